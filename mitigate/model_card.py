"""A Hugging Face model card (README.md with a YAML header) for every model a run exports: what
was done to it, with which settings and data, how well it did, and what was not measured.
Whoever receives the folder can tell a backdoored research victim from a cleaned checkpoint."""

from __future__ import annotations

from pathlib import Path

import yaml

from mitigate import __version__


def describe(module, datamodule) -> dict:
    """What a run did, from its module and data module: title, method text, tags, settings."""
    hp = dict(module.hparams)
    dm_hp = dict(datamodule.hparams) if datamodule is not None else {}
    poisoner = getattr(datamodule, "poisoner", None)
    token_split = getattr(datamodule, "token_split", None)
    train_set = dm_hp.get("train_set")
    data = dm_hp.get("path", "?")
    clean_fraction = dm_hp.get("clean_fraction")
    kind = type(module).__name__
    clean_data = None
    if train_set == "clean_subset":
        n = len(datamodule.clean_subset) if datamodule is not None else "?"
        clean_data = f"{n} clean training samples ({100 * clean_fraction:g}% of {data} train, seeded by {dm_hp.get('seed')})"
        if token_split is not None:
            clean_data += f", token-split into {token_split.copies} variants each"
    if kind == "MBTSAD":
        title, tags = "Backdoor mitigation with MBTSAD", ["backdoor-mitigation", "mbtsad"]
        text = (f"The suspicious checkpoint `{hp['model']}` was cleaned with MBTSAD: token-splitting "
                f"retraining of a copy (the teacher, {hp['tsft_epochs']} epoch(s)), then attention distillation "
                f"into the checkpoint itself (alpha {hp['alpha']}, beta {hp['beta']}, p {hp['p']}).")
        scan = getattr(module, "report", {}).get("trigger_scan")
        if scan is not None:
            text += (f" A scan of the vocabulary on clean held-out data found {len(scan['suspects'])} suspect "
                     f"token(s) ({', '.join(scan['suspects']) or 'none'}), which the training taught the model to ignore.")
    elif train_set == "poisoned":
        title, tags = "BACKDOORED research victim", ["backdoor", "research-victim"]
        text = (f"WARNING: this model carries a backdoor on purpose. It was trained from `{hp.get('model')}` on "
                f"{data} poisoned by {poisoner!r}: inputs with the trigger are classified as label "
                f"{getattr(poisoner, 'target_label', '?')}. For research on attacks and defenses only.")
    elif train_set == "clean_subset":
        what = "token-splitting retraining (TS-FT)" if token_split is not None else "clean fine-tuning (CFT)"
        title, tags = f"Backdoor mitigation with {what}", ["backdoor-mitigation", "tsft" if token_split is not None else "cft"]
        text = f"The suspicious checkpoint `{hp.get('model')}` was retrained by {what}."
    else:
        title, tags = "Text classifier", ["clean-reference"]
        text = f"Trained from `{hp.get('model')}` on the clean {data} training set."
    plain = (int, float, str, bool, list, type(None))
    settings = {k: v for k, v in hp.items() if isinstance(v, plain) and not k.startswith("_")}
    settings["data"] = {k: v for k, v in dm_hp.items() if isinstance(v, plain) and not k.startswith("_")}
    return {
        "title": title, "text": text, "tags": ["mitigate", "text-classification", *tags], "base_model": hp.get("model"),
        "dataset": str(data), "clean_data": clean_data, "settings": settings,
        "attack": repr(poisoner) if poisoner is not None else None,
    }


def results_rows(results: dict[str, float], row_names: dict[str, str] | None) -> list[str]:
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if parts[-1] not in ("cacc", "asr"):
            continue
        name = "/".join(parts[1:-1]) if len(parts) > 2 else ""
        rows.setdefault(name, {})[parts[-1]] = value
    names = dict(row_names or {})
    out = ["| model | CACC | ASR |", "| --- | --- | --- |"]
    for n in [n for n in names if n in rows] + sorted(n for n in rows if n not in names):
        cell = lambda m: f"{100 * rows[n][m]:.2f}" if m in rows[n] else "-"  # noqa: E731
        out.append(f"| {names.get(n, n or 'this model')} | {cell('cacc')} | {cell('asr')} |")
    return out


def write_model_card(folder: Path, info: dict, results: dict[str, float] | None = None,
                     row_names: dict[str, str] | None = None) -> Path:
    """Write ``folder/README.md`` from ``describe``'s ``info`` and, once tested, the results."""
    header = {
        "library_name": "transformers", "pipeline_tag": "text-classification", "tags": info["tags"],
        "datasets": [info["dataset"]],
    }
    base = info.get("base_model")
    if base and not Path(str(base)).exists():  # a hub id; local folders mean nothing elsewhere
        header["base_model"] = base
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {info['title']}", "", info["text"], ""]
    if info.get("clean_data"):
        lines += [f"Clean data used: {info['clean_data']}.", ""]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(info["settings"], sort_keys=False).strip(), "```", ""]
    lines += ["## Results", ""]
    if results:
        lines += [f"On the {info['dataset']} test set (CACC: clean accuracy; ASR: share of poisoned test inputs "
                  "classified as the attacker's target label), in %:", "", *results_rows(results, row_names), ""]
    else:
        lines += ["Not measured yet (the run exported the model before its test).", ""]
    lines += ["## Not measured", "",
              f"The ASR above is that of one attack: {info['attack'] or 'none given'}. Other triggers, other "
              "attacks (syntactic, style, weight poisoning) and adaptive attackers were not measured; a low ASR "
              "here says nothing about them.", "",
              f"Written by mitigate {__version__}.", ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path
