"""The ``mitigate`` command: a LightningCLI (fit / validate / test / predict) whose module, data
module, callbacks and loggers are all chosen by class path in YAML recipes."""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import inspect
import json
import logging
import netrc
import os
import re
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from transformers.utils import logging as transformers_logging

# every class a recipe names, imported so that short names (``--model.help MBTSAD``) resolve
from mitigate import attacks, classifier, data, defenses, evaluation, mitigations, scan  # noqa: F401
from mitigate.run import errors
from mitigate.run.checkpoint import RunCheckpoint
from mitigate.run.export import ExportPretrained
from mitigate.run.folder import claim_run_folder
from mitigate.run.predictions import PredictionWriter
from mitigate.run.progress import EpochBar, ProgressLog
from mitigate.run.results import ResultsWriter

log = logging.getLogger("mitigate")

#: init arguments that the CLI links from elsewhere (they are not the user's to set)
LINKED = {"model": {"num_labels"}, "data": {"tokenizer"}}


def _under(name: str):
    def compute(root: str | None) -> str:
        return str(Path(root or ".") / name)

    return compute


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _plain(value):
    """Config values in a comparable form (Namespaces as dicts, tuples as lists)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def settings_mismatch(saved: dict, group: str, config: Namespace) -> list[str]:
    """Where the hyper-parameters a checkpoint was saved with differ from this run's
    ``config[group]`` (``model`` or ``data``): ``key: checkpoint X, this run Y`` per field."""
    saved = {k: v for k, v in saved.items() if k != "_instantiator"}
    out = []
    saved_class = saved.pop("_class_path", None)
    if saved_class and saved_class != config.class_path:
        out.append(f"{group}.class_path: checkpoint {saved_class}, this run {config.class_path}")
    init = _plain(config.get("init_args") or Namespace())
    for key, value in saved.items():
        if key in LINKED.get(group, ()):
            continue
        if key not in init:
            out.append(f"{group}.init_args.{key}: checkpoint {value!r}, not a setting of {config.class_path}")
        elif _plain(value) != init[key]:
            out.append(f"{group}.init_args.{key}: checkpoint {value!r}, this run {init[key]!r}")
    return out


class MitigateCLI(LightningCLI):
    """LightningCLI with the run layout of ``mitigate``: under ``--trainer.default_root_dir``
    go the resolved config (with the logs), ``checkpoints/`` (``last.ckpt`` every
    ``checkpoint.every_n_train_steps`` steps, at each epoch's end and at the end, for
    ``--ckpt_path last``), ``model/`` (the exported Hugging Face checkpoint) and
    ``results.json`` / ``results.md``. A folder that holds a finished run is never overwritten
    silently (``--overwrite true`` replaces it), and a checkpoint never changes the settings
    of the run that resumes from it."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.every_n_train_steps": 50})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_under("checkpoints"))
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.link_arguments("trainer.default_root_dir", "results.dirpath", compute_fn=_under(""))
        parser.add_lightning_class_args(ExportPretrained, "export")
        parser.link_arguments("trainer.default_root_dir", "export.dirpath", compute_fn=_under("model"))
        parser.add_lightning_class_args(ProgressLog, "progress_log")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.link_arguments("trainer.default_root_dir", "predictions.dirpath", compute_fn=_under(""))
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")
        parser.link_arguments("data.num_classes", "model.init_args.num_labels", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Run `test` on the final weights after `fit`.")
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Replace the outputs of a finished run in trainer.default_root_dir (without it such a folder is refused).",
        )
        parser.add_argument(
            "--wandb_project", type=str | None, default=None,
            help="Also log to Weights & Biases under this project (offline when no API key is set).",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "verbose" in self._subcommand_method_arguments.get(subcommand, []):
            # Lightning's table of fractions: mitigate ends with its own line, in % (final_line)
            parser.set_defaults({"verbose": False})
        return parser

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """The trainer, with ``EpochBar`` where Lightning would add its own rich progress bar."""
        config = self._get(self.config_init, "trainer", default={})
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        wanted = config.get("enable_progress_bar") is not False and importlib.util.find_spec("rich") is not None
        if wanted and not any(isinstance(c, ProgressBar) for c in given):
            kwargs["callbacks"] = [*given, EpochBar()]
        return super().instantiate_trainer(**kwargs)

    # -- checkpoints given to --ckpt_path ---------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges the hyper-parameters stored in a ``--ckpt_path`` checkpoint over the
        command line, so a file could switch the model source, ``allow_pickle`` or the module
        class. Here the command line and the recipe decide: the checkpoint must have been saved
        with the same settings, or the run stops. ``last`` must exist."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else None
        if cfg is None or not cfg.get("ckpt_path"):
            return
        given = cfg.ckpt_path
        root = Path(cfg.trainer.default_root_dir or ".")
        if given == "last":
            path = root / "checkpoints" / "last.ckpt"
            if not path.exists():
                raise FileNotFoundError(
                    f"--ckpt_path last: no checkpoint to resume in {path.parent} (a run that never reached "
                    f"checkpoint.every_n_train_steps steps has none); drop --ckpt_path to start the run"
                )
            cfg.ckpt_path = str(path)
        elif given in ("best", "hpc", "registry"):
            return
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {given}: no such checkpoint file")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"--ckpt_path {path}: not a checkpoint written by Lightning (torch.save's zip format)")
        weights_only = cfg.get("weights_only") is not False
        try:
            ckpt = torch.load(path, weights_only=weights_only, map_location="cpu", mmap=True)
        except Exception as e:
            if weights_only and "weights_only" in str(e):
                raise ValueError(
                    f"--ckpt_path {path}: holds objects other than tensors and plain values, and loading them "
                    "would unpickle code from the file; refused. Pass --weights_only false only if you trust its source"
                ) from e
            raise ValueError(f"--ckpt_path {path}: not a readable Lightning checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"--ckpt_path {path}: not a Lightning checkpoint (no state_dict)")
        problems = settings_mismatch(ckpt.get("hyper_parameters") or {}, "model", cfg.model)
        problems += settings_mismatch(ckpt.get("datamodule_hyper_parameters") or {}, "data", cfg.data)
        if problems:
            raise ValueError(
                f"--ckpt_path {path}: saved with other settings than this run's ({'; '.join(problems)}). "
                "A checkpoint never changes a run's settings: resume with the run's own config "
                "(lightning_logs/version_N/config.yaml in its folder) or start a new run"
            )

    # -- run folder and loggers ---------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        if self.subcommand == "fit" and trainer.max_epochs is not None and trainer.max_epochs < 0 and (trainer.max_steps or -1) < 0:
            raise errors.UsageError(
                f"--trainer.max_epochs {trainer.max_epochs}: a run without end, and the learning-rate schedules need a "
                "length; give a number of epochs, or --trainer.max_steps N"
            )
        if "weights_only" in config and config.weights_only is None:
            # checkpoints given to --ckpt_path may come from elsewhere: never unpickle code
            config.weights_only = True
        root = config.trainer.default_root_dir or "."
        if rank_zero_only.rank == 0:  # DDP workers re-run the command after rank 0 claimed the folder
            claim_run_folder(root, self.subcommand, resuming=bool(config.get("ckpt_path")), overwrite=config.overwrite)
        if config.get("wandb_project"):
            config.trainer.logger = [
                Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root)),
                Namespace(
                    class_path="lightning.pytorch.loggers.WandbLogger",
                    init_args=Namespace(project=config.wandb_project, save_dir=root),
                ),
            ]
        loggers = config.trainer.logger
        loggers = loggers if isinstance(loggers, list) else [loggers]
        uses_wandb = any("WandbLogger" in str(getattr(lg, "class_path", lg)) for lg in loggers if lg)
        if uses_wandb and not _wandb_has_key() and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            log.warning("W&B: no API key found, logging offline (sync later with `wandb sync`)")

    def after_fit(self) -> None:
        """``fit`` is followed by ``test`` on the final weights unless ``--test_after_fit false``."""
        if self.config[self.subcommand].get("test_after_fit", True):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)


