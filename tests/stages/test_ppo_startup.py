"""What a PPO-Lagrangian run says and warns at start-up, how many rollouts it runs, and when it skips the reference.

Issue 24: the start-up line ``PPOLagrangian holds N networks ...`` is printed by ``lit-saferlhf fit`` (item 15);
a run with ``ppo.kl_coeff: 0`` builds no reference and says so (item 14); ``rollouts`` counts rollouts, and
``trainer.max_steps`` optimiser steps (item 16); Lightning warns neither of a ``val_dataloader`` without a
``validation_step`` nor of modules in eval mode (item 17).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_saferlhf.cli import main
from lit_saferlhf.commands.fit import cli_main
from tests.helpers import metrics

REPO = Path(__file__).resolve().parents[2]


def ppo_args(tiny_models: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    """``fit`` of the tiny PPO-Lagrangian config on 8 prompts per rollout, 2 optimiser steps each, into ``out``."""
    return [
        "fit",
        f"--config={REPO / 'cli_configs/tiny/ppo_lag.yaml'}",
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]


def test_rollouts_count_rollouts_and_the_start_up_line_is_printed_without_lightning_warnings(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    args = ppo_args(tiny_models, tmp_path, "--model.init_args.rollouts=3", "--trainer.limit_train_batches=null")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    run = subprocess.run(
        [sys.executable, "-m", "lit_saferlhf.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    networks = "(actor, reference, reward_model, cost_model, reward_critic, cost_critic)"
    assert f"PPOLagrangian holds 6 networks {networks} with GAE: " in output
    assert "validation_step" not in output, output[-3000:]
    assert "eval mode at the start of training" not in output, output[-3000:]
    rows = metrics(tmp_path)
    assert len([row for row in rows if row.get("rollout/reward")]) == 3  # one row per rollout
    assert "`max_steps=6` reached" in output  # 3 rollouts x 2 optimiser steps (8 sequences, minibatches of 4)


class Lines(logging.Handler):
    """The messages of Lightning's logger, which ``lit-saferlhf fit`` shows."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_no_reference_is_built_when_beta_is_0(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shown, lightning = Lines(), logging.getLogger("lightning.pytorch")
    lightning.addHandler(shown)
    try:
        flags = ["--model.init_args.ppo.kl_coeff=0", "--model.init_args.ppo.kl_penalty=loss"]
        cli_main(ppo_args(tiny_models, tmp_path, *flags, "--trainer.limit_train_batches=1"))
    finally:
        lightning.removeHandler(shown)
    (line,) = [line for line in shown.lines if "PPOLagrangian holds" in line]
    assert "holds 5 networks (actor, reward_model, cost_model, reward_critic, cost_critic)" in line
    assert "no reference policy: ppo.kl_coeff is 0" in line
    (row,) = [row for row in metrics(tmp_path) if row.get("rollout/reward")]
    assert "rollout/kl" not in row
    assert "policy/k3_kl" not in row
    assert (tmp_path / "model" / "config.json").is_file()


def test_rollouts_and_max_steps_together_are_refused(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                f"--config={REPO / 'cli_configs/tiny/ppo_lag.yaml'}",
                f"--model.init_args.policy={tiny_models['sft']}",
                f"--model.init_args.reward_model={tiny_models['reward']}",
                f"--model.init_args.cost_model={tiny_models['cost']}",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false",
                "--model.init_args.rollouts=3",
                "--trainer.max_steps=12",
            ]
        )
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "trainer.max_steps: expected unset when model.init_args.rollouts is set (3)" in line
