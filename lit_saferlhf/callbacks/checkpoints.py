"""Checkpoints that are never half-written, names that stay stable, and exports of finished runs.

- :class:`AtomicCheckpoints` writes single-file checkpoints to a temporary file in the same folder,
  fsyncs it and ``os.replace``-s it into place, so a checkpoint name never points at a half-written
  file (a SIGKILL or a full disk mid-write leaves the previous checkpoint as it was).
- :class:`StaleCheckpointFiles` removes what killed runs left behind (partial checkpoint writes,
  export staging dirs, checkpoints written after the one a run resumes from), so names stay stable.
- :class:`ExportFinishedRun` writes the export of a run whose training had finished when it was
  killed (before or during its export) when that run is started again from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_saferlhf.errors import writing

log = logging.getLogger(__name__)


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


def saved_metadata(path: Path) -> dict[str, Any] | None:
    """What a checkpoint file or distributed checkpoint folder holds but tensor data (None: unreadable, another kind).

    A file is memory-mapped (its tensors are not read); a folder's ``meta.pt`` holds all but the sharded states.
    DeepSpeed's folders (pickled) are not read.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    file = path / _METADATA_FILENAME if path.is_dir() else path
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=path.is_file())
    except Exception:  # not a checkpoint we can read
        return None
    return loaded if isinstance(loaded, dict) else None


def saved_step(path: Path) -> int | None:
    """The ``global_step`` a checkpoint file or distributed checkpoint folder holds (None: unreadable, another kind)."""
    step = (saved_metadata(path) or {}).get("global_step")
    return int(step) if isinstance(step, int) else None  # not a checkpoint we can read: not ours to delete


def orphaned_checkpoints(callback: ModelCheckpoint, step: int, resumed_from: Path) -> list[Path]:
    """Checkpoints in ``callback``'s folder of steps after ``step`` that ``callback`` (as restored) does not know."""
    names = {callback.last_model_path, callback.best_model_path, callback.kth_best_model_path, *callback.best_k_models}
    known = {Path(name) for name in names if name} | {resumed_from}
    assert callback.dirpath is not None  # the caller checks it: a ModelCheckpoint that writes files
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
