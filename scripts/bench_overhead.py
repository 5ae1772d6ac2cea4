"""Lightning overhead of `mitigate fit`: training samples/s of the TextClassifier under the
Lightning Trainer (as `mitigate fit` runs it: logging, progress bar, checkpoints every 50 steps)
against a bare PyTorch loop, on the same model, the same initial weights and the same batches,
in one process. Steady-state throughput skips the first `--warmup` steps of each.

    python scripts/bench_overhead.py --steps 40        # MiniLM-L6 on SST-2 (BadNet mix)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import lightning.pytorch as pl
import torch

from mitigate.data import BackdoorDataModule
from mitigate.attacks import BadNet
from mitigate.classifier import TextClassifier


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


def steady_rate(times: list[float], warmup: int, batch_size: int) -> float:
    return (len(times) - 1 - warmup) * batch_size / (times[-1] - times[warmup])


def bare_loop(model: torch.nn.Module, batches: list[dict], lr: float) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / len(batches))
    times = []
    for b in batches:
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="alternating bare/Lightning rounds")
    args = ap.parse_args()
    torch.manual_seed(0)

    dm = BackdoorDataModule(args.data, tokenizer=args.model, poisoner=BadNet(), batch_size=args.batch_size)
    dm.setup("fit")
    batches = [b for _, b in zip(range(args.steps), dm.train_dataloader())]
    module = TextClassifier(args.model, num_labels=dm.num_classes)
    init = copy.deepcopy(module.model.state_dict())

    bare, lit = [], []
    for r in range(args.repeats):
        module.model.load_state_dict(init)
        bare.append(steady_rate(bare_loop(module.model, batches, module.hparams.lr), args.warmup, args.batch_size))

        module.model.load_state_dict(init)
        timer = StepTimes()
        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(
                max_epochs=1, limit_train_batches=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                default_root_dir=root, callbacks=[timer, pl.callbacks.ModelCheckpoint(save_last=True, every_n_train_steps=50)],
                enable_model_summary=False, accelerator="cpu", devices=1,
            )
            t0 = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            total = time.perf_counter() - t0
        lit.append(steady_rate(timer.times, args.warmup, args.batch_size))
        print(f"round {r}: bare {bare[-1]:.2f} samples/s, Lightning {lit[-1]:.2f} samples/s "
              f"(fit() wall {total:.1f} s for {args.steps} steps)", flush=True)

    b, l = sum(bare) / len(bare), sum(lit) / len(lit)
    print(f"\nmodel {args.model}, {args.steps} batches of {args.batch_size}, {torch.get_num_threads()} threads")
    print("| loop | samples/s |\n| --- | --- |")
    print(f"| bare PyTorch | {b:.2f} |\n| Lightning (mitigate fit) | {l:.2f} |")
    print(f"Lightning overhead: {100 * (b / l - 1):+.1f}% time per sample (target <= 10%)")


if __name__ == "__main__":
    main()
