"""``lit-saferlhf fit`` (and ``validate``, ``test``, ``predict``): any stage from YAML through LightningCLI.

The stage is named by the config's ``model.class_path``. This module also holds the parsing set-up
that every command reading stage configs shares (``export`` and ``pipeline`` import it, never
``lit_saferlhf.cli``, so the entry point sits on top of the commands and no import circle forms).
Importing it imports the stages, datamodules and adapters, and ``configure_parsing`` every plugin
kind's built-ins and entry points, so YAML and the command line can name them by short class name.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.fsdp import MixedPrecision

import lit_saferlhf.data  # noqa: F401  (datamodules and adapters, so short names resolve)
import lit_saferlhf.stages  # noqa: F401  (stage modules, so short names resolve)
from lit_saferlhf.callbacks import project_callbacks
from lit_saferlhf.callbacks.runs import RunCheckpoints, check_outputs, check_same_stage, local_path
from lit_saferlhf.errors import ConfigError, DataError, expected_error, locate
from lit_saferlhf.registry import load_plugins

PARSER_KWARGS = {"exit_on_error": False, **{name: {"exit_on_error": False} for name in LightningCLI.subcommands()}}
"""Parse errors are raised, not printed with the usage: ``lit-saferlhf``'s error boundary reports them."""


def configure_parsing() -> None:
    """What commands that parse stage configs (``fit``, ``export``) need: every plugin kind, jsonargparse settings."""
    load_plugins()

    # MixedPrecision is a dataclass, which jsonargparse otherwise takes only as itself (fsdp.yaml names a subclass).
    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_enabled=[MixedPrecision])


class ProjectCLI(LightningCLI):
    """LightningCLI whose errors name the full config key of a setting out of its domain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As LightningCLI; a setting's error (at start-up or in the run) names its key, e.g. ``model.init_args.lr``."""
        try:
            super().__init__(*args, **kwargs)
        except Exception as error:
            ours, config = expected_error(error), getattr(self, "config", None)
            if isinstance(ours, ConfigError) and config is not None:
                subcommand = getattr(self, "subcommand", None)
                locate(ours, config[subcommand] if subcommand else config)
            raise

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """As LightningCLI; a tracker (TensorBoard, MLflow, W&B) gets a CSVLogger beside it, first.

        The CSV logs go to ``<default_root_dir>/logs``, where the stage configs and the pipeline put them and
        ``lit-saferlhf report`` reads them; being first, that folder also keeps the run's ``config.yaml``.
        """
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.loggers and not any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
            trainer.loggers = [CSVLogger(trainer.default_root_dir, name="logs"), *trainer.loggers]
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Refuse a cut or corrupt ``--ckpt_path``; never merge its hyper-parameters into the configs (LightningCLI's).

        ``torch.save`` writes a zip archive whose directory is at the end: a file cut short has none, and
        torch's own error names no file. LightningCLI would load the checkpoint's hyper-parameters over the
        configs: its stage class over theirs, and its ``export_dir``, so a checkpoint resumed in another dir
        exported over the run that wrote it. The configs say what runs; ``parse_arguments`` refuses a checkpoint
        of another stage.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file() and not zipfile.is_zipfile(path):
            raise DataError(
                f"--ckpt_path {path}: a checkpoint that is cut short or corrupt (torch.save writes a zip archive; "
                "this file has no zip directory at its end)"
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--replace_checkpoints``, the one option of the project's beside LightningCLI's."""
        parser.add_argument(
            "--replace_checkpoints",
            type=bool,
            default=False,
            help="Start this fit even though its checkpoint dirs hold another run's checkpoints, deleting them "
            "(without it, such a fit stops at start-up and says which run they belong to).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """As LightningCLI; then refuse a ``--ckpt_path`` of another stage or datamodule than the configs name.

        One line before anything is built (``last`` and ``hpc`` are resolved, and checked, by the run's callbacks).
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        path = local_path(config.get("ckpt_path")) if config else None
        if config and path is not None and path.exists():
            check_same_stage(path, config.get("model.class_path"), config.get("data.class_path"))

    def before_fit(self) -> None:
        """Check every output before Lightning creates the loggers' dirs; tell the run's callbacks what it resumes."""
        check_outputs(self.trainer, self.model)
        self.resolve_checkpoint("fit")

    def before_validate(self) -> None:
        """Hand the run's callbacks the checkpoint to validate."""
        self.resolve_checkpoint("validate")

    def before_test(self) -> None:
        """Hand the run's callbacks the checkpoint to test."""
        self.resolve_checkpoint("test")

    def before_predict(self) -> None:
        """Hand the run's callbacks the checkpoint to predict with."""
        self.resolve_checkpoint("predict")

    def resolve_checkpoint(self, subcommand: str) -> None:
        """Resolve ``--ckpt_path`` as Lightning does (``last``, ``hpc``, SLURM's resume) and set ``trainer.ckpt_path``.

        ``trainer.fit`` would resolve it only after the callbacks' ``setup``; set beforehand, the run's checks
        (``lit_saferlhf.callbacks.runs``) know at ``setup``, before any network is built, what the run resumes.
        """
        config = self.config_init[subcommand]
        connector = self.trainer._checkpoint_connector  # Lightning's own resolution, as trainer.fit runs it
        path = connector._parse_ckpt_path(TrainerFn(subcommand), config.get("ckpt_path"), True, False)
        config["ckpt_path"] = None
        self.trainer.ckpt_path = path
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning; Trainer declares none
            if isinstance(callback, RunCheckpoints):
                callback.replace_checkpoints = bool(config.get("replace_checkpoints"))


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (a Lightning subcommand first, unless ``run`` is False) and run it."""
    configure_parsing()
    # In every run: a start-up check of the stage against the strategy, atomic checkpoints, a stop on
    # non-finite losses, and a save on SIGTERM / SLURM requeue.
    callbacks = project_callbacks()
    if sys.stdout.isatty():
        callbacks.insert(0, RichProgressBar())
    return ProjectCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=PARSER_KWARGS,
        trainer_defaults={"callbacks": callbacks},
        args=list(args) if args is not None else None,
        run=run,
    )
