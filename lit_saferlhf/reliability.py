"""Fault tolerance that every stage gets from the CLI: atomic checkpoints, a non-finite-loss stop, preemption.

``lit-saferlhf fit`` adds :func:`reliability_callbacks` to every run, so a run killed at any point
loses at most the work since its last checkpoint:

- :class:`AtomicCheckpoints` writes single-file checkpoints to a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it into place, so a checkpoint name never points at a half-written
  file (a SIGKILL or a full disk mid-write leaves the previous checkpoint as it was).
- :class:`NonFiniteLossGuard` stops the run at the first step whose loss is NaN or infinite, before
  that step's state is checkpointed, and names the step, the loss and the last checkpoint.
- :class:`SaveOnPreemption` turns SIGTERM into "finish the step, save, exit 143", and SLURM's requeue
  signal (``--signal=SIGUSR1@120``) into "finish the step, save ``hpc_ckpt_<n>.ckpt``, ``scontrol
  requeue``, exit". Lightning itself saves from inside the signal handler, mid-step and, under DDP,
  with a barrier that the other ranks may never reach (Lightning issue #21406); here the handler only
  sets a flag and the save happens at the next step boundary, on every rank at the same step.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lit_saferlhf.errors import writing

log = logging.getLogger(__name__)

LOSS_PREFIXES = ("train/loss", "loss/")
"""Logged metrics that :class:`NonFiniteLossGuard` checks (besides the loss ``training_step`` returns)."""
HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
"""Lightning's name for the checkpoint a SLURM job resumes from (the highest number wins)."""


def reliability_callbacks() -> list[Callback]:
    """The callbacks ``lit-saferlhf fit`` adds to every run."""
    return [AtomicCheckpoints(), NonFiniteLossGuard(), SaveOnPreemption()]


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------


def partial_path(target: Path) -> Path:
    """The temporary file a checkpoint is written to before it is renamed to ``target``.

    Hidden, in the same folder (so the rename is atomic), and named by a hash of the target's name:
    it must not end in ``.ckpt`` nor contain ``hpc_ckpt_``, or Lightning would take it for a
    checkpoint when it looks for the newest one to resume from.
    """
    digest = hashlib.sha1(target.name.encode()).hexdigest()[:16]
    return target.with_name(f".partial-{digest}.tmp")


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written file under a checkpoint's name.

    ``torch.save`` writes the checkpoint to a temporary file next to the target, which is fsynced
    and then ``os.replace``-d over the target; the folder is fsynced too, so the rename survives a
    power cut. Lightning's own writer buffers the whole checkpoint in memory and stages it in the
    system temp folder (often a small local disk or a tmpfs on compute nodes, and a copy instead of
    a rename across file systems), without fsync. Remote paths (``s3://`` ...) keep Lightning's
    writer: an object store's upload is already all-or-nothing.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The state to save (anything ``torch.save`` accepts).
            path: The checkpoint file.
            storage_options: Must be None, as for ``TorchCheckpointIO``.
        """
        fs, local = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            with writing(target):  # a full disk says so, naming the checkpoint (the previous one stays whole)
                torch.save(checkpoint, partial)
                fsync(partial)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
            fsync(target.parent)


class AtomicCheckpoints(Callback):
    """Use :class:`AtomicCheckpointIO` wherever the strategy writes single-file checkpoints with Lightning's default.

    Installed at ``setup`` rather than as a ``trainer.plugins`` default, so a config that sets its own
    ``trainer.plugins`` (a SLURM environment, say) still gets atomic writes. A strategy with its own
    checkpoint IO (a user's CheckpointIO plugin, XLA, async wrappers) is left alone. Sharded checkpoints
    are folders that bypass the CheckpointIO: ``strategies.FSDP2Strategy`` makes FSDP2's atomic, while
    DeepSpeed's and FSDP1's are written by those libraries as they are.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Swap in the atomic writer if the strategy uses the plain ``TorchCheckpointIO``."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the message names the step, the loss and the last checkpoint."""


def newest_checkpoint(trainer: L.Trainer) -> str | None:
    """The most recently written checkpoint of the run's ModelCheckpoints and SLURM saves, if any."""
    candidates = [Path(p) for cb in trainer.checkpoint_callbacks for p in checkpoint_paths(cb) if p]
    candidates += Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
    existing = [path for path in candidates if path.exists()]
    return str(max(existing, key=lambda path: path.stat().st_mtime)) if existing else None


def checkpoint_paths(callback: Callback) -> list[str]:
    """The last and best checkpoint paths a ModelCheckpoint knows of."""
    if not isinstance(callback, ModelCheckpoint):
        return []
    return [callback.last_model_path, callback.best_model_path]


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


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM and SLURM's requeue signal
# ----------------------------------------------------------------------------------------------------------------


class Requeued(SystemExit):
    """Raised after the requeue checkpoint is saved and the job requeued; exits with 128 + the signal number."""


def slurm_requeue(trainer: L.Trainer) -> SLURMEnvironment | None:
    """The trainer's SLURM environment if Lightning's auto-requeue is on (the default inside a SLURM job)."""
    environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment
    return None


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
    """

    def __init__(self) -> None:
        self.requested = False
        self.exit_status: int | None = None
        self.previous_handler: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Note who handled the requeue signal before Lightning registers its handlers."""
        environment = slurm_requeue(trainer)
        self.requested, self.exit_status = False, None
        self.previous_handler = signal.getsignal(environment.requeue_signal) if environment else None

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over the requeue signal (Lightning registered its own handler just before)."""
        self.take_over_requeue_signal(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over the requeue signal (when there is no sanity check)."""
        self.take_over_requeue_signal(trainer)

    def take_over_requeue_signal(self, trainer: L.Trainer) -> None:
        """Replace Lightning's save-inside-the-handler with a flag; Lightning restores the old handler at teardown."""
        environment = slurm_requeue(trainer)
        user_handler = self.previous_handler not in (None, signal.SIG_DFL)  # then Lightning left it alone; so do we
        if environment and not user_handler and threading.current_thread() is threading.main_thread():
            signal.signal(environment.requeue_signal, self.on_requeue_signal)

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
            self.save_and_requeue(trainer, environment.requeue_signal)

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
        """After SIGTERM: save the run at the step it stopped at, and exit with status 143."""
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        if slurm_requeue(trainer):
            path = save_hpc_checkpoint(trainer)
        elif (path := claim_last_checkpoint(trainer)) is not None:
            trainer.save_checkpoint(path)
        if path is None:
            log.warning("SIGTERM: the run has no ModelCheckpoint, so no checkpoint was saved")
        else:
            log.warning("SIGTERM: saved the run at step %d to %s", trainer.global_step, path)
        exception.code = 128 + signal.SIGTERM


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
