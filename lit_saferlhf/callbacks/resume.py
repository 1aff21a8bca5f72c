"""Exact resumes: every rank's random states and stage state, and progress counts that stay right.

- :class:`RankStates` saves every random-number state the next step draws from (Python, NumPy,
  torch CPU and the current CUDA device), and the stage's own per-rank state, for every rank in each
  checkpoint and puts them back in a resumed run, so sampling, dropout and shuffling continue bit for bit.
- :class:`RepairProgress` corrects Lightning's progress counts around resumes from the last batch
  of an epoch, which otherwise make a later resume train batches the uninterrupted run never did.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loops.progress import _ProcessedTracker

log = logging.getLogger(__name__)

RANK_STATES_KEY = "rank_states"
"""Where :class:`RankStates` keeps every rank's random-number states and stage state in a checkpoint."""


def random_state() -> dict[str, Any]:
    """This process's random-number states, as types ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)  # legacy=True (the default): the MT19937 tuple
    kind, keys, position, has_gauss, cached = numpy_state
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().cpu()  # the current device: this rank's
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Put back the states :func:`random_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class RankStates(Callback):
    """Save what differs between ranks with every checkpoint, and give each rank its own back on resume.

    A checkpoint file is written by rank 0 from rank 0's state; what each rank holds for itself
    would come back as rank 0's. Saved for every rank: the random-number states (Python, NumPy,
    torch CPU, the current CUDA device) and, for a stage that has them, ``rank_state_dict()``
    (PPO-Lagrangian: its window of recent costs), which ``load_rank_state_dict`` takes back on load.

    The random states are taken when the checkpoint is written (the end of a step: nothing draws
    before the next step) and put back at the start of the resumed run's first training batch:
    after the model build, the sanity check and the data loader's start, which draw numbers of their
    own. A checkpoint written by a different number of ranks cannot continue each rank's streams, so
    nothing is restored (a warning says so); checkpoints from before this callback hold none. Data
    order needs no state here: :mod:`lit_saferlhf.data.sampling` derives it from the seed and epoch.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Store every rank's states (one all-gather; every rank takes part in writing a checkpoint).

        Before a resumed run's first step (a rerun of a finished run saves without training), the
        states the next step will draw from are the loaded ones, not the process's own.
        """
        own = {"random": self.pending if self.pending is not None else random_state()}
        rank_state_dict = getattr(pl_module, "rank_state_dict", None)  # a stage with per-rank state has it
        if rank_state_dict is not None:
            own["stage"] = rank_state_dict()
        checkpoint[RANK_STATES_KEY] = gather_objects(own)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Give the stage this rank's state now; keep the random states until the first training batch."""
        states = checkpoint.get(RANK_STATES_KEY)
        if states is None:
            log.warning("The checkpoint holds no per-rank states: the resumed run will not repeat the original")
            return
        if len(states) != trainer.world_size:
            log.warning(
                "The checkpoint was written by %d ranks and resumes on %d: per-rank states are not restored, "
                "so the run will not repeat the original one exactly", len(states), trainer.world_size,
            )  # fmt: skip
            return
        own = states[trainer.global_rank]
        load_rank_state_dict = getattr(pl_module, "load_rank_state_dict", None)
        if "stage" in own and load_rank_state_dict is not None:
            load_rank_state_dict(own["stage"])
        self.pending = own["random"]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Restore the loaded random states once, right before the resumed run's first step."""
        if self.pending is not None:
            set_random_state(self.pending)
            self.pending = None


def repair_batch_progress(checkpoint: dict[str, Any]) -> bool:
    """Make a batch-end checkpoint's total batch counts agree with its current ones; whether anything changed.

    A checkpoint written at the end of a training batch has that batch processed but not yet counted
    as completed. Lightning recognises such a checkpoint by that one-batch gap in the counts of the
    whole run (``total``), but after a resume across an epoch's end the run's completed count falls
    behind by more, so a later resume from the last batch of an epoch is not recognised: Lightning
    then trains an extra batch (taken from the next epoch's data) before it stops. The gap of the
    current epoch's counts is always right, and the run's completed count is set from it.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return False
    current, total = progress["current"], progress["total"]
    at_batch_end = current["ready"] == current["started"] == current["processed"] == current["completed"] + 1
    consistent = total["ready"] == total["started"] == total["processed"] == total["completed"] + 1
    if not at_batch_end or consistent or total["ready"] != total["started"] or total["started"] != total["processed"]:
        return False
    total["completed"] = total["processed"] - 1
    return True


class RepairProgress(Callback):
    """Keep Lightning's progress counts right across resumes from the last batch of an epoch.

    Two counts go wrong there, and each makes a later resume train batches the uninterrupted run never
    trained: the batch counts a checkpoint holds (fixed before the loops are restored, see
    :func:`repair_batch_progress`), and the epoch after such a resume, which Lightning never counts as
    started (it skips ``on_train_epoch_start`` for it too), so its checkpoints look like the start of
    that epoch again; it is counted at its first batch here. And a rerun that resumes after the last
    step trains nothing, yet its ModelCheckpoints would write ``last.ckpt`` again at the end, with
    counts that make the logged steps of a later resume start one step early; the checkpoint it
    resumed from already holds that state, so they are told it is saved.
    """

    def __init__(self) -> None:
        self.stepped = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """No step taken yet in this fit."""
        self.stepped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resumed fit without a step: keep the checkpoint it resumed from (runs before ModelCheckpoint's)."""
        if self.stepped or trainer.ckpt_path is None:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback._last_global_step_saved = trainer.global_step  # what its own skip checks read
                callback._last_checkpoint_saved = str(trainer.ckpt_path)  # the checkpoint holding this state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Runs before the loops read ``checkpoint["loops"]``."""
        if repair_batch_progress(checkpoint):
            log.info("Repaired the batch counts of the checkpoint, written at the end of a batch, before resuming")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Count the running epoch as started if Lightning did not (a running epoch is one ahead of the processed)."""
        self.stepped = True
        epochs = trainer.fit_loop.epoch_progress
        current = epochs.current
        assert isinstance(current, _ProcessedTracker)  # Lightning types _Progress.current as the base tracker
        if current.started == current.processed:
            epochs.increment_ready()
            epochs.increment_started()
