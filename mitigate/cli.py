"""The ``mitigate`` command: a LightningCLI (fit / validate / test / predict) whose module, data
module, callbacks and loggers are all chosen by class path in YAML recipes."""

from __future__ import annotations

import logging
import netrc
import os
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# every class a recipe names, imported so that short names (``--model.help MBTSAD``) resolve
from mitigate import attacks, classifier, data, defenses, evaluation, mitigations  # noqa: F401
from mitigate.run import errors
from mitigate.run.checkpoint import RunCheckpoint
from mitigate.run.export import ExportPretrained
from mitigate.run.folder import claim_run_folder
from mitigate.run.predictions import PredictionWriter
from mitigate.run.progress import ProgressLog
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
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None) -> None:
    """The ``mitigate`` command. An error ends it with one line that says what is wrong (the
    traceback goes to a log file; ``MITIGATE_DEBUG=1`` raises it instead)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cli = MitigateCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except Exception as e:  # noqa: BLE001 - every error ends as one clear line
        if os.environ.get("MITIGATE_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        sys.exit(errors.report(e))
    for logger in cli.trainer.loggers:  # flush W&B's summary and close its run
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()
    refused = next((cb.refused for cb in cli.trainer.callbacks if isinstance(cb, ExportPretrained) and cb.refused), None)
    if refused:
        root = cli.trainer.default_root_dir
        print(f"mitigate: error: {refused} (the numbers are in {root}/results.md)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
