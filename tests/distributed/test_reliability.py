"""Fault tolerance: atomic checkpoints, the non-finite-loss stop, runs killed by SIGKILL or SIGTERM that resume,
exports written on rerun, and what killed runs leave behind (the bit-exact resume tests: ``test_exact_resume.py``).

The kill tests run the real CLI in a subprocess (``python -m lit_saferlhf.cli fit``) on the tiny SFT
config: 256 demonstrations, 3 epochs of 8 steps, ``last.ckpt`` every 2 steps.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from safetensors.torch import load_file
from torch import Tensor

import lit_saferlhf.stages.sft
from lit_saferlhf.callbacks import AtomicCheckpoints, NonFiniteLossGuard
from lit_saferlhf.callbacks.checkpoints import AtomicCheckpointIO, partial_path
from lit_saferlhf.callbacks.guards import NonFiniteLossError
from lit_saferlhf.callbacks.preemption import hpc_checkpoint_path
from lit_saferlhf.callbacks.resume import RANK_STATES_KEY, random_state, repair_batch_progress, set_random_state
from lit_saferlhf.commands.fit import cli_main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SFT = REPO / "cli_configs/tiny/sft.yaml"
TOTAL_STEPS = 24  # 256 demonstrations / 32 per batch * 3 epochs


# ----------------------------------------------------------------------------------------------------------------
# Helpers: the tiny SFT run, in this process or in a subprocess
# ----------------------------------------------------------------------------------------------------------------


def sft_args(out: Path, *overrides: str, every: int = 7, limit: int = 256, epochs: int = 3) -> list[str]:
    """``fit`` arguments of the tiny SFT run with outputs in ``out`` and ``last.ckpt`` every ``every`` steps (0: at
    every epoch's end)."""
    trigger = {"every_n_train_steps": every} if every else {"every_n_epochs": 1}
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, **trigger},
    }
    return [
        "fit",
        f"--config={SFT}",
        f"--data.init_args.limit={limit}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger.init_args.flush_logs_every_n_steps=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks+={json.dumps(checkpoint)}",
        *overrides,
    ]


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m lit_saferlhf.cli <args>`` in the background, its output in ``log``."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    with log.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "lit_saferlhf.cli", *args], cwd=REPO, env=env, stdout=output, stderr=output
        )


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll ``condition`` every 50 ms while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def finish(process: subprocess.Popen, log: Path, status: int, timeout: float = 600) -> None:
    """Wait for ``process`` and check its exit status."""
    assert process.wait(timeout) == status, log.read_text()[-5000:]


def global_step(path: Path) -> int:
    """The ``global_step`` stored in a checkpoint."""
    return torch.load(path, weights_only=True)["global_step"]


def train_steps(out: Path, version: int) -> list[int]:
    """The steps at which ``train/loss`` was logged in one CSVLogger version (none yet: [])."""
    path = out / "logs" / f"version_{version}" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as file:
        return [int(row["step"]) for row in csv.DictReader(file) if (row.get("train/loss") or "").strip()]


def saved_steps(out: Path) -> list[int]:
    """The steps of the periodic ``epoch=E-step=S.ckpt`` files."""
    return [int(path.stem.rsplit("step=", 1)[1]) for path in (out / "checkpoints").glob("epoch=*-step=*.ckpt")]


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_a_save_that_crashes_mid_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "weights": torch.ones(3)}, target)

    def write_half_then_fail(obj: object, file: Path) -> None:
        Path(file).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 6, "weights": torch.zeros(3)}, target)
    monkeypatch.undo()

    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file is left behind
    assert global_step(target) == 4
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.ones(3))


def test_a_file_left_by_a_kill_mid_write_is_never_taken_for_a_checkpoint(tmp_path: Path) -> None:
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, tmp_path / "hpc_ckpt_1.ckpt")
    for name in ("hpc_ckpt_2.ckpt", "last.ckpt"):  # what a SIGKILL during the rename's write leaves
        partial_path(tmp_path / name).write_bytes(b"PK\x03\x04 half a checkpoint")
        assert not partial_path(tmp_path / name).name.endswith(".ckpt")
        assert "hpc_ckpt_" not in partial_path(tmp_path / name).name

    trainer = L.Trainer(default_root_dir=tmp_path, logger=False)
    assert trainer._checkpoint_connector._hpc_resume_path == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert hpc_checkpoint_path(trainer) == tmp_path / "hpc_ckpt_2.ckpt"


