"""``lit-saferlhf fit`` (and ``validate``, ``test``, ``predict``): any stage from YAML through LightningCLI.

The stage is named by the config's ``model.class_path``. This module also holds the parsing set-up
that every command reading stage configs shares (``export`` and ``pipeline`` import it, never
``lit_saferlhf.cli``, so the entry point sits on top of the commands and no import circle forms).
Importing it imports the stages, datamodules and adapters, and ``configure_parsing`` every plugin
kind's built-ins and entry points, so YAML and the command line can name them by short class name.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI
from torch.distributed.fsdp import MixedPrecision

import lit_saferlhf.data  # noqa: F401  (datamodules and adapters, so short names resolve)
import lit_saferlhf.stages  # noqa: F401  (stage modules, so short names resolve)
from lit_saferlhf.callbacks import project_callbacks
from lit_saferlhf.errors import ConfigError, expected_error, locate
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
