"""PPO-Lagrangian with several constraints, a guard as the cost, and RePO, through the CLI (METHODS.md §6.2, §6.3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lit_saferlhf.commands.report import read_stage_metrics
from lit_saferlhf.scorers import ScorerError
from lit_saferlhf.stages import PPOLagrangian
from tests.bad_input.harness import fit_error
from tests.distributed.test_exact_resume import kill_at, ppo_args, run_to_end, weights, without_timing
from tests.distributed.test_reliability import finish, start
from tests.helpers import CONFIGS, column, fit, metrics

PINNED = {
    "multiplier": [1.1222750944533328, 1.3865372209264915],
    "rollout/reward": [0.11380845308303833, 2.362276554107666],
    "loss/actor": [-1.1770938634872437, -0.050113946199417114],
}
"""The tiny PPO-Lagrangian's numbers (2 rollouts of 8 prompts, the session's tiny models) from main before
constraints existed (4ad05fb): the same run there and here gave equal λ's, rewards, costs and losses."""


def ppo(tiny_models: dict[str, Path], out: Path, config: str, *overrides: str, rollouts: int = 2) -> Path:
    """A few rollouts (8 prompts each) of ``config`` from the session's tiny models."""
    return fit(
        config,
        out,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--trainer.limit_train_batches={rollouts}",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
        *overrides,
    )


def nan_cost(prompt: str, response: str) -> float:
    """A broken rule: NaN for every answer."""
    return math.nan


def history(export: Path) -> dict:
    return json.loads((export / "multiplier_history.json").read_text())


def test_one_constraint_is_todays_run_bit_for_bit(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """``solver: S`` and ``constraints: [{name: cost, solver: S}]`` give the same numbers as before constraints."""
    cost = f"--model.init_args.cost_model={tiny_models['cost']}"
    legacy = ppo(tiny_models, tmp_path / "solver", "tiny/ppo_lag.yaml", cost)
    solver = "lit_saferlhf_plugins.solvers.DualAscent"
    constraint = [{"name": "cost", "solver": {"class_path": solver, "init_args": {"cost_limit": -5.0, "lr": 0.1}}}]
    listed = ppo(
        tiny_models,
        tmp_path / "constraints",
        "tiny/ppo_lag.yaml",
        cost,
        "--model.init_args.solver=null",
        f"--model.init_args.constraints={json.dumps(constraint)}",
    )
    assert history(listed) == history(legacy)
    for name, tensor in weights(legacy).items():
        assert torch.equal(weights(listed)[name], tensor), name
    rows = metrics(tmp_path / "solver")
    assert history(legacy)["multiplier"] == PINNED["multiplier"]
    for key in ("rollout/reward", "loss/actor"):
        assert column(rows, key) == pytest.approx(PINNED[key], rel=1e-6, abs=1e-7), key
        assert column(metrics(tmp_path / "constraints"), key) == column(rows, key)


def test_per_category_constraints_train_and_keep_every_multiplier(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = ppo(
        tiny_models, tmp_path, "tiny/ppo_lag_categories.yaml", f"--model.init_args.cost_model={tiny_models['cost']}"
    )
    saved = history(export)["constraints"]
    assert sorted(saved) == ["ehd", "ihd", "mhd"]
    assert {name: entry["category"] for name, entry in saved.items()} == {"ehd": "EHD", "ihd": "IHD", "mhd": "MHD"}
    assert all(len(entry["multiplier"]) == 2 for entry in saved.values())
    rows = metrics(tmp_path)
    for name in saved:
        assert column(rows, f"solver/{name}/multiplier") == pytest.approx(saved[name]["multiplier"], rel=1e-6)
        assert column(rows, f"rollout/cost/{name}")
    assert column(rows, "loss/ehd_critic")  # one critic per constraint
    assert column(rows, "loss/reward_critic")


def test_a_guard_model_is_the_only_cost(tiny_models: dict[str, Path], tiny_guard: Path, tmp_path: Path) -> None:
    """No cost model: the guard's P(unsafe) is the constraint's cost, in [0, 1]."""
    export = ppo(
        tiny_models, tmp_path, "tiny/ppo_lag_guard.yaml", f"--model.init_args.scorers.guard.init_args.path={tiny_guard}"
    )
    assert len(history(export)["constraints"]["unsafe"]["multiplier"]) == 2
    costs = column(metrics(tmp_path), "rollout/cost")
    assert costs
    assert all(0.0 <= value <= 1.0 for value in costs)


def test_repo_multiplier_never_falls(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """RePO's violation is the mean rectified violation, >= 0: dual ascent on ln λ can only rise or stay."""
    export = ppo(
        tiny_models, tmp_path, "tiny/repo.yaml", f"--model.init_args.cost_model={tiny_models['cost']}", rollouts=3
    )
    multipliers = history(export)["multiplier"]
    assert all(later >= earlier for earlier, later in zip([1.0, *multipliers], multipliers, strict=False))
    assert all(value >= 0.0 for value in column(metrics(tmp_path), "solver/violation"))
    assert history(export)["constraints"]["cost"]["rectified"] is True


def test_a_category_no_prompt_has_is_one_line(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    line = fit_error(
        CONFIGS / "tiny" / "ppo_lag_categories.yaml",
        capsys,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        "--model.init_args.constraints.category=XYZ",  # the last constraint's
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    for part in ("model.init_args.constraints[2].category", "XYZ", "EHD"):
        assert part in line


def test_a_function_scorer_returning_nan_stops_at_the_first_rollout(tiny_models: dict[str, Path]) -> None:
    from lit_saferlhf.stages.constraints import Constraint
    from lit_saferlhf_plugins.scorers import FunctionScorer
    from lit_saferlhf_plugins.solvers import DualAscent

    module = PPOLagrangian(
        policy=str(tiny_models["sft"]),
        reward_model=str(tiny_models["reward"]),
        scorers={"rule": FunctionScorer("tests.stages.test_constraints_stage:nan_cost")},
        constraints=[Constraint("rule", DualAscent(), cost="rule")],
    )
    module.configure_model()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ScorerError, match="scorer 'rule'"):
        module.collect_rollout(ids, torch.ones_like(ids), ["how do i bake bread"], None)


@pytest.mark.slow
def test_a_killed_per_category_run_resumes_every_multiplier_bit_for_bit(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    def args(out: Path, *overrides: str) -> list[str]:
        found = ppo_args(out, tiny_models, *overrides)
        return [
            f"--config={CONFIGS / 'tiny' / 'ppo_lag_categories.yaml'}" if a.startswith("--config=") else a
            for a in found
        ]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    uninterrupted = start(args(whole), whole / "whole.log")
    kill_at(args(killed), killed, 2, "first")
    run_to_end(args(killed, f"--ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"), killed, "second")
    finish(uninterrupted, whole / "whole.log", 0)

    expected = history(whole / "model")
    assert all(len(entry["multiplier"]) == 6 for entry in expected["constraints"].values())
    assert history(killed / "model") == expected  # every λ_k, exactly
    for name, tensor in weights(whole / "model").items():
        assert torch.equal(weights(killed / "model")[name], tensor), name
    found, expected_metrics = (without_timing(read_stage_metrics(out / "logs")[0]) for out in (killed, whole))
    assert found == expected_metrics
