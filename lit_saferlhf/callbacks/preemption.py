"""SIGTERM, Ctrl-C (SIGINT) and SLURM's requeue signal: finish the step, save, then exit or requeue.

:class:`SaveOnPreemption` turns SIGTERM into "finish the step, save, exit 143", SIGINT (Ctrl-C) into
the same with exit status 130 (a second Ctrl-C stops at once, without saving), and SLURM's requeue
signal (``--signal=SIGUSR1@120``) into "finish the step, save ``hpc_ckpt_<n>.ckpt``, ``scontrol
requeue``, exit". Lightning itself saves from inside the signal handler, mid-step and, under DDP,
with a barrier that the other ranks may never reach (Lightning issue #21406); here the handler only
sets a flag and the save happens at the next step boundary, on every rank at the same step.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_saferlhf.callbacks.guards import sum_over_ranks

log = logging.getLogger(__name__)

HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
"""Lightning's name for the checkpoint a SLURM job resumes from (the highest number wins)."""


class Requeued(SystemExit):
    """Raised after the requeue checkpoint is saved and the job requeued; exits with 128 + the signal number."""


def slurm_requeue(trainer: L.Trainer) -> SLURMEnvironment | None:
    """The trainer's SLURM environment if Lightning's auto-requeue is on (the default inside a SLURM job)."""
    environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment
    return None


def requeue_signal(environment: SLURMEnvironment) -> signal.Signals:
    """The signal SLURM sends before it requeues the job (Lightning leaves it None only on Windows: no SLURM)."""
    assert environment.requeue_signal is not None
    return environment.requeue_signal


