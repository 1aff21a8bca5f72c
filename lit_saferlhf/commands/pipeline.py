"""``lit-saferlhf pipeline``: SFT -> reward model -> cost model -> PPO-Lagrangian, then evaluation and a report.

A pipeline YAML lists stages, each a stage config plus the links that feed earlier exports into it
(``inputs``: config key -> earlier stage name) and per-stage overrides. Every stage writes into
``<out_dir>/<name>/``: its Hugging Face export in ``model/``, checkpoints in ``checkpoints/``
(``last.ckpt`` every ``checkpoint_every`` steps), CSV logs in ``logs/``, and ``stage.json`` once it
has finished. A stage has finished when its ``stage.json`` and its export both exist. Repeating the
command skips finished stages and resumes an interrupted one from the newest of ``last.ckpt`` and a
SLURM ``hpc_ckpt_<n>.ckpt`` (a file, or a folder under sharded strategies); one whose training had
finished but whose export is missing writes the export from that checkpoint.

Under SLURM (``cli_configs/slurm/pipeline.sbatch``) the command runs once, in the batch step, and
``launcher`` makes each stage a job step of its own: ``bash cli_configs/slurm/run.sbatch <fit arguments>``
runs it on every task of the job. A requeue restarts the batch script, which skips the finished stages.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from rich.console import Console

from lit_saferlhf.errors import InputNotFoundError, StageError, require

console = Console()


@dataclass
class StageSpec:
    """One stage of the pipeline."""

    name: str
    """Folder name under ``out_dir`` and the name later stages link to."""
    config: str
    """The stage's YAML (a ``lit-saferlhf fit`` config)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Config key -> earlier stage whose export goes there, e.g. ``model.init_args.policy: sft``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config key -> value, applied after the stage YAML, e.g. ``trainer.max_epochs: 1``."""


@dataclass
class EvaluationSpec:
    """What ``lit-saferlhf evaluate`` runs at the end of the pipeline (names are stage names)."""

    policies: list[str]
    """Stages whose exports are compared (e.g. ``[sft, ppo_lag]``); the first two also meet in the arena."""
    reward_model: str
    """Stage of the reward model."""
    cost_model: str
    """Stage of the cost model."""
    prompt_sets: list[str]
    """Prompt files or ``safety-world:prompts-eval``; ``path#column`` picks the prompt column."""
    max_new_tokens: int = 128
    """Longest response."""
    batch_size: int = 32
    """Prompts per generation batch."""
    limit: int | None = None
    """At most this many prompts per set."""
    seed: int = 0
    """Sampling seed."""


def stage_args(spec: StageSpec, out_dir: Path, checkpoint_every: int) -> list[str]:
    """``lit-saferlhf fit`` arguments of one stage, with its outputs placed under ``out_dir/<name>``."""
    stage_dir = out_dir / spec.name
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(stage_dir / "checkpoints"),
            "save_last": True,
            "every_n_train_steps": checkpoint_every,
        },
    }
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(stage_dir), "name": "logs"},
    }
    settings: dict[str, Any] = {
        "trainer.default_root_dir": str(stage_dir),
        "trainer.logger": logger,
        "trainer.callbacks+": checkpoint,
        "model.init_args.export_dir": str(stage_dir / "model"),
        **{key: str(out_dir / source / "model") for key, source in spec.inputs.items()},
        **spec.overrides,
    }
    args = ["fit", "--config", spec.config]
    for key, value in settings.items():
        args.append(f"--{key}={value if isinstance(value, str) else json.dumps(value)}")
    newest = newest_checkpoint(stage_dir)
    return [*args, f"--ckpt_path={newest}"] if newest else args


def newest_checkpoint(stage_dir: Path) -> Path | None:
    """The newer of ``checkpoints/last.ckpt`` and ``hpc_ckpt_<n>.ckpt`` (a SLURM requeue), files or sharded folders."""
    from lit_saferlhf.commands.export import checkpoint_kind

    saved = [stage_dir / "checkpoints" / "last.ckpt", *stage_dir.glob("hpc_ckpt_*.ckpt")]
    saved = [path for path in saved if checkpoint_kind(path) is not None]
    return max(saved, key=lambda path: path.stat().st_mtime) if saved else None


