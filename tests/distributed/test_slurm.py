"""SLURM without a cluster: the sbatch template, ranks from SLURM's variables, and requeue-then-resume.

SLURM is faked by its environment variables, a fake ``srun`` that records its arguments and a fake
``scontrol`` that records the requeue.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only

from lit_saferlhf.commands.fit import cli_main
from lit_saferlhf_plugins.solvers import DualAscent
from tests.distributed.rank_checks import RecordBatches
from tests.distributed.test_reliability import (
    REPO,
    finish,
    global_step,
    sft_args,
    start,
    train_steps,
    wait_until,
)

SBATCH = REPO / "cli_configs/slurm/run.sbatch"
JOB_2X2 = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NAME": "lit-saferlhf",  # "bash" or "interactive" would make Lightning ignore SLURM
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "2",
    "SLURM_NODELIST": "gpu[07-08]",
}


@pytest.fixture(autouse=True)
def restore_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Trainer built for rank 3 makes every later ``rank_zero_only`` call in this process a no-op; undo that."""
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)


def slurm_environ(tmp_path: Path, **variables: str) -> dict[str, str]:
    """``os.environ`` without SLURM's variables, plus ``variables`` and fake ``srun``/``scontrol`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):  # each appends its arguments, one per line, to <tool>.calls
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{tmp_path / tool}.calls"\n')
        script.chmod(0o755)
    environ = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    return {**environ, **variables, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def use_environ(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    """Make ``environ`` this process's environment for the test."""
    for name in [name for name in os.environ if name not in environ]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)


def calls(tmp_path: Path, tool: str) -> list[str]:
    """The arguments the fake ``tool`` was called with, one per line."""
    path = tmp_path / f"{tool}.calls"
    return path.read_text().splitlines() if path.is_file() else []


# ----------------------------------------------------------------------------------------------------------------
# The sbatch template and ranks
# ----------------------------------------------------------------------------------------------------------------


