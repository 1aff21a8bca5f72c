"""The project's own ``run.sbatch`` on a real two-node SLURM cluster (2 nodes x 1 task, DDP over gloo, on CPU).

A tiny PPO-Lagrangian run is submitted with the real ``sbatch``; the runs that are interrupted (requeued at the
time limit, preempted with SIGTERM, or losing a task to ``kill -9``) and resumed must end exactly where the
uninterrupted job ends: λ history, logged metrics (all but the ``time/`` ones, wall-clock seconds) and weights,
bit for bit. The uninterrupted job itself must repeat a 2-process run on one machine without SLURM.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.slurm.cluster import Cluster, free_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "cli_configs/slurm/run.sbatch"
BATCHES = 4  # rollouts of the tiny PPO-Lagrangian run
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5"]
HOLD = "tests.slurm.hold.HoldAtBatch"


def ppo_args(out: Path, tiny_models: dict[str, Path], *extra: str) -> list[str]:
    """``lit-saferlhf fit`` arguments of the tiny PPO-Lagrangian run (4 rollouts of 4 prompts per rank) in ``out``."""
    return [
        f"--config={REPO / 'cli_configs/tiny/ppo_lag.yaml'}",
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        f"--trainer.limit_train_batches={BATCHES}",
        "--data.init_args.batch_size=4",
        "--model.init_args.ppo.minibatch_size=4",
        "--model.init_args.generation.max_new_tokens=8",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def job_env(cluster: Cluster) -> dict[str, str]:
    """What the job inherits: one thread per task, the first node's address (n1 does not resolve), this repo."""
    return {
        **cluster.env,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def submit(cluster: Cluster, out: Path, *args: str, options: tuple[str, ...] = ()) -> str:
    """``sbatch run.sbatch <args>`` from the repository root on both nodes; the job id."""
    out.mkdir(parents=True, exist_ok=True)
    output = f"--output={out / 'job-%j.out'}"
    return cluster.sbatch(*CPU_JOB, output, *options, str(SBATCH), *args, env=job_env(cluster), cwd=REPO)


def job_output(out: Path, job_id: str) -> str:
    """What the job printed (every run of it: ``--open-mode=append``)."""
    return (out / f"job-{job_id}.out").read_text()


def finished(cluster: Cluster, out: Path, job_id: str, timeout: float = 240) -> dict[str, str]:
    """Wait for the job to end; its record, with its output in the assertion message if it did not complete."""
    record = cluster.wait_job(job_id, timeout)
    assert record["JobState"] == "COMPLETED", f"{record['JobState']} {record['ExitCode']}:\n{job_output(out, job_id)}"
    return record


def outcome(out: Path) -> dict[str, object]:
    """λ history, every logged (step, metric, value) but wall-clock times, and the exported weights of a run."""
    rows = []
    for path in sorted((out / "logs").glob("version_*/metrics.csv")):
        with path.open() as file:
            rows += [
                (row["step"], name, value)
                for row in csv.DictReader(file)
                for name, value in row.items()
                if value and name != "step" and not name.startswith("time/")
            ]
    weights = {}
    for path in sorted((out / "model").glob("*.safetensors")):
        weights |= {f"{path.name}:{name}": tensor for name, tensor in load_file(path).items()}
    history = json.loads((out / "model" / "multiplier_history.json").read_text())["multiplier"]
    return {"multipliers": history, "metrics": sorted(rows), "weights": weights}


def assert_same_run(run: dict[str, object], reference: dict[str, object]) -> None:
    """Bit for bit: the same λ floats, the same logged strings, the same weight tensors."""
    assert run["multipliers"] == reference["multipliers"]
    assert run["metrics"] == reference["metrics"]
    weights, expected = run["weights"], reference["weights"]
    assert isinstance(weights, dict)
    assert isinstance(expected, dict)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


@pytest.fixture(scope="module")
def uninterrupted(
    slurm_cluster: Cluster, tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The reference: the job run start to end on both nodes."""
    out = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(slurm_cluster, out, *ppo_args(out, tiny_models))
    finished(slurm_cluster, out, job_id)
    text = job_output(out, job_id)
    assert f"job {job_id} restart 0 on 2 x 1" in text
    return {"out": out, "outcome": outcome(out), "output": text}


def test_a_two_node_job_repeats_a_two_process_run_on_one_machine(
    uninterrupted: dict, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    reference = uninterrupted["outcome"]
    assert len(reference["multipliers"]) == BATCHES
    assert len(set(reference["multipliers"])) > 1

    local = tmp_path / "local"  # the same run without SLURM: Lightning starts the 2 processes itself
    args = ppo_args(local, tiny_models, "--trainer.devices=2", "--trainer.strategy=ddp")
    environ = {name: value for name, value in job_env(Cluster(tmp_path)).items() if name != "MASTER_ADDR"}
    result = subprocess.run(
        [sys.executable, "-m", "lit_saferlhf.cli", "fit", *args], env=environ, cwd=REPO, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert_same_run(outcome(local), reference)


def test_the_time_limit_signal_requeues_the_job_and_it_resumes_bit_for_bit(
    slurm_cluster: Cluster, uninterrupted: dict, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    # SIGUSR1 comes when 30 s are left of the 1 min limit, at SLURM's next 30 s tick: batch 1 waits for it.
    # (Not earlier: a task that gets it before Lightning's handler is set, while importing, dies of it.)
    hold = f"--trainer.callbacks+={json.dumps({'class_path': HOLD, 'init_args': {'batch': 1}})}"
    options = ("--time=1", "--signal=USR1@30")
    job_id = submit(slurm_cluster, tmp_path, *ppo_args(tmp_path, tiny_models, hold), options=options)
    slurm_cluster.wait_for(lambda: int(slurm_cluster.job(job_id)["Restarts"]) >= 1, 180, "the requeue")
    # SLURM signals a requeued job again 30 s before its new limit; on a real cluster that is a whole new time
    # limit away, here it would be seconds into the resumed run: give the second run room to finish.
    slurm_cluster.client("scontrol", "update", f"JobId={job_id}", "TimeLimit=5")
    record = finished(slurm_cluster, tmp_path, job_id)
    text = job_output(tmp_path, job_id)
    assert int(record["Restarts"]) >= 1, text
    assert f"job {job_id} restart 1 on 2 x 1" in text  # the same job, run again by SLURM
    assert "Restored all states from the checkpoint" in text
    assert "hpc_ckpt_1.ckpt" in text
    assert_same_run(outcome(tmp_path), uninterrupted["outcome"])


def test_preemption_saves_at_the_step_boundary_exits_143_and_a_resubmission_resumes(
    slurm_cluster: Cluster, uninterrupted: dict, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    hold = f"--trainer.callbacks+={json.dumps({'class_path': HOLD, 'init_args': {'batch': 1}})}"
    args = ppo_args(tmp_path, tiny_models, hold)
    job_id = submit(slurm_cluster, tmp_path, *args)
    slurm_cluster.wait_for(lambda: {"held.0", "held.1"} <= {p.name for p in tmp_path.iterdir()}, 180, "batch 1")
    slurm_cluster.client("scancel", "--signal=TERM", job_id)  # what a preempting scheduler sends the tasks
    record = slurm_cluster.wait_job(job_id, 120)
    text = job_output(tmp_path, job_id)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "143:0"), text
    assert "stopped by SIGTERM (preemption" in text
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] > 0

    again = submit(slurm_cluster, tmp_path, *args)  # no --ckpt_path: Lightning finds hpc_ckpt_1.ckpt
    finished(slurm_cluster, tmp_path, again)
    assert "Restored all states from the checkpoint" in job_output(tmp_path, again)
    assert_same_run(outcome(tmp_path), uninterrupted["outcome"])


def test_a_task_killed_mid_step_ends_the_job_and_a_resubmission_resumes_from_the_last_checkpoint(
    slurm_cluster: Cluster, uninterrupted: dict, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True, "every_n_train_steps": 1},
    }
    # Rank 1 stops before batch 2; rank 0 goes on into the step and waits for it in a gloo collective.
    hold = {"class_path": HOLD, "init_args": {"batch": 2, "rank": 1}}
    args = ppo_args(tmp_path, tiny_models, f"--trainer.callbacks+={json.dumps(checkpoint)}")
    job_id = submit(slurm_cluster, tmp_path, *args, f"--trainer.callbacks+={json.dumps(hold)}")
    slurm_cluster.wait_for(lambda: (tmp_path / "held.1").exists(), 180, "rank 1 at batch 2")
    time.sleep(1)  # rank 0 is inside the step now
    os.kill(int((tmp_path / "held.1").read_text()), signal.SIGKILL)
    killed = time.monotonic()
    record = slurm_cluster.wait_job(job_id, 90)
    text = job_output(tmp_path, job_id)
    assert record["JobState"] == "FAILED", text
    assert time.monotonic() - killed < 60, text  # srun stops the rank left waiting: no hang
    assert "task 1: Killed" in text
    # run.sbatch's line: srun's status is the killed task's (137) or the others' SIGTERM exit (143), whichever it saw
    assert "a task failed" in text or "stopped by SIGTERM (preemption, or srun stopping the others" in text

    again = submit(slurm_cluster, tmp_path, *args, "--ckpt_path=last")
    finished(slurm_cluster, tmp_path, again)
    assert "Restored all states from the checkpoint" in job_output(tmp_path, again)
    assert_same_run(outcome(tmp_path), uninterrupted["outcome"])
