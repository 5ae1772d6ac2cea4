"""Cost of an MBTSAD distillation step against a plain fine-tuning step of the same model on
the same batches, in one process: samples/s of

  fine-tuning (sdpa)   cross-entropy step, the attention kernel a plain fine-tune uses
  fine-tuning (eager)  the same step with eager attention (what distillation must use)
  distillation         teacher forward (no grad) + student forward with attentions and hidden
                       states + L = alpha L_at + beta L_hid + L_ce, backward, AdamW step

Rounds alternate the three so that drifts of a shared CPU hit all of them alike; steady-state
rates skip the first --warmup steps of each round.

    python scripts/bench_distillation.py --steps 30 --repeats 2     # MiniLM-L6, SST-2 token-split
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mitigate.data import BackdoorDataModule
from mitigate.data.token_split import TokenSplit
from mitigate.mitigations.mbtsad.distillation import DistillationLoss
from mitigate.loading import load_classifier


def run(step, batches: list[dict], warmup: int) -> float:
    times = []
    for b in batches:
        step(b)
        times.append(time.perf_counter())
    n = sum(len(b["labels"]) for b in batches[warmup + 1 :])
    return n / (times[-1] - times[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)

    dm = BackdoorDataModule(
        args.data, tokenizer=args.model, train_set="clean_subset", batch_size=args.batch_size, token_split=TokenSplit()
    )
    dm.setup("fit")
    batches = [b for _, b in zip(range(args.steps), dm.train_dataloader())]
    n_labels = dm.num_classes
    models = {
        "sdpa": load_classifier(args.model, num_labels=n_labels),
        "eager": load_classifier(args.model, num_labels=n_labels, attn_implementation="eager"),
    }
    init = copy.deepcopy(models["eager"].state_dict())
    teacher = copy.deepcopy(models["eager"]).eval()
    loss_fn = DistillationLoss(alpha=1.0, beta=1.0)

    def finetune(model):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)

        def step(b):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    def distill(model):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)

        def step(b):
            kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      output_attentions=True, output_hidden_states=True)
            with torch.no_grad():
                t_out = teacher(**kw)
            loss = loss_fn(t_out, model(**kw), b["labels"], b["attention_mask"])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    rates: dict[str, list[float]] = {"fine-tuning (sdpa)": [], "fine-tuning (eager)": [], "distillation": []}
    for r in range(args.repeats):
        for name, model, make in (
            ("fine-tuning (sdpa)", models["sdpa"], finetune),
            ("fine-tuning (eager)", models["eager"], finetune),
            ("distillation", models["eager"], distill),
        ):
            model.load_state_dict(init)
            model.train()
            rates[name].append(run(make(model), batches, args.warmup))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items()) + " samples/s", flush=True)

    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    print(f"\nmodel {args.model}, {args.steps} token-split SST-2 batches of {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print("| step | samples/s | time per step vs fine-tuning (sdpa) |\n| --- | --- | --- |")
    for k, v in mean.items():
        print(f"| {k} | {v:.2f} | {mean['fine-tuning (sdpa)'] / v:.2f}x |")
    print(f"distillation step / fine-tuning step: {mean['fine-tuning (sdpa)'] / mean['distillation']:.2f}x "
          f"(target <= 1.6x); vs eager fine-tuning {mean['fine-tuning (eager)'] / mean['distillation']:.2f}x")


if __name__ == "__main__":
    main()
