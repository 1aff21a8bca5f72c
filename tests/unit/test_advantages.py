"""Advantage estimators: known values (METHODS.md §6.2), edge groups, the normalise-then-combine order, k3 KL."""

from __future__ import annotations

import pytest
import torch

from lit_saferlhf.advantages import GAE
from lit_saferlhf.losses import (
    aggregate,
    broadcast_to_tokens,
    gae,
    group_normalized_advantages,
    k3_kl_loss,
    lagrangian_policy_loss,
    leave_one_out_advantages,
    sequence_scores,
)
from lit_saferlhf.registry import load_kind
from lit_saferlhf_plugins.advantages import GroupNormalized, LeaveOneOut

# METHODS.md §6.2, Constrained GRPO: G = 4, sample std, no ε.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
COSTS = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
Z_R = [-1.224745, 0.0, 1.224745, 0.0]
Z_C = [-0.866025, 0.866025, 0.866025, -0.866025]
NORMALISE_THEN_COMBINE = [-0.791732, -0.433013, 0.791732, 0.433013]  # Z_R - 0.5·Z_C
COMBINE_THEN_NORMALISE = [-1.161895, -0.387298, 1.161895, 0.387298]  # z(r - 0.5·c)


def close(actual: torch.Tensor, expected: list[float], atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def test_group_normalized_known_values() -> None:
    close(group_normalized_advantages(REWARDS, 4, eps=0.0), Z_R)
    close(group_normalized_advantages(COSTS, 4, eps=0.0), Z_C)
    # population std: r has std sqrt(0.5), so (r - 2) / sqrt(0.5)
    close(group_normalized_advantages(REWARDS, 4, eps=0.0, unbiased=False), [-1.414214, 0.0, 1.414214, 0.0])
    # ε = 1e-4 (the default) shrinks them a little
    close(group_normalized_advantages(REWARDS, 4), [-1 / (0.816497 + 1e-4), 0.0, 1 / (0.816497 + 1e-4), 0.0])


def test_leave_one_out_known_values() -> None:
    # baseline of sample i = mean of the other three: (8 - r_i) / 3
    close(leave_one_out_advantages(REWARDS, 4), [1 - 7 / 3, 0.0, 3 - 5 / 3, 0.0])
    close(leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2), [-2.0, 2.0])  # G = 2: the other sample


@pytest.mark.parametrize("estimator", [group_normalized_advantages, leave_one_out_advantages])
def test_groups_are_consecutive_rows_and_independent(estimator) -> None:  # noqa: ANN001
    scores = torch.randn(12, dtype=torch.float64)
    together = estimator(scores, 3)
    apart = torch.cat([estimator(scores[i : i + 3], 3) for i in range(0, 12, 3)])
    torch.testing.assert_close(together, apart)


def test_group_normalized_matches_a_plain_recomputation() -> None:
    scores = torch.randn(8, 4, dtype=torch.float64)
    expected = (scores - scores.mean(-1, keepdim=True)) / (scores.std(-1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_normalized_advantages(scores.reshape(-1), 4), expected.reshape(-1))
    loo = scores - (scores.sum(-1, keepdim=True) - scores) / 3
    torch.testing.assert_close(leave_one_out_advantages(scores.reshape(-1), 4), loo.reshape(-1))


@pytest.mark.parametrize("estimator", [group_normalized_advantages, leave_one_out_advantages])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_one_sample_and_equal_scores_give_zero_not_nan(estimator, eps: float) -> None:  # noqa: ANN001
    kwargs = {"eps": eps} if estimator is group_normalized_advantages else {}
    close(estimator(torch.tensor([0.3, -2.0, 7.0]), 1, **kwargs), [0.0, 0.0, 0.0])  # G = 1
    equal = torch.tensor([0.1, 0.1, 0.1, 5.0, 5.0, 5.0])  # 0.1 * 3 / 3 != 0.1 in floating point
    close(estimator(equal, 3, **kwargs), [0.0] * 6)


def test_groups_must_divide_the_rollout() -> None:
    with pytest.raises(ValueError, match="num_return_sequences = 4"):
        group_normalized_advantages(torch.zeros(6), 4)


def test_normalise_then_combine_is_what_the_actor_loss_sees() -> None:
    """The estimator z-scores reward and cost separately; the loss merges them (METHODS.md §6.2).

    At ratio 1 the gradient of the loss with respect to each token's log-prob is ``-A / (B · len)``,
    so it reveals the merged advantage ``A`` the actor is trained on.
    """
    mask = torch.ones(4, 1, dtype=torch.bool)
    streams = {"reward": REWARDS.unsqueeze(-1), "cost": COSTS.unsqueeze(-1)}
    estimator = GroupNormalized(eps=0.0)
    (reward_adv, reward_returns), (cost_adv, _) = (estimator.estimate(s, mask, 4) for s in streams.values())
    assert reward_returns is None
    logprobs = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    for normalize, divisor in ((False, 1.0), (True, 1.5)):
        loss, _ = lagrangian_policy_loss(
            logprobs, logprobs.detach(), reward_adv, cost_adv, mask, 0.5, normalize=normalize
        )
        (grad,) = torch.autograd.grad(loss, logprobs)
        close(-4 * grad.squeeze(-1) * divisor, NORMALISE_THEN_COMBINE)
    scalarised_first = group_normalized_advantages(REWARDS - 0.5 * COSTS, 4, eps=0.0)
    close(scalarised_first, COMBINE_THEN_NORMALISE)
    assert not torch.allclose(scalarised_first, torch.tensor(NORMALISE_THEN_COMBINE, dtype=torch.float64), atol=0.1)


def test_estimators_score_the_stream_and_broadcast_to_response_tokens() -> None:
    stream = torch.tensor([[0.1, 0.2, 1.0, 9.0], [0.0, 3.0, 0.0, 9.0]])  # 9.0 sits on padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    close(sequence_scores(stream, mask), [1.3, 3.0])
    advantages, returns = LeaveOneOut().estimate(stream, mask, 2)
    assert returns is None
    close(advantages[0], [-1.7, -1.7, -1.7, 0.0], atol=1e-6)
    close(advantages[1], [1.7, 1.7, 0.0, 0.0], atol=1e-6)
    z = 1 / (2**0.5 * 0.85 + 1e-4) * 0.85  # (s - mean) / (sample std + ε) with s - mean = ±0.85
    close(GroupNormalized().estimate(stream, mask, 2)[0][:, 0], [-z, z], atol=1e-6)
    close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)[1], [-1.0, -1.0, 0.0, 0.0])