def test_atomic_writes_replace_only_lightnings_default_writer() -> None:
    default = L.Trainer(accelerator="cpu", logger=False)
    AtomicCheckpoints().setup(default, None, "fit")
    assert isinstance(default.strategy.checkpoint_io, AtomicCheckpointIO)

    mine = L.Trainer(accelerator="cpu", logger=False, plugins=[AsyncCheckpointIO(TorchCheckpointIO())])
    AtomicCheckpoints().setup(mine, None, "fit")
    assert isinstance(mine.strategy.checkpoint_io, AsyncCheckpointIO)


def test_the_cli_writes_atomically_and_keeps_a_configs_own_plugins(tmp_path: Path) -> None:
    environment = "lightning.fabric.plugins.environments.LightningEnvironment"
    cli = cli_main(sft_args(tmp_path, f"--trainer.plugins={environment}", every=2, limit=64, epochs=1))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert type(cli.trainer._accelerator_connector.cluster_environment).__name__ == "LightningEnvironment"
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))


class RecordCheckpointIO(L.Callback):
    """Writes ``<default_root_dir>/io_rank<N>.txt``: the class that wrote this rank's checkpoints."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = type(trainer.strategy.checkpoint_io).__name__
        (Path(trainer.default_root_dir) / f"io_rank{trainer.global_rank}.txt").write_text(name)


@pytest.mark.slow
def test_ddp_spawn_runs_with_atomic_checkpoints(tmp_path: Path) -> None:
    ddp = ["--trainer.strategy=ddp_spawn", "--trainer.devices=2"]
    record = "--trainer.callbacks+=test_reliability.RecordCheckpointIO"
    process = start(sft_args(tmp_path, *ddp, record, every=2, limit=128, epochs=1), tmp_path / "run.log")
    finish(process, tmp_path / "run.log", 0)
    assert [(tmp_path / f"io_rank{rank}.txt").read_text() for rank in (0, 1)] == ["AtomicCheckpointIO"] * 2
    assert global_step(tmp_path / "checkpoints" / "last.ckpt") == 2  # 128 / 32 per batch / 2 ranks
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------------------------


def nan_from_training_call(monkeypatch: pytest.MonkeyPatch, bad_call: int) -> None:
    """Make the SFT stage's loss NaN from its ``bad_call``-th training forward (0-based) on."""
    real, calls = lit_saferlhf.stages.sft.lm_loss, []

    def lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats = real(logits, labels)
        if torch.is_grad_enabled():  # validation runs without grad
            calls.append(1)
            if len(calls) > bad_call:
                loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(lit_saferlhf.stages.sft, "lm_loss", lm_loss)


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_from_training_call(monkeypatch, bad_call=5)
    with pytest.raises(NonFiniteLossError, match=r"^step 5: train/loss is nan") as error:
        cli_main(sft_args(tmp_path, every=2, limit=256, epochs=1))

    named = Path(str(error.value).split("the last good checkpoint is ")[1])
    assert named.parent == tmp_path / "checkpoints"
    assert global_step(named) == 4  # checkpoints every 2 steps; step 5's state was never saved
    assert saved_steps(tmp_path) == [4]
    weights = torch.load(named, weights_only=True)["state_dict"].values()
    assert all(torch.isfinite(value).all() for value in weights)


class ManualLossModule(L.LightningModule):
    """Manual optimisation that logs ``loss/actor`` as the PPO stage does; the loss is inf from batch ``bad_batch``."""

    def __init__(self, bad_batch: int) -> None:
        super().__init__()
        self.automatic_optimization, self.bad_batch = False, bad_batch
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        loss = self.layer(batch[0]).pow(2).mean()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scale = math.inf if batch_idx >= self.bad_batch else 1.0
        self.log_dict({"loss/actor": loss.detach() * scale, "rollout/cost": torch.tensor(math.nan)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_logged_ppo_style_loss_that_turns_inf_stops_the_run(tmp_path: Path) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[NonFiniteLossGuard()], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"^step 3: loss/actor is inf\. .* no checkpoint was written"):
        trainer.fit(ManualLossModule(bad_batch=3), data)  # rollout/cost is NaN throughout: not a loss, not checked


def test_the_loss_check_syncs_with_the_host_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {"train/loss": torch.tensor(1.0), "loss/actor": torch.tensor(2.0), "val/loss": torch.tensor(3.0)}
    trainer = SimpleNamespace(callback_metrics=metrics, global_step=7)
    syncs: list[str] = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: syncs.append(_n) or _r(self, *a))
    NonFiniteLossGuard().on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    assert syncs == ["__bool__"]


