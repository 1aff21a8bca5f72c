"""What ``lit-saferlhf fit`` adds to every run: checkpoints, exact resumes, guards and preemption.

A run killed at any point loses at most the work since its last checkpoint, and a resumed run goes
on exactly as the uninterrupted one would have:

- ``checkpoints``: atomic single-file checkpoints, stale files of killed runs removed, the export
  of a run that had finished training written when it is started again.
- ``resume``: every rank's random states and stage state saved and restored; progress counts
  repaired around resumes from the last batch of an epoch.
- ``guards``: a start-up check of the stage against the strategy (before any network is built) and
  a stop at the first non-finite loss (before that step is saved).
- ``preemption``: SIGTERM, Ctrl-C and SLURM's requeue signal save at the next step boundary, then exit
  or requeue.
- ``runs``: what a run owns. Its run dir is locked before a network is built; each checkpoint records its
  run, stage and datamodule, and a checkpoint of another stage, or a checkpoint dir holding another run's
  checkpoints, is refused at start-up.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from lit_saferlhf.callbacks.checkpoints import AtomicCheckpoints, ExportFinishedRun, StaleCheckpointFiles
from lit_saferlhf.callbacks.guards import NonFiniteLossGuard, StrategyCheck
from lit_saferlhf.callbacks.preemption import SaveOnPreemption
from lit_saferlhf.callbacks.resume import RankStates, RepairProgress
from lit_saferlhf.callbacks.runs import LockRunDir, RunCheckpoints

__all__ = ["project_callbacks"]


def project_callbacks() -> list[Callback]:
    """The callbacks ``lit-saferlhf fit`` adds to every run, in the order they must run."""
    return [
        StrategyCheck(),
        AtomicCheckpoints(),
        StaleCheckpointFiles(),
        RankStates(),
        RepairProgress(),
        NonFiniteLossGuard(),
        SaveOnPreemption(),
        ExportFinishedRun(),
        LockRunDir(),  # late: on an exception, its lock is released after the save on SIGTERM
        RunCheckpoints(),
    ]
