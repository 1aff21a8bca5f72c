"""Runs that stop early and clearly: a non-finite loss stops the run before its step is saved.

:class:`NonFiniteLossGuard` stops the run at the first step whose loss is NaN or infinite, before
that step's state is checkpointed, and names the step, the loss and the last checkpoint.

:class:`StrategyCheck`: ``lit-saferlhf fit`` adds :class:`StrategyCheck` to every run. Its ``setup`` runs after the
processes are launched and before ``configure_model``, so a forbidden combination costs seconds,
not a failure (or a hang) minutes into a run:

- Manual optimisation (the PPO-Lagrangian stage) under Lightning's FSDP1 ``FSDPStrategy``: a
  backward inside ``training_step`` is not supported on FSDP1's sharded root (Lightning issue
  #19685). FSDP2 (``cli_configs/strategies/fsdp2.yaml``) supports it.
- A generation backend that cannot run under the strategy: the backend says so itself
  (``Generator.strategy_problem``; e.g. ``HFGenerate`` with ``synced_gpus: false`` under a strategy
  that shards parameters over several processes would hang).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor

from lit_saferlhf.callbacks.checkpoints import newest_checkpoint
from lit_saferlhf.generators import Generator

LOSS_PREFIXES = ("train/loss", "loss/")
"""Logged metrics that :class:`NonFiniteLossGuard` checks (besides the loss ``training_step`` returns)."""


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the message names the step, the loss and the last checkpoint."""


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place; no host sync (``strategy.reduce`` adds a blocking barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def finite_all(value: Tensor) -> bool:
    """Whether every element is finite (a host sync: only on the failure path)."""
    return bool(torch.isfinite(value).all())


class NonFiniteLossGuard(Callback):
    """Stop the run at the first step whose loss is NaN or infinite.

    Checks the loss ``training_step`` returns and every logged metric whose name starts with
    ``train/loss`` or ``loss/`` (the PPO stage's actor and critic losses). It runs before the
    ModelCheckpoints (Lightning calls checkpoint callbacks last), so the failing step's state is
    never saved and the newest checkpoint is the last one written with a finite loss. One host sync
    per step: the per-metric checks stay on the device, and ranks agree through one all-reduce of
    an integer (no barrier) before the single ``bool()``, so every rank stops at the same step.
    """

    def __init__(self) -> None:
        self.step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Remember the step the batch starts from (the step a checkpoint of the previous state is named by)."""
        self.step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Raise :class:`NonFiniteLossError` if any loss of this step is not finite on any rank."""
        losses = self.losses(trainer, outputs)
        if not losses:
            return
        device = next(iter(losses.values())).device
        finite = torch.stack([torch.isfinite(value).all().to(device) for value in losses.values()]).all()
        failing = sum_over_ranks(finite.logical_not().int())
        if not bool(failing):  # the step's one host sync
            return
        bad = [f"{name} is {value.float().mean().item():g}" for name, value in losses.items() if not finite_all(value)]
        where = ", ".join(bad) if bad else "a loss is not finite on another rank"
        last = newest_checkpoint(trainer)
        raise NonFiniteLossError(
            f"step {self.step}: {where}. Stopped before saving this step's state; "
            + (f"the last good checkpoint is {last}" if last else "no checkpoint was written before it")
        )

    @staticmethod
    def losses(trainer: L.Trainer, outputs: Any) -> dict[str, Tensor]:
        """The returned loss and the logged loss metrics of this step, as tensors."""
        found = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if name.startswith(LOSS_PREFIXES) and isinstance(value, Tensor)
        }
        returned = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(returned, Tensor):
            found["the loss training_step returned"] = returned.detach()
        return found


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
    generator = getattr(module, "generator", None)  # the PPO and offline stages' backend
    if isinstance(generator, Generator):
        world_size = getattr(strategy, "world_size", 1)  # as Trainer.world_size reads it: Strategy declares none
        problem = generator.strategy_problem(name, shards_parameters(strategy), world_size)
        if problem is not None:
            raise UnsupportedCombinationError(f"{stage}: {problem}")


class StrategyCheck(Callback):
    """Run :func:`check_strategy` at ``setup``, before any network is built."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a forbidden combination of ``pl_module`` and the trainer's strategy."""
        check_strategy(trainer.strategy, pl_module)
