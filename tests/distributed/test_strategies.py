"""Every stage under 2-process ``ddp_spawn`` and under 2-process FSDP2 (ModelParallelStrategy + fully_shard), on CPU.

Runs the real CLI in a subprocess (ModelParallelStrategy relaunches the command for its second
rank), with ``rank_checks.RecordRanks`` recording what each rank saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STRATEGIES = {
    "ddp_spawn": ["--trainer.strategy=ddp_spawn"],
    "fsdp2": [f"--config={REPO / 'cli_configs/strategies/fsdp2.yaml'}"],
}
QUICK = ["--trainer.max_epochs=1", "--data.init_args.limit=64", "--trainer.enable_progress_bar=false"]


LAUNCH_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
)


def clean_environment() -> dict[str, str]:
    """This process's environment without another job's launch variables, which would make the run wait for peers."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }


def fit_on_two_processes(setup: list[str], out: Path, *overrides: str, env: dict[str, str] | None = None) -> Any:
    """``lit-saferlhf fit <setup>`` (the stage config, then the strategy) on 2 CPU processes, outputs under ``out``.

    The run gets its own process group: if one rank dies, the timeout kills the other too instead of
    leaving it hanging. Returns the ``subprocess.CompletedProcess``.
    """
    args = [
        sys.executable, "-m", "lit_saferlhf.cli", "fit", *setup,
        "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}", f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false", *overrides,
    ]  # fmt: skip
    env = {
        **clean_environment(),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"fit {' '.join(setup)} timed out:\n{stdout[-2000:]}{stderr[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # ranks a finished run may have left behind
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run_stage(stage: str, strategy: str, out: Path, *overrides: str) -> list[dict]:
    """``lit-saferlhf fit`` on 2 CPU processes; each rank's record."""
    checks = out / "checks"
    checks.mkdir(parents=True)
    setup = [f"--config={REPO / 'cli_configs/tiny' / f'{stage}.yaml'}", *STRATEGIES[strategy]]
    run = fit_on_two_processes(
        setup, out, "--trainer.callbacks+=rank_checks.RecordRanks", *QUICK, *overrides,
        env={"RANK_CHECKS_DIR": str(checks)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return [json.loads((checks / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def check_ranks(records: list[dict], strategy: str) -> None:
    assert [record["world_size"] for record in records] == [2, 2]
    if strategy == "fsdp2":
        for record in records:
            assert record["sharded_params"] == record["params"] > 0, record["unsharded"]
            assert record["local_numel"] < record["full_numel"]  # each rank holds a shard, not the whole
    else:
        assert all(record["sharded_params"] == 0 for record in records)
    for name, values in records[0]["metrics"].items():
        assert values[0] == pytest.approx(values[1]), name  # torchmetrics sync: every rank logs the same
    for gathered in records[0]["multipliers"]:
        assert gathered[0] == gathered[1]  # both ranks stepped λ from the same reduced cost
    assert records[0]["samples"] != records[1]["samples"]  # each rank trains on its own share of the data


def stage_overrides(stage: str, tiny_models: dict[str, Path]) -> list[str]:
    """Arguments that point a stage at the tiny trained models and keep PPO to 2 short rollouts."""
    return {
        "sft": [],
        "reward": [f"--model.init_args.model.path={tiny_models['sft']}"],
        "cost": [f"--model.init_args.model.path={tiny_models['sft']}"],
        "ppo_lag": [
            f"--model.init_args.policy={tiny_models['sft']}",
            f"--model.init_args.reward_model={tiny_models['reward']}",
            f"--model.init_args.cost_model={tiny_models['cost']}",
            "--trainer.limit_train_batches=2",
            "--data.init_args.batch_size=4",
            "--model.init_args.ppo.minibatch_size=2",
            "--model.init_args.generation.max_new_tokens=6",
        ],
    }[stage]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("stage", ["sft", "reward", "cost", "ppo_lag"])
def test_stage_runs_on_two_processes(stage: str, strategy: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    records = run_stage(stage, strategy, tmp_path, *stage_overrides(stage, tiny_models))
    check_ranks(records, strategy)
    if stage == "ppo_lag":
        assert len(records[0]["multipliers"]) == 2
    assert (tmp_path / "model" / "config.json").is_file()  # the export is gathered into one full HF dir
