"""A callback that parks a SLURM job's tasks at a known batch, so a signal or a kill lands there.

SLURM's timer sends ``--signal`` only every 30 s or so; holding the run at batch ``batch`` until the signal
arrives makes the interrupted step the same in every CI run, whatever the timer and the machine's load.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L

from lit_saferlhf.callbacks.preemption import SaveOnPreemption


class HoldAtBatch(L.Callback):
    """Before batch ``batch``, once per run folder: write ``held.<rank>`` (this pid) and wait for a signal.

    The wait ends when SIGTERM or SLURM's requeue signal has reached this rank, or after ``timeout`` s.
    ``rank`` holds that rank only (the others run on into the step's collectives); None holds every rank.
    """

    def __init__(self, batch: int, rank: int | None = None, timeout: float = 120.0) -> None:
        self.batch, self.rank, self.timeout = batch, rank, timeout

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        marker = Path(trainer.default_root_dir) / f"held.{trainer.global_rank}"
        if idx != self.batch or marker.exists() or self.rank not in (None, trainer.global_rank):
            return
        marker.write_text(str(os.getpid()))
        (preemption,) = [callback for callback in trainer.callbacks if isinstance(callback, SaveOnPreemption)]
        deadline = time.monotonic() + self.timeout
        while not (trainer.received_sigterm or preemption.requested) and time.monotonic() < deadline:
            time.sleep(0.05)
