"""Several constraints (METHODS.md §6.2) and RePO (§6.3): the advantage, the windows, the solver input, the state."""

from __future__ import annotations

import pytest
import torch

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import (
    constrained_advantage,
    group_normalized_advantages,
    lagrangian_advantage,
    rectified_costs,
)
from lit_saferlhf.stages.constraints import (
    Constraint,
    ConstraintLedger,
    check_constraints,
    response_weights,
    stream_costs,
)
from lit_saferlhf_plugins.solvers import DualAscent, FixedPenalty, PIDLagrangian


def test_methods_worked_example_gives_0_7() -> None:
    """A_r = 1, A_c = (0.5, −1), λ = (1, 3): (1 − 0.5 + 3) / (1 + 4) = 0.7."""
    advantage = constrained_advantage(torch.tensor([[1.0]]), torch.tensor([[[0.5], [-1.0]]]), torch.tensor([1.0, 3.0]))
    assert advantage.item() == pytest.approx(0.7, abs=1e-7)


def test_one_constraint_is_safe_rlhfs_advantage_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    reward, cost = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    for multiplier in (0.0, 0.731, 4.9):
        lam = torch.tensor(multiplier)
        assert torch.equal(
            constrained_advantage(reward, cost[:, None], lam[None]), lagrangian_advantage(reward, cost, lam)
        )
        unnormalised = constrained_advantage(reward, cost[:, None], lam[None], normalize=False)
        assert torch.equal(unnormalised, lagrangian_advantage(reward, cost, lam, normalize=False))


def test_several_weighted_constraints_against_a_plain_recomputation() -> None:
    generator = torch.Generator().manual_seed(1)
    n, k, a = 7, 3, 4
    reward = torch.randn(n, a, generator=generator)
    costs = torch.randn(n, k, a, generator=generator)
    lam = torch.rand(k, generator=generator) * 3
    weights = (torch.rand(n, k, generator=generator) > 0.4).float()
    got = constrained_advantage(reward, costs, lam, weights)
    for i in range(n):
        numerator = reward[i] - sum(lam[j] * weights[i, j] * costs[i, j] for j in range(k))
        denominator = 1 + sum(lam[j] * weights[i, j] for j in range(k))
        torch.testing.assert_close(got[i], numerator / denominator)
    unweighted = constrained_advantage(reward, costs, lam)
    torch.testing.assert_close(unweighted, constrained_advantage(reward, costs, lam, torch.ones(n, k)))
    torch.testing.assert_close(constrained_advantage(reward, costs, lam, torch.zeros(n, k)), reward)  # nobody weighed


def test_the_advantage_is_a_constant_for_the_gradient() -> None:
    reward = torch.randn(3, 2, requires_grad=True)
    costs = torch.randn(3, 2, 2, requires_grad=True)
    advantage = constrained_advantage(reward, costs, torch.tensor([0.5, 2.0], requires_grad=True))
    assert not advantage.requires_grad


def test_constrained_grpo_normalises_each_stream_before_combining() -> None:
    """Girgis et al. (2026) via METHODS §6.2: G = 4, r = (1,2,3,2), c = (0,1,1,0), λ = 0.5, sample std, no ε."""
    rewards, costs = torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    z_r = group_normalized_advantages(rewards, 4, eps=0.0)
    z_c = group_normalized_advantages(costs, 4, eps=0.0)
    torch.testing.assert_close(z_r, torch.tensor([-1.224745, 0.0, 1.224745, 0.0]))
    torch.testing.assert_close(z_c, torch.tensor([-0.866025, 0.866025, 0.866025, -0.866025]))
    advantage = constrained_advantage(z_r[:, None], z_c[:, None, None], torch.tensor([0.5]), normalize=False)
    torch.testing.assert_close(advantage[:, 0], torch.tensor([-0.791732, -0.433013, 0.791732, 0.433013]))
    scalarised_first = group_normalized_advantages(rewards - 0.5 * costs, 4, eps=0.0)
    torch.testing.assert_close(scalarised_first, torch.tensor([-1.161895, -0.387298, 1.161895, 0.387298]))
    assert not torch.allclose(scalarised_first, advantage[:, 0], atol=1e-2)  # the two orders differ


