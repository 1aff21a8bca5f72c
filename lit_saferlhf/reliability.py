"""Fault tolerance for every stage: atomic checkpoints, exact resumes, a non-finite-loss stop, preemption.

``lit-saferlhf fit`` adds :func:`reliability_callbacks` to every run, so a run killed at any point
loses at most the work since its last checkpoint, and a resumed run goes on exactly as the
uninterrupted one would have:

- :class:`AtomicCheckpoints` writes single-file checkpoints to a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it into place, so a checkpoint name never points at a half-written
  file (a SIGKILL or a full disk mid-write leaves the previous checkpoint as it was).
- :class:`StaleCheckpointFiles` removes what killed runs left behind (partial checkpoint writes,
  export staging dirs, checkpoints written after the one a run resumes from), so names stay stable.
- :class:`RankStates` saves every random-number state the next step draws from (Python, NumPy,
  torch CPU and the current CUDA device), and the stage's own per-rank state, for every rank in each
  checkpoint and puts them back in a resumed run, so sampling, dropout and shuffling continue bit for bit.
- :class:`RepairProgress` corrects Lightning's progress counts around resumes from the last batch
  of an epoch, which otherwise make a later resume train batches the uninterrupted run never did.
- :class:`NonFiniteLossGuard` stops the run at the first step whose loss is NaN or infinite, before
  that step's state is checkpointed, and names the step, the loss and the last checkpoint.
- :class:`SaveOnPreemption` turns SIGTERM into "finish the step, save, exit 143", and SLURM's requeue
  signal (``--signal=SIGUSR1@120``) into "finish the step, save ``hpc_ckpt_<n>.ckpt``, ``scontrol
  requeue``, exit". Lightning itself saves from inside the signal handler, mid-step and, under DDP,
  with a barrier that the other ranks may never reach (Lightning issue #21406); here the handler only
  sets a flag and the save happens at the next step boundary, on every rank at the same step.
- :class:`ExportFinishedRun` writes the export of a run whose training had finished when it was
  killed (before or during its export) when that run is started again from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
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
    return [
        AtomicCheckpoints(),
        StaleCheckpointFiles(),
        RankStates(),
        RepairProgress(),
        NonFiniteLossGuard(),
        SaveOnPreemption(),
        ExportFinishedRun(),
    ]


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
# What killed runs leave behind
# ----------------------------------------------------------------------------------------------------------------

PARTIAL_GLOB = ".partial-*.tmp"
"""The names :func:`partial_path` gives (files, or folders of sharded checkpoints)."""
RESUME_NAMES = re.compile(r"last(-v\d+)?\.ckpt|hpc_ckpt_\d+\.ckpt")
"""Checkpoints a run resumes from to go on where it stopped (``--ckpt_path last``, the pipeline, SLURM)."""


def remove_path(path: Path) -> None:
    """Delete a file or a folder (whichever ``path`` is); gone already is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The local folders the run's checkpoints go to: its ModelCheckpoints' and ``default_root_dir`` (SLURM)."""
    folders = [callback.dirpath for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
    folders.append(trainer.default_root_dir)
    local = [Path(url_to_fs(str(folder))[1]) for folder in folders if folder and is_local(folder)]
    return list(dict.fromkeys(local))


def is_local(path: Any) -> bool:
    """Whether ``path`` is on the local file system (not ``s3://`` ...)."""
    return isinstance(url_to_fs(str(path))[0], LocalFileSystem)


def saved_step(path: Path) -> int | None:
    """The ``global_step`` a checkpoint file or distributed checkpoint folder holds (None: unreadable, another kind)."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    file = path / _METADATA_FILENAME if path.is_dir() else path
    try:
        return int(torch.load(file, map_location="cpu", weights_only=True, mmap=path.is_file())["global_step"])
    except Exception:  # not a checkpoint we can read: not ours to delete
        return None


def orphaned_checkpoints(callback: ModelCheckpoint, step: int, resumed_from: Path) -> list[Path]:
    """Checkpoints in ``callback``'s folder of steps after ``step`` that ``callback`` (as restored) does not know."""
    known = {callback.last_model_path, callback.best_model_path, callback.kth_best_model_path, *callback.best_k_models}
    known = {Path(path) for path in known if path} | {resumed_from}
    candidates = [path for path in Path(callback.dirpath).glob("*.ckpt") if path not in known]
    return [path for path in candidates if (saved := saved_step(path)) is not None and saved > step]


class StaleCheckpointFiles(Callback):
    """Remove what killed runs left beside the checkpoints and the export, so names stay stable across reruns.

    At the start of a fit (local rank 0; nothing is being written then): the partial files and folders
    of killed checkpoint writes (``.partial-*.tmp``) in every checkpoint folder, and the staging dirs
    of a killed export (``.<export dir name>.*`` beside it). Once a run resumed from its newest
    checkpoint (``last.ckpt``, ``hpc_ckpt_<n>.ckpt``) has restored its state: the checkpoints of later
    steps that the killed run wrote after that one, which the restored ModelCheckpoint does not know.
    The resumed run writes those steps again; left in place, they would stay forever and make it name
    its own ``epoch=0-step=8-v1.ckpt``. Checkpoints are never removed when a run resumes from an
    older, named checkpoint (a deliberate restart from there) or starts afresh.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Delete partial checkpoint writes and export staging dirs of killed runs."""
        if trainer.local_rank != 0:
            return
        leftovers = [path for folder in checkpoint_dirs(trainer) for path in folder.glob(PARTIAL_GLOB)]
        export_dir = getattr(pl_module, "export_dir", None)
        if export_dir and is_local(export_dir):
            export = Path(url_to_fs(str(export_dir))[1])
            leftovers += [path for path in export.parent.glob(f".{export.name}.*") if path.is_dir()]
        for path in leftovers:
            log.info("Removing %s, left by a run killed while writing it", path)
            remove_path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume from the newest checkpoint: delete checkpoints the killed run wrote after it."""
        resumed_from = Path(str(trainer.ckpt_path)) if trainer.ckpt_path else None
        if not trainer.is_global_zero or resumed_from is None or not RESUME_NAMES.fullmatch(resumed_from.name):
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and is_local(callback.dirpath):
                for path in orphaned_checkpoints(callback, trainer.global_step, resumed_from):
                    log.warning("Removing %s: written after %s by the run that was killed", path, resumed_from)
                    remove_path(path)


# ----------------------------------------------------------------------------------------------------------------
# Random-number states
# ----------------------------------------------------------------------------------------------------------------

RANK_STATES_KEY = "rank_states"
"""Where :class:`RankStates` keeps every rank's random-number states and stage state in a checkpoint."""


def random_state() -> dict[str, Any]:
    """This process's random-number states, as types ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
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
        if hasattr(pl_module, "rank_state_dict"):
            own["stage"] = pl_module.rank_state_dict()
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
        if "stage" in own and hasattr(pl_module, "load_rank_state_dict"):
            pl_module.load_rank_state_dict(own["stage"])
        self.pending = own["random"]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Restore the loaded random states once, right before the resumed run's first step."""
        if self.pending is not None:
            set_random_state(self.pending)
            self.pending = None


# ----------------------------------------------------------------------------------------------------------------
# Loop progress of a resumed run
# ----------------------------------------------------------------------------------------------------------------


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
                callback._last_checkpoint_saved = True

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Runs before the loops read ``checkpoint["loops"]``."""
        if repair_batch_progress(checkpoint):
            log.info("Repaired the batch counts of the checkpoint, written at the end of a batch, before resuming")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Count the running epoch as started if Lightning did not (a running epoch is one ahead of the processed)."""
        self.stepped = True
        epochs = trainer.fit_loop.epoch_progress
        if epochs.current.started == epochs.current.processed:
            epochs.increment_ready()
            epochs.increment_started()


# ----------------------------------------------------------------------------------------------------------------
# The export of a run that had finished training
# ----------------------------------------------------------------------------------------------------------------


class ExportFinishedRun(Callback):
    """Write the missing export of a run resumed from a checkpoint taken after its last step.

    Lightning skips the whole training loop when the checkpoint it resumes from has reached
    ``max_epochs`` or ``max_steps``, and with it ``on_train_end``, where every stage writes its
    export. A run killed between its last checkpoint and the end of its export would rerun to exit 0
    and write nothing; this calls the stage's ``on_train_end`` at the end of such a fit, so the export
    is written from the checkpoint's weights (when the stage has an ``export_dir`` that does not exist).
    The export happens after Lightning's teardown (the only hook left), on every rank, as at the end of
    training; tested with one process, untested under DDP and sharded strategies (whose gather of the
    full weights needs the process group, which Lightning's teardown keeps).
    """

    def __init__(self) -> None:
        self.trained = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A new fit has not trained yet."""
        self.trained = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The training loop ran, so ``on_train_end`` will export as usual."""
        self.trained = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resumed fit that skipped training: export if the export dir is missing."""
        export_dir = getattr(pl_module, "export_dir", None)
        if self.trained or trainer.ckpt_path is None or not export_dir:
            return
        if not trainer.strategy.broadcast(not Path(export_dir).is_dir(), src=0):
            return
        log.warning(
            "Training had finished at step %d (%s) but %s is missing: writing it from that checkpoint",
            trainer.global_step, trainer.ckpt_path, export_dir,
        )  # fmt: skip
        pl_module.on_train_end()


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