def run_stage(
    index: int, spec: StageSpec, out_dir: Path, total: int, checkpoint_every: int, launcher: list[str] | None = None
) -> dict[str, Any]:
    """Run one stage unless it has finished before (here, or by ``launcher`` + its fit arguments); its record."""
    from lit_saferlhf.commands.fit import cli_main

    done, export = out_dir / spec.name / "stage.json", out_dir / spec.name / "model"
    if done.is_file() and export.is_dir():
        console.print(f"[bold]Stage {index}/{total} · {spec.name}[/]: finished before, skipped ({done})")
        return json.loads(done.read_text())
    missing = [source for source in spec.inputs.values() if not (out_dir / source / "model").is_dir()]
    if missing:
        raise InputNotFoundError(f"stage {spec.name!r} needs the exports of {missing}, which are not under {out_dir}")
    args = stage_args(spec, out_dir, checkpoint_every)
    resumed = any(arg.startswith("--ckpt_path") for arg in args)
    console.rule(f"[bold]Stage {index}/{total} · {spec.name}[/] ({spec.config}{', resuming' if resumed else ''})")
    started = time.perf_counter()
    if launcher is None:
        cli_main(args)
    elif status := subprocess.run([*launcher, *args[1:]], check=False).returncode:
        raise StageError(f"stage {spec.name!r}: `{' '.join([*launcher, *args[1:]])}` exited with status {status}")
    if not export.is_dir():  # the stage is done only once its export exists
        raise StageError(f"stage {spec.name!r}: `lit-saferlhf {' '.join(args)}` ended without writing {export}")
    record = {
        "name": spec.name,
        "config": spec.config,
        "seconds": round(time.perf_counter() - started, 1),
        "resumed": resumed,
        "command": "lit-saferlhf " + " ".join(args),
    }
    done.write_text(json.dumps(record, indent=2))
    return record


def run_evaluation(spec: EvaluationSpec, out_dir: Path) -> dict[str, Any]:
    """Evaluate the pipeline's policies with its reward and cost models."""
    from lit_saferlhf.commands.evaluate import evaluate

    return evaluate(
        policies={name: str(out_dir / name / "model") for name in spec.policies},
        reward_model=str(out_dir / spec.reward_model / "model"),
        cost_model=str(out_dir / spec.cost_model / "model"),
        prompt_sets=spec.prompt_sets,
        out_dir=str(out_dir / "evaluation"),
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        seed=spec.seed,
        limit=spec.limit,
        arena=spec.policies[:2][::-1] if len(spec.policies) >= 2 else None,
    )


def cost_limit_of(spec: StageSpec) -> float | None:
    """The solver's ``cost_limit`` in a PPO stage config, if it has one."""
    config = yaml.safe_load(Path(spec.config).read_text())
    solver = config.get("model", {}).get("init_args", {}).get("solver", {})
    limit = spec.overrides.get(
        "model.init_args.solver.init_args.cost_limit", solver.get("init_args", {}).get("cost_limit")
    )
    return None if limit is None else float(limit)


def check_pipeline(stages: list[StageSpec], checkpoint_every: int) -> None:
    """Fail before the first stage runs on settings that would fail later, naming the key.

    Raises:
        ConfigError: ``checkpoint_every`` < 1, no stages or two with one name, or a stage YAML that does not exist.
    """
    require(checkpoint_every >= 1, "checkpoint_every", "a number of steps >= 1", checkpoint_every)
    names = [spec.name for spec in stages]
    require(bool(names) and len(set(names)) == len(names), "stages", "at least one stage, distinct names", names)
    for spec in stages:
        require(Path(spec.config).is_file(), f"stages.{spec.name}.config", "a stage YAML that exists", spec.config)


def pipeline(
    out_dir: str,
    stages: list[StageSpec],
    evaluation: EvaluationSpec | None = None,
    checkpoint_every: int = 50,
    launcher: list[str] | None = None,
) -> Path | None:
    """Run the stages in order, then the evaluation and the report; returns the report's path.

    Args:
        out_dir: Where every stage, the evaluation and the report go.
        stages: The stages, in order.
        evaluation: What to evaluate at the end (None: no evaluation and no report).
        checkpoint_every: Steps between the stages' ``last.ckpt`` saves.
        launcher: A command that runs ``lit-saferlhf fit`` with the arguments appended, each stage in processes
            of its own (``[bash, cli_configs/slurm/run.sbatch]``: a SLURM job step); None runs them in this process.
    """
    from lit_saferlhf.commands.report import print_summary, write_report

    check_pipeline(stages, checkpoint_every)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    records = [run_stage(i, spec, root, len(stages), checkpoint_every, launcher) for i, spec in enumerate(stages, 1)]
    if evaluation is None:
        return None
    console.rule("[bold]Evaluation[/]")
    summary = run_evaluation(evaluation, root)
    limits = [limit for spec in stages if (limit := cost_limit_of(spec)) is not None]
    report = write_report(
        root,
        {spec.name: root / spec.name / "logs" for spec in stages},
        summary,
        cost_limit=limits[-1] if limits else None,
        extra={"stages": records},
    )
    print_summary(report, summary)
    return report


def pipeline_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf pipeline --config cli_configs/tiny/pipeline.yaml``: run the whole Safe RLHF pipeline."""
    parser = ArgumentParser(prog="lit-saferlhf pipeline", description=pipeline_command.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="the pipeline YAML")
    parser.add_function_arguments(pipeline)
    args = parser.parse_args(list(argv))
    args = parser.instantiate_classes(args)
    pipeline(args.out_dir, args.stages, args.evaluation, args.checkpoint_every, args.launcher)
