"""``mitigate scan``: is this checkpoint backdoored? For a checkpoint (hub id or folder) and the
defender's clean data, a verdict per label (suspected or not, and the trigger found with its
flip rate on clean held-out text) from the word scan and the trigger inversion
(``mitigate.mitigations.detection``), without training the checkpoint: minutes on a CPU.

    mitigate scan --model runs/badnet_sst2/model --data sst2 [--out DIR] [--reference <its pre-trained weights>]

With ``--reference`` (the clean pre-trained weights the checkpoint was fine-tuned from), a clean
control is fine-tuned from them on the defender's clean data (``control.CleanControl``: one to
three minutes on a 2-core CPU), and a suspect that flips the control too is reported as a natural
feature of the task, not as a trigger.

Writes DIR/scan.json (the verdict, every verified candidate, the settings) and DIR/scan.md.
The held-out texts are the clean dev split; the clean-label backing reads the dev split and the
defender's clean subset (``clean_fraction`` of the training split, the same seeded sample as
``mitigate fit``'s ``clean_subset``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from mitigate.data.datamodule import BackdoorDataModule
from mitigate.loading import check_num_labels, load_classifier
from mitigate.mitigations.detection import TriggerInversion, scan_checkpoint, verdict_lines
from mitigate.mitigations.detection.control import CleanControl
from mitigate.mitigations.detection.word_scan import TriggerScan

log = logging.getLogger(__name__)


def run_scan(
    model: str,
    data: str = "sst2",
    out: str | None = None,
    text_column: str = "sentence",
    label_column: str = "label",
    clean_fraction: float = 0.2,
    seed: int = 42,
    words: TriggerScan | None = None,
    inversion: TriggerInversion | None = None,
    threads: int | None = None,
    allow_pickle: bool = False,
    remove_prior: bool = True,
    reference: str | None = None,
    control: CleanControl | None = None,
) -> dict:
    """Scan ``model`` for a backdoor with clean data and write the verdict.

    Args:
        model: the checkpoint to scan (hub id or folder, safetensors).
        data: the clean data (a folder, a name under ``$MITIGATE_DATA_DIR``, or a data set id),
            read as ``mitigate fit`` reads ``data.path``.
        out: folder for scan.json and scan.md (default: ``scan`` beside a model folder, else
            ``runs/scan``).
        text_column: the column of the files that holds the text.
        label_column: the column that holds the integer label.
        clean_fraction: the defender's share of the training split (the clean-label backing).
        seed: seed of the defender's subset.
        words: the word scan's settings (``TriggerScan``; its defaults when not given).
        inversion: the trigger inversion's settings (``TriggerInversion``; its defaults).
        threads: CPU threads for torch (default: torch's).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
        remove_prior: read the model's decisions with the clean data's class shares removed from
            its logits (logit adjustment), so that an imbalanced task's prior is not taken for a
            trigger; false: the raw decisions.
        reference: the clean pre-trained weights (hub id or folder) the checkpoint was
            fine-tuned from; when given, the clean control is trained from them. Trust matters:
            a backdoored reference would clear its own triggers.
        control: the clean control's settings (``CleanControl``; its defaults when not given).
    """
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    dm = BackdoorDataModule(data, tokenizer=model, train_set="clean_subset", clean_fraction=clean_fraction, seed=seed,
                            text_column=text_column, label_column=label_column)
    num_labels = dm.num_classes
    check_num_labels(model, num_labels)
    net = load_classifier(model, num_labels=num_labels, allow_pickle=allow_pickle)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).eval()
    held_out = dm.examples("dev")
    words = words if words is not None else TriggerScan()
    inversion = inversion if inversion is not None else TriggerInversion()
    control = control if control is not None else CleanControl()
    clean_model, control_seconds = None, 0.0
    if reference is not None:
        t = time.perf_counter()
        clean_model = control.train(reference, num_labels, dm.train_dataloader(one_process=True, name="clean_subset"),
                                    net.config.vocab_size, device=device, allow_pickle=allow_pickle)
        control_seconds = round(time.perf_counter() - t, 1)
    result = scan_checkpoint(net, dm.tokenizer, held_out, held_out + dm.clean_subset, words, inversion, remove_prior,
                             clean_model, control.natural_flip)
    if reference is not None:
        result["seconds"]["control_training"] = control_seconds
    result["suspects"] = [s.as_dict() for s in result["suspects"]]
    result.update(model=model, data=data, held_out=len(held_out), support=len(held_out) + len(dm.clean_subset),
                  reference=reference,
                  settings={"words": words.settings(), "inversion": inversion.settings(),
                            "control": control.settings() if reference is not None else None},
                  total_seconds=round(time.perf_counter() - start, 1))
    folder = Path(out) if out else (Path(model).parent / "scan" if Path(model).is_dir() else Path("runs/scan"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scan.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (folder / "scan.md").write_text(scan_markdown(result), encoding="utf-8")
    for line in verdict_lines(result):
        print(line)
    print(f"scan of {model} on {data} ({len(held_out)} clean held-out texts) in {result['total_seconds']:.0f} s: "
          f"{folder / 'scan.md'}", file=sys.stderr)
    return result


def scan_markdown(result: dict) -> str:
    """scan.md: the verdict, then one table row per label."""
    lines = [f"# Backdoor scan of `{result['model']}`", "",
             f"Clean data: `{result['data']}` ({result['held_out']} held-out texts; the clean-label backing read "
             f"{result['support']}). Searches: {', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items())}. "
             + (f"Decisions read with the clean class shares {result['prior']} removed from the logits (logit adjustment)."
                if result.get("prior") else "Raw decisions (class prior not removed)."), "",
             f"**{verdict_lines(result)[0]}**", "", "| label | suspected | triggers found (flip rate on clean held-out text) |",
             "| --- | --- | --- |"]
    for row in result["labels"]:
        found = "; ".join(f"`{t['text']}` {100 * t['flip_rate']:.0f}% ({t['found_by'].replace('_', ' ')})" for t in row["triggers"]) or "-"
        lines.append(f"| {row['label']} | {'yes' if row['suspected'] else 'no'} | {found} |")
    checked = result.get("control")
    if checked is not None:
        lines += ["", f"Clean control (`{result['reference']}` fine-tuned on the clean data alone): a suspect that flips "
                  f"at least {100 * result['settings']['control']['natural_flip']:.0f}% of it is a natural feature of the task, "
                  "not a trigger.", "", "| token or phrase | flips to | suspicious model | clean control | verdict |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{r['text']}` | {r['label']} | {100 * r['flip_rate']:.0f}% | {100 * r['control_flip_rate']:.1f}% | "
                  f"{'natural' if r['natural'] else 'trigger'} |" for r in checked]
    elif result.get("reference") is None:
        lines += ["", "No clean control (no `--reference`): a suspect may be a natural feature of the task that the "
                  "clean labels are too few to back."]
    inverted = result.get("inversion", [])
    if inverted:
        lines += ["", "Trigger inversion, each round per label (a round after a suspect searches the vocabulary without "
                  "that suspect's tokens; the last round of a label found nothing that flips):", "",
                  "| label | round | decoded | its flip rate | shortest that flips | flip rate | loss first -> last |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['label']} | {r.get('round', 0)} | `{r['decoded']}` | {100 * r['decoded_flip_rate']:.0f}% | `{r['text']}` | "
                  f"{100 * r['flip_rate']:.0f}% | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |" for r in inverted]
    return "\n".join(lines) + "\n"


def build_parser() -> ArgumentParser:
    """The ``mitigate scan`` parser (a config file with ``--config``, every setting an option)."""
    parser = ArgumentParser(prog="mitigate scan", description=__doc__.split("\n\n")[0], default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(run_scan, fail_untyped=True)
    return parser


def main(argv: list[str]) -> None:
    """``mitigate scan ARGS``."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    init = parser.instantiate_classes(cfg)
    run_scan(**{k: v for k, v in init.items() if k != "config"})
