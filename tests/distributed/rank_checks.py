"""Callbacks for distributed and resume tests: record, per rank, what the test asserts afterwards.

Added to a run with ``--trainer.callbacks+=rank_checks.RecordRanks`` (this folder on PYTHONPATH).
Each rank writes ``rank<N>.json`` into ``$RANK_CHECKS_DIR``: world size, whether parameters are
DTensor-sharded and their local vs full sizes, the samples it trained on, and, gathered across ranks
after every step, λ (PPO) and the epoch metrics, so the test can check that every rank saw the same
numbers. ``RecordBatches`` appends each step's samples to ``$BATCH_LOG``, line by line, so a killed
run leaves what it trained on. ``KillAtExport`` kills a run between the end of its training and its export.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def sample_ids(batch: dict[str, Tensor]) -> list[str]:
    """A short digest of each sample's unpadded tokens (its first ``*input_ids``), to tell samples apart."""
    key = next(name for name in batch if name.endswith("input_ids"))
    mask = batch[key.replace("input_ids", "attention_mask")].bool()
    rows = zip(batch[key], mask, strict=True)
    return [hashlib.sha1(ids[keep].numpy().tobytes()).hexdigest()[:12] for ids, keep in rows]


class RecordRanks(L.Callback):
    """Write each rank's view of sharding, λ and metrics for the test to compare."""

    def __init__(self) -> None:
        self.record: dict = {"multipliers": [], "metrics": {}, "samples": []}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FSDP2 keeps the root unit gathered after a forward (the sanity check ran one): reshard to look at rest.
        for module in pl_module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        params = list(pl_module.parameters())
        sharded = [p for p in params if isinstance(p, DTensor)]
        self.record |= {
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "params": len(params),
            "sharded_params": len(sharded),
            "unsharded": [name for name, p in pl_module.named_parameters() if not isinstance(p, DTensor)],
            "local_numel": sum(p.to_local().numel() for p in sharded),
            "full_numel": sum(p.numel() for p in sharded),
        }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: dict, batch_idx: int
    ) -> None:
        self.record["samples"] += sample_ids(batch)
        constraints = getattr(pl_module, "constraints", None)  # PPO-Lagrangian's: the first one's λ
        if constraints is not None:
            gathered = pl_module.all_gather(torch.tensor(constraints[0].solver.multiplier, dtype=torch.float64))
            self.record["multipliers"].append(gathered.tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("val/", "train_epoch/")):
                self.record["metrics"][name] = pl_module.all_gather(value.float()).tolist()
        out = Path(os.environ["RANK_CHECKS_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.record))


class RecordBatches(L.Callback):
    """Append ``{"epoch", "step", "samples"}`` to ``$BATCH_LOG`` after every training step."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: dict, batch_idx: int
    ) -> None:
        line = {"epoch": trainer.current_epoch, "step": trainer.global_step - 1, "samples": sample_ids(batch)}
        with open(os.environ["BATCH_LOG"], "a") as log:
            log.write(json.dumps(line) + "\n")


class KillAtExport(L.Callback):
    """SIGKILL this process at the end of training: ``KILL_AT_EXPORT=before`` before the stage's export starts,
    ``during`` once the export is written beside its destination but not yet renamed into place."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if os.environ["KILL_AT_EXPORT"] == "before":  # callbacks' on_train_end runs before the stage's
            os.kill(os.getpid(), signal.SIGKILL)
        import lit_saferlhf.models.causal_lm

        def killed_before_the_rename(staging: Path, out_dir: Path) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        lit_saferlhf.models.causal_lm.replace_dir = killed_before_the_rename
