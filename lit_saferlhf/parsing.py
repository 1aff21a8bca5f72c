"""Parsing set-up shared by every command that reads stage configs (``fit``, ``export``, ``pipeline``).

The command modules (``consolidate``, ``pipeline``) import this module, never ``lit_saferlhf.cli``,
so the entry point sits on top of them and no import circle forms. Importing it imports the
stages, datamodules and adapters, so YAML and the command line can name them by short class name.
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
from lit_saferlhf.compatibility import StrategyCheck
from lit_saferlhf.errors import ConfigError, expected_error, locate
from lit_saferlhf.registry import load_advantage_plugins, load_solver_plugins
from lit_saferlhf.reliability import reliability_callbacks

PARSER_KWARGS = {"exit_on_error": False, **{name: {"exit_on_error": False} for name in LightningCLI.subcommands()}}
"""Parse errors are raised, not printed with the usage: ``lit-saferlhf``'s error boundary reports them."""


def configure_parsing() -> None:
    """What commands that parse stage configs (``fit``, ``export``) need: plugin solvers, jsonargparse settings."""
    load_solver_plugins()
    load_advantage_plugins()
    import lit_saferlhf_plugins.objectives  # noqa: F401  (built-in offline objectives, so short names resolve)

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
    callbacks = [StrategyCheck(), *reliability_callbacks()]
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
