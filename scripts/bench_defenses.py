"""Speed of the test-time defenses, in one process, on the same model and samples.

For each defense: samples/s, model passes per sample, and the ratio of its time to the time
of the same number of plain batched forward passes over the same samples (the floor; a
backward pass counts as one pass). Then the batched IMBERT and ONION against the way the
reference implementations run them: IMBERT one sample per pass; ONION one LM pass per
variant, and one sentence (all its variants) per batch.

The defenses run through the callbacks' own per-batch code (``defend``), on batches of
test-set samples sorted by length as in a `mitigate test` run. Each timing is the best of
``--repeats`` rounds (rounds alternate the modes, so drifts of a shared CPU hit all alike).

Then (``--options``, on by default) each defense's options against its exact path, every one
calibrated on the same clean dev subset and run on the same test samples in this process:
samples/s, the speed ratio to the exact path, the detection (FRR / FAR / AUROC) or correction
(CACC / ASR) numbers, and the share of samples whose decision equals the exact path's. Beside
each option, on the device it ran on: its pass-count floor (every model and LM call the option
made is recorded, shapes and masks, and replayed as plain forward passes under the same
precision; a call that was back-propagated counts twice) and ``time / floor``; on a GPU also
the share of the option's wall time that the device spent in kernels (``gpu_busy``, from
torch.profiler on a second, untimed run).

    python scripts/bench_defenses.py                       # BadNet victim, 128 clean + 128 poisoned
    python scripts/bench_defenses.py --model runs/insertsent_sst2/model --onion-samples 16
    python scripts/bench_defenses.py --skip-floor --option-samples 100 --calib-samples 300
    python scripts/bench_defenses.py --device cuda --skip-floor --option-samples 200   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mitigate.defenses import IMBERT, ONION, RAP, STRIP
from mitigate.inference import classify_texts
from mitigate.data import BackdoorDataModule
from mitigate.data.encoding import EncodedDataset, PadCollator
from mitigate.attacks import BadNet
from mitigate.defenses.onion import onion_variants
from mitigate.defenses.perplexity import encode_for_lm, perplexities, sequence_nll
from mitigate.metrics import CorrectionMetrics, DetectionMetrics
from mitigate.loading import load_classifier
from mitigate.loading import load_causal_lm


def batches_of(examples, tok, batch_size: int) -> list[tuple[dict, list[str]]]:
    """(batch, texts) pairs, shortest samples first, as the test loader makes them."""
    ds = EncodedDataset(examples, tok, 128)
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    collate = PadCollator(tok.pad_token_id)
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate([ds[i] for i in idx])
        batch["index"] = torch.tensor(idx)
        out.append((batch, [examples[i].text for i in idx]))
    return out


class PassRecorder:
    """Records every forward call of the given modules while active: the module, the shape of
    its ``input_ids`` (or of ``inputs_embeds`` without the hidden axis), its attention mask and
    whether autograd was recording (a backward pass follows such a call)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.modules = [m for m in modules if m is not None]
        self.calls: list[tuple[torch.nn.Module, tuple[int, int], torch.Tensor | None, bool]] = []
        self._handles = []

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        mask = kwargs.get("attention_mask")
        self.calls.append((module, tuple(ids.shape), None if mask is None else mask.detach().clone(), torch.is_grad_enabled()))

    def __enter__(self) -> "PassRecorder":
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def passes(self) -> int:
        """Forward passes, a back-propagated call counted twice."""
        return sum(2 if grad else 1 for *_, grad in self.calls)


@torch.no_grad()
def replay(calls, device) -> None:
    """The recorded calls as plain forward passes (token id 0 in every position, the recorded
    mask), a back-propagated call run twice. A call that ran on a key/value cache (ONION's
    prefix cache: a mask longer than its input) is replayed as its new tokens alone, without
    the cache, so its floor leaves out the attention to the cached prefix."""
    for module, shape, mask, grad in calls:
        ids = torch.zeros(shape, dtype=torch.long, device=device)
        if mask is not None and mask.shape[-1] != shape[-1]:
            mask = mask[..., -shape[-1]:]
        for _ in range(2 if grad else 1):
            module(input_ids=ids, attention_mask=mask)


