"""Offline objectives against METHODS.md's worked examples, plain recomputations on random inputs, and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lit_saferlhf.losses import (
    bfpo_loss,
    bfpo_targets,
    can_dual,
    dpo_loss,
    ipo_loss,
    kto_loss,
    lagrangian_preference,
    ordered,
    pair_metrics,
    pecan_loss,
    safe_dpo_loss,
    safe_dpo_transform,
    soft_dpo_loss,
    solve_can_dual,
)
from lit_saferlhf.objectives import PairBatch
from lit_saferlhf_plugins.objectives import BFPO, CDPO, DPO, IPO, KTO, MoCAN, PeCAN, SafeDPO
from lit_saferlhf_plugins.solvers import DualAscent

# The four (s_w, s_l) combinations of BFPO's table, in METHODS.md §1 order.
COMBINATIONS = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def random_batch(size: int = 6, seed: int = 0, **labels: torch.Tensor) -> PairBatch:
    generator = torch.Generator().manual_seed(seed)
    logprobs = (-10 + 3 * torch.randn(size, 2, generator=generator, dtype=torch.float64)).requires_grad_(True)
    ref = -10 + 3 * torch.randn(size, 2, generator=generator, dtype=torch.float64)
    return PairBatch(logprobs, ref, **labels)


# ----------------------------------------------------------------------------------------------
# BFPO (METHODS.md §1(e))
# ----------------------------------------------------------------------------------------------


def test_bfpo_targets_follow_the_table() -> None:
    targets = bfpo_targets(COMBINATIONS[:, 0], COMBINATIONS[:, 1])
    assert targets.tolist() == [1.0, 0.5, -0.5, -1.0]
    assert bfpo_targets(torch.tensor([1]), torch.tensor([1]), b1=5.0, alpha=0.0).item() == pytest.approx(1.0)


def test_bfpo_worked_example() -> None:
    chosen = torch.full((4,), (-10.0) - (-11.0))  # ρ(y_hw) = 1
    rejected = torch.full((4,), (-12.0) - (-11.0))  # ρ(y_hl) = -1, so h = 2
    targets = bfpo_targets(COMBINATIONS[:, 0], COMBINATIONS[:, 1])
    per_pair = [bfpo_loss(chosen[i : i + 1], rejected[i : i + 1], targets[i : i + 1], 0.5)[0].item() for i in range(4)]
    assert per_pair == pytest.approx([0.0, 1.0, 9.0, 16.0])
    assert bfpo_loss(chosen, rejected, targets, 0.5)[0].item() == pytest.approx(6.5)
    assert bfpo_loss(chosen[:1], rejected[:1], targets[:1], 0.01)[0].item() == pytest.approx(9604.0)


def test_bfpo_gradient_is_two_times_the_residual() -> None:
    margin = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    targets = torch.tensor([1.0, -0.5, 0.5])
    loss, _ = bfpo_loss(margin, torch.zeros(3), targets, 0.5)
    loss.backward()
    assert torch.allclose(margin.grad, 2 * (margin.detach() - targets / 0.5) / 3)


def test_bfpo_plugin_labels_the_four_combinations_by_the_better_response() -> None:
    # Put the more helpful response second in half of the rows: a mix-up of index and label would show.
    better = torch.tensor([1, 0, 1, 0])
    is_safe = torch.stack([COMBINATIONS[:, 1], COMBINATIONS[:, 0]], dim=1)  # (s_l, s_w) when better = 1
    is_safe[1], is_safe[3] = COMBINATIONS[1], COMBINATIONS[3]
    batch = random_batch(4, better=better, is_safe=is_safe.bool())
    loss, stats = BFPO(tau=0.5)(batch)
    rho = batch.logratios.detach()
    expected = []
    for i, (b, g) in enumerate(zip(better.tolist(), [1.0, 0.5, -0.5, -1.0], strict=True)):
        h = (rho[i, b] - rho[i, 1 - b]).item()
        expected.append((h - g / 0.5) ** 2)
    assert loss.item() == pytest.approx(sum(expected) / 4)
    assert stats["target"].item() == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# DPO, IPO, KTO (SACPO's steps, METHODS.md §5(e))
# ----------------------------------------------------------------------------------------------


def test_dpo_worked_examples() -> None:
    h = torch.tensor([2.0])
    assert dpo_loss(h, torch.zeros(1), 0.025)[0].item() == pytest.approx(0.668460, abs=1e-6)
    assert dpo_loss(h, torch.zeros(1), 0.1)[0].item() == pytest.approx(0.598139, abs=1e-6)


def test_dpo_plugin_uses_the_chosen_ordering_and_its_gradient() -> None:
    better, safer = torch.tensor([0, 1, 1, 0, 0, 1]), torch.tensor([1, 1, 0, 0, 1, 0])
    for pairs, index in (("helpfulness", better), ("safety", safer)):
        batch = random_batch(better=better, safer=safer)
        loss, _ = DPO(beta=0.1, pairs=pairs)(batch)
        rho = batch.logratios.detach()
        margins = [(rho[i, j] - rho[i, 1 - j]).item() for i, j in enumerate(index.tolist())]
        assert loss.item() == pytest.approx(sum(softplus(-0.1 * m) for m in margins) / 6)
        loss.backward()
        for i, j in enumerate(index.tolist()):  # ∂L/∂ℓ(y_w) = −β σ(−β h) / B, opposite for y_l
            expected = -0.1 * sigmoid(-0.1 * margins[i]) / 6
            assert batch.logprobs.grad[i, j].item() == pytest.approx(expected)
            assert batch.logprobs.grad[i, 1 - j].item() == pytest.approx(-expected)


def test_dpo_rejects_an_unknown_pair_kind() -> None:
    with pytest.raises(ValueError, match="'helpfulness' or 'safety'"):
        DPO(pairs="harmlessness")  # type: ignore[arg-type]


def test_ipo_against_a_plain_recomputation() -> None:
    better = torch.tensor([1, 0, 1, 0, 1, 1])
    batch = random_batch(better=better)
    loss, _ = IPO(tau=0.25)(batch)
    rho = batch.logratios.detach()
    margins = [(rho[i, j] - rho[i, 1 - j]).item() for i, j in enumerate(better.tolist())]
    assert loss.item() == pytest.approx(sum((m - 2.0) ** 2 for m in margins) / 6)
    assert ipo_loss(torch.tensor([2.0]), torch.zeros(1), 0.25)[0].item() == pytest.approx(0.0)


def test_ipo_token_mean_divides_each_response_by_its_length_as_trl() -> None:
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    token_logprobs = torch.tensor([[9.0, -1.0, -2.0, -3.0], [9.0, 9.0, -4.0, 9.0]])
    weights = IPO(logprobs="token_mean").token_weights(mask, {})
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0, 0.0]]))
    assert (token_logprobs * weights).sum(-1).tolist() == pytest.approx([-2.0, -4.0])  # per-token means
    assert IPO().token_weights(mask, {}).tolist() == mask.float().tolist()  # the default sums
    with pytest.raises(ValueError, match="'sum' or 'token_mean'"):
        IPO(logprobs="mean")  # type: ignore[arg-type]


def test_kto_worked_example_and_weights() -> None:
    rho, z = torch.tensor([2.0, 2.0]), torch.tensor(0.5)
    desirable = kto_loss(rho[:1], torch.tensor([True]), z, 0.1)[0].item()
    undesirable = kto_loss(rho[:1], torch.tensor([False]), z, 0.1)[0].item()
    assert desirable == pytest.approx(0.462570, abs=1e-6)
    assert undesirable == pytest.approx(0.537430, abs=1e-6)
    weighted = kto_loss(rho, torch.tensor([True, False]), z, 0.1, desirable_weight=1.0, undesirable_weight=3.0)[0]
    assert weighted.item() == pytest.approx((0.462570 + 3 * 0.537430) / 2, abs=1e-6)
    assert kto_loss(rho[:1], torch.tensor([True]), torch.tensor(-4.0), 0.1)[0].item() == pytest.approx(
        1 - sigmoid(0.2)
    )  # z is clamped at 0


def test_kto_plugin_labels_each_response_by_its_safety() -> None:
    is_safe = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    batch = random_batch(4, is_safe=is_safe)
    loss, _ = KTO(beta=0.1, undesirable_weight=2.0)(batch)
    rho = batch.logratios.detach()
    z = max(0.0, rho.mean().item())
    terms = [
        (1 - sigmoid(0.1 * (r - z))) if s else 2.0 * (1 - sigmoid(0.1 * (z - r)))
        for r, s in zip(rho.reshape(-1).tolist(), is_safe.reshape(-1).tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(sum(terms) / 8)


# ----------------------------------------------------------------------------------------------
# SafeDPO (METHODS.md §6.1)
# ----------------------------------------------------------------------------------------------


def test_safe_dpo_transform_of_the_four_combinations() -> None:
    better = torch.tensor([0, 0, 0, 0, 1])
    is_safe = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]]).bool()
    chosen, keep, gap = safe_dpo_transform(better, is_safe)
    assert chosen.tolist() == [0, 0, 1, 0, 0]  # unsafe-better over safe: swapped; row 5: safe response 0 chosen
    assert keep.tolist() == [True, True, True, False, True]  # both unsafe: dropped
    assert gap.tolist() == [1, 0, 1, 0, 1]


def test_safe_dpo_worked_examples() -> None:
    h = torch.tensor([2.0, 2.0])  # β h = 0.2 at β = 0.1
    keep = torch.tensor([True, True])
    loss, _ = safe_dpo_loss(h[:1], torch.zeros(1), torch.tensor([1]), keep[:1], beta=0.1, delta=1.0)
    assert loss.item() == pytest.approx(1.171101, abs=1e-6)
    loss, _ = safe_dpo_loss(h[:1], torch.zeros(1), torch.tensor([0]), keep[:1], beta=0.1, delta=1.0)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    dropped, _ = safe_dpo_loss(h, torch.zeros(2), torch.tensor([1, 0]), torch.tensor([True, False]), 0.1, 1.0)
    assert dropped.item() == pytest.approx(1.171101, abs=1e-6)  # the dropped pair counts for nothing


def test_safe_dpo_plugin_against_a_plain_recomputation() -> None:
    better = torch.tensor([0, 1, 0, 1, 0, 1])
    is_safe = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0], [0, 1]]).bool()
    batch = random_batch(better=better, is_safe=is_safe)
    loss, _ = SafeDPO(beta=0.1, delta=2.0)(batch)
    rho = batch.logratios.detach()
    terms = []
    for i, b in enumerate(better.tolist()):
        s = is_safe[i].tolist()
        if not (s[0] or s[1]):
            continue
        w = 1 - b if (not s[b] and s[1 - b]) else b
        gap = int(not s[1 - w]) - int(not s[w])
        terms.append(softplus(-(0.1 * (rho[i, w] - rho[i, 1 - w]).item() - 2.0 * gap)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms))


# ----------------------------------------------------------------------------------------------
# C-DPO (METHODS.md §3(e))
# ----------------------------------------------------------------------------------------------


def test_lagrangian_preference_worked_example() -> None:
    rewards, costs = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 1.5]])
    probs = [lagrangian_preference(rewards, costs, lam).item() for lam in (0.0, 0.5, 1.0)]
    assert probs == pytest.approx([0.731059, 0.437823, 0.182426], abs=1e-6)


def test_cdpo_relabels_by_the_lagrangian_reward() -> None:
    rewards = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    costs = torch.tensor([[-1.0, 1.5], [-1.0, 1.5]])
    objective = CDPO(DualAscent(cost_limit=0.0, lr=0.1, init_multiplier=0.0, linear=True), beta=0.1)
    batch = random_batch(2, rewards=rewards, costs=costs)
    rho = batch.logratios.detach()
    loss, _ = objective(batch)  # λ = 0: response 1 preferred
    assert loss.item() == pytest.approx(sum(softplus(-0.1 * (rho[i, 1] - rho[i, 0]).item()) for i in range(2)) / 2)
    objective.solver.multiplier = 0.5  # λ = 0.5: response 0 preferred
    loss, _ = objective(batch)
    assert loss.item() == pytest.approx(sum(softplus(-0.1 * (rho[i, 0] - rho[i, 1]).item()) for i in range(2)) / 2)
    soft = CDPO(DualAscent(init_multiplier=0.5, linear=True), beta=0.1, soft=True)
    p = 0.437823
    expected = [
        p * softplus(-0.1 * (rho[i, 1] - rho[i, 0]).item()) + (1 - p) * softplus(0.1 * (rho[i, 1] - rho[i, 0]).item())
        for i in range(2)
    ]
    assert soft(batch)[0].item() == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_cdpo_dual_step_worked_example_through_the_solver_contract() -> None:
    objective = CDPO(DualAscent(cost_limit=0.0, lr=0.1, init_multiplier=0.5, max_multiplier=None, linear=True))
    objective.solver.update(0.8)
    assert objective.multiplier == pytest.approx(0.58)
    objective.solver.multiplier = 0.01
    objective.solver.update(-0.2)
    assert objective.multiplier == 0.0  # projected at 0
    restored = CDPO(DualAscent(linear=True, init_multiplier=1.0))
    restored.load_state_dict(objective.state_dict())
    assert restored.multiplier == 0.0


def test_cdpo_rejects_a_bad_update_interval() -> None:
    with pytest.raises(ValueError, match="update_every"):
        CDPO(DualAscent(), update_every=0)


# ----------------------------------------------------------------------------------------------
# CAN: MoCAN and PeCAN (METHODS.md §4(e))
# ----------------------------------------------------------------------------------------------

R, G = torch.tensor([[0.0, 1.0]]), torch.tensor([[[1.0], [-1.0]]])


def test_can_dual_worked_example() -> None:
    values = [can_dual(torch.tensor([lam]), R, G, beta=1.0).item() for lam in (0.0, 1.0, 0.5)]
    assert values == pytest.approx([0.620115, 0.620115, 0.5], abs=1e-6)
    lam = torch.tensor([0.0], requires_grad=True)
    can_dual(lam, R, G, beta=1.0).backward()
    assert lam.grad.item() == pytest.approx(-0.462117, abs=1e-6)  # violated: λ must rise


def test_can_dual_solution_worked_example() -> None:
    lam, stats = solve_can_dual(R, G, beta=1.0)
    assert lam.item() == pytest.approx(0.5, abs=1e-6)
    assert stats["dual_value"] == pytest.approx(0.5, abs=1e-9)
    lam, stats = solve_can_dual(R, G, beta=1.0, margin=0.2)
    assert lam.item() == pytest.approx(0.5 + math.atanh(0.2), abs=1e-6)
    assert stats["dual_value"] == pytest.approx(0.379864, abs=1e-6)


def test_can_dual_does_not_overflow_and_respects_the_bound() -> None:
    rewards = torch.tensor([[50.0, 60.0, 55.0]])  # exp(600) overflows float32 and float64
    utilities = torch.tensor([[[0.0], [-5.0], [1.0]]])
    assert torch.isfinite(can_dual(torch.tensor([1.0]), rewards, utilities, beta=0.1))
    lam, _ = solve_can_dual(rewards, utilities, beta=0.1, margin=100.0, max_multiplier=7.0)  # unreachable b
    assert lam.item() == pytest.approx(7.0)


def test_can_dual_against_a_plain_recomputation() -> None:
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    utilities = torch.randn(4, 5, 1, generator=generator, dtype=torch.float64)
    lam, beta, b = 0.7, 0.5, 0.1
    total = 0.0
    for i in range(4):
        g = utilities[i, :, 0].tolist()
        mean = sum(g) / 5
        total += beta * math.log(
            sum(math.exp((r + lam * (x - mean)) / beta) for r, x in zip(rewards[i].tolist(), g, strict=True)) / 5
        )
    expected = total / 4 - lam * b
    assert can_dual(torch.tensor([lam], dtype=torch.float64), rewards, utilities, beta, b).item() == pytest.approx(
        expected
    )


def test_mocan_fits_lambda_then_trains_on_soft_labels() -> None:
    objective = MoCAN(beta=1.0, dual_samples=2)
    with pytest.raises(RuntimeError, match="fit_dual"):
        objective(random_batch(1, rewards=torch.zeros(1, 2), costs=torch.zeros(1, 2)))
    stats = objective.fit_dual(R, -G[..., 0])  # costs = -g
    assert stats["multiplier"] == pytest.approx(0.5, abs=1e-6)
    assert objective.multiplier == pytest.approx(0.5, abs=1e-6)
    # The worked example: r_λ(y_1) − r_λ(y_0) = 1 ⇒ p = 0.731059; β h = 0.5 ⇒ loss 0.608548.
    objective = MoCAN(beta=0.1, dual_samples=2)
    objective.lam = 1.0
    batch = PairBatch(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), rewards=torch.tensor([[0.0, 0.0]]),
                      costs=torch.tensor([[0.5, -0.5]]))  # fmt: skip
    assert objective(batch)[0].item() == pytest.approx(0.608548, abs=1e-6)
    assert soft_dpo_loss(torch.tensor([5.0]), torch.zeros(1), torch.tensor([1.0]), 0.1)[0].item() == pytest.approx(
        softplus(-0.5)
    )  # p = 1 is DPO


def test_pecan_worked_example_and_plugin_ordering() -> None:
    loss, _ = pecan_loss(torch.tensor([3.0]), torch.zeros(1), torch.tensor([-0.1]), torch.zeros(1), 1.0, 0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    objective = PeCAN(beta=0.1, dual_samples=2)
    objective.load_state_dict({"multiplier": 1.0})
    # better = 1: y_hw is response 1 (ρ = 3, ĝ = 0.1 ⇒ cost −0.1)
    batch = PairBatch(torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2), better=torch.tensor([1]),
                      costs=torch.tensor([[0.0, -0.1]]), rewards=torch.zeros(1, 2))  # fmt: skip
    assert objective(batch)[0].item() == pytest.approx(0.598139, abs=1e-6)


def test_pecan_margin_sign_a_less_safe_helpful_answer_is_pushed_less_never_reversed() -> None:
    """ĝ = −c: a more helpful answer that is also safer is pushed up harder than one that is less safe."""
    objective = PeCAN(beta=0.1, dual_samples=2)
    objective.load_state_dict({"multiplier": 2.0})
    pushes = {}
    for name, costs in (("safer", [[-1.0, 1.0]]), ("less_safe", [[1.0, -1.0]])):  # response 0 is the better one
        logprobs = torch.zeros(1, 2, requires_grad=True)
        batch = PairBatch(logprobs, torch.zeros(1, 2), better=torch.tensor([0]), costs=torch.tensor(costs),
                          rewards=torch.zeros(1, 2))  # fmt: skip
        objective(batch)[0].backward()
        pushes[name] = -logprobs.grad[0, 0].item()  # > 0: training raises the better answer
    assert pushes["safer"] == pytest.approx(0.1 * torch.sigmoid(torch.tensor(4.0)).item())  # logit 0 − 2·2
    assert pushes["less_safe"] == pytest.approx(0.1 * torch.sigmoid(torch.tensor(-4.0)).item())
    assert pushes["safer"] > pushes["less_safe"] > 0


def test_pecan_labels_step_uses_the_combined_implicit_rewards() -> None:
    objective = PeCAN(beta=0.1, dual_samples=2, policy_step="labels")
    assert objective.requires == ("rewards", "costs")  # no helpfulness label needed
    objective.load_state_dict({"multiplier": 1.0})
    # (r̂ + λ*ĝ)(y_1) − (r̂ + λ*ĝ)(y_0) = 0.5 + 1·0.5 = 1 ⇒ p = 0.731059; β h = 0.5 ⇒ 0.608548 (METHODS.md §4(e)).
    batch = PairBatch(torch.tensor([[0.0, 5.0]]), torch.zeros(1, 2), rewards=torch.tensor([[0.0, 0.5]]),
                      costs=torch.tensor([[0.25, -0.25]]))  # fmt: skip
    loss, stats = objective(batch)
    assert loss.item() == pytest.approx(0.608548, abs=1e-6)
    assert stats["label_second"].item() == pytest.approx(0.731059, abs=1e-6)
    # More helpful (r̂ + 1) but unsafe (ĝ − 2, cost + 2): with λ* = 1 the safe response 0 is preferred.
    logprobs = torch.zeros(1, 2, requires_grad=True)
    batch = PairBatch(logprobs, torch.zeros(1, 2), rewards=torch.tensor([[0.0, 1.0]]), costs=torch.tensor([[0.0, 2.0]]))
    objective(batch)[0].backward()
    assert logprobs.grad[0, 0].item() < 0 < logprobs.grad[0, 1].item()  # training raises the safe one
    with pytest.raises(ValueError, match="policy_step"):
        PeCAN(policy_step="modpo")


def test_dualized_objectives_need_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        PeCAN(dual_samples=1)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def test_pair_metrics_split_helpfulness_and_safety() -> None:
    rho = torch.tensor([[1.0, -1.0], [0.0, 3.0]])
    stats = pair_metrics(rho, torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert stats["helpful/margin"].item() == pytest.approx((2.0 - 3.0) / 2)
    assert stats["helpful/accuracy"].item() == pytest.approx(0.5)
    assert stats["safety/margin"].item() == pytest.approx((2.0 + 3.0) / 2)
    assert stats["safety/accuracy"].item() == pytest.approx(1.0)
    assert pair_metrics(rho, None, None) == {}


def test_ordered_and_default_token_weights() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    first, second = ordered(values, torch.tensor([1, 0]))
    assert first.tolist() == [2.0, 3.0]
    assert second.tolist() == [1.0, 4.0]
    mask = torch.tensor([[False, True, True]])
    assert DPO().token_weights(mask, {}).tolist() == [[0.0, 1.0, 1.0]]


@pytest.mark.parametrize(
    "objective",
    [DPO(beta=0.5), IPO(tau=0.5), KTO(beta=0.5), BFPO(tau=0.5), SafeDPO(beta=0.5, delta=1.0),
     CDPO(DualAscent(init_multiplier=0.5, linear=True), beta=0.5, soft=True)],
    ids=lambda objective: type(objective).__name__,
)  # fmt: skip
def test_gradients_match_finite_differences(objective: object) -> None:
    labels = {
        "better": torch.tensor([0, 1, 1, 0]),
        "safer": torch.tensor([1, 1, 0, 0]),
        "is_safe": torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]]).bool(),
        "rewards": torch.tensor([[1.0, 2.0], [0.0, -1.0], [0.5, 0.5], [2.0, 0.0]], dtype=torch.float64),
        "costs": torch.tensor([[-1.0, 1.5], [1.0, 0.0], [0.0, 2.0], [-2.0, 1.0]], dtype=torch.float64),
    }
    ref = random_batch(4, seed=5).ref_logprobs

    def loss(logprobs: torch.Tensor) -> torch.Tensor:
        return objective(PairBatch(logprobs, ref, **labels))[0]

    start = random_batch(4, seed=6).logprobs.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (start,), eps=1e-6, atol=1e-5)
