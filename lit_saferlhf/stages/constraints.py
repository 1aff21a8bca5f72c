"""PPO-Lagrangian's constraints: each a cost, a limit, its own multiplier and solver (METHODS.md §6.2, §6.3).

A run bounds one or more expected costs, ``J_k <= d_k``. Each constraint names where its cost comes
from (the stage's cost model, or a stream of one of its scorers), may be restricted to the prompts of
one category (it then bounds the mean cost over that category's prompts), and may be rectified
(RePO: every response's cost is bounded, not the mean). Its solver owns ``λ_k`` and ``d_k``
(``cost_limit``), so each constraint moves its multiplier by its own rule.

:class:`ConstraintLedger` keeps what each constraint remembers between rollouts: its window of recent
costs (this rank's) and the history of ``λ_k``; it computes each episode cost ``J_k`` the same way on
every rank and saves and restores all of it.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import rectified_costs
from lit_saferlhf.solvers import ConstraintSolver

COST_MODEL = "cost_model"
"""The ``cost`` of a constraint that reads the stage's cost model (``model.init_args.cost_model``)."""


@dataclass(frozen=True)
class Constraint:
    """One constraint ``J_k <= d_k`` of PPO-Lagrangian.

    Attributes:
        name: A short identifier (letters, digits, ``_``), unique in the run: its metrics are
            ``solver/<name>/...``, its critic ``cost_critic_<name>`` and its history is kept under it.
        solver: The rule that moves ``λ_k`` (``DualAscent``, ``PIDLagrangian``, ``FixedPenalty``); its
            ``cost_limit`` is ``d_k``.
        cost: Where the cost comes from: ``cost_model`` (the stage's cost model), or a scorer of
            ``model.init_args.scorers`` by name (its main stream) or ``name.stream`` (another stream).
        category: Bound only the prompts of this category (the prompt data's ``category_column``):
            ``J_k`` is the mean cost over them, and only their responses carry ``λ_k``'s penalty.
        rectified: RePO (Peng et al., 2024): bound every response's cost, ``C(x, y) <= d_k``. The cost
            stream carries the rectified cost ``max(0, C - d_k)`` (only the excess over the bound is
            penalised), and the solver is driven by its mean, the mean rectified violation.
    """

    name: str
    solver: ConstraintSolver
    cost: str = COST_MODEL
    category: str | None = None
    rectified: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name) or self.name == "reward":
            expected = "an identifier (a letter, then letters, digits or _) other than 'reward'"
            raise ConfigError("model.init_args.constraints[].name", expected, self.name)


def check_constraints(constraints: list[Constraint]) -> None:
    """Refuse an empty list and two constraints with the same name, as one line naming the key."""
    if not constraints:
        raise ConfigError("model.init_args.constraints", "at least one constraint", constraints)
    names = [constraint.name for constraint in constraints]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError("model.init_args.constraints", "constraints with distinct names", f"{repeated[0]!r} twice")


def response_weights(constraint: Constraint, categories: list[str | None], device: torch.device) -> Tensor | None:
    """Which responses carry ``λ_k``'s penalty, ``(N,)`` 0/1: its category's; None when every one does.

    Args:
        constraint: The constraint.
        categories: Each response's prompt category.
        device: Where the weights go.
    """
    if constraint.category is None:
        return None
    return torch.tensor([c == constraint.category for c in categories], dtype=torch.float32, device=device)


def stream_costs(constraint: Constraint, costs: Tensor) -> Tensor:
    """The end costs a constraint's cost stream carries: the costs, or RePO's rectified ``max(0, C - d)``."""
    return rectified_costs(costs, constraint.solver.cost_limit) if constraint.rectified else costs


class ConstraintLedger:
    """Each constraint's recent costs (this rank's window) and its multiplier's history; saved with the run.

    Args:
        constraints: The run's constraints.
        window: How many of this rank's latest counted responses each episode cost averages
            (``ppo.cost_window``).
    """

    def __init__(self, constraints: list[Constraint], window: int) -> None:
        self.constraints = constraints
        self.windows: dict[str, deque[float]] = {c.name: deque(maxlen=window) for c in constraints}
        self.histories: dict[str, list[float]] = {c.name: [] for c in constraints}

    def record(self, constraint: Constraint, costs: Tensor, categories: list[str | None]) -> None:
        """Add this rollout's costs of ``constraint`` to its window.

        Only the responses to its category's prompts count for a conditioned constraint, and a
        rectified one counts each response's violation ``max(0, C - d)`` instead of its cost.
        """
        values = stream_costs(constraint, costs.float())
        kept = [v for v, c in zip(values.tolist(), categories, strict=True) if constraint.category in (None, c)]
        self.windows[constraint.name].extend(kept)

    def local_totals(self, constraint: Constraint) -> tuple[float, int]:
        """The sum and the count of this rank's window of ``constraint``."""
        window = self.windows[constraint.name]
        return sum(window), len(window)

    def solver_input(self, constraint: Constraint, mean: float) -> float:
        """What the solver is given: the mean cost, or for RePO ``d + E[{C - d}^+]``.

        A rectified constraint's solver so sees the mean rectified violation as its ``J - d`` (never negative).
        """
        return constraint.solver.cost_limit + mean if constraint.rectified else mean

    def note_multipliers(self) -> None:
        """Append every constraint's current ``λ_k`` to its history (once per rollout)."""
        for constraint in self.constraints:
            self.histories[constraint.name].append(constraint.solver.multiplier)

    def state_dict(self) -> dict[str, Any]:
        """Each constraint's solver state, window and history, by name (plain Python data)."""
        return {
            c.name: {
                "solver": c.solver.state_dict(),
                "cost_window": list(self.windows[c.name]),
                "multiplier_history": list(self.histories[c.name]),
            }
            for c in self.constraints
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a checkpoint of other constraints is an error."""
        saved, expected = sorted(state), sorted(c.name for c in self.constraints)
        if saved != expected:
            raise ConfigError(
                "model.init_args.constraints", f"the constraints the checkpoint was trained with ({saved})", expected
            )
        for constraint in self.constraints:
            entry = state[constraint.name]
            constraint.solver.load_state_dict(entry["solver"])
            self.windows[constraint.name].clear()
            self.windows[constraint.name].extend(entry["cost_window"])
            self.histories[constraint.name] = list(entry["multiplier_history"])

    def rank_state_dict(self) -> dict[str, list[float]]:
        """This rank's windows (every rank saves its own)."""
        return {name: list(window) for name, window in self.windows.items()}

    def load_rank_state_dict(self, state: dict[str, list[float]]) -> None:
        """Resume with this rank's windows."""
        for name, values in state.items():
            self.windows[name].clear()
            self.windows[name].extend(values)

    def export(self) -> dict[str, Any]:
        """``multiplier_history.json``: every constraint's under ``constraints``.

        The first constraint's solver and λ's are also at the top level, where single-constraint readers look.
        """
        first = self.constraints[0]
        return {
            "solver": type(first.solver).__name__,
            "multiplier": self.histories[first.name],
            "constraints": {
                c.name: {"solver": type(c.solver).__name__, "cost_limit": c.solver.cost_limit, **self.meta(c)}
                for c in self.constraints
            },
        }

    def meta(self, constraint: Constraint) -> dict[str, Any]:
        """A constraint's cost source, condition and history, for the export."""
        return {
            "cost": constraint.cost,
            "category": constraint.category,
            "rectified": constraint.rectified,
            "multiplier": self.histories[constraint.name],
        }
