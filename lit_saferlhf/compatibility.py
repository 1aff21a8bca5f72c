"""Start-up checks: a stage and strategy that cannot work together fail before any network is built.

``lit-saferlhf fit`` adds :class:`StrategyCheck` to every run. Its ``setup`` runs after the
processes are launched and before ``configure_model``, so a forbidden combination costs seconds,
not a failure (or a hang) minutes into a run:

- Manual optimisation (the PPO-Lagrangian stage) under Lightning's FSDP1 ``FSDPStrategy``: a
  backward inside ``training_step`` is not supported on FSDP1's sharded root (Lightning issue
  #19685). FSDP2 (``cli_configs/strategies/fsdp2.yaml``) supports it.
- Hugging Face generation with ``synced_gpus: false`` under a strategy that shards parameters, on
  more than one process: each decoding step gathers weights from every rank, so a rank whose
  samples all ended early would leave the others waiting forever.
"""

from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy

from lit_saferlhf.rollout import HFGenerate

FSDP2_CONFIG = "cli_configs/strategies/fsdp2.yaml"


class UnsupportedCombinationError(MisconfigurationException):
    """This stage cannot run under this strategy; the message says what to use instead."""


def shards_parameters(strategy: Strategy) -> bool:
    """Whether every rank holds only a shard of each network (FSDP1, FSDP2, DeepSpeed ZeRO-3)."""
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.zero_stage_3
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def check_strategy(strategy: Strategy, module: L.LightningModule) -> None:
    """Raise :class:`UnsupportedCombinationError` if ``module`` cannot run under ``strategy``."""
    stage, name = type(module).__name__, type(strategy).__name__
    if isinstance(strategy, FSDPStrategy) and not module.automatic_optimization:
        raise UnsupportedCombinationError(
            f"{stage} uses manual optimisation, which Lightning's {name} (FSDP1) does not support: a backward "
            "inside training_step cannot run on its sharded root (Lightning issue #19685). Use FSDP2 instead: "
            f"replace the strategy config with --config {FSDP2_CONFIG} (ModelParallelStrategy + fully_shard)."
        )
    generator = getattr(module, "generator", None)
    if (
        isinstance(generator, HFGenerate)
        and generator.synced_gpus is False
        and shards_parameters(strategy)
        and strategy.world_size > 1
    ):
        raise UnsupportedCombinationError(
            f"{stage}: model.generator.init_args.synced_gpus is false, but {name} shards the policy over "
            f"{strategy.world_size} processes, and generation would hang when one rank's samples end before the "
            "others' (each decoding step gathers weights from every rank). Set it to true, or leave it unset "
            "(on whenever the run is distributed)."
        )


class StrategyCheck(Callback):
    """Run :func:`check_strategy` at ``setup``, before any network is built."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a forbidden combination of ``pl_module`` and the trainer's strategy."""
        check_strategy(trainer.strategy, pl_module)