#: what the libraries print that a person running mitigate has no use for (MITIGATE_VERBOSE=1 shows it)
NOISE = (
    "Starting from v1.9.0, `tensorboardX` has been removed",  # Lightning's default-logger notice
    "`isinstance(treespec, LeafSpec)` is deprecated",
    "LightningCLI's args parameter is intended to run from within Python",
    "The number of training batches",  # the logging-interval notice on small runs
    "does not have many workers which may be a bottleneck",
    "litlogger",
    "Seed set to",
    "module(s) in eval mode at the start of training",  # MBTSAD's frozen teacher, on purpose
    # MBTSAD's manual optimisation checkpoints the state after the step, on purpose (resume is
    # tested bit-identical in tests/test_resume_and_ddp.py)
    "Using ModelCheckpoint with manual optimization",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in NOISE)


def quiet_logs() -> None:
    """INFO log lines from mitigate and Lightning, without the libraries' notices, tips,
    deprecation warnings and weight-loading bars (``MITIGATE_VERBOSE=1`` keeps them)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("MITIGATE_VERBOSE", "").lower() in ("1", "true", "yes"):
        return
    for text in NOISE:
        warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).addFilter(_DropNoise())
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def final_line(cli: MitigateCLI) -> str | None:
    """Where the run's results, plots and model are, with its headline numbers in %."""
    root = Path(cli.trainer.default_root_dir)
    parts = []
    results = root / "results.json"
    if cli.subcommand in ("fit", "test") and results.is_file():
        r = json.loads(results.read_text())
        nums = ", ".join(f"{name} {100 * r[k]:.2f} %" for k, name in (("test/cacc", "CACC"), ("test/asr", "ASR"),
                         ("test/floor", "floor")) if k in r and r[k] == r[k])
        parts.append(f"results {root / 'results.md'}" + (f" ({nums})" if nums else ""))
    pngs = sorted(root.glob("*.png"))
    if pngs:
        parts.append("plots " + ", ".join(str(p) for p in pngs))
    if cli.subcommand == "fit" and (root / "model").is_dir():
        parts.append(f"model {root / 'model'}" + (f" (teacher: {root / 'teacher'})" if (root / "teacher").is_dir() else ""))
    return "mitigate: " + "; ".join(parts) if parts else None


