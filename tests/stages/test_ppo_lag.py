"""Stage 4 (PPO-Lagrangian) through the CLI: λ moves the right way, solvers and estimators swap, state resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_saferlhf.generators import GenerationArgs
from lit_saferlhf.losses import gae, group_normalized_advantages, kl_shaped_rewards
from lit_saferlhf.solvers import ConstraintSolver
from lit_saferlhf.stages import PPOArgs, PPOLagrangian
from lit_saferlhf_plugins.advantages import GroupNormalized, LeaveOneOut
from lit_saferlhf_plugins.solvers import DualAscent, FixedPenalty
from tests.helpers import CONFIGS, column, fit, metrics

CRITIC_FREE = ["tiny/grpo_lag.yaml", "tiny/rloo_lag.yaml"]
"""The critic-free configs; their tests sample 2 prompts x 4 responses per rollout."""


def ppo(
    tiny_models: dict[str, Path], out: Path, *overrides: str, rollouts: int = 3, config: str = "tiny/ppo_lag.yaml"
) -> Path:
    """A few PPO-Lagrangian rollouts (8 prompts each) from the session's tiny models."""
    return fit(
        config,
        out,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        f"--trainer.limit_train_batches={rollouts}",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
        *overrides,
    )


def multipliers(export: Path) -> list[float]:
    return json.loads((export / "multiplier_history.json").read_text())["multiplier"]


