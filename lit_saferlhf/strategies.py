"""Strategy pieces the configs name: ``FSDP2Strategy`` (atomic distributed checkpoints) and ``BF16MixedPrecision``.

Under ``ModelParallelStrategy`` every checkpoint is a folder (one shard file per rank, torch's
``.metadata`` and Lightning's ``meta.pt``) that Lightning writes straight under its final name, not
through the CheckpointIO. A run killed mid-save therefore leaves a half-written folder that looks
like a checkpoint, and re-saving ``last.ckpt`` writes the new shards into the old folder, so a kill
there leaves new weights next to the old step counters. ``FSDP2Strategy`` writes each folder under
a hidden partial name beside its target, and only once every rank has finished does rank 0 move it
into place. ``cli_configs/strategies/fsdp2.yaml`` selects it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import MixedPrecision

from lit_saferlhf.callbacks.checkpoints import fsync, partial_path

RENAME_EXCHANGE = 2
"""``renameat2`` flag: swap two existing paths in one step (Linux 3.15+, most local file systems)."""
AT_FDCWD = -100
"""``renameat2``'s "relative to the working directory"."""


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 via ``fully_shard`` in ``configure_model``) whose checkpoint folders are atomic.

    What it adds to Lightning's strategy, and why:

    - **Saving** a distributed checkpoint writes it into a hidden folder next to the target (named by
      ``reliability.partial_path``: it neither ends in ``.ckpt`` nor contains ``hpc_ckpt_``, so neither
      Lightning nor the pipeline takes it for a checkpoint), waits for every rank, and rank 0 then moves
      it to the target: an atomic exchange with an older folder of that name where the file system
      allows it (Linux ``renameat2``), else two renames. A crash at any point leaves the previous
      checkpoint under the name, complete; a leftover partial folder is deleted by the next save of
      that name.
    - **Removing** a checkpoint folder (``ModelCheckpoint``'s top-k clean-up, older SLURM checkpoints)
      first renames it to its hidden name, so a half-deleted folder never keeps a checkpoint's name.

    Arguments are those of ``ModelParallelStrategy``. With ``save_distributed_checkpoint=False`` the
    checkpoint is one file written by rank 0 through the CheckpointIO (atomic with ``AtomicCheckpoints``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Write the distributed checkpoint to a partial folder on every rank, then move it into place on rank 0."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(filepath))
        partial = partial_path(target)
        if self.is_global_zero:
            discard(partial)  # left by a run killed while saving this name
        self.barrier()
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier()  # every rank has written its shards, and rank 0 the metadata
            if self.is_global_zero:
                fsync(partial / _METADATA_FILENAME)
                move_into_place(partial, target)
        except BaseException:
            if self.is_global_zero:
                discard(partial)
            raise
        self.barrier()

    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Delete a checkpoint; a folder is renamed to its hidden name first, then deleted."""
        path = Path(filepath)
        if self.is_global_zero and path.is_dir() and not path.is_symlink():
            discard(path)
        else:
            super().remove_checkpoint(filepath)


def move_into_place(partial: Path, target: Path) -> None:
    """Rename the finished ``partial`` to ``target``, replacing whatever ``target`` was (a folder or a file).

    The older ``target`` is swapped out atomically where the file system can exchange two paths;
    elsewhere it is renamed away first, so for a moment neither exists under the name, but a
    half-written one never does.
    """
    if not target.exists() and not target.is_symlink():
        os.rename(partial, target)
    elif exchange(partial, target):
        discard(partial)  # the older checkpoint, now under the partial name
    else:
        old = partial.with_name(f"{partial.name}.old")
        discard(old)
        os.replace(target, old)
        os.rename(partial, target)
        discard(old)
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
        fsync(target.parent)


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange (NFS, ...)
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def discard(path: Path) -> None:
    """Delete a file or folder if it exists; a folder under a visible name is renamed to its hidden name first."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.is_dir():
        return
    if not path.name.startswith("."):  # a checkpoint's name: never leave a half-deleted folder under it
        hidden = partial_path(path)
        discard(hidden)
        os.rename(path, hidden)
        path = hidden
    shutil.rmtree(path)


@dataclass
class BF16MixedPrecision(MixedPrecision):
    """FSDP1 mixed precision: bf16 parameters and buffers in forward and backward, gradients reduced in fp32.

    Lightning's ``precision: bf16-mixed`` under ``FSDPStrategy`` also reduces gradients in bf16, which
    loses precision when many ranks' gradients are summed; ``cli_configs/strategies/fsdp.yaml`` passes
    this as the strategy's ``mixed_precision``.
    """

    param_dtype: torch.dtype | None = torch.bfloat16
    reduce_dtype: torch.dtype | None = torch.float32
    buffer_dtype: torch.dtype | None = torch.bfloat16