CLI_KWARGS = dict(
    subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False,
    save_config_kwargs={"overwrite": True},
    # no prefix matching: a mistyped option is an error with a suggestion, never another option
    parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class _ParserBuilt(Exception):
    """Carries the CLI's parser out of a ``ParserOnlyCLI`` (help and suggestions need it)."""

    def __init__(self, parser) -> None:
        self.parser = parser


class ParserOnlyCLI(MitigateCLI):
    """``MitigateCLI`` that stops once its parser is built."""

    def parse_arguments(self, parser, args) -> None:
        raise _ParserBuilt(parser)


def build_parser():
    """The ``mitigate`` parser (with every subcommand's), nothing parsed or run."""
    try:
        ParserOnlyCLI(pl.LightningModule, pl.LightningDataModule, **CLI_KWARGS, args=[])
    except _ParserBuilt as built:
        return built.parser
    raise RuntimeError("the CLI built no parser")  # pragma: no cover


def subcommand_parser(sub: str):
    """The parser of subcommand ``sub``."""
    return build_parser()._subcommands_action._name_parser_map[sub]


# -- what the command can do ----------------------------------------------------------------------
def recipes_folder() -> Path:
    """./recipes when run from a checkout, else the one beside the installed package."""
    here = Path("recipes")
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def recipe_purposes() -> dict[str, str]:
    """recipes/<name>.yaml -> its first line (each recipe opens with a one-line purpose)."""
    out = {}
    folder = recipes_folder()
    for f in sorted(folder.rglob("*.yaml")):
        first = f.read_text(encoding="utf-8").split("\n", 1)[0]
        out[str(f.relative_to(folder.parent))] = first.lstrip("# ").strip()
    return out


def catalog() -> dict[str, dict[str, str]]:
    """Every class a recipe can name, by kind: short name -> the first line of its docstring."""

    def first_line(obj) -> str:
        return (inspect.getdoc(obj) or "").split("\n", 1)[0]

    kinds = {"attacks": attacks, "mitigations": mitigations, "defenses": defenses, "evaluation": evaluation}
    out = {kind: {n: first_line(getattr(mod, n)) for n in mod.__all__ if inspect.isclass(getattr(mod, n))}
           for kind, mod in kinds.items()}
    out["mitigations"] = {n: d for n, d in out["mitigations"].items() if n not in ("Mitigation",)}
    out["defenses"].pop("Defense", None)
    out["models and data"] = {"TextClassifier": first_line(classifier.TextClassifier),
                              "BackdoorDataModule": first_line(data.BackdoorDataModule)}
    return out


OVERVIEW = """mitigate: remove backdoors from text classifiers (PyTorch Lightning).

  reproduce an attack     mitigate fit --config recipes/badnet_sst2.yaml
  clean a checkpoint      mitigate clean <hub id or folder> [--data.init_args.path <data>]
  guard a deployed model  mitigate test --config recipes/defend_sst2.yaml --model.init_args.model <folder>
  is it backdoored?       mitigate scan --model <hub id or folder> --data sst2
  a first run (minutes)   bash scripts/smoke.sh

subcommands:
  fit        train (an attack's victim, a mitigation), then test; writes DIR/results.md and DIR/model
  test       evaluate a model, with any test-time defenses of the recipe
  validate   evaluate on the dev set
  predict    write predictions.csv
  clean      fit with recipes/clean_checkpoint.yaml: detect, choose and clean (mitigate clean CHECKPOINT)
  scan       a verdict on a checkpoint from clean data, no training (mitigate scan --help)
  list       the recipes, attacks, mitigations, defenses (mitigate list [KIND])

Options of a subcommand: mitigate fit --help (all of Lightning's: --help-all); the settings of
one class: mitigate fit --model.help MBTSAD. Short class names work wherever a class path does
(--model MBTSAD). Docs: README.md and docs/."""


def print_list(kind: str | None) -> int:
    """``mitigate list [recipes|attacks|mitigations|defenses|evaluation]``."""
    sections: dict[str, dict[str, str]] = {"recipes": recipe_purposes(), **catalog()}
    if kind is not None and kind not in sections:
        close = difflib.get_close_matches(kind, list(sections), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"mitigate: error: list: no kind {kind!r} (kinds: {', '.join(sections)}){hint}", file=sys.stderr)
        return 2
    for name, rows in sections.items():
        if kind is not None and name != kind:
            continue
        print(f"{name}:")
        width = max((len(k) for k in rows), default=0)
        for key, text in rows.items():
            print(f"  {key:<{width}}  {text}")
        print()
    return 0


#: the sections of `<subcommand> --help`: title -> the options (dests) it shows, with mitigate's
#: own wording where Lightning's is long; every option of mitigate's is here, and Lightning's
#: common ones (all of Lightning's: --help-all)
HELP_SECTIONS: dict[str, dict[str, str | None]] = {
    "run": {
        "config": "a recipe (YAML); several apply in order, e.g. a victim overlay after a method's recipe",
        "print_config": "print the full configuration, after every option, and exit (it reproduces the run)",
        "seed_everything": None, "test_after_fit": None, "overwrite": None, "wandb_project": None,
        "ckpt_path": "resume: `last` (this run's checkpoints/last.ckpt) or a file; it must hold this run's settings",
        "weights_only": "load --ckpt_path without unpickling code (default; false only for checkpoints you trust)",
    },
    "method and data": {
        "model": "the method: a class name (TextClassifier, MBTSAD, WeightSpaceMitigation, EmbeddingPoisoning, ...: "
                 "mitigate list) or a recipe's model section; one setting: --model.init_args.NAME VALUE",
        "model.help": "every setting of a method, described (e.g. --model.help MBTSAD)",
        "data": "the data module (BackdoorDataModule); one setting: --data.init_args.NAME VALUE (path, poisoner, ...)",
        "data.help": "every setting of the data module, described (--data.help BackdoorDataModule)",
    },
    "trainer (Lightning's common options; all of them: --help-all)": {
        "trainer.default_root_dir": "the run folder: results.md, model/, checkpoints/, logs",
        "trainer.max_epochs": "epochs to train", "trainer.max_steps": "optimizer steps to train (-1: by epochs)",
        "trainer.accelerator": "cpu, gpu or auto", "trainer.devices": "how many devices (or which)",
        "trainer.strategy": "auto, ddp (MBTSAD: ddp_find_unused_parameters_true), ...",
        "trainer.precision": "32-true, bf16-mixed, ...", "trainer.deterministic": "deterministic algorithms (true, warn)",
        "trainer.limit_train_batches": "train on this many batches (int) or this share (float) of each epoch",
        "trainer.limit_val_batches": "validate on this many batches or this share",
        "trainer.limit_test_batches": "test on this many batches or this share (results then say: partial)",
        "trainer.callbacks": "callbacks, e.g. a defense: --trainer.callbacks+=RAP",
        "trainer.enable_progress_bar": "show the progress bar (log lines are written when stderr is not a terminal)",
    },
    "what a run writes": {
        "checkpoint.every_n_train_steps": "a checkpoint every N steps (and at every epoch's end)",
        "checkpoint.keep": None,
        "export.max_class_share": None,
        "progress_log.every_s": None, "progress_log.always": None,
    },
}


def focused_help(sub: str) -> str:
    """``mitigate <sub> --help``: mitigate's options and Lightning's common ones, one or two lines
    each (every option of Lightning's: ``--help-all``)."""
    actions = {a.dest: a for a in subcommand_parser(sub)._actions}
    lines = [f"usage: mitigate {sub} --config RECIPE [--OPTION VALUE ...]   (the recipes: mitigate list recipes)", ""]
    for title, options in HELP_SECTIONS.items():
        rows = []
        for dest, text in options.items():
            action = actions.get(dest)
            if action is None:
                continue
            flag = ", ".join(action.option_strings[:1] if dest != "config" else ["-c", "--config"])
            metavar = "" if action.nargs == 0 else " " + (dest.split(".")[-1].upper() if dest != "config" else "RECIPE")
            text = text or " ".join((action.help or "").split())
            default = action.default
            if default not in (None, argparse.SUPPRESS, "") and not isinstance(default, (dict, Namespace)) and dest != "config":
                text += f" (default: {default})"
            rows.append((flag + metavar, text))
        if rows:
            lines.append(f"{title}:")
            for flag, text in rows:
                wrapped = textwrap.wrap(text, 100 - 34) or [""]
                lines.append(f"  {flag:<31} {wrapped[0]}" if len(flag) < 32 else f"  {flag}\n  {'':<31} {wrapped[0]}")
                lines += [f"  {'':<31} {w}" for w in wrapped[1:]]
            lines.append("")
    return "\n".join(lines).rstrip()


def suggestions(message: str, sub: str | None) -> str:
    """For an unknown option in ``message``: the closest real ones."""
    bad = re.findall(r"(--[\w.]+)", message)
    if not bad or sub not in SUBCOMMANDS:
        return ""
    known = [o for a in subcommand_parser(sub)._actions for o in a.option_strings]
    hints = [f"{b} -> {close[0]}" for b in bad if (close := difflib.get_close_matches(b, known, n=1, cutoff=0.75))]
    return f" (did you mean: {'; '.join(hints)}?)" if hints else ""


def main(args: list[str] | None = None) -> None:
    """The ``mitigate`` command. An error ends it with one line that says what is wrong (a usage
    error that says how to fix it; any other error also points to a log file with the traceback;
    ``MITIGATE_DEBUG=1`` raises it instead)."""
    argv = list(sys.argv[1:] if args is None else args)
    quiet_logs()
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return
    if argv[0] in ("list", "recipes"):  # `mitigate recipes` = `mitigate list recipes`
        kind = "recipes" if argv[0] == "recipes" else (argv[1] if len(argv) > 1 else None)
        if code := print_list(kind):
            sys.exit(code)
        return
    sub = argv[0]
    if sub == "clean":  # mitigate clean [CHECKPOINT] [fit options] = fit with the clean_checkpoint recipe
        rest = argv[1:]
        if any(a in ("-h", "--help") for a in rest):
            print("mitigate clean CHECKPOINT [OPTIONS] = mitigate fit --config recipes/clean_checkpoint.yaml "
                  "--model.init_args.model CHECKPOINT [OPTIONS] (docs/clean.md); the options:\n")
            print(focused_help("fit"))
            return
        model = ["--model.init_args.model", rest.pop(0)] if rest and not rest[0].startswith("-") else []
        argv = ["fit", "--config", str(recipes_folder() / "clean_checkpoint.yaml"), *rest, *model]  # the checkpoint wins over a victim config
        sub = "fit"
    if sub == "scan":
        try:
            scan.main(argv[1:])
        except Exception as e:  # noqa: BLE001 - every error ends as one clear line
            if os.environ.get("MITIGATE_DEBUG", "").lower() in ("1", "true", "yes"):
                raise
            sys.exit(errors.report(e, command="mitigate scan"))
        return
    if sub in SUBCOMMANDS and any(a in ("-h", "--help") for a in argv[1:]):
        print(focused_help(sub))
        return
    argv = [("--help" if a == "--help-all" else a) for a in argv]
    try:
        cli = MitigateCLI(pl.LightningModule, pl.LightningDataModule, **CLI_KWARGS, args=argv)
    except Exception as e:  # noqa: BLE001 - every error ends as one clear line
        if os.environ.get("MITIGATE_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        hint = ""
        if type(e).__name__ == "ArgumentError":
            text = str(e)
            if "Unrecognized arguments" in text or "unrecognized arguments" in text:
                hint = suggestions(text, sub)
            elif "arguments are required" in text and "--config" not in argv and "-c" not in argv:
                hint = " (start from a recipe: mitigate fit --config recipes/badnet_sst2.yaml; mitigate list recipes)"
        sys.exit(errors.report(e, hint=hint))
    for logger in cli.trainer.loggers:  # flush W&B's summary and close its run
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()
    if cli.trainer.is_global_zero and (line := final_line(cli)):
        print(line, file=sys.stderr)
    refused = next((cb.refused for cb in cli.trainer.callbacks if isinstance(cb, ExportPretrained) and cb.refused), None)
    if refused:
        root = cli.trainer.default_root_dir
        print(f"mitigate: error: {refused} (the numbers are in {root}/results.md)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
