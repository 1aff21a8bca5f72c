"""Known-value tests of the pure objectives in ``lit_saferlhf.losses``.

Expected numbers are worked out by hand in the comments (torchtune style). Useful constants:
-log σ(0) = ln 2 = 0.693147, -log σ(1) = ln(1 + e^-1) = 0.313262, -log σ(2) = ln(1 + e^-2) = 0.126928,
-log σ(-0.5) = ln(1 + e^0.5) = 0.974077, -log σ(-1) = ln(1 + e) = 1.313262.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from lit_saferlhf import losses
from lit_saferlhf.losses import (
    clipped_surrogate_loss,
    cost_loss,
    end_scores,
    gae,
    gather_logprobs,
    kl_shaped_rewards,
    kl_to_reference,
    lagrangian_advantage,
    lagrangian_policy_loss,
    lm_loss,
    masked_mean,
    reward_loss,
    shaped_cost_stream,
    shaped_reward_stream,
    tokenwise_cost_loss,
    tokenwise_reward_loss,
    value_loss,
)

LN2 = math.log(2)
NLS1 = math.log1p(math.exp(-1))  # -log σ(1)
NLS2 = math.log1p(math.exp(-2))  # -log σ(2)
NLS_M05 = math.log1p(math.exp(0.5))  # -log σ(-0.5)
NLS_M1 = math.log1p(math.e)  # -log σ(-1)


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


def assert_detached(stats: dict[str, torch.Tensor]) -> None:
    for name, value in stats.items():
        assert isinstance(value, torch.Tensor), name
        assert not value.requires_grad, name


# ---------------------------------------------------------------------------- masked_mean


def test_masked_mean_averages_each_row_then_the_rows():
    values = t([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1]], torch.bool)
    # row means: (1 + 2) / 2 = 1.5 and (10 + 20 + 30 + 40) / 4 = 25 -> (1.5 + 25) / 2 = 13.25
    # (a token-level mean would give 106 / 6 = 17.67: the short row must weigh as much as the long one)
    assert_close(masked_mean(values, mask), 13.25)


def test_masked_mean_excludes_empty_rows_and_ignores_masked_nan():
    values = t([[float("nan"), float("inf")], [5.0, 7.0], [1.0, float("-inf")]])
    mask = t([[0, 0], [1, 1], [1, 0]], torch.bool)
    # row 0 is empty and excluded; rows 1 and 2: 6 and 1 -> 3.5
    assert_close(masked_mean(values, mask), 3.5)
    assert_close(masked_mean(values, torch.zeros_like(mask)), 0.0)


def test_masked_mean_of_a_1d_tensor_is_the_masked_mean():
    assert_close(masked_mean(t([1.0, 2.0, 6.0]), t([1, 0, 1], torch.bool)), 3.5)


def test_masked_mean_is_invariant_to_splitting_the_batch():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator)
    mask = torch.arange(5) < torch.tensor([5, 1, 3, 2, 4, 5]).unsqueeze(-1)  # right padding, no empty row
    halves = (masked_mean(values[:3], mask[:3]) + masked_mean(values[3:], mask[3:])) / 2
    assert_close(masked_mean(values, mask), halves)


# ---------------------------------------------------------------------------- gather / end scores


def test_gather_logprobs_known_values():
    # logits [0, 0, ln 2] -> softmax [1, 1, 2] / 4, so log p = [ln 1/4, ln 1/4, ln 1/2]
    logits = t([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])  # (B=1, L=2, V=3)
    tokens = torch.tensor([[2, 0]])
    assert_close(gather_logprobs(logits, tokens), [[math.log(0.5), math.log(0.25)]])


def test_gather_logprobs_matches_log_softmax_and_upcasts_half_precision():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=generator) * 5
    tokens = torch.randint(0, 11, (3, 4), generator=generator)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(gather_logprobs(logits, tokens), expected)
    low = logits.bfloat16()
    result = gather_logprobs(low, tokens)
    assert result.dtype == torch.float32
    expected_low = torch.log_softmax(low.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(result, expected_low)


def test_end_scores_right_and_left_padding():
    scores = t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    right = t([[1, 1, 0, 0], [1, 1, 1, 1]], torch.bool)
    left = t([[0, 0, 1, 1], [0, 1, 1, 1]], torch.bool)
    assert_close(end_scores(scores, right), [2.0, 8.0])  # last real tokens at 1 and 3
    assert_close(end_scores(scores, left), [4.0, 8.0])  # both end at the last position
    assert_close(end_scores(scores.unsqueeze(-1), right.long()), [[2.0], [8.0]])  # (B, L, 1) -> (B, 1)


# ---------------------------------------------------------------------------- lm_loss


def test_lm_loss_shifts_and_averages_over_target_tokens():
    # V = 2. logits[0] = [0, 0] predicts labels[1] = 0: -ln 1/2 = ln 2, arg-max 0 (first) is right.
    # logits[1] = [ln 3, 0] predicts labels[2] = 1: p = 1/4, -ln 1/4 = 2 ln 2, arg-max 0 is wrong.
    # logits[2] has no target. loss = (ln 2 + 2 ln 2) / 2 = 1.5 ln 2 = 1.039721.
    logits = t([[[0.0, 0.0], [math.log(3), 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    loss, stats = lm_loss(logits, labels)
    assert_close(loss, 1.5 * LN2)
    assert stats["correct"].item() == 1
    assert stats["tokens"].item() == 2
    assert_detached(stats)


def test_lm_loss_with_no_target_is_zero_not_nan():
    loss, stats = lm_loss(torch.randn(2, 3, 5, requires_grad=True), torch.full((2, 3), -100))
    assert_close(loss, 0.0)
    assert stats["tokens"].item() == 0
    loss.backward()


# ---------------------------------------------------------------------------- reward model


def test_reward_loss_known_values():
    better, worse = t([1.0, 0.0]), t([0.0, 0.0])
    # pairs: -log σ(1) = 0.313262, -log σ(0) = 0.693147 -> mean 0.503204
    loss, stats = reward_loss(better, worse)
    assert_close(loss, (NLS1 + LN2) / 2)
    assert_close(stats["accuracy"], 0.5)  # 1 > 0 yes, 0 > 0 no
    assert_close(stats["margin"], 0.5)  # (1 + 0) / 2
    # squares over both responses: [1, 0, 0, 0] -> mean 0.25; reg 0.1 adds 0.025
    loss_reg, _ = reward_loss(better, worse, regularization=0.1)
    assert_close(loss_reg, (NLS1 + LN2) / 2 + 0.025)


def test_reward_loss_gradient_pushes_better_up_and_is_split_invariant():
    generator = torch.Generator().manual_seed(1)
    better = torch.randn(4, generator=generator, requires_grad=True)
    worse = torch.randn(4, generator=generator)
    loss, stats = reward_loss(better, worse, regularization=0.01)
    loss.backward()
    assert (better.grad < 0).all()  # minimising raises every better score (small reg)
    assert_detached(stats)
    halves = (reward_loss(better[:2], worse[:2], 0.01)[0] + reward_loss(better[2:], worse[2:], 0.01)[0]) / 2
    assert_close(loss.detach(), halves.detach())


def _tokenwise_reward_batch():
    # pair 0: share [5, 6], diverge at 2; better ends at 2, worse at 3 -> tokens 2..3.
    # pair 1: share [5], diverge at 1; better ends at 1, worse at 2 -> tokens 1..2 (better's t=2 is padding).
    better_ids = torch.tensor([[5, 6, 7, 0], [5, 7, 0, 0]])
    worse_ids = torch.tensor([[5, 6, 8, 9], [5, 6, 7, 0]])
    better_mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    worse_mask = t([[1, 1, 1, 1], [1, 1, 1, 0]], torch.bool)
    # Scores outside the windows are extreme so that using them would show.
    better_scores = t([[100.0, -100.0, 1.0, 0.5], [-50.0, 2.0, 9.0, 100.0]])
    worse_scores = t([[-100.0, 100.0, 0.0, 0.5], [50.0, 0.0, 9.0, -100.0]])
    return better_scores, worse_scores, better_ids, worse_ids, better_mask, worse_mask


def test_tokenwise_reward_loss_averages_from_the_divergence_to_the_later_end():
    batch = _tokenwise_reward_batch()
    loss, stats = tokenwise_reward_loss(*batch)
    # pair 0: t=2 diff 1 -> 0.313262, t=3 diff 0 -> 0.693147, mean 0.503204
    # pair 1: t=1 diff 2 -> 0.126928, t=2 diff 0 -> 0.693147, mean 0.410038
    # loss = (0.503204 + 0.410038) / 2 = 0.456621
    assert_close(loss, ((NLS1 + LN2) / 2 + (NLS2 + LN2) / 2) / 2)
    # end scores: pair 0 better 1.0 (t=2) vs worse 0.5 (t=3): right; pair 1 better 2 (t=1) vs worse 9 (t=2): wrong
    assert_close(stats["accuracy"], 0.5)
    assert_close(stats["margin"], (0.5 + (2.0 - 9.0)) / 2)  # -3.25
    assert_detached(stats)


def test_tokenwise_reward_loss_regularises_the_token_range():
    better_scores, worse_scores, better_ids, worse_ids, better_mask, worse_mask = _tokenwise_reward_batch()
    args = (better_scores[:1], worse_scores[:1], better_ids[:1], worse_ids[:1], better_mask[:1], worse_mask[:1])
    loss, _ = tokenwise_reward_loss(*args, regularization=0.1)
    # pair 0, tokens 2..3: mean of squares over both rows = (1 + 0.25 + 0 + 0.25) / 4 = 0.375 -> + 0.0375
    assert_close(loss, (NLS1 + LN2) / 2 + 0.1 * 0.375)


def test_tokenwise_reward_loss_pads_pairs_of_unequal_length():
    # better has 4 tokens, worse 3; they diverge at 2, the later end is 3.
    better_ids, worse_ids = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 9]])
    better_mask, worse_mask = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    better_scores, worse_scores = t([[0.0, 0.0, 1.0, 2.0]]), t([[0.0, 0.0, 0.0]])
    loss, _ = tokenwise_reward_loss(better_scores, worse_scores, better_ids, worse_ids, better_mask, worse_mask)
    # t=2: diff 1 -> 0.313262; t=3: worse is padded with score 0, diff 2 -> 0.126928; mean 0.220095
    assert_close(loss, (NLS1 + NLS2) / 2)
    scores_w, ids_w, mask_w = t([[0.0, 0.0, 0.0, 0.0]]), torch.tensor([[5, 6, 9, 0]]), t([[1, 1, 1, 0]], torch.bool)
    padded, _ = tokenwise_reward_loss(better_scores, scores_w, better_ids, ids_w, better_mask, mask_w)
    assert_close(loss, padded)


def test_tokenwise_reward_loss_sees_a_divergence_in_the_mask_only():
    # pad id = EOS id = 0: the ids are equal, but the better answer has one more (real) EOS.
    ids = torch.tensor([[5, 6, 0, 0]])
    better_mask, worse_mask = t([[1, 1, 1, 0]], torch.bool), t([[1, 1, 0, 0]], torch.bool)
    scores_b, scores_w = t([[0.0, 0.0, 1.0, 7.0]]), t([[0.0, 0.0, 0.0, 7.0]])
    loss, _ = tokenwise_reward_loss(scores_b, scores_w, ids, ids.clone(), better_mask, worse_mask)
    assert_close(loss, NLS1)  # only t=2: diff 1


def test_tokenwise_losses_reject_identical_pairs():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    other = torch.tensor([[5, 6, 8, 0], [5, 6, 0, 0]])  # pair 1 is identical
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"pair\(s\) \[1\] are identical"):
        tokenwise_reward_loss(scores, scores, ids, other, mask, mask)
    safe, unsafe = t([True, True], torch.bool), t([False, False], torch.bool)
    with pytest.raises(ValueError, match="identical"):
        tokenwise_cost_loss(scores, scores, ids, other, mask, mask, safe, unsafe)


def test_tokenwise_reward_loss_is_split_invariant_and_trains_only_the_window():
    better_scores, worse_scores, *rest = _tokenwise_reward_batch()
    better_scores.requires_grad_(True)
    loss, _ = tokenwise_reward_loss(better_scores, worse_scores, *rest)
    loss.backward()
    window = t([[0, 0, 1, 1], [0, 1, 1, 0]], torch.bool)
    assert (better_scores.grad[~window] == 0).all()
    assert (better_scores.grad[window] < 0).all()
    pairs = [[x[i : i + 1] for x in (better_scores, worse_scores, *rest)] for i in range(2)]
    halves = [tokenwise_reward_loss(*pair)[0] for pair in pairs]
    assert_close(loss.detach(), (sum(halves) / 2).detach())


# ---------------------------------------------------------------------------- cost model


def test_cost_loss_known_values():
    safer, unsafer = t([-1.0, 1.0]), t([1.0, 0.5])
    safer_is_safe, unsafer_is_safe = t([True, True], torch.bool), t([False, True], torch.bool)
    # pair 0 (safe vs unsafe, signs -1 / +1): -log σ(1 - -1) - log σ(-1 * -1) - log σ(+1 * 1)
    #   = 0.126928 + 0.313262 + 0.313262 = 0.753451
    # pair 1 (both safe, signs -1 / -1): -log σ(0.5 - 1) - log σ(-1 * 1) - log σ(-1 * 0.5)
    #   = 0.974077 + 1.313262 + 0.974077 = 3.261416
    # mean = 2.007434
    expected = ((NLS2 + 2 * NLS1) + (NLS_M05 + NLS_M1 + NLS_M05)) / 2
    loss, stats = cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe)
    assert_close(loss, expected)
    assert_close(stats["accuracy"], 0.5)  # 1 > -1 yes, 0.5 > 1 no
    # signs: safer0 -1*-1 > 0 yes, safer1 -1*1 no, unsafer0 +1*1 yes, unsafer1 -1*0.5 no -> 2/4
    assert_close(stats["sign_accuracy"], 0.5)
    assert_detached(stats)
    # squares: [1, 1, 1, 0.25] -> mean 0.8125; reg 0.1 adds 0.08125
    loss_reg, _ = cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, regularization=0.1)
    assert_close(loss_reg, expected + 0.08125)


def test_cost_loss_gradient_pushes_safe_costs_down_and_unsafe_costs_up():
    safer = torch.zeros(2, requires_grad=True)
    unsafer = torch.zeros(2, requires_grad=True)
    loss, _ = cost_loss(safer, unsafer, t([True, True], torch.bool), t([False, False], torch.bool))
    loss.backward()
    assert (safer.grad > 0).all()  # gradient descent lowers the safe responses' cost below 0
    assert (unsafer.grad < 0).all()  # and raises the unsafe ones' above 0


def test_tokenwise_cost_loss_known_values():
    # diverge at 2, safer ends at 2, unsafer at 3 -> tokens 2..3; safer is safe (s=-1), unsafer unsafe (s=+1)
    safer_ids, unsafer_ids = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 2, 4, 5]])
    safer_mask, unsafer_mask = t([[1, 1, 1, 0]], torch.bool), t([[1, 1, 1, 1]], torch.bool)
    safer_scores, unsafer_scores = t([[9.0, 9.0, -1.0, 0.0]]), t([[9.0, 9.0, 1.0, 1.0]])
    safe, unsafe = t([True], torch.bool), t([False], torch.bool)
    # t=2: -log σ(1 - -1) - log σ(-1 * -1) - log σ(1 * 1) = 0.126928 + 0.313262 + 0.313262 = 0.753451
    # t=3: -log σ(1 - 0) - log σ(-1 * 0) - log σ(1 * 1) = 0.313262 + 0.693147 + 0.313262 = 1.319671
    # mean = 1.036561
    args = (safer_scores, unsafer_scores, safer_ids, unsafer_ids, safer_mask, unsafer_mask, safe, unsafe)
    loss, stats = tokenwise_cost_loss(*args)
    assert_close(loss, ((NLS2 + 2 * NLS1) + (NLS1 + LN2 + NLS1)) / 2)
    # end costs: safer -1 (t=2), unsafer 1 (t=3): ordered and both signs right
    assert_close(stats["accuracy"], 1.0)
    assert_close(stats["sign_accuracy"], 1.0)
    # reg over the window: squares (1 + 0 + 1 + 1) / 4 = 0.75 -> + 0.075
    assert_close(tokenwise_cost_loss(*args, regularization=0.1)[0], loss + 0.075)


def test_tokenwise_cost_loss_on_a_one_token_window_equals_the_sequence_loss():
    # Both end at 3 and differ only there: the window is the end token, so the two losses agree.
    safer_ids, unsafer_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 7]]), torch.tensor([[1, 2, 3, 5], [1, 2, 3, 6]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    generator = torch.Generator().manual_seed(2)
    safer_scores, unsafer_scores = torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)
    safe, unsafe = t([True, False], torch.bool), t([False, False], torch.bool)
    tokenwise, _ = tokenwise_cost_loss(
        safer_scores, unsafer_scores, safer_ids, unsafer_ids, mask, mask, safe, unsafe, regularization=0.1
    )
    sequence, _ = cost_loss(safer_scores[:, -1], unsafer_scores[:, -1], safe, unsafe, regularization=0.1)
    assert_close(tokenwise, sequence)


# ---------------------------------------------------------------------------- KL-shaped streams


def test_kl_shaped_streams_add_the_clipped_score_at_the_last_response_token():
    logprobs = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, 5.0]])
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-2.0, -2.0, 0.0]])  # KL_t row 0: [0.5, 0, -0.5]; row 1: [0, 0, 5]
    mask = t([[1, 1, 1], [1, 0, 0]], torch.bool)  # row 0 hits max length, row 1 ends after 1 token
    end = t([2.0, 100.0])
    # reward (-β KL, β = 0.1): row 0 [-0.05, 0, 0.05 + 2]; row 1 [clip(0 + 100) = 50, 0, 0] (t=2 is padding)
    rewards = shaped_reward_stream(end, logprobs, ref_logprobs, mask, kl_coeff=0.1)
    assert_close(rewards, [[-0.05, 0.0, 2.05], [50.0, 0.0, 0.0]])
    # cost (+β KL): row 0 [0.05, 0, -0.05 + 2]; row 1 with C = -100: [-50, 0, 0]
    costs = shaped_cost_stream(t([2.0, -100.0]), logprobs, ref_logprobs, mask, kl_coeff=0.1)
    assert_close(costs, [[0.05, 0.0, 1.95], [-50.0, 0.0, 0.0]])
    generic = kl_shaped_rewards(end, logprobs, ref_logprobs, mask, kl_coeff=0.1, score_clip=50.0, kl_sign=-1.0)
    assert_close(generic, rewards)


def test_kl_shaped_stream_is_detached():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    stream = shaped_reward_stream(torch.ones(1, requires_grad=True), logprobs, torch.zeros(1, 2), torch.ones(1, 2))
    assert not stream.requires_grad
    assert_close(stream, [[0.0, 1.0]])


# ---------------------------------------------------------------------------- GAE


def test_gae_known_values():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3, dtype=torch.bool)
    # γ = 1, λ = 1: A_t = reward-to-go - V_t = [6 - 0.5, 5 - 1, 3 - 1.5]; returns = reward-to-go
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(advantages, [[5.5, 4.0, 1.5]])
    assert_close(returns, [[6.0, 5.0, 3.0]])
    # λ = 0: one-step TD, A_t = r_t + V_{t+1} - V_t = [1 + 1 - 0.5, 2 + 1.5 - 1, 3 + 0 - 1.5]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    assert_close(advantages, [[1.5, 2.5, 1.5]])
    assert_close(returns, [[2.0, 3.5, 3.0]])
    # γ = λ = 0.5: δ = [1 + 0.5 - 0.5, 2 + 0.75 - 1, 3 - 1.5] = [1, 1.75, 1.5]
    # A_2 = 1.5, A_1 = 1.75 + 0.25 * 1.5 = 2.125, A_0 = 1 + 0.25 * 2.125 = 1.53125
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(advantages, [[1.53125, 2.125, 1.5]])


def test_gae_stops_at_the_end_of_each_response():
    # row 0 ends early (EOS at t=1, garbage after it); row 1 hits max length.
    rewards = t([[1.0, 2.0, 100.0], [1.0, 2.0, 3.0]])
    values = t([[0.5, 1.0, 100.0], [0.5, 1.0, 1.5]])
    mask = t([[1, 1, 0], [1, 1, 1]], torch.bool)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0 is the 2-token episode: reward-to-go [3, 2] minus values [0.5, 1]; padding is 0
    assert_close(advantages, [[2.5, 1.0, 0.0], [5.5, 4.0, 1.5]])
    assert_close(returns, [[3.0, 2.0, 0.0], [6.0, 5.0, 3.0]])


def test_gae_matches_a_per_sequence_loop_and_carries_no_grad():
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(5, 7, generator=generator)
    values = torch.randn(5, 7, generator=generator, requires_grad=True)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.arange(7) < torch.tensor(lengths).unsqueeze(-1)
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert not advantages.requires_grad
    assert not returns.requires_grad
    for b, length in enumerate(lengths):
        running = 0.0
        for step in reversed(range(length)):
            next_value = values[b, step + 1].item() if step + 1 < length else 0.0
            delta = rewards[b, step].item() + 0.99 * next_value - values[b, step].item()
            running = delta + 0.99 * 0.95 * running
            assert advantages[b, step].item() == pytest.approx(running, abs=1e-5)
            assert returns[b, step].item() == pytest.approx(running + values[b, step].item(), abs=1e-5)
        assert (advantages[b, length:] == 0).all()


# ---------------------------------------------------------------------------- policy loss


def _ratios(*ratios: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs / old_logprobs (1, A) with the given probability ratios."""
    return t([[math.log(r) for r in ratios]]).requires_grad_(True), torch.zeros(1, len(ratios))


