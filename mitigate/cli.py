"""The ``mitigate`` command: a LightningCLI (fit / validate / test / predict) whose module, data
module, callbacks and loggers are all chosen by class path in YAML recipes."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from mitigate.callbacks import ExportPretrained, PredictionWriter, ResultsWriter

log = logging.getLogger("mitigate")


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


class MitigateCLI(LightningCLI):
    """LightningCLI with the run layout of ``mitigate``: under ``--trainer.default_root_dir``
    go the resolved config (with the logs), ``checkpoints/`` (``last.ckpt`` every
    ``checkpoint.every_n_train_steps`` steps, for ``--ckpt_path last``), ``model/`` (the
    exported Hugging Face checkpoint) and ``results.json`` / ``results.md``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.every_n_train_steps": 50})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_under("checkpoints"))
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.link_arguments("trainer.default_root_dir", "results.dirpath", compute_fn=_under(""))
        parser.add_lightning_class_args(ExportPretrained, "export")
        parser.link_arguments("trainer.default_root_dir", "export.dirpath", compute_fn=_under("model"))
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.link_arguments("trainer.default_root_dir", "predictions.dirpath", compute_fn=_under(""))
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")
        parser.link_arguments("data.num_classes", "model.init_args.num_labels", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Run `test` on the final weights after `fit`.")
        parser.add_argument(
            "--wandb_project", type=str | None, default=None,
            help="Also log to Weights & Biases under this project (offline when no API key is set).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if "weights_only" in config and config.weights_only is None:
            # checkpoints given to --ckpt_path may come from elsewhere: never unpickle code
            config.weights_only = True
        root = config.trainer.default_root_dir or "."
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
        if self.config[self.subcommand].get("test_after_fit", True):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli = MitigateCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    for logger in cli.trainer.loggers:  # flush W&B's summary and close its run
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish()


if __name__ == "__main__":  # pragma: no cover
    main()