def test_the_sbatch_template_asks_for_requeue_and_one_task_per_gpu() -> None:
    directives = [line.split()[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    options = dict(directive.lstrip("-").split("=", 1) for directive in directives if "=" in directive)
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert options["signal"] == "SIGUSR1@120"
    assert {"nodes", "cpus-per-task"} <= options.keys()
    assert {"--requeue", "--open-mode=append"} <= set(directives)
    assert subprocess.run(["bash", "-n", str(SBATCH)], check=False).returncode == 0


def test_the_sbatch_runs_any_stage_on_the_jobs_nodes_and_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = {**JOB_2X2, "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "3"}
    environ = slurm_environ(tmp_path, **job)
    stage = ["--config", "cli_configs/tiny/sft.yaml", "--trainer.strategy=ddp", "--trainer.logger=false"]
    subprocess.run(["bash", str(SBATCH), *stage], env=environ, cwd=tmp_path, check=True, capture_output=True)
    command = calls(tmp_path, "srun")
    assert command[:4] == ["--kill-on-bad-exit=1", "lit-saferlhf", "fit", *stage[:1]]
    slurm = ["--config", "cli_configs/slurm/trainer.yaml", "--trainer.num_nodes=2", "--trainer.devices=2"]
    assert command[4:] == [*stage[1:], *slurm]

    use_environ(monkeypatch, {**environ, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    monkeypatch.chdir(REPO)
    trainer = cli_main(command[3:], run=False).trainer  # what srun runs on the last task, minus "fit"
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (environment.auto_requeue, environment.requeue_signal) == (True, signal.SIGUSR1)
    assert (environment.main_address, environment.main_port) == (
        "gpu07",
        15000 + 3456,
    )  # every task derives the port from the job id
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)


@pytest.mark.parametrize(("procid", "localid", "nodeid"), [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
def test_a_2_node_job_of_2_tasks_each_gives_every_process_its_ranks(
    monkeypatch: pytest.MonkeyPatch, procid: int, localid: int, nodeid: int
) -> None:
    ranks = {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid)}
    use_environ(monkeypatch, {**os.environ, **JOB_2X2, **ranks})
    environment = SLURMEnvironment()
    assert SLURMEnvironment.detect()
    assert environment.world_size() == 4
    assert (environment.global_rank(), environment.local_rank(), environment.node_rank()) == (procid, localid, nodeid)

    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)
    assert trainer.strategy.cluster_environment.creates_processes_externally  # srun starts the 4 processes
    ranks = (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank)
    assert ranks == (4, procid, localid, nodeid)


# ----------------------------------------------------------------------------------------------------------------
# Requeue and resume
# ----------------------------------------------------------------------------------------------------------------


def one_task_job(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment of a 1-node, 1-task SLURM job, with fake ``srun`` and ``scontrol``."""
    job = {**JOB_2X2, "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}
    ranks = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    return slurm_environ(tmp_path, **{**job, **ranks, **variables})


@pytest.mark.slow
def test_the_requeue_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    args, hpc = sft_args(tmp_path, every=1000, limit=128, epochs=2), tmp_path / "hpc_ckpt_1.ckpt"  # 8 steps
    first = start(args, tmp_path / "first.log", one_task_job(tmp_path))
    wait_until(lambda: 1 in train_steps(tmp_path, 0), first, tmp_path / "first.log")
    first.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@120` sends
    finish(first, tmp_path / "first.log", 128 + signal.SIGUSR1)
    saved_at = global_step(hpc)
    assert 2 <= saved_at < 8
    assert calls(tmp_path, "scontrol") == ["requeue", "4242"]
    assert train_steps(tmp_path, 0) == list(range(saved_at))  # the checkpoint holds every step that ran

    second = start(args, tmp_path / "second.log", one_task_job(tmp_path, SLURM_RESTART_COUNT="1"))
    finish(second, tmp_path / "second.log", 0)
    assert f"Restored all states from the checkpoint at {hpc}" in (tmp_path / "second.log").read_text()
    assert train_steps(tmp_path, 1) == list(range(saved_at, 8))
    assert calls(tmp_path, "scontrol") == ["requeue", "4242"]


@pytest.mark.slow
def test_a_requeue_signal_seen_by_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    job = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    args = sft_args(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2", every=1000, limit=256, epochs=2)
    ranks = [  # what srun starts: one process per task, told its rank by SLURM_PROCID / SLURM_LOCALID
        start(
            args,
            tmp_path / f"rank{rank}.log",
            one_task_job(tmp_path, **job, SLURM_PROCID=f"{rank}", SLURM_LOCALID=f"{rank}"),
        )
        for rank in (0, 1)
    ]
    wait_until(lambda: 1 in train_steps(tmp_path, 0), ranks[0], tmp_path / "rank0.log")
    ranks[1].send_signal(signal.SIGUSR1)  # a signal that reaches one rank only must not deadlock the other
    for rank, process in enumerate(ranks):
        finish(process, tmp_path / f"rank{rank}.log", 128 + signal.SIGUSR1, timeout=300)
    saved_at = global_step(tmp_path / "hpc_ckpt_1.ckpt")
    assert train_steps(tmp_path, 0) == list(range(saved_at))
    assert calls(tmp_path, "scontrol") == ["requeue", "4242"]  # rank 0 only


class SignalAtBatch(L.Callback):
    """Sends this process ``signum`` as batch ``batch_idx`` starts, as SLURM would at any moment."""

    def __init__(self, batch_idx: int, signum: int) -> None:
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, idx: int) -> None:
        if idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_a_requeued_ppo_lagrangian_run_resumes_with_its_solver_state(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ppo"
    args = [
        "--config=cli_configs/tiny/ppo_lag.yaml",  # DualAscent
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        "--trainer.limit_train_batches=3",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
    ]
    use_environ(monkeypatch, one_task_job(tmp_path))
    monkeypatch.setenv("BATCH_LOG", str(tmp_path / "batches.jsonl"))
    monkeypatch.chdir(REPO)
    cli = cli_main(args, run=False)
    cli.trainer.callbacks[:0] = [SignalAtBatch(1, signal.SIGUSR1), RecordBatches()]
    with pytest.raises(SystemExit) as stopped:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert calls(tmp_path, "scontrol") == ["requeue", "4242"]
    saved = torch.load(out / "hpc_ckpt_1.ckpt", weights_only=True)["constraints"]["cost"]  # the one constraint
    assert len(saved["multiplier_history"]) == 2  # rollouts 0 and 1; the signal came during rollout 1
    assert saved["solver"]["multiplier"] == saved["multiplier_history"][-1] != 1.0

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # No --ckpt_path: Lightning finds hpc_ckpt_1.ckpt in default_root_dir.
    cli_main(["fit", *args, "--trainer.callbacks+=tests.distributed.rank_checks.RecordBatches"])
    multipliers = json.loads((out / "model" / "multiplier_history.json").read_text())["multiplier"]
    assert multipliers[:2] == saved["multiplier_history"]
    (episode_cost,) = [float(row) for row in column(out / "logs" / "version_1", "solver/episode_cost")]
    restored = DualAscent()
    restored.load_state_dict(saved["solver"])  # λ, cost limit, step size, cap, update count
    restored.update(episode_cost)  # rollout 2's step, from the saved λ
    assert multipliers[2:] == [pytest.approx(restored.multiplier, rel=1e-5)]
    prompts = [json.loads(line)["samples"] for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    assert len(prompts) == 3  # rollouts 0 and 1, then 2 after the requeue
    assert not set(prompts[2]) & set(prompts[0] + prompts[1])  # the epoch's third batch, not its first again


def column(version: Path, name: str) -> list[str]:
    """The non-empty values of one metric in a CSVLogger version."""
    with (version / "metrics.csv").open() as file:
        return [row[name] for row in csv.DictReader(file) if row.get(name)]