# ----------------------------------------------------------------------------------------------------------------
# Killed runs resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runs_killed_by_sigkill_and_sigterm_resume_where_they_left_off(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"  # written every 7 steps
    batches = tmp_path / "batches.jsonl"  # each step's samples, appended by every run

    def start_run(name: str, *overrides: str) -> subprocess.Popen:
        args = sft_args(tmp_path, "--trainer.callbacks+=rank_checks.RecordBatches", *overrides)
        return start(args, tmp_path / f"{name}.log", env={"BATCH_LOG": str(batches)})

    # SIGKILL: the work since the last periodic checkpoint is lost, nothing else.
    first = start_run("first")
    wait_until(last.exists, first, tmp_path / "first.log")
    first.send_signal(signal.SIGKILL)
    finish(first, tmp_path / "first.log", -signal.SIGKILL)
    killed_at = global_step(last)
    assert 7 <= killed_at < TOTAL_STEPS

    # Resumed, then SIGTERM between periodic checkpoints: it finishes its step, saves last.ckpt there, exits 143.
    second = start_run("second", f"--ckpt_path={last}")
    wait_until(lambda: killed_at + 1 in train_steps(tmp_path, 1), second, tmp_path / "second.log")
    second.send_signal(signal.SIGTERM)
    finish(second, tmp_path / "second.log", 128 + signal.SIGTERM)
    terminated_at = global_step(last)
    assert killed_at + 2 <= terminated_at < TOTAL_STEPS
    assert f"SIGTERM: saved the run at step {terminated_at} to {last}" in (tmp_path / "second.log").read_text()
    assert train_steps(tmp_path, 1) == list(range(killed_at, terminated_at))  # every logged step is in last.ckpt

    third = start_run("third", f"--ckpt_path={last}")
    finish(third, tmp_path / "third.log", 0)
    assert train_steps(tmp_path, 2) == list(range(terminated_at, TOTAL_STEPS))
    assert global_step(last) == 21  # the last multiple of 7; no stray last-v1.ckpt beside it
    assert sorted(path.name for path in last.parent.iterdir()) == ["epoch=2-step=21.ckpt", "last.ckpt"]
    assert (tmp_path / "model" / "config.json").is_file()
    check_data_position(batches, killed_at)


def check_data_position(batches: Path, killed_at: int) -> None:
    """Resumed runs drew exactly the batches the killed ones had left: each epoch is one pass over the data."""
    by_step: dict[int, dict] = {}
    for line in map(json.loads, batches.read_text().splitlines()):
        if line["step"] in by_step:  # redone after the SIGKILL: the same batch as the first time
            assert line == by_step[line["step"]]
        by_step[line["step"]] = line
    assert sorted(by_step) == list(range(TOTAL_STEPS))
    assert killed_at % 8 != 0  # 8 steps an epoch, checkpoints every 7: the first resume was mid-epoch
    epochs = [[sample for line in by_step.values() if line["epoch"] == epoch for sample in line["samples"]]
              for epoch in range(3)]  # fmt: skip
    assert len(epochs[0]) == 256
    assert Counter(epochs[0]) == Counter(epochs[1]) == Counter(epochs[2])  # no sample repeated or missed
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch


# ----------------------------------------------------------------------------------------------------------------
# Exports that do not lie; what killed runs leave behind
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("moment", "every"), [("before", 0), ("during", 1)])
def test_a_run_killed_at_its_export_writes_the_export_from_its_last_checkpoint_when_started_again(
    moment: str, every: int, tmp_path: Path
) -> None:
    # every=0: the last checkpoint is taken at the epoch's end, and Lightning skips training (and its export) on
    # resume; every=1: at the last batch, and Lightning runs the end of training again.
    last, export = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "model"
    args = sft_args(tmp_path, "--trainer.callbacks+=rank_checks.KillAtExport", every=every, limit=64, epochs=1)
    killed = start(args, tmp_path / "killed.log", env={"KILL_AT_EXPORT": moment})
    finish(killed, tmp_path / "killed.log", -signal.SIGKILL)
    assert global_step(last) == 2  # training had finished: 64 demonstrations / 32 per batch
    assert not export.exists()
    staging = [path.name for path in tmp_path.glob(".model.*")]
    assert len(staging) == (moment == "during")  # the complete export, never renamed into place

    again = start(sft_args(tmp_path, f"--ckpt_path={last}", every=every, limit=64, epochs=1), tmp_path / "again.log")
    finish(again, tmp_path / "again.log", 0)
    written_by_us = f"but {export} is missing: writing it from that checkpoint" in (tmp_path / "again.log").read_text()
    assert written_by_us == (every == 0)
    assert not list(tmp_path.glob(".model.*"))  # the killed export's staging dir is gone too
    weights = load_file(export / "model.safetensors")
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert weights.keys() == {name.removeprefix("model.") for name in saved}
    assert all(torch.equal(tensor, saved[f"model.{name}"]) for name, tensor in weights.items())
    assert sorted(path.name for path in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_a_resumed_run_removes_what_the_killed_run_left_and_keeps_its_checkpoint_names(tmp_path: Path) -> None:
    folder, last = tmp_path / "checkpoints", tmp_path / "checkpoints" / "last.ckpt"
    run = ["--trainer.enable_model_summary=false"]
    cli_main(sft_args(tmp_path, *run, "--trainer.max_steps=1", every=1, limit=96, epochs=1))
    at_step_1 = last.read_bytes()
    cli_main(sft_args(tmp_path, *run, "--trainer.max_steps=2", f"--ckpt_path={last}", every=1, limit=96, epochs=1))
    # What a kill at step 2 between writing epoch=0-step=2.ckpt and last.ckpt leaves, plus a write killed mid-way
    # and a killed export's staging dir.
    last.write_bytes(at_step_1)
    partial_path(folder / "epoch=0-step=3.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    (tmp_path / ".model.k1ll3d").mkdir()
    (tmp_path / ".model.k1ll3d" / "config.json").write_text("{}")
    assert sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) == [
        "epoch=0-step=2.ckpt",
        "last.ckpt",
    ]

    cli_main(sft_args(tmp_path, *run, f"--ckpt_path={last}", every=1, limit=96, epochs=1))
    assert sorted(path.name for path in folder.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]  # no -v1
    assert global_step(last) == 3
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".model")) == []
    assert (tmp_path / "model" / "config.json").is_file()


def test_checkpoints_are_kept_when_a_run_restarts_from_an_older_named_one(tmp_path: Path) -> None:
    folder, last, restart = tmp_path / "checkpoints", tmp_path / "checkpoints" / "last.ckpt", tmp_path / "restart.ckpt"
    run = ["--trainer.enable_model_summary=false"]
    cli_main(sft_args(tmp_path, *run, "--trainer.max_steps=1", every=1, limit=96, epochs=1))
    restart.write_bytes(last.read_bytes())
    cli_main(sft_args(tmp_path, *run, "--trainer.max_steps=2", f"--ckpt_path={last}", every=1, limit=96, epochs=1))
    later = (folder / "epoch=0-step=2.ckpt").read_bytes()
    cli_main(sft_args(tmp_path, *run, "--trainer.max_steps=2", f"--ckpt_path={restart}", every=1, limit=96, epochs=1))
    assert (folder / "epoch=0-step=2.ckpt").read_bytes() == later  # a deliberate restart deletes nothing


# ----------------------------------------------------------------------------------------------------------------
# Exact resumes: the pieces
# ----------------------------------------------------------------------------------------------------------------


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_random_states_round_trip_through_a_checkpoint_loaded_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    saved = random_state()
    expected = draws()
    torch.save({RANK_STATES_KEY: [{"random": saved}]}, tmp_path / "states.pt")
    draws()  # the states move on
    loaded = torch.load(tmp_path / "states.pt", weights_only=True)[RANK_STATES_KEY][0]["random"]
    set_random_state(loaded)
    assert draws() == expected


def test_the_batch_counts_of_a_checkpoint_behind_by_a_resume_are_repaired() -> None:
    def checkpoint(total_completed: int) -> dict:
        total = {"ready": 4, "started": 4, "processed": 4, "completed": total_completed}
        current = {"ready": 2, "started": 2, "processed": 2, "completed": 1}  # saved at the end of batch 2 of 2
        return {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": total, "current": current}}}}

    behind = checkpoint(total_completed=2)  # what Lightning saved after a resume across an epoch's end
    assert repair_batch_progress(behind)
    assert behind["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 3
    assert not repair_batch_progress(checkpoint(total_completed=3))  # already consistent
    assert not repair_batch_progress({"state_dict": {}})  # saved without loops (weights only)