def test_violation_rate_step_of_constrained_grpo() -> None:
    """Dual ascent on the violation rate: λ' = 0.5 + 0.1·(0.5 − 0.1) = 0.54."""
    solver = DualAscent(cost_limit=0.1, lr=0.1, init_multiplier=0.5, linear=True)
    solver.update(0.5)
    assert solver.multiplier == pytest.approx(0.54)


def test_repo_rectified_costs() -> None:
    costs = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    assert rectified_costs(costs, 0.0).tolist() == [0.0, 0.0, 0.5, 2.0]  # at or below the bound: no penalty
    assert rectified_costs(costs, 1.0).tolist() == [0.0, 0.0, 0.0, 1.0]  # only the excess over d


def test_response_weights_are_a_constraints_category() -> None:
    categories = ["EHD", "EHD", "IHD", None]
    assert response_weights(Constraint("all", DualAscent()), categories, torch.device("cpu")) is None
    ehd = Constraint("ehd", DualAscent(), category="EHD")
    assert response_weights(ehd, categories, torch.device("cpu")).tolist() == [1.0, 1.0, 0.0, 0.0]
    rectified = Constraint("ehd", DualAscent(cost_limit=0.0), category="EHD", rectified=True)
    assert response_weights(rectified, categories, torch.device("cpu")).tolist() == [1.0, 1.0, 0.0, 0.0]
    costs = torch.tensor([1.0, -1.0, 3.0, -2.0])
    assert stream_costs(rectified, costs).tolist() == [1.0, 0.0, 3.0, 0.0]  # RePO's stream: the excess only
    assert stream_costs(ehd, costs) is costs  # any other: the costs as they are


def test_ledger_counts_a_category_only_and_rectified_violations() -> None:
    ehd = Constraint("ehd", DualAscent(cost_limit=0.5), category="EHD")
    repo = Constraint("repo", DualAscent(cost_limit=0.5), rectified=True)
    ledger = ConstraintLedger([ehd, repo], window=3)
    costs, categories = torch.tensor([1.0, 2.0, 0.0, 4.0]), ["EHD", "IHD", "EHD", "EHD"]
    ledger.record(ehd, costs, categories)
    ledger.record(repo, costs, categories)
    assert list(ledger.windows["ehd"]) == [1.0, 0.0, 4.0]
    assert list(ledger.windows["repo"]) == [1.5, 0.0, 3.5]  # window 3: the last three of (0.5, 1.5, 0, 3.5)
    assert ledger.solver_input(repo, 2.0) == 2.5  # d + mean violation: the solver sees J - d = 2.0
    assert ledger.solver_input(ehd, 2.0) == 2.0


def test_ledger_state_round_trips_and_refuses_other_constraints() -> None:
    constraints = [Constraint("a", DualAscent(lr=0.5)), Constraint("b", PIDLagrangian(ki=0.2))]
    ledger = ConstraintLedger(constraints, window=4)
    for step in range(3):
        for constraint in constraints:
            ledger.record(constraint, torch.tensor([float(step), 1.0]), [None, None])
            constraint.solver.update(float(step))
        ledger.note_multipliers()
    state = ledger.state_dict()
    fresh = [Constraint("a", DualAscent(lr=0.5)), Constraint("b", PIDLagrangian(ki=0.2))]
    restored = ConstraintLedger(fresh, window=4)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert [c.solver.multiplier for c in fresh] == [c.solver.multiplier for c in constraints]
    with pytest.raises(ConfigError, match="constraints the checkpoint was trained with"):
        ConstraintLedger([Constraint("a", DualAscent())], window=4).load_state_dict(state)
    exported = ledger.export()
    assert exported["solver"] == "DualAscent"
    assert exported["multiplier"] == ledger.histories["a"]
    assert exported["constraints"]["b"]["multiplier"] == ledger.histories["b"]


def test_constraint_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="distinct names"):
        check_constraints([Constraint("a", DualAscent()), Constraint("a", FixedPenalty())])
    with pytest.raises(ConfigError, match="at least one constraint"):
        check_constraints([])
    with pytest.raises(ConfigError, match="an identifier"):
        Constraint("bad name", DualAscent())