@pytest.mark.parametrize(("cost_limit", "direction"), [(-100.0, 1), (100.0, -1)])
def test_multiplier_rises_above_the_limit_and_falls_below(
    cost_limit: float, direction: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    export = ppo(
        tiny_models,
        tmp_path,
        f"--model.init_args.solver.init_args.cost_limit={cost_limit}",
        "--model.init_args.solver.init_args.linear=true",
    )
    history = multipliers(export)
    assert len(history) == 3
    steps = [later - earlier for earlier, later in zip([1.0, *history[:-1]], history, strict=True)]
    assert all(step * direction > 0 or value in (0.0, 5.0) for step, value in zip(steps, history, strict=True)), history
    rows = metrics(tmp_path)
    for name in (
        "rollout/reward",
        "rollout/cost",
        "rollout/kl",
        "loss/actor",
        "loss/reward_critic",
        "loss/cost_critic",
        "policy/clip_fraction",
        "solver/multiplier",
        "rollout/response_length",
        "time/generation_s",
        "time/scoring_s",
        "time/update_s",
    ):
        values = column(rows, name)
        assert values, name
        assert all(torch.isfinite(torch.tensor(values))), name


def test_actor_and_critics_change_and_frozen_models_do_not(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = ppo(tiny_models, tmp_path, rollouts=2)
    before, after = load_file(tiny_models["sft"] / "model.safetensors"), load_file(export / "model.safetensors")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2


@pytest.mark.parametrize(
    "solver_args",
    [
        ["--model.solver=PIDLagrangian", "--model.solver.ki=0.1"],
        [
            "--model.init_args.solver=lit_saferlhf_plugins.solvers.PIDLagrangian",
            "--model.init_args.solver.init_args.kp=0.2",
        ],
    ],
)
def test_solver_swaps_from_the_command_line(
    solver_args: list[str], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    export = ppo(tiny_models, tmp_path, *solver_args, rollouts=1)
    assert json.loads((export / "multiplier_history.json").read_text())["solver"] == "PIDLagrangian"
    assert column(metrics(tmp_path), "solver/pid_i")


def test_plain_ppo_needs_no_cost_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = fit(
        "tiny/ppo_lag.yaml",
        tmp_path,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        "--model.init_args.cost_model=null",
        "--model.solver=FixedPenalty",
        "--model.solver.multiplier=0.0",
        "--trainer.limit_train_batches=1",
        "--data.init_args.batch_size=8",
    )
    assert multipliers(export) == [0.0]
    assert "loss/cost_critic" not in metrics(tmp_path)[0]


def test_resumed_run_continues_the_multiplier_exactly(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    common = ["--model.init_args.solver.init_args.cost_limit=-100.0", "--trainer.max_epochs=2"]
    straight = ppo(tiny_models, tmp_path / "straight", *common, rollouts=2)
    ppo(tiny_models, tmp_path / "first", *common[:1], "--trainer.max_epochs=1", rollouts=2)
    (checkpoint,) = (tmp_path / "first" / "logs").glob("version_0/checkpoints/*.ckpt")
    state = torch.load(checkpoint, weights_only=True)  # solver state loads without unpickling objects
    assert len(state["constraints"]["cost"]["multiplier_history"]) == 2
    resumed = ppo(tiny_models, tmp_path / "first", *common, f"--ckpt_path={checkpoint}", rollouts=2)
    assert len(multipliers(resumed)) == 4
    assert multipliers(resumed)[:2] == multipliers(straight)[:2]
    torch.testing.assert_close(torch.tensor(multipliers(resumed)), torch.tensor(multipliers(straight)))


def test_ptx_loss_on_demonstrations_is_added_and_logged(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    ppo(
        tiny_models,
        tmp_path,
        "--data.init_args.ptx_path=safety-world:sft",
        "--data.init_args.ptx_max_length=48",
        "--model.init_args.ppo.ptx_coeff=2.0",
        rollouts=2,
    )
    ptx = column(metrics(tmp_path), "loss/ptx")
    assert len(ptx) == 2
    assert all(0.0 < value < 10.0 for value in ptx)


# ---- critic-free estimators (GRPO, RLOO) ---------------------------------------------------------


@pytest.mark.parametrize("config", CRITIC_FREE)
@pytest.mark.parametrize(("cost_limit", "direction"), [(-100.0, 1), (100.0, -1)])
def test_critic_free_multiplier_rises_above_the_limit_and_falls_below(
    config: str, cost_limit: float, direction: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    export = ppo(
        tiny_models,
        tmp_path,
        f"--model.init_args.solver.init_args.cost_limit={cost_limit}",
        "--model.init_args.solver.init_args.linear=true",
        "--data.init_args.batch_size=2",
        config=config,
    )
    history = multipliers(export)
    assert len(history) == 3
    steps = [later - earlier for earlier, later in zip([1.0, *history[:-1]], history, strict=True)]
    assert all(step * direction > 0 or value in (0.0, 5.0) for step, value in zip(steps, history, strict=True)), history
    rows = metrics(tmp_path)
    assert not any(name.startswith(("loss/reward_critic", "loss/cost_critic")) for name in rows[0])
    for name in ("loss/actor", "policy/k3_kl", "rollout/cost", "solver/multiplier"):
        values = column(rows, name)
        assert values, name
        assert all(torch.isfinite(torch.tensor(values))), name


@pytest.mark.parametrize(
    "estimator_args",
    [
        ["--model.advantage=LeaveOneOut"],
        [
            "--model.init_args.advantage=lit_saferlhf_plugins.advantages.GroupNormalized",
            "--model.advantage.std=population",
        ],
    ],
)
def test_estimator_swaps_from_the_command_line(
    estimator_args: list[str], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    group = "--model.init_args.generation.num_return_sequences=2"
    ppo(tiny_models, tmp_path, *estimator_args, group, "--data.init_args.batch_size=4", rollouts=1)
    config = (tmp_path / "logs" / "version_0" / "config.yaml").read_text()
    assert "class_path: lit_saferlhf_plugins.advantages." in config
    assert "loss/reward_critic" not in metrics(tmp_path)[0]


def test_plain_grpo_is_fixed_penalty_zero_without_a_cost_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = fit(
        CRITIC_FREE[0],
        tmp_path,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        "--model.init_args.cost_model=null",
        f"--config={CONFIGS / 'solvers' / 'ppo.yaml'}",
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=2",
    )
    assert multipliers(export) == [0.0, 0.0]
    assert column(metrics(tmp_path), "loss/actor")


def test_critic_free_run_holds_four_networks_and_saves_no_critic(
    tiny_models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lightning = logging.getLogger("lightning.pytorch")  # the start-up line's logger (it does not propagate)
    lightning.addHandler(caplog.handler)
    try:
        ppo(tiny_models, tmp_path / "gae", rollouts=1)
        ppo(tiny_models, tmp_path / "grpo", "--data.init_args.batch_size=2", rollouts=1, config=CRITIC_FREE[0])
    finally:
        lightning.removeHandler(caplog.handler)
    summaries = [record.getMessage() for record in caplog.records if " holds " in record.getMessage()]
    assert len(summaries) == 2, summaries
    assert summaries[0].startswith("PPOLagrangian holds 6 networks (actor, reference, reward_model, cost_model, "
                                   "reward_critic, cost_critic) with GAE")  # fmt: skip
    assert summaries[1].startswith("PPOLagrangian holds 4 networks (actor, reference, reward_model, cost_model) with "
                                   "GroupNormalized")  # fmt: skip
    for run, networks, groups in (("gae", 6, 6), ("grpo", 4, 2)):  # AdamW: decay and no-decay group per network
        (checkpoint,) = (tmp_path / run / "logs").glob("version_0/checkpoints/*.ckpt")
        state = torch.load(checkpoint, weights_only=True)
        assert len({key.split(".")[0] for key in state["state_dict"]}) == networks
        assert len(state["optimizer_states"][0]["param_groups"]) == groups


def test_critic_free_resume_continues_the_multiplier_exactly(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    common = [
        "--model.init_args.solver.init_args.cost_limit=-100.0",
        "--data.init_args.batch_size=2",
        "--trainer.max_epochs=2",
    ]
    straight = ppo(tiny_models, tmp_path / "straight", *common, rollouts=2, config=CRITIC_FREE[0])
    ppo(tiny_models, tmp_path / "first", *common[:2], "--trainer.max_epochs=1", rollouts=2, config=CRITIC_FREE[0])
    (checkpoint,) = (tmp_path / "first" / "logs").glob("version_0/checkpoints/*.ckpt")
    resumed = ppo(
        tiny_models, tmp_path / "first", *common, f"--ckpt_path={checkpoint}", rollouts=2, config=CRITIC_FREE[0]
    )
    assert len(multipliers(resumed)) == 4
    torch.testing.assert_close(torch.tensor(multipliers(resumed)), torch.tensor(multipliers(straight)))


# ---- the stage's advantage wiring, on hand-made rollout tensors ----------------------------------

N, A = 4, 5
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
END_REWARDS = torch.tensor([1.0, -0.5, 4.0, 2.0])
END_COSTS = torch.tensor([0.5, 2.0, -1.0, 0.0])


def stage(tiny_models: dict[str, Path], solver: ConstraintSolver, **kwargs: object) -> PPOLagrangian:
    """A stage built from the tiny models' dirs (its networks are not loaded: ``configure_model`` is not called)."""
    paths = {name: str(tiny_models[key]) for name, key in (("policy", "sft"), ("reward_model", "reward"))}
    return PPOLagrangian(**paths, cost_model=str(tiny_models["cost"]), solver=solver, **kwargs)  # type: ignore[arg-type]


def rollout_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "logprobs": -torch.rand(N, A, generator=generator),
        "ref_logprobs": -torch.rand(N, A, generator=generator),
        "values": torch.randn(N, A, generator=generator),
    }


def advantages_of(module: PPOLagrangian, tensors: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):  # noqa: ANN201
    ids = torch.zeros(N, 3 + A, dtype=torch.long)
    return module.estimate_advantages(
        ids,
        torch.ones_like(ids),
        MASK,
        tensors["logprobs"],
        tensors["ref_logprobs"],
        END_REWARDS,
        END_COSTS[:, None],
        values,
    )


def safe_rlhf_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):  # noqa: ANN201
    """safe-rlhf's ``get_advantages_and_returns`` written out: masked values and rewards, backwards over tokens."""
    values, rewards = values * MASK, rewards * MASK
    last, advantages = torch.zeros(N), []
    for t in reversed(range(A)):
        next_values = values[:, t + 1] if t < A - 1 else torch.zeros(N)
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        advantages.insert(0, last)
    advantages = torch.stack(advantages, dim=1)
    return advantages * MASK, (advantages + values) * MASK


def test_reward_shaping_is_safe_rlhfs_single_stream(tiny_models: dict[str, Path]) -> None:
    """FixedPenalty(λ) = safe-rlhf's PPORewardShapingTrainer: ONE stream ``clip(-β·KL_t + 1[end]·(R - λ·C), ±s)``,
    GAE with the reward critic alone, no cost stream or critic, no ``1 + λ`` divisor."""
    module = stage(tiny_models, FixedPenalty(multiplier=2.0), ppo=PPOArgs(kl_coeff=0.1, score_clip=3.0))
    assert module.critic_names() == ("reward",)
    tensors = rollout_tensors()
    rollout = advantages_of(module, tensors, {"reward": tensors["values"]})
    stream = -0.1 * (tensors["logprobs"] - tensors["ref_logprobs"])
    last = MASK.long().cumsum(-1).argmax(-1)
    stream[torch.arange(N), last] += END_REWARDS - 2.0 * END_COSTS  # sample 2: 4 + 2 = 6, clipped to 3 below
    advantages, returns = safe_rlhf_gae(stream.clamp(-3.0, 3.0), tensors["values"])
    torch.testing.assert_close(rollout.reward_advantages, advantages)
    torch.testing.assert_close(rollout.reward_returns, returns)
    assert not rollout.cost_advantages.any()
    actor_advantages = module.lagrangian_advantages(rollout)
    assert torch.equal(actor_advantages, rollout.reward_advantages)  # the actor trains on A_r: no cost stream, no 1 + λ


def test_lagrangian_gae_streams_are_unchanged(tiny_models: dict[str, Path]) -> None:
    """DualAscent with GAE: a KL-shaped reward and cost stream, each with its own critic (Safe RLHF)."""
    module = stage(tiny_models, DualAscent(), ppo=PPOArgs(kl_coeff=0.1))
    assert module.critic_names() == ("reward", "cost")
    tensors = rollout_tensors()
    cost_values = -tensors["values"]
    rollout = advantages_of(module, tensors, {"reward": tensors["values"], "cost": cost_values})
    shaped = {"kl_coeff": 0.1, "score_clip": 50.0}
    lp, ref = tensors["logprobs"], tensors["ref_logprobs"]
    rewards = kl_shaped_rewards(END_REWARDS, lp, ref, MASK, kl_sign=-1.0, **shaped)
    costs = kl_shaped_rewards(END_COSTS, lp, ref, MASK, kl_sign=1.0, **shaped)
    torch.testing.assert_close(rollout.reward_advantages, gae(rewards, tensors["values"], MASK)[0])
    torch.testing.assert_close(rollout.cost_advantages[:, 0], gae(costs, cost_values, MASK)[0])
    torch.testing.assert_close(rollout.cost_returns[:, 0], gae(costs, cost_values, MASK)[1])


def test_group_estimator_normalises_each_stream_within_its_group(tiny_models: dict[str, Path]) -> None:
    generation = GenerationArgs(num_return_sequences=2)
    ppo_args = PPOArgs(kl_penalty="loss")
    module = stage(tiny_models, DualAscent(), advantage=GroupNormalized(eps=0.0), generation=generation, ppo=ppo_args)
    assert module.critic_names() == ()
    rollout = advantages_of(module, rollout_tensors(), {})
    for got, scores in ((rollout.reward_advantages, END_REWARDS), (rollout.cost_advantages[:, 0], END_COSTS)):
        expected = group_normalized_advantages(scores, 2, eps=0.0).unsqueeze(-1) * MASK  # KL in the loss: end scores
        torch.testing.assert_close(got, expected)
    assert not rollout.reward_returns.any()
    assert not rollout.reward_values.any()


@pytest.mark.parametrize("estimator", [GroupNormalized(), LeaveOneOut()])
def test_critic_free_estimators_need_several_samples_per_prompt(
    estimator: object, tiny_models: dict[str, Path]
) -> None:
    with pytest.raises(ValueError, match="num_return_sequences.*at least 2, got 1"):
        stage(tiny_models, DualAscent(), advantage=estimator, generation=GenerationArgs(num_return_sequences=1))


def test_critic_dirs_without_critics_are_refused(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="model.reward_critic: LeaveOneOut uses no critics"):
        stage(
            tiny_models,
            DualAscent(),
            advantage=LeaveOneOut(),
            generation=GenerationArgs(num_return_sequences=2),
            reward_critic=str(tiny_models["reward"]),
        )


@pytest.mark.parametrize(("field", "value"), [("kl_penalty", "both"), ("loss_aggregation", "sum")])
def test_unknown_kl_or_aggregation_option_is_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{field}: expected"):
        PPOArgs(**{field: value})  # type: ignore[arg-type]