def test_gae_estimator_is_the_stage_default_maths() -> None:
    stream, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    advantages, returns = GAE(gamma=0.99, lam=0.9).estimate(stream, mask, 1, values)
    expected = gae(stream, values, mask, gamma=0.99, lam=0.9)
    torch.testing.assert_close(advantages, expected[0])
    torch.testing.assert_close(returns, expected[1])
    assert GAE().needs_critics
    assert not GroupNormalized.needs_critics
    assert not LeaveOneOut.needs_critics
    with pytest.raises(ValueError, match="critic's values"):
        GAE().estimate(stream, mask, 1, None)


def test_group_normalized_rejects_an_unknown_std() -> None:
    with pytest.raises(ValueError, match="'sample' or 'population'"):
        GroupNormalized(std="biased")  # type: ignore[arg-type]


def test_builtins_resolve_by_short_name() -> None:
    assert set(load_kind("advantage estimator")) >= {"GAE", "GroupNormalized", "LeaveOneOut"}


# ---- loss aggregation and the k3 KL term --------------------------------------------------------


def test_sequence_and_token_mean() -> None:
    values = torch.tensor([[1.0, 2.0, 7.0], [3.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, "sequence_mean").item() == pytest.approx((1.5 + 3.0) / 2)
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(6.0 / 3)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(values, mask, "sum")


def test_k3_known_value_gradient_and_zero_at_the_reference() -> None:
    logprobs = torch.tensor([[-1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ref_logprobs = torch.tensor([[-2.0, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1]], dtype=torch.bool)
    loss, stats = k3_kl_loss(logprobs, ref_logprobs, mask, "token_mean")
    # δ = ref - logp = (-1, 0): k3 = (e^-1 + 1 - 1, 0), mean over 2 tokens
    assert loss.item() == pytest.approx(torch.exp(torch.tensor(-1.0)).item() / 2)
    assert stats["policy/k3_kl"].item() == pytest.approx(loss.item())
    (grad,) = torch.autograd.grad(loss, logprobs)
    close(grad[0], [(1 - torch.exp(torch.tensor(-1.0)).item()) / 2, 0.0])  # d k3 / d logp = 1 - e^δ
    same, _ = k3_kl_loss(ref_logprobs, ref_logprobs, mask)
    assert same.item() == 0.0


def test_token_mean_weighs_long_responses_more_in_the_actor_loss() -> None:
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    logprobs = torch.zeros(2, 3)
    sequence, _ = lagrangian_policy_loss(logprobs, logprobs, advantages, torch.zeros_like(advantages), mask, 0.0)
    token, _ = lagrangian_policy_loss(
        logprobs, logprobs, advantages, torch.zeros_like(advantages), mask, 0.0, aggregation="token_mean"
    )
    assert sequence.item() == pytest.approx(0.0)  # (mean 1 + mean -1) / 2
    assert token.item() == pytest.approx(-(3 - 1) / 4)


def test_constrained_grpo_dual_step_is_linear_dual_ascent() -> None:
    """METHODS.md §6.2: violation rate 0.5, d = 0.1, η = 0.1, λ = 0.5 -> 0.54; the solvers are unchanged."""
    from lit_saferlhf_plugins.solvers import DualAscent

    solver = DualAscent(cost_limit=0.1, lr=0.1, init_multiplier=0.5, linear=True)
    solver.update(0.5)
    assert solver.multiplier == pytest.approx(0.54)