def test_policy_loss_clips_positive_advantages_above_one_plus_eps():
    logprobs, old = _ratios(1.0, 1.5)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = lagrangian_policy_loss(logprobs, old, t([[1.0, 1.0]]), torch.zeros(1, 2), mask, multiplier=0.0)
    # A = 1: min(1 * 1, 1 * 1) = 1 and min(1.5 * 1, 1.2 * 1) = 1.2 -> loss = -(1 + 1.2) / 2 = -1.1
    assert_close(loss, -1.1)
    assert_close(stats["policy/clip_fraction"], 0.5)  # |1.5 - 1| > 0.2
    assert_close(stats["policy/ratio"], 1.25)
    assert_close(stats["policy/approx_kl"], 0.5 * (0.0 + math.log(1.5) ** 2) / 2)  # 0.041100
    assert_detached(stats)
    loss.backward()
    # d/dlogp of -(ρ A) / 2 at ρ = 1 is -0.5; the clipped token gets no gradient
    assert_close(logprobs.grad, [[-0.5, 0.0]])


def test_policy_loss_keeps_the_pessimistic_term_for_negative_advantages():
    logprobs, old = _ratios(1.5, 0.5)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = lagrangian_policy_loss(logprobs, old, t([[-1.0, -1.0]]), torch.zeros(1, 2), mask, multiplier=0.0)
    # A = -1: min(-1.5, -1.2) = -1.5 (unclipped) and min(-0.5, -0.8) = -0.8 (clipped) -> loss = 2.3 / 2 = 1.15
    assert_close(loss, 1.15)
    loss.backward()
    assert_close(logprobs.grad, [[0.75, 0.0]])  # d/dlogp of 1.5 ρ / 2 = 0.75 at ρ = 1.5