def gpu_busy(fn) -> float:
    """Share of ``fn``'s wall time the GPU spent in kernels (torch.profiler)."""
    from torch.profiler import profile, ProfilerActivity

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return kernel_us / 1e6 / wall


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/badnet_sst2/model", help="victim folder (recipes/badnet_sst2.yaml exports it)")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--samples", type=int, default=128, help="clean and poisoned test samples each")
    ap.add_argument("--onion-samples", type=int, default=16, help="clean and poisoned samples each for ONION")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lm", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--lm-batch-size", type=int, default=64)
    ap.add_argument("--strip-copies", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_defenses.json")
    ap.add_argument("--skip-floor", action="store_true", help="only the options section")
    ap.add_argument("--no-options", action="store_true", help="only the floor section")
    ap.add_argument("--option-samples", type=int, default=100, help="clean and poisoned samples each (options section)")
    ap.add_argument("--option-onion-samples", type=int, default=16, help="clean and poisoned samples each for ONION (options)")
    ap.add_argument("--calib-samples", type=int, default=300, help="clean dev samples every option calibrates on")
    ap.add_argument("--groups", nargs="*", default=None, help="only these defenses in the options section (IMBERT-G RAP STRIP ONION)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="only the options whose label starts with one of these words (the exact path runs first and again last)")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                    help="the classifier's attention in the options section (sdpa: what `mitigate test` loads)")
    ap.add_argument("--no-gpu-busy", action="store_true", help="on a GPU, skip the profiled second run of each option")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (options section only: on a GPU the int8 options, "
                    "which are CPU-only, give way to the trainer's bf16-mixed precision)")
    args = ap.parse_args()
    if args.device != "cpu" and not args.skip_floor:
        ap.error("--device: the floor section runs on the CPU; add --skip-floor")
    torch.manual_seed(0)
    poisoner = BadNet(triggers=["cf", "mn", "bb", "tq"], num_triggers=[1], target_label=1)
    dm = BackdoorDataModule(args.data, tokenizer=args.model, poisoner=poisoner)
    rng = random.Random(0)
    pick = lambda xs, k: [xs[i] for i in sorted(rng.sample(range(len(xs)), min(k, len(xs))))]  # noqa: E731
    clean, poisoned = dm.examples("test"), dm.examples("test_poisoned")
    examples = pick(clean, args.samples) + pick(poisoned, args.samples)
    onion_examples = pick(clean, args.onion_samples) + pick(poisoned, args.onion_samples)
    tok = dm.tokenizer
    # the floor section's passes use eager attention; the options section the one `mitigate test` loads
    model = load_classifier(args.model, attn_implementation=args.attention if args.skip_floor else "eager").eval()
    batches = batches_of(examples, tok, args.batch_size)
    singles = batches_of(examples, tok, 1)
    n = len(examples)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tok, hparams=SimpleNamespace(max_length=128)))
    module = SimpleNamespace(model=model, device=torch.device("cpu"))

    # -- defenses, set up as their calibration would leave them (thresholds do not change the cost)
    imbert = IMBERT(batch_size=args.batch_size)
    imbert.metric, imbert.rows = CorrectionMetrics(extra=("precision", "removed")), []
    rap = RAP(batch_size=args.batch_size)
    rap.label, rap.word_id = 1, tok("jj", add_special_tokens=False)["input_ids"][0]
    rap.row, rap.threshold = model.get_input_embeddings().weight.data[rap.word_id].clone(), 0.0
    rap.metric, rap.rows = DetectionMetrics(), []
    strip = STRIP(copies=args.strip_copies, batch_size=256)
    held = dm.examples("dev")
    strip.all_words = [w for ex in held for w in ex.text.split()]
    strip.pools = {c: [w for ex in held if ex.label != c for w in ex.text.split()] for c in (0, 1)}
    strip.threshold, strip.metric, strip.rows = 0.0, DetectionMetrics(), []

    def run_all(defense, bs):
        def go():
            defense.rows = []
            with torch.no_grad():
                for b, texts in bs:
                    defense.defend(trainer, module, b, texts)
        return go

    @torch.no_grad()
    def forward_all():
        for b, _ in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    modes = {
        "floor: plain forward": (forward_all, 1),
        "IMBERT-G batched": (run_all(imbert, batches), 3),
        "IMBERT-G one sample per pass": (run_all(imbert, singles), 3),
        "RAP": (run_all(rap, batches), 2),
        f"STRIP (N={args.strip_copies})": (run_all(strip, batches), args.strip_copies + 1),
    }
    if not args.no_options:
        if args.attention != model.config._attn_implementation:
            model = load_classifier(args.model, attn_implementation=args.attention).eval()
        options = bench_options(args, dm, model, tok)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_name("bench_defense_options.json").write_text(json.dumps(options, indent=2))
    if args.skip_floor:
        return
    times: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (fn, _) in modes.items():
            t = timed(fn)
            times[name] = min(times.get(name, float("inf")), t)
            print(f"  {name}: {t:.2f} s", flush=True)

    # -- ONION: its own (smaller) sample, LM passes
    lm, lm_tok = load_causal_lm(args.lm)
    onion = ONION(lm=args.lm, lm_batch_size=args.lm_batch_size)
    onion.lm, onion.lm_tokenizer, onion._target = lm, lm_tok, 1
    onion.metric, onion.rows = CorrectionMetrics(), []
    o_batches = batches_of(onion_examples, tok, args.batch_size)
    texts = [ex.text for ex in onion_examples]
    variants = [[t, *onion_variants(t)] for t in texts]
    n_variants = sum(len(v) for v in variants)
    pad = lm_tok.pad_token_id

    def onion_per_sentence():
        for v in variants:  # all variants of one sentence in one batch
            perplexities(lm, lm_tok, v, batch_size=len(v))

    def onion_per_variant():
        for seq in encode_for_lm(lm_tok, [x for v in variants for x in v]):  # one LM pass per variant
            sequence_nll(lm, [seq], pad)

    lm_floor_seqs = sorted((s for t, v in zip(encode_for_lm(lm_tok, texts), variants) for s in [t] * len(v)), key=len)

    @torch.no_grad()
    def onion_floor():  # the same number of LM passes over the original sentences, batched
        for s in range(0, len(lm_floor_seqs), args.lm_batch_size):
            sequence_nll(lm, lm_floor_seqs[s : s + args.lm_batch_size], pad)
        classify_texts(model, tok, texts, args.batch_size, 128)
        classify_texts(model, tok, texts, args.batch_size, 128)

    onion_modes = {
        "floor: plain LM forward": onion_floor,
        "ONION batched (packed)": run_all(onion, o_batches),
        "ONION one sentence per batch": onion_per_sentence,
        "ONION one pass per variant": onion_per_variant,
    }
    for _ in range(args.repeats):
        for name, fn in onion_modes.items():
            t = timed(fn)
            times[name] = min(times.get(name, float("inf")), t)
            print(f"  {name}: {t:.2f} s", flush=True)

    floor = times["floor: plain forward"]
    n_o = len(onion_examples)
    rows = []
    for name, (_, passes) in modes.items():
        if name.startswith("floor"):
            continue
        rows.append((name, n, n / times[name], passes, times[name] / (passes * floor)))
    lm_passes = n_variants / n_o
    for name in ("ONION batched (packed)", "ONION one sentence per batch", "ONION one pass per variant"):
        rows.append((name, n_o, n_o / times[name], lm_passes, times[name] / times["floor: plain LM forward"]))
    print(f"\nMiniLM victim {args.model}; {n} test samples ({args.samples} clean + {args.samples} poisoned), "
          f"batch {args.batch_size}; ONION: {n_o} samples, {args.lm}, LM batch {args.lm_batch_size}; "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")
    print("| defense | samples | samples/s | passes/sample | time / floor |")
    print("|---|---|---|---|---|")
    for name, k, sps, passes, ratio in rows:
        print(f"| {name} | {k} | {sps:.1f} | {passes:.1f} | {ratio:.2f} |")
    speedups = {
        "IMBERT-G batched vs one sample per pass": times["IMBERT-G one sample per pass"] / times["IMBERT-G batched"],
        "ONION batched vs one pass per variant": times["ONION one pass per variant"] / times["ONION batched (packed)"],
        "ONION batched vs one sentence per batch": times["ONION one sentence per batch"] / times["ONION batched (packed)"],
    }
    for k, v in speedups.items():
        print(f"{k}: {v:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"times_s": times, "rows": rows, "speedups": speedups, "args": vars(args)}, indent=2))


# -- options against the exact path --------------------------------------------------------------
def fake_trainer(dm, root: str, precision: str | None = None, device: str = "cpu"):
    """What a defense's calibrate / defend read from a trainer, for one process; ``precision``
    (e.g. ``bf16-mixed``) gives it Lightning's own precision plugin, as ``--trainer.precision`` would."""
    if precision is None:
        plugin = SimpleNamespace(forward_context=contextlib.nullcontext)
    else:
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = MixedPrecision(precision, torch.device(device).type)
    return SimpleNamespace(datamodule=dm, world_size=1, global_rank=0, is_global_zero=True, default_root_dir=root,
                           precision_plugin=plugin)


def decisions(defense) -> dict:
    key = "flagged" if "flagged" in (defense.rows[0] if defense.rows else {}) else "defended_pred"
    return {(r["poisoned"], r["index"]): r[key] for r in defense.rows}


def bench_options(args, dm, model, tok) -> list[dict]:
    """Each defense option calibrated on the same dev subset and run on the same test samples;
    speed and decisions against the defense's exact path (the first entry of its group)."""
    rng = random.Random(1)
    dev = dm.examples("dev")
    dev = [dev[i] for i in sorted(rng.sample(range(len(dev)), min(args.calib_samples, len(dev))))]
    sets = {False: dm.dataset("test"), True: dm.dataset("test_poisoned")}
    device = torch.device(args.device)
    model.to(device)

    def test_batches(k: int, batch_size: int):
        out = []
        for poisoned, ds in sets.items():
            idx = sorted(random.Random(f"opt-{poisoned}").sample(range(len(ds)), min(k, len(ds))))
            idx.sort(key=lambda i: len(ds.input_ids[i]))
            collate = PadCollator(tok.pad_token_id)
            for s in range(0, len(idx), batch_size):
                b = collate([ds[i] for i in idx[s : s + batch_size]])
                b["index"] = torch.tensor(idx[s : s + batch_size])
                b["poisoned"] = torch.full((len(b["index"]),), poisoned)
                b = {key: v.to(device) for key, v in b.items()}  # as the test loop hands them over
                out.append((b, [ds.examples[i].text for i in idx[s : s + batch_size]]))
        return out

    strip_args = dict(copies=args.strip_copies, ratio=0.5, frr=1.0)
    rap_args = dict(word="jj", frr=1.0, lr=1.0, epochs=15, c_low=0.1, c_up=0.3)
    groups = {
        "IMBERT-G": [
            ("exact (batch 64)", lambda: IMBERT(saliency="gradient", k=3, max_cacc_drop=1.0), 64),
            ("bf16", lambda: IMBERT(saliency="gradient", k=3, max_cacc_drop=1.0, precision="bf16"), 64),
            ("naive: one sample per pass", lambda: IMBERT(saliency="gradient", k=3, max_cacc_drop=1.0, batch_size=1), 1),
        ],
        "RAP": [
            ("exact (sgd, lr 1.0, 15 epochs)", lambda: RAP(**rap_args), 64),
            ("bf16", lambda: RAP(**rap_args, precision="bf16"), 64),
            ("int8", lambda: RAP(**rap_args, precision="int8"), 64),
            ("reference rule: accumulate, lr 1e-2, 5 epochs", lambda: RAP(**{**rap_args, "lr": 1e-2, "epochs": 5}, update="accumulate"), 64),
        ],
        "STRIP": [
            (f"exact (N {args.strip_copies}, batch 32)", lambda: STRIP(**strip_args), 64),
            ("copies re-tokenised as text (token_ids: false, the path before)", lambda: STRIP(**strip_args, token_ids=False), 64),
            ("early stop", lambda: STRIP(**strip_args, early_stop=True), 64),
            ("early stop + bf16", lambda: STRIP(**strip_args, early_stop=True, precision="bf16"), 64),
            ("early stop (min 10, z 3) + bf16", lambda: STRIP(**strip_args, early_stop=True, min_copies=10, z=3.0, precision="bf16"), 64),
            ("bf16", lambda: STRIP(**strip_args, precision="bf16"), 64),
            ("bf16, batch 128", lambda: STRIP(**strip_args, precision="bf16", batch_size=128), 64),
            ("bf16, batch 256", lambda: STRIP(**strip_args, precision="bf16", batch_size=256), 64),
            ("int8", lambda: STRIP(**strip_args, precision="int8"), 64),
            ("pool: any class", lambda: STRIP(**strip_args, pool="any"), 64),
            ("batch 256", lambda: STRIP(**strip_args, batch_size=256), 64),
            ("naive: one input's copies per pass", lambda: STRIP(**strip_args, batch_size=args.strip_copies), 1),
        ],
        "ONION": [
            ("exact (prefix cache)", lambda: ONION(lm=args.lm, lm_batch_size=args.lm_batch_size), 64),
            ("batched, every variant from scratch", lambda: ONION(lm=args.lm, lm_batch_size=args.lm_batch_size, prefix_cache=False), 64),
            ("bf16", lambda: ONION(lm=args.lm, lm_batch_size=args.lm_batch_size, precision="bf16"), 64),
            ("int8", lambda: ONION(lm=args.lm, lm_batch_size=args.lm_batch_size, precision="int8"), 64),
            ("naive: one sentence per batch", lambda: ONION(lm=args.lm, lm_batch_size=1_000_000, prefix_cache=False), 1),
        ],
    }
    if device.type != "cpu":  # int8 is CPU-only; on a GPU the trainer's precision is the other way to bf16
        for group, options in groups.items():
            options[:] = [o for o in options if o[0] != "int8"]
            options.insert(2, ("trainer precision bf16-mixed", options[0][1], options[0][2], "bf16-mixed"))
    module = SimpleNamespace(model=model, device=device)
    # warm-up: allocator, kernels (and on a GPU the CUDA context and autotuning) are paid here, not by the first option timed
    warm = test_batches(8 if device.type == "cuda" else 2, 64)
    for bf16 in ((False, True) if device.type == "cuda" else (False,)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for b, _ in warm:
                emb = model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
                model(inputs_embeds=emb, attention_mask=b["attention_mask"]).logits.sum().backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    trainers = {None: fake_trainer(dm, str(Path(args.out).parent))}
    results = []
    lm_cache = {}
    for group, options in groups.items():
        if args.groups and group not in args.groups:
            continue
        k = args.option_onion_samples if group == "ONION" else args.option_samples
        exact = None
        if args.only:
            options = (options[:1] + [o for o in options[1:] if o[0].split()[0] in args.only]
                       + [("exact again (the run-to-run noise)", *options[0][1:])])
        for label, make, batch_size, *trainer_precision in options:
            precision = trainer_precision[0] if trainer_precision else None
            if precision not in trainers:
                trainers[precision] = fake_trainer(dm, str(Path(args.out).parent), precision, args.device)
            trainer = trainers[precision]
            d = make()
            d.held_out = lambda trainer, dev=dev: dev
            if group == "ONION":  # one LM load for the group (int8 quantises its own copy)
                if "lm" not in lm_cache:
                    lm_cache["lm"] = load_causal_lm(args.lm)
                d.lm, d.lm_tokenizer = lm_cache["lm"]
                if d.precision == "int8":
                    from mitigate.defenses.base import int8_dynamic

                    d.lm = int8_dynamic(d.lm)
            start = time.perf_counter()
            d.on_test_start(trainer, module)
            calib = time.perf_counter() - start
            batches = test_batches(k, batch_size)

            def run_defense():
                with torch.inference_mode(), d.passes(trainer, module.device):  # as the test loop runs them
                    for b, texts in batches:
                        d.defend(trainer, module, b, texts)

            with PassRecorder(d.model(module), getattr(d, "lm", None)) as rec:  # int8: the quantised copies
                start = time.perf_counter()
                run_defense()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
            start = time.perf_counter()
            with d.passes(trainer, module.device):
                replay(rec.calls, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            floor = time.perf_counter() - start
            m, dec = d.metric.compute(), decisions(d)
            copies = d.used_sum / d.used_n if getattr(d, "used_n", 0) else None
            busy = None
            if device.type == "cuda" and not args.no_gpu_busy:  # a second run, read for its kernel time only
                busy = round(100 * gpu_busy(run_defense), 1)
            m = {key: round(float(v) * (100 if key != "removed" else 1), 2) for key, v in m.items()}
            row = {"defense": group, "option": label, "samples": 2 * k, "samples_per_s": round(2 * k / wall, 2),
                   "calib_s": round(calib, 1), "passes": rec.passes(), "floor_samples_per_s": round(2 * k / floor, 2),
                   "time_over_floor": round(wall / floor, 2), **m}
            if busy is not None:
                row["gpu_busy"] = busy
            if copies is not None:
                row["copies_used"] = round(copies, 2)
            if exact is None:
                exact = (row, dec)
                row["speedup"], row["agreement"] = 1.0, 100.0
            else:
                row["speedup"] = round(row["samples_per_s"] / exact[0]["samples_per_s"], 2)
                row["agreement"] = round(100 * sum(dec[x] == exact[1].get(x) for x in dec) / max(1, len(dec)), 2)
            results.append(row)
            print(f"  {group} / {label}: {row}", flush=True)
    cols = ["samples_per_s", "floor_samples_per_s", "time_over_floor", "gpu_busy", "speedup", "agreement", "frr", "far", "auroc", "cacc", "asr", "copies_used", "calib_s"]
    print(f"\nOptions against the exact path ({model.name_or_path}; {args.calib_samples} dev samples for every calibration; "
          f"{torch.get_num_threads() if device.type == 'cpu' else torch.cuda.get_device_name(device)}"
          f"{' threads' if device.type == 'cpu' else ''}; rates in %)")
    print("| defense | option | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in results:
        print(f"| {r['defense']} | {r['option']} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return results


if __name__ == "__main__":
    main()
