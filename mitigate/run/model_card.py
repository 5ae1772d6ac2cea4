"""A Hugging Face model card (README.md with a YAML header) for every model a run exports: what
was done to it, with which settings and data, how well it did, and what was not measured.
Whoever receives the folder can tell a backdoored research victim from a cleaned checkpoint."""

from __future__ import annotations

from pathlib import Path

import yaml

from mitigate import __version__
from mitigate.run.results import coverage_line, metrics_by_model, verdict


def describe(module, datamodule) -> dict:
    """What a run did, for its model card: the module's own account (``module.card(datamodule)``:
    title, text, tags; every method describes itself), the settings, and the clean data used."""
    hp = dict(module.hparams)
    dm_hp = dict(datamodule.hparams) if datamodule is not None else {}
    poisoner = getattr(datamodule, "poisoner", None)
    token_split = getattr(datamodule, "token_split", None)
    data = dm_hp.get("path", "?")
    clean_data = None
    if dm_hp.get("train_set") == "clean_subset":
        n = len(datamodule.clean_subset)
        clean_data = f"{n} clean training samples ({100 * dm_hp.get('clean_fraction'):g}% of {data} train, seeded by {dm_hp.get('seed')})"
        if token_split is not None:
            clean_data += f", token-split into {token_split.copies} variants each"
    card = module.card(datamodule) if hasattr(module, "card") and datamodule is not None else {
        "title": type(module).__name__, "tags": [], "text": f"Trained by `{type(module).__name__}`."}
    plain = (int, float, str, bool, list, type(None))
    settings = {k: v for k, v in hp.items() if isinstance(v, plain) and not k.startswith("_")}
    settings["data"] = {k: v for k, v in dm_hp.items() if isinstance(v, plain) and not k.startswith("_")}
    return {
        "title": card["title"], "text": card["text"], "tags": ["mitigate", "text-classification", *card["tags"]],
        "base_model": hp.get("model"), "dataset": getattr(datamodule, "source", str(data)), "clean_data": clean_data,
        "settings": settings,
        "attack": repr(poisoner) if poisoner is not None else None,
    }


def results_rows(results: dict[str, float], row_names: dict[str, str] | None) -> list[str]:
    """A CACC / ASR table (in %) of every evaluated model, for the card."""
    names = dict(row_names or {})
    out = ["| model | CACC | ASR | floor |", "| --- | --- | --- | --- |"]
    for n, r in metrics_by_model(results, row_names, ("cacc", "asr", "floor")).items():
        cell = lambda m: f"{100 * r[m]:.2f}" if m in r and r[m] == r[m] else "-"  # noqa: E731
        out.append(f"| {names.get(n, n or 'this model')} | {cell('cacc')} | {cell('asr')} | {cell('floor')} |")
    return out


def write_model_card(folder: Path, info: dict, results: dict[str, float] | None = None,
                     row_names: dict[str, str] | None = None, coverage: dict | None = None) -> Path:
    """Write ``folder/README.md`` from ``describe``'s ``info`` and, once tested, the results, the
    verdict they support, and how much of the test sets they cover (``coverage``)."""
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
        said = verdict(results)
        if said:
            lines += [f"**{said}**", ""]
        if coverage:
            lines += [coverage_line(coverage, info["dataset"]), ""]
        lines += ["CACC: clean accuracy; ASR: share of poisoned test inputs classified as the attacker's target label; "
                  "floor: the same model's share of their clean versions classified as the target. In %:", "",
                  *results_rows(results, row_names), ""]
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
