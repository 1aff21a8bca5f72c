"""AMA (Equilibrate RLHF): ADPO's and APPO's token masks, METHODS.md §2 (e) and hand-made values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_saferlhf.losses import (
    adpo_token_mask,
    appo_lagrangian_mask,
    appo_policy_loss,
    appo_surrogate_loss,
    appo_token_mask,
    lagrangian_advantage,
    lagrangian_policy_loss,
)
from lit_saferlhf.objectives import PairBatch
from lit_saferlhf_plugins.objectives import DPO, IPO
from lit_saferlhf_plugins.objectives.ama import AMA

# METHODS.md §2 (e): pair 0 = (chosen, rejected); the rejected response has 2 tokens (third is padding).
POLICY = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -1.0, 0.0]], dtype=torch.float64)
REFERENCE = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]], dtype=torch.float64)
SCORES = torch.tensor([[0.5, -0.2, 0.1], [-0.3, 0.4, 9.0]])
RESPONSE = torch.tensor([[True, True, True], [True, True, False]])


def summed_batch(weights: torch.Tensor, chosen: int = 0) -> PairBatch:
    w = weights.to(torch.float64)
    return PairBatch(
        (POLICY * w).sum(-1).view(-1, 2), (REFERENCE * w).sum(-1).view(-1, 2), safer=torch.tensor([chosen])
    )


def test_adpo_worked_example_of_methods() -> None:
    weights = adpo_token_mask(SCORES, RESPONSE, torch.tensor([0]))
    assert weights.tolist() == [[1, 0, 1], [1, 0, 0]]
    loss, stats = DPO(beta=0.1, pairs="safety")(summed_batch(weights))
    assert loss.item() == pytest.approx(0.668460, abs=1e-6)
    assert stats["margin"].item() == pytest.approx(0.5)
    plain, _ = DPO(beta=0.1, pairs="safety")(summed_batch(RESPONSE.float()))
    assert plain.item() == pytest.approx(0.718460, abs=1e-6)


def test_adpo_mask_follows_the_chosen_index_and_the_baseline() -> None:
    swapped = adpo_token_mask(SCORES, RESPONSE, torch.tensor([1]))  # row 1 is now the chosen one
    assert swapped.tolist() == [[0, 1, 0], [0, 1, 0]]
    raised = adpo_token_mask(SCORES, RESPONSE, torch.tensor([0]), baseline=0.2)
    assert raised.tolist() == [[1, 0, 0], [1, 0, 0]]


def test_adpo_mask_matches_a_plain_loop_on_random_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 7, generator=generator)
    mask = torch.rand(8, 7, generator=generator) > 0.3
    chosen = torch.randint(0, 2, (4,), generator=generator)
    weights = adpo_token_mask(scores, mask, chosen, baseline=0.1)
    for row in range(8):
        is_chosen = row % 2 == chosen[row // 2]
        for t in range(7):
            keep = (scores[row, t] > 0.1) if is_chosen else (scores[row, t] < 0.1)
            assert weights[row, t].item() == float(bool(mask[row, t]) and bool(keep))


def test_an_empty_chosen_mask_contributes_zero_never_nan() -> None:
    scores = torch.tensor([[-1.0, -1.0, -1.0], [-0.3, 0.4, 9.0]])  # no chosen token above b
    weights = adpo_token_mask(scores, RESPONSE, torch.tensor([0]))
    assert weights[0].sum() == 0
    policy = POLICY.clone().requires_grad_(True)
    batch = PairBatch(
        (policy * weights.double()).sum(-1).view(-1, 2),
        (REFERENCE * weights.double()).sum(-1).view(-1, 2),
        safer=torch.tensor([0]),
    )
    loss, _ = DPO(beta=0.1, pairs="safety")(batch)
    loss.backward()
    assert loss.item() == pytest.approx(F.softplus(torch.tensor(-0.1 * 1.0)).item())  # margin 0 − (−1) = 1
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[0].abs().sum() == 0


class FixedScorer(torch.nn.Module):
    """A score model whose per-token scores are ``scores`` whatever the input."""

    normalizer = staticmethod(lambda scores: scores)

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> object:
        return type("Out", (), {"scores": self.scores})()


def test_dpo_and_ipo_take_the_ama_masks_through_the_token_weight_hook() -> None:
    ama = AMA(path="cost-model", negate=True)
    padded = torch.cat([torch.zeros(2, 1), -SCORES], dim=1)  # a cost per position (negated); targets start at 1
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4),
        "safer": torch.tensor([0]),
    }
    for objective in (DPO(pairs="safety", ama=ama), IPO(pairs="safety", ama=ama)):
        loaded: list[str] = []
        networks = objective.frozen_networks(lambda path, loaded=loaded: loaded.append(path) or FixedScorer(padded))
        assert loaded == ["cost-model"]  # the stage loads ama.path, once
        assert list(networks) == ["ama"]
        assert objective.token_weights(RESPONSE, batch).tolist() == [[1, 0, 1], [1, 0, 0]]
    assert DPO(pairs="safety").frozen_networks(lambda path: pytest.fail("no scorer without ama")) == {}
    assert DPO(pairs="safety").token_weights(RESPONSE, batch).tolist() == RESPONSE.float().tolist()


def test_ama_negates_a_cost_models_scores() -> None:
    ids = torch.zeros(1, 2, dtype=torch.long)
    for ama, expected in ((AMA("x"), [[1.0, -2.0]]), (AMA("x", negate=True), [[-1.0, 2.0]])):
        network = DPO(ama=ama).frozen_networks(lambda path: FixedScorer(torch.tensor([[1.0, -2.0]])))["ama"]
        assert ama.token_scores(network, ids, ids).tolist() == expected


# ---------------------------------------------------------------- APPO


def test_appo_mask_on_hand_made_values() -> None:
    values = torch.tensor([[0.5, -0.5, 0.5, -0.5, 0.0], [1.0, 1.0, -1.0, 2.0, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0], [0.0, -2.0, -2.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    kept = appo_token_mask(values, advantages, mask)
    # A ≥ 0 keeps V > 0; A < 0 keeps V < 0; V = 0 never agrees; padding never kept
    assert kept.int().tolist() == [[1, 0, 0, 1, 0], [1, 0, 1, 1, 0]]
    assert appo_token_mask(values, advantages, mask, baseline=0.75).int().tolist() == [[0, 0, 1, 1, 0], [1, 0, 1, 1, 0]]


def test_appo_loss_is_the_per_sequence_masked_mean_over_all_sequences() -> None:

    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -0.3], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.8, -0.5], [-1.5, -0.4, -0.3], [-1.0, -1.0, -1.0]])
    advantages = torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0], [1.0, 1.0, 1.0]])
    values = torch.tensor([[2.0, 1.0, 1.0], [-1.0, 3.0, -2.0], [-1.0, -1.0, -1.0]])  # row 3: nothing agrees
    mask = torch.ones(3, 3, dtype=torch.bool)
    zeros = torch.zeros_like(advantages)
    loss, stats = appo_policy_loss(logprobs, old, advantages, zeros, values, zeros, mask, 0.0, clip_eps=0.2)
    kept = [[0, 2], [1, 2], []]
    expected = 0.0
    for row, tokens in enumerate(kept):
        terms = []
        for t in tokens:
            ratio = math.exp(logprobs[row, t].item() - old[row, t].item())
            a = advantages[row, t].item()
            terms.append(min(ratio * a, min(max(ratio, 0.8), 1.2) * a))
        expected += sum(terms) / len(terms) if terms else 0.0
    assert loss.item() == pytest.approx(-expected / 3, rel=1e-6)
    assert stats["policy/ama_kept_fraction"].item() == pytest.approx(4 / 9)
    assert stats["policy/ama_empty_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[2].abs().sum() == 0
    assert logprobs.grad[0, 1] == 0


def test_appo_uses_the_lagrangian_value_and_advantage() -> None:

    logprobs = torch.zeros(1, 2)
    reward_adv, cost_adv = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])  # λ = 1: A = (1, −1)
    reward_values, cost_values = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 3.0]])  # V = (1, −2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, stats = appo_policy_loss(logprobs, logprobs, reward_adv, cost_adv, reward_values, cost_values, mask, 1.0)
    assert stats["policy/ama_kept_fraction"].item() == 1.0  # both tokens agree only with the merged V and A
    plain, _ = lagrangian_policy_loss(logprobs, logprobs, reward_adv, cost_adv, mask, 1.0)
    masked, _ = appo_policy_loss(logprobs, logprobs, reward_adv, cost_adv, reward_values, cost_values, mask, 1.0)
    assert masked.item() == pytest.approx(plain.item())


def test_appo_loss_is_the_lagrangian_mask_then_the_surrogate_on_the_merged_advantage() -> None:
    """The split the stage uses (APPO's mask, the solver's advantage, the surrogate) gives the very same numbers."""
    generator = torch.Generator().manual_seed(0)
    logprobs = (torch.randn(3, 4, generator=generator) * 0.3).requires_grad_(True)
    old, *streams = (torch.randn(3, 4, generator=generator) for _ in range(5))  # A_r, A_c, V_r, V_c
    reward_adv, cost_adv, reward_values, cost_values = streams
    mask = torch.arange(4) < torch.tensor([4, 2, 3]).unsqueeze(-1)
    for normalize, baseline in ((True, 0.0), (False, 0.3)):
        kept = appo_lagrangian_mask(reward_values, cost_values, reward_adv, cost_adv, mask, 1.5, baseline)
        by_hand = appo_token_mask(reward_values - 1.5 * cost_values, reward_adv - 1.5 * cost_adv, mask, baseline)
        assert torch.equal(kept, by_hand)
        merged = lagrangian_advantage(reward_adv, cost_adv, 1.5, normalize)
        split, split_stats = appo_surrogate_loss(logprobs, old, merged, kept, mask)
        whole, stats = appo_policy_loss(
            logprobs, old, reward_adv, cost_adv, reward_values, cost_values, mask, 1.5, 0.2, normalize, baseline
        )
        assert torch.equal(split, whole)
        assert all(torch.equal(split_stats[key], stats[key]) for key in stats)


def test_appo_with_an_all_empty_batch_is_zero() -> None:

    x = torch.zeros(2, 3, requires_grad=True)
    loss, _ = appo_policy_loss(x, x.detach(), torch.ones(2, 3), torch.zeros(2, 3), -torch.ones(2, 3),
                               torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.0)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all()


def test_without_ama_dpo_and_ipo_weigh_every_response_token() -> None:
    for objective in (DPO(pairs="safety"), IPO(pairs="safety")):
        assert objective.token_weights(RESPONSE, {}).tolist() == RESPONSE.float().tolist()