def test_policy_loss_combines_advantages_with_the_multiplier():
    logprobs, old = _ratios(1.0, 1.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    reward_adv, cost_adv = t([[1.0, 1.0]]), t([[3.0, -1.0]])
    # λ = 2: A = (A_r - 2 A_c) / 3 = [-5/3, 1]; ρ = 1 -> loss = -mean(A) = 1/3
    loss, _ = lagrangian_policy_loss(logprobs, old, reward_adv, cost_adv, mask, multiplier=t(2.0))
    assert_close(loss, 1 / 3)
    # unnormalised: A = [-5, 3] -> loss = 1
    loss, _ = lagrangian_policy_loss(logprobs, old, reward_adv, cost_adv, mask, multiplier=2.0, normalize=False)
    assert_close(loss, 1.0)


def test_policy_loss_is_the_clipped_surrogate_on_the_lagrangian_advantage():
    """The split the stage uses (the solver merges, then the surrogate) gives the very same numbers."""
    generator = torch.Generator().manual_seed(3)
    logprobs = (torch.randn(3, 4, generator=generator) * 0.3).requires_grad_(True)
    old = torch.randn(3, 4, generator=generator) * 0.3
    reward_adv, cost_adv = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    mask = torch.arange(4) < torch.tensor([4, 1, 3]).unsqueeze(-1)
    # λ = 2: (A_r - 2 A_c) / 3 by hand; unnormalised A_r - 2 A_c
    assert torch.equal(lagrangian_advantage(reward_adv, cost_adv, 2.0), (reward_adv - 2.0 * cost_adv) / 3.0)
    assert torch.equal(lagrangian_advantage(reward_adv, cost_adv, 2.0, normalize=False), reward_adv - 2.0 * cost_adv)
    for normalize, aggregation in ((True, "sequence_mean"), (False, "token_mean")):
        merged = lagrangian_advantage(reward_adv, cost_adv, t(2.0), normalize)
        split, split_stats = clipped_surrogate_loss(logprobs, old, merged, mask, 0.2, aggregation)
        args = (reward_adv, cost_adv, mask, t(2.0), 0.2, normalize, aggregation)
        whole, stats = lagrangian_policy_loss(logprobs, old, *args)
        assert torch.equal(split, whole)
        assert all(torch.equal(split_stats[key], stats[key]) for key in stats)
    assert not lagrangian_advantage(reward_adv.requires_grad_(True), cost_adv, 2.0).requires_grad  # a constant


def test_policy_loss_with_zero_multiplier_is_plain_ppo_and_large_multiplier_follows_the_cost():
    generator = torch.Generator().manual_seed(4)
    logprobs = torch.randn(4, 6, generator=generator) * 0.3
    old = torch.randn(4, 6, generator=generator) * 0.3
    reward_adv, cost_adv = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    mask = torch.arange(6) < torch.tensor([6, 2, 4, 5]).unsqueeze(-1)
    ratio = torch.exp(logprobs - old)
    ppo = -torch.min(ratio * reward_adv, ratio.clamp(0.8, 1.2) * reward_adv)
    expected = torch.stack([ppo[b, mask[b]].mean() for b in range(4)]).mean()
    loss, _ = lagrangian_policy_loss(logprobs, old, reward_adv, cost_adv, mask, multiplier=0.0)
    assert_close(loss, expected)
    # λ -> ∞: (A_r - λ A_c) / (1 + λ) -> -A_c, plain PPO on the negated cost advantage
    large, _ = lagrangian_policy_loss(logprobs, old, reward_adv, cost_adv, mask, multiplier=1e6)
    cost_only, _ = lagrangian_policy_loss(logprobs, old, -cost_adv, torch.zeros(4, 6), mask, multiplier=0.0)
    assert_close(large, cost_only, atol=1e-4)


def test_policy_loss_gradient_flows_only_through_logprobs():
    generator = torch.Generator().manual_seed(5)
    logprobs, old, reward_adv, cost_adv = (torch.randn(2, 3, generator=generator, requires_grad=True) for _ in range(4))
    multiplier = torch.tensor(0.5, requires_grad=True)
    loss, stats = lagrangian_policy_loss(logprobs, old, reward_adv, cost_adv, torch.ones(2, 3), multiplier)
    loss.backward()
    assert logprobs.grad is not None
    assert old.grad is None
    assert reward_adv.grad is None
    assert cost_adv.grad is None
    assert multiplier.grad is None
    assert_detached(stats)


def test_policy_loss_ignores_padding_and_is_split_invariant():
    generator = torch.Generator().manual_seed(6)
    logprobs, old = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    reward_adv, cost_adv = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    mask = torch.arange(5) < torch.tensor([5, 3, 1, 4]).unsqueeze(-1)
    loss, _ = lagrangian_policy_loss(logprobs, old, reward_adv, cost_adv, mask, multiplier=1.5)
    garbage = logprobs.masked_fill(~mask, 50.0)  # huge ratios at padding change nothing
    assert_close(lagrangian_policy_loss(garbage, old, reward_adv, cost_adv, mask, multiplier=1.5)[0], loss)
    halves = [
        lagrangian_policy_loss(logprobs[s], old[s], reward_adv[s], cost_adv[s], mask[s], multiplier=1.5)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert_close(loss, sum(halves) / 2)


# ---------------------------------------------------------------------------- value loss


def test_value_loss_known_values_and_clipping():
    values = t([[1.0, 10.0, 10.0]]).requires_grad_(True)
    old_values = t([[0.0, 0.0, 0.0]])
    returns = t([[2.0, 0.0, 10.0]])
    loss, stats = value_loss(values, old_values, returns, torch.ones(1, 3, dtype=torch.bool), clip_range=5.0)
    # t=0: V_clip = 1; max((1-2)^2, (1-2)^2) = 1
    # t=1: V_clip = 5; max((10-0)^2, (5-0)^2) = 100 (unclipped term, gradient flows)
    # t=2: V_clip = 5; max((10-10)^2, (5-10)^2) = 25 (clipped term, constant in V: no gradient)
    # loss = 0.5 * (1 + 100 + 25) / 3 = 21
    assert_close(loss, 21.0)
    assert_close(stats["clip_fraction"], 2 / 3)
    assert_close(stats["value"], 7.0)
    assert_detached(stats)
    loss.backward()
    # d/dV of 0.5 (V - R)^2 / 3 = (V - R) / 3: t=0 -> -1/3, t=1 -> 10/3, t=2 -> 0
    assert_close(values.grad, [[-1 / 3, 10 / 3, 0.0]])


def test_value_loss_gradient_flows_only_through_values_and_is_split_invariant():
    generator = torch.Generator().manual_seed(7)
    values, old_values, returns = (torch.randn(4, 5, generator=generator, requires_grad=True) for _ in range(3))
    mask = torch.arange(5) < torch.tensor([5, 2, 3, 1]).unsqueeze(-1)
    loss, _ = value_loss(values, old_values, returns, mask, clip_range=0.5)
    loss.backward()
    assert values.grad is not None
    assert old_values.grad is None
    assert returns.grad is None
    halves = [value_loss(values[s], old_values[s], returns[s], mask[s], 0.5)[0] for s in (slice(0, 2), slice(2, 4))]
    assert_close(loss.detach(), (sum(halves) / 2).detach())


# ---------------------------------------------------------------------------- logging helpers


def test_kl_to_reference_sums_tokens_and_averages_sequences():
    logprobs = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]]).requires_grad_(True)
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-3.0, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]], torch.bool)
    # row 0: 0.5 + 0 - 0.5 = 0; row 1: only t=0 counts, -2 + 3 = 1 -> mean 0.5
    kl = kl_to_reference(logprobs, ref_logprobs, mask)
    assert_close(kl, 0.5)
    assert not kl.requires_grad


def test_losses_package_imports_torch_only():
    # `import lit_saferlhf.losses` must work with nothing but torch installed (STYLE.md, section 1):
    # every module of the package imports torch and its siblings only, lazy imports included.
    for module in Path(losses.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        outside = {name for name in imported if name.split(".")[0] not in {"__future__", "torch"}}
        assert {name for name in outside if not name.startswith("lit_saferlhf.losses")} == set(), (module, outside)
    assert set(losses.__all__) <= set(dir(losses))
