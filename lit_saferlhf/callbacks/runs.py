"""What a run owns: its run dir (locked while it fits), its outputs (checked before it starts) and its checkpoints.

A run starts with a ``fit`` without a checkpoint and goes on through every resume from one of its checkpoints,
wherever that checkpoint lies (``--ckpt_path``, ``--ckpt_path last``, the pipeline's resume, a SLURM requeue, a
copy in another dir). It gets a run id when it starts, and each of its checkpoints records that id, the stage and
the datamodule (:data:`RUN_KEY`).

- :func:`check_outputs`: every local dir a fit writes (run dir, checkpoint dirs, log dirs, the export dir's parent)
  is created and written to once, and the export dir must be a dir or not exist yet. ``lit-saferlhf fit`` runs it
  before ``trainer.fit``: Lightning creates the loggers' dirs before any callback's ``setup``.
- :class:`LockRunDir`: the run dir (``trainer.default_root_dir``) is locked while the fit runs (:class:`RunDirLock`).
- :class:`RunCheckpoints`: a checkpoint of another stage or datamodule is refused before anything is restored
  (:func:`check_same_stage`), and so are checkpoint dirs that hold another run's checkpoints, unless
  ``--replace_checkpoints=true`` says to delete them.

The callbacks read the checkpoint a fit resumes from at ``setup`` in ``trainer.ckpt_path``, which ``lit-saferlhf fit``
sets from ``--ckpt_path`` (``last``, ``hpc`` and SLURM's automatic resume resolved as Lightning resolves them).
In Python, set ``trainer.ckpt_path`` before ``trainer.fit`` instead of passing ``ckpt_path`` to it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import lightning as L
from fsspec.core import url_to_fs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_saferlhf.callbacks.checkpoints import is_local, remove_path, saved_metadata
from lit_saferlhf.errors import ConfigError, DataError, LitSafeRLHFError, RunConflictError, output_dir

log = logging.getLogger(__name__)

RUN_KEY = "lit_saferlhf_run"
"""Where a checkpoint records its run: ``{"run_id", "stage", "data"}`` (the stage's and datamodule's import paths)."""
LOCK_NAME = ".lit-saferlhf.lock"
"""The lock file of a fitting run, in its run dir; removed when the run ends."""
REPLACE_FLAG = "--replace_checkpoints=true"
"""What lets a fit start over checkpoints of another run, deleting them."""

T = TypeVar("T")


def local_path(path: Any) -> Path | None:
    """``path`` on the local file system; None when unset or remote (``s3://`` ...)."""
    return Path(url_to_fs(str(path))[1]) if path and is_local(path) else None


def class_path(instance: object) -> str:
    """The import path of ``instance``'s class, as checkpoints record it."""
    return f"{type(instance).__module__}.{type(instance).__qualname__}"


def on_rank_zero(trainer: L.Trainer, work: Callable[[], T]) -> T:
    """``work()`` on global rank 0, its result on every rank; our error is raised on every rank, so none waits.

    Other ranks raise a plain :class:`LitSafeRLHFError` with the same message (not every error class can be
    rebuilt from its message).
    """
    outcome: tuple[T | None, str | None] = (None, None)
    error: LitSafeRLHFError | None = None
    if trainer.is_global_zero:
        try:
            outcome = (work(), None)
        except LitSafeRLHFError as raised:
            error, outcome = raised, (None, str(raised))
    result, message = trainer.strategy.broadcast(outcome, src=0)
    if error is not None:
        raise error
    if message is not None:
        raise LitSafeRLHFError(message)
    return cast(T, result)  # set whenever no error was raised


# ----------------------------------------------------------------------------------------------------------------
# The outputs and the run dir's lock
# ----------------------------------------------------------------------------------------------------------------


def check_outputs(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Refuse an export dir that is not a dir, and create and write to once every local dir the fit writes.

    Raises:
        ConfigError: Naming the setting of the dir that cannot be created or written to.
    """
    export_dir = getattr(pl_module, "export_dir", None)  # every stage has one
    export = local_path(export_dir)
    if export is not None and export.exists() and not export.is_dir():
        expected = "a dir (the export replaces it) or a path that does not exist yet, not a file"
        raise ConfigError("export_dir", expected, export_dir)
    outputs: list[tuple[str, Any]] = [("trainer.default_root_dir", trainer.default_root_dir)]
    outputs += [
        ("trainer.callbacks: the ModelCheckpoint's dirpath", callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint)
    ]
    outputs += [("trainer.logger's save_dir", logger.save_dir) for logger in trainer.loggers]
    if export is not None:  # written beside the export dir, then renamed into place
        outputs.append(("model.init_args.export_dir's parent", export.parent))
    for key, path in outputs:
        folder = local_path(path)
        if folder is not None:
            output_dir(folder, key)


def holder(handle: IO[str]) -> str:
    """Who a lock file says holds it: ``pid 12 on host gpu07 since <time>``."""
    handle.seek(0)
    try:
        record = json.loads(handle.read())
        return f"pid {record['pid']} on host {record['host']} since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def same_file(handle: IO[str], path: Path) -> bool:
    """Whether ``handle`` is open on the file that ``path`` names now."""
    try:
        return os.fstat(handle.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


class RunDirLock:
    """An exclusive lock on a run dir: ``.lit-saferlhf.lock`` in it, ``flock``-ed and naming its holder.

    The kernel drops an ``flock`` when the process that holds it ends, however it ends, so the lock file
    of a killed run is free and the next run takes it over (and says whose it was). On a file system
    without locks (some NFS and Lustre mounts) a warning says so and the run goes on unlocked.

    Args:
        folder: The run dir.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunConflictError: Another live process holds it (its host and pid are named).
        """
        while True:
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held_by = holder(handle)
                handle.close()
                raise RunConflictError(
                    f"{self.path.parent} is the run dir of a run that is still going ({held_by}; lock file "
                    f"{self.path}): wait for it to end, or give this run another trainer.default_root_dir"
                ) from None
            except OSError as error:
                handle.close()
                log.warning("Cannot lock %s (%s): nothing stops another run from writing here", self.path, error)
                return
            if same_file(handle, self.path):
                break
            handle.close()  # its holder removed it between our open and our lock: lock the one there now
        if os.fstat(handle.fileno()).st_size:  # left by a run that was killed: the kernel dropped its lock
            log.warning("Taking over the lock of %s, which ended without releasing it", holder(handle))
        handle.truncate(0)
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}))
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        """Remove the lock file, then drop the lock (whoever waits for it then locks a new file)."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()
            self.handle = None


class LockRunDir(Callback):
    """Lock a fit's run dir (``trainer.default_root_dir``) from ``setup``, before any network is built, to its end.

    On global rank 0 (every rank raises the same error), with :class:`RunDirLock`. The lock is released at
    ``teardown``, and on an exception once the callbacks before this one (a save on SIGTERM) have run.
    """

    def __init__(self) -> None:
        self.lock: RunDirLock | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Take the lock."""
        if stage == "fit" and (folder := local_path(trainer.default_root_dir)) is not None:
            on_rank_zero(trainer, lambda: self.acquire(folder))

    def acquire(self, folder: Path) -> None:
        """Create the run dir and lock it."""
        output_dir(folder, "trainer.default_root_dir")
        self.lock = RunDirLock(folder)
        self.lock.acquire()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Release the lock at the end of the fit."""
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Release the lock when the fit fails (Lightning calls no ``teardown`` then)."""
        self.release()

    def release(self) -> None:
        """Release the lock, if this run holds it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the run, stage and datamodule that wrote them
# ----------------------------------------------------------------------------------------------------------------


def run_record(metadata: dict[str, Any] | None) -> dict[str, str | None]:
    """What a checkpoint says of the run that wrote it: ``run_id``, ``stage`` and ``data`` (None: not said).

    Checkpoints from before :data:`RUN_KEY` name only their stage, in LightningCLI's hyper-parameters.
    """
    metadata = metadata or {}
    record = metadata.get(RUN_KEY) or {}
    stage = record.get("stage") or (metadata.get("hyper_parameters") or {}).get("_class_path")
    return {"run_id": record.get("run_id"), "stage": stage, "data": record.get("data")}


def check_same_stage(path: Path, stage: str | None, data: str | None) -> dict[str, str | None]:
    """Refuse the checkpoint at ``path`` if it records another stage or datamodule class than ``stage`` and ``data``.

    Classes are compared by name, so a checkpoint still resumes after a class moved to another module.

    Args:
        path: A checkpoint file or distributed checkpoint folder (others are not read and pass).
        stage: The import path of the stage this run builds.
        data: The import path of its datamodule (None: none).

    Returns:
        The checkpoint's :func:`run_record`.

    Raises:
        DataError: The checkpoint was written by another stage, or with another datamodule.
    """
    record = run_record(saved_metadata(path))
    saved = (short_name(record["stage"]), short_name(record["data"]))
    wanted = (short_name(stage), short_name(data))
    if (saved[0] and saved[0] != wanted[0]) or (saved[1] and wanted[1] and saved[1] != wanted[1]):
        raise DataError(
            f"checkpoint {path} was written by {describe(*saved)}, but this run is {describe(*wanted)}: "
            f"resume a checkpoint of {wanted[0]}, or run the configs that checkpoint was trained with"
        )
    return record


def short_name(import_path: str | None) -> str | None:
    """``lit_saferlhf.stages.sft.SFTModule`` -> ``SFTModule``."""
    return import_path.rsplit(".", 1)[-1] if import_path else None


def describe(stage: str | None, data: str | None) -> str:
    """``RewardModelModule on RewardData``."""
    return f"{stage} on {data}" if data else str(stage)


def checkpoint_dir(callback: ModelCheckpoint, trainer: L.Trainer) -> Any:
    """The dir ``callback`` writes to: its ``dirpath``, or the one its own ``setup`` (run after ours) will derive."""
    if callback.dirpath is not None:
        return callback.dirpath
    # Lightning's own rule (the logger's dir, or the root's), private: its setup resolves the dir only after ours.
    return callback._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]


def saved_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The checkpoints (files or sharded folders) in the local dirs the fit saves to.

    Every ``*.ckpt`` in its ModelCheckpoints' dirs, and SLURM's ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``.
    """
    found: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and (folder := local_path(checkpoint_dir(callback, trainer))):
            found += folder.glob("*.ckpt")
    if root := local_path(trainer.default_root_dir):
        found += root.glob("hpc_ckpt_*.ckpt")
    return sorted({path.resolve() for path in found})


def other_runs_checkpoints(trainer: L.Trainer, run_id: str, resumed: Path | None) -> list[Path]:
    """The checkpoints in the fit's checkpoint dirs that another run wrote.

    For a fit that resumes, those that record another run id (a checkpoint that records none cannot tell);
    for a fit that starts a run, every one.
    """
    found = [path for path in saved_checkpoints(trainer) if resumed is None or path != resumed.resolve()]
    if resumed is None:
        return found
    return [path for path in found if run_record(saved_metadata(path))["run_id"] not in (None, run_id)]


def conflict(others: list[Path], resumed: Path | None) -> RunConflictError:
    """The error for checkpoint dirs that hold ``others``, another run's checkpoints: what they are and what to do."""
    names = ", ".join(path.name for path in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    folders = " and ".join(sorted({str(path.parent) for path in others}))
    if resumed is None:
        newest = max(others, key=lambda path: path.stat().st_mtime)
        what, resume = "another run", f"resume that run with --ckpt_path {newest}, "
    else:
        what, resume = f"another run than the one {resumed} belongs to", ""
    return RunConflictError(
        f"{folders} holds checkpoints of {what} ({names}): {resume}give this run another trainer.default_root_dir "
        f"(or ModelCheckpoint dirpath), or pass {REPLACE_FLAG} to delete them"
    )


class RunCheckpoints(Callback):
    """Record the run in its checkpoints; refuse a checkpoint of another stage, and dirs of another run's checkpoints.

    At ``setup`` (global rank 0; every rank raises the same error), before any network is built:

    - The checkpoint the fit resumes from (``trainer.ckpt_path``) must record this stage and datamodule
      (:func:`check_same_stage`); its run id becomes this run's. A fit without one starts a new run.
    - ``fit`` only: its checkpoint dirs must hold no other run's checkpoints (:func:`other_runs_checkpoints`).
      Otherwise a fresh run would save ``last-v1.ckpt`` beside the older run's ``last.ckpt``, and resuming from
      ``last.ckpt`` would resume and export the older run. With ``replace_checkpoints`` they are deleted instead.

    Every checkpoint the run writes records its run id, stage and datamodule under :data:`RUN_KEY`.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.replace_checkpoints = False
        """Delete other runs' checkpoints in the checkpoint dirs instead of refusing (``--replace_checkpoints``)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the checkpoint resumed from and the checkpoint dirs; learn the run id."""
        self.run_id = on_rank_zero(trainer, lambda: self.start(trainer, pl_module, stage))

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> str:
        """The checks of :meth:`setup`, on rank 0; the run id."""
        resumed = local_path(trainer.ckpt_path)
        record = check_same_stage(resumed, class_path(pl_module), data_class_path(trainer)) if resumed else None
        run_id = (record or {}).get("run_id") or uuid.uuid4().hex
        if stage == "fit":
            others = other_runs_checkpoints(trainer, run_id, resumed)
            if others and not self.replace_checkpoints:
                raise conflict(others, resumed)
            for path in others:
                log.warning("Deleting %s, a checkpoint of another run (%s)", path, REPLACE_FLAG)
                remove_path(path)
        return run_id

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the run id, the stage and the datamodule."""
        checkpoint[RUN_KEY] = {"run_id": self.run_id, "stage": class_path(pl_module), "data": data_class_path(trainer)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Continue the loaded checkpoint's run (a Python ``trainer.fit(ckpt_path=...)`` is known only here)."""
        self.run_id = run_record(checkpoint)["run_id"] or self.run_id


def data_class_path(trainer: L.Trainer) -> str | None:
    """The import path of the fit's datamodule class (None: dataloaders were given instead)."""
    datamodule = getattr(trainer, "datamodule", None)  # Lightning sets it at fit; Trainer declares none
    return class_path(datamodule) if datamodule is not None else None
