"""Runs killed with SIGKILL and resumed repeat the uninterrupted run bit for bit (random-number states included).

A tiny PPO-Lagrangian (2 epochs of 3 rollouts of 4 prompts, 6 new tokens, ``last.ckpt`` after every
rollout) runs once without interruption and once killed twice and resumed, in subprocesses through
the real CLI; λ's history, the logged metrics (all log versions joined) and the exported weights must
be equal, not close.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_saferlhf.commands.report import read_stage_metrics
from tests.distributed.test_reliability import finish, global_step, start, wait_until
from tests.distributed.test_strategies import clean_environment

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PPO = REPO / "cli_configs/tiny/ppo_lag.yaml"
ROLLOUTS = 6
UPDATES = 2
"""Optimizer steps per rollout (4 sequences in minibatches of 2): the unit of ``global_step``."""
TIMING = ("time/",)
"""Metrics that measure wall-clock time, the only ones a resumed run may log differently."""


def ppo_args(out: Path, tiny_models: dict[str, Path], *overrides: str) -> list[str]:
    """``fit`` arguments of the tiny PPO-Lagrangian with outputs in ``out`` and ``last.ckpt`` after every rollout."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True, "every_n_train_steps": 1},
    }
    return [
        "fit",
        f"--config={PPO}",
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        f"--trainer.limit_train_batches={ROLLOUTS // 2}",
        "--trainer.max_epochs=2",
        "--data.init_args.batch_size=4",
        "--model.init_args.ppo.minibatch_size=2",
        "--model.init_args.generation.max_new_tokens=6",
        "--trainer.logger.init_args.flush_logs_every_n_steps=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks+={json.dumps(checkpoint)}",
        *overrides,
    ]


def saved_step(last: Path) -> int:
    """The step of ``last.ckpt`` (-1 while there is none or it cannot be read yet)."""
    try:
        return global_step(last)
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def kill_at(args: list[str], out: Path, rollout: int, name: str) -> int:
    """Start a run, SIGKILL it once ``last.ckpt`` holds rollout ``rollout`` or a later one; the rollout it holds."""
    log, last = out / f"{name}.log", out / "checkpoints" / "last.ckpt"
    out.mkdir(parents=True, exist_ok=True)
    process = start(args, log)
    wait_until(lambda: saved_step(last) >= rollout * UPDATES, process, log)
    process.send_signal(signal.SIGKILL)
    finish(process, log, -signal.SIGKILL)
    return saved_step(last) // UPDATES


def run_to_end(args: list[str], out: Path, name: str) -> None:
    log = out / f"{name}.log"
    out.mkdir(parents=True, exist_ok=True)
    finish(start(args, log), log, 0)


def weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "model.safetensors")


def without_timing(metrics: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    return {name: points for name, points in metrics.items() if not name.startswith(TIMING)}


@pytest.mark.slow
def test_a_ppo_run_killed_twice_repeats_the_uninterrupted_run_bit_for_bit(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    uninterrupted = start(ppo_args(whole, tiny_models), whole / "whole.log")  # beside the killed runs: 2 cores

    first = kill_at(ppo_args(killed, tiny_models), killed, 2, "first")
    resume = f"--ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"
    second = kill_at(ppo_args(killed, tiny_models, resume), killed, min(first + 2, ROLLOUTS - 1), "second")
    assert 2 <= first < second < ROLLOUTS
    run_to_end(ppo_args(killed, tiny_models, resume), killed, "third")
    finish(uninterrupted, whole / "whole.log", 0)

    expected = json.loads((whole / "model" / "multiplier_history.json").read_text())
    assert len(expected["multiplier"]) == ROLLOUTS
    assert json.loads((killed / "model" / "multiplier_history.json").read_text()) == expected  # floats, exactly
    expected_weights, found_weights = weights(whole / "model"), weights(killed / "model")
    assert expected_weights.keys() == found_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.equal(found_weights[name], tensor), name
    expected_metrics = without_timing(read_stage_metrics(whole / "logs")[0])
    assert without_timing(read_stage_metrics(killed / "logs")[0]) == expected_metrics
    assert len(expected_metrics["solver/multiplier"]) == ROLLOUTS
    names = sorted(path.name for path in (killed / "checkpoints").iterdir())
    assert names == [f"epoch=1-step={ROLLOUTS * UPDATES}.ckpt", "last.ckpt"]  # no -v1, no partial file left


def two_process_run(args: list[str], out: Path, name: str, kill_after: int | None = None) -> None:
    """``args`` on 2 CPU processes (``ddp_spawn``); with ``kill_after``, SIGKILL the whole group once
    ``last.ckpt`` holds that rollout."""
    log, last = out / f"{name}.log", out / "checkpoints" / "last.ckpt"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **clean_environment(),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "lit_saferlhf.cli", *args, "--trainer.strategy=ddp_spawn", "--trainer.devices=2"]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output, start_new_session=True)
    try:
        if kill_after is None:
            finish(process, log, 0, timeout=300)
            return
        wait_until(lambda: saved_step(last) >= kill_after * UPDATES, process, log)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_two_process_ddp_ppo_run_repeats_the_uninterrupted_lambda_history(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    steps = 2  # rollouts per rank, in one epoch
    args = [f"--trainer.limit_train_batches={steps}", "--trainer.max_epochs=1"]
    two_process_run(ppo_args(whole, tiny_models, *args), whole, "whole")
    two_process_run(ppo_args(killed, tiny_models, *args), killed, "first", kill_after=1)
    first = saved_step(killed / "checkpoints" / "last.ckpt") // UPDATES
    assert 1 <= first < steps
    resume = f"--ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"
    two_process_run(ppo_args(killed, tiny_models, *args, resume), killed, "rest")
    expected = json.loads((whole / "model" / "multiplier_history.json").read_text())
    assert len(expected["multiplier"]) == steps
    assert json.loads((killed / "model" / "multiplier_history.json").read_text()) == expected