def hpc_checkpoint_path(trainer: L.Trainer) -> Path:
    """``<default_root_dir>/hpc_ckpt_<n+1>.ckpt``, the name Lightning resumes from in a SLURM job; same on all ranks."""
    folder = Path(trainer.default_root_dir)
    versions = [int(match[1]) for path in folder.glob("hpc_ckpt_*.ckpt") if (match := HPC_NAME.fullmatch(path.name))]
    return trainer.strategy.broadcast(folder / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt", src=0)


def save_hpc_checkpoint(trainer: L.Trainer) -> Path:
    """Save ``hpc_ckpt_<n+1>.ckpt``, then delete the older ones (Lightning would keep them all); its path."""
    path = hpc_checkpoint_path(trainer)
    trainer.save_checkpoint(path)
    for old in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
        if old != path:
            trainer.strategy.remove_checkpoint(old)
    return path


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (array jobs as ``<array job>_<task>``), as Lightning does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except FileNotFoundError:
        result = None
    if result == 0:
        log.info("Requeued SLURM job %s", job)
    else:
        log.warning("`scontrol requeue %s` failed (%s); resubmit the job to resume from its checkpoint", job, result)


class SaveOnPreemption(Callback):
    """On SIGTERM or SLURM's requeue signal: finish the step, save a checkpoint, exit with 128 + the signal.

    SIGTERM: Lightning already stops at the next batch boundary (it raises ``SIGTERMException``, a
    ``SystemExit`` with status 0); this saves the run there and makes the exit status 143. The
    checkpoint goes to ``hpc_ckpt_<n>.ckpt`` in a SLURM job with auto-requeue (Lightning resumes from it
    by itself when the job is requeued), else to the first ModelCheckpoint's ``last.ckpt`` (what
    ``--ckpt_path last`` and ``lit-saferlhf pipeline`` resume from). With no ModelCheckpoint nothing is
    saved. SIGUSR1 from SLURM (``#SBATCH --signal=SIGUSR1@120``) is taken over from Lightning's handler:
    the handler only sets a flag, and at the end of the step in which any rank saw it every rank saves
    ``hpc_ckpt_<n>.ckpt``, rank 0 runs ``scontrol requeue`` and removes older HPC checkpoints, and the
    run exits with status 138 once the step's metrics are logged (at the next batch, validation or
    epoch end, so nothing else runs).

    SIGINT (Ctrl-C) during training is taken as SIGTERM (Python would raise KeyboardInterrupt mid-step,
    and Lightning then exits 1 without saving), unless a handler of the user's holds it; the run exits
    with status 130. A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.exit_status: int | None = None
        self.previous_handler: Any = None
        self.interrupted = False
        self.previous_interrupt_handler: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Note who handled the requeue signal before Lightning registers its handlers."""
        environment = slurm_requeue(trainer)
        self.requested, self.exit_status, self.interrupted = False, None, False
        self.previous_handler = signal.getsignal(requeue_signal(environment)) if environment else None

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over the requeue signal (Lightning registered its own handler just before)."""
        self.take_over_requeue_signal(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over the requeue signal (when there is no sanity check), and Ctrl-C for training."""
        self.take_over_requeue_signal(trainer)
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Python's own
            self.previous_interrupt_handler = signal.signal(signal.SIGINT, lambda *_: self.on_interrupt(trainer))

    def on_interrupt(self, trainer: L.Trainer) -> None:
        """First Ctrl-C: stop at the step boundary as on SIGTERM (Lightning's flag); a second: stop now."""
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets
        log.warning("Ctrl-C: stopping after this step to save the run (Ctrl-C again stops without saving)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give Ctrl-C back to Python once training is over."""
        if self.previous_interrupt_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.previous_interrupt_handler)
        self.previous_interrupt_handler = None

    def take_over_requeue_signal(self, trainer: L.Trainer) -> None:
        """Replace Lightning's save-inside-the-handler with a flag; Lightning restores the old handler at teardown."""
        environment = slurm_requeue(trainer)
        user_handler = self.previous_handler not in (None, signal.SIG_DFL)  # then Lightning left it alone; so do we
        if environment and not user_handler and threading.current_thread() is threading.main_thread():
            signal.signal(requeue_signal(environment), self.on_requeue_signal)

    def on_requeue_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only set a flag: the save happens at the step boundary, in ordinary code."""
        self.requested = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """If any rank got the requeue signal: save and requeue, all ranks at this step."""
        environment = slurm_requeue(trainer)
        if environment is None or self.exit_status is not None:
            return
        requested = self.requested
        if trainer.world_size > 1:  # one all-reduce per step, only in SLURM jobs with auto-requeue
            requested = bool(sum_over_ranks(torch.tensor(int(requested), device=trainer.strategy.root_device)))
        if requested:
            self.save_and_requeue(trainer, requeue_signal(environment))

    def save_and_requeue(self, trainer: L.Trainer, signum: int) -> None:
        """Save ``hpc_ckpt_<n>.ckpt``, requeue the job, and set the exit status."""
        path = save_hpc_checkpoint(trainer)
        if trainer.is_global_zero:
            requeue_slurm_job()
        log.warning("Requeue signal: saved the run at step %d to %s", trainer.global_step, path)
        self.exit_status = 128 + int(signum)

    def exit_if_requeued(self) -> None:
        """Stop the run once the requeue checkpoint is saved and the step logged."""
        if self.exit_status is not None:
            raise Requeued(self.exit_status)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Exit before the next step, if requeued."""
        self.exit_if_requeued()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Exit before validating, if requeued."""
        self.exit_if_requeued()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Exit before the epoch's end-of-epoch work (and, after the last batch, the export), if requeued."""
        self.exit_if_requeued()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """After SIGTERM (SIGINT): save the run at the step it stopped at, and exit with status 143 (130)."""
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        signum = signal.SIGINT if self.interrupted else signal.SIGTERM
        path: Path | None
        if slurm_requeue(trainer):
            path = save_hpc_checkpoint(trainer)
        elif (path := claim_last_checkpoint(trainer)) is not None:
            trainer.save_checkpoint(path)
        if path is None:
            log.warning("%s: the run has no ModelCheckpoint, so no checkpoint was saved", signum.name)
        else:
            step = trainer.global_step
            log.warning("%s: saved the run at step %d to %s; resume with --ckpt_path %s", signum.name, step, path, path)
        exception.code = 128 + signum


def claim_last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The first ModelCheckpoint's ``last`` checkpoint path, marked as its own (None without a ModelCheckpoint).

    Every ModelCheckpoint that writes that file is told it wrote it (``last_model_path``), before
    the checkpoint that stores this is saved: otherwise the resumed run's ModelCheckpoint finds a
    ``last.ckpt`` it does not know and writes ``last-v1.ckpt`` next to it from then on.
    """
    metrics = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
    paths = {
        callback: Path(callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST))
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None
    }
    if not paths:
        return None
    path = next(iter(paths.values()))
    for callback, last in paths.items():
        if last == path:
            callback.last_model_path = str(path)
    return path
