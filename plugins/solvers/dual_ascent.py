"""Safe RLHF's multiplier update: gradient ascent on ln λ (or the textbook projected form)."""

from __future__ import annotations

import math

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.solvers import ConstraintSolver

LOG_MULTIPLIER_BOUND = 700.0
"""``|ln λ|`` is kept below this, so λ = exp(ln λ) stays a finite, strictly positive float64
(``exp(709.8)`` is the largest float64; ``exp(-700)`` is about 1e-304)."""


class DualAscent(ConstraintSolver):
    """Dual ascent on the Lagrange multiplier, by default in log space as in Safe RLHF.

    Safe RLHF (Dai et al. 2023, ``PPOLagTrainer``) keeps ``ln λ`` as the parameter and takes an SGD
    step on the loss ``-λ·(J_c - d)``, whose gradient with respect to ``ln λ`` is ``-λ·(J_c - d)``:

        ``ln λ <- min(ln λ + lr·λ·(J_c - d), ln max_multiplier)``

    ``ln λ`` itself is the state (λ is derived from it), so a large violation cannot underflow λ to
    0.0 (whose logarithm is undefined) and a large λ cannot overflow: ``ln λ`` is clipped to
    ``±LOG_MULTIPLIER_BOUND`` (700), λ stays finite and strictly positive, and a step that overflows
    to ``±inf`` lands on the bound. λ's step is proportional to λ itself. With ``linear=True`` the
    textbook projected form is used instead: ``λ <- clamp(λ + lr·(J_c - d), 0, max_multiplier)``.
    The first ``update_delay`` calls are counted but leave λ unchanged (Safe RLHF's
    ``lambda_update_delay_steps``), letting the critics warm up first. Arithmetic is in Python
    floats (float64), so every rank given the same ``J_c`` computes the same λ.

    Args:
        cost_limit: The threshold ``d`` in ``J_c <= d`` (Safe RLHF's ``threshold``, default 0:
            the cost model scores safe answers below 0).
        lr: The step size (> 0): on ``ln λ`` by default, on λ itself when ``linear``.
        init_multiplier: λ before the first update; must be > 0 in log space (``ln 0`` is
            undefined), >= 0 when ``linear``.
        max_multiplier: The cap on λ (>= ``init_multiplier``); ``None`` for no cap.
        update_delay: How many first calls to ``update`` leave λ unchanged.
        linear: Use the projected linear update on λ instead of the log-space one.
    """

    def __init__(
        self,
        cost_limit: float = 0.0,
        lr: float = 0.1,
        init_multiplier: float = 1.0,
        max_multiplier: float | None = 5.0,
        update_delay: int = 0,
        linear: bool = False,
    ) -> None:
        _validate(lr, init_multiplier, max_multiplier, update_delay, linear)
        super().__init__(cost_limit=cost_limit, init_multiplier=init_multiplier)
        self.lr = float(lr)
        self.max_multiplier = None if max_multiplier is None else float(max_multiplier)
        self.update_delay = int(update_delay)
        self.linear = bool(linear)
        self.num_updates = 0
        self.log_multiplier = None if self.linear else math.log(self.multiplier)

    def update(self, episode_cost: float) -> dict[str, float]:
        """Take one dual step from the mean episode cost (none during the first ``update_delay`` calls).

        Args:
            episode_cost: The globally reduced mean episode cost ``J_c``.

        Returns:
            ``solver/multiplier`` (after the step), ``solver/violation`` (``J_c - d``) and
            ``solver/episode_cost``.
        """
        episode_cost = float(episode_cost)
        if not math.isfinite(episode_cost):
            raise ValueError(f"DualAscent: the episode cost must be a finite number, got {episode_cost}")
        violation = episode_cost - self.cost_limit
        if self.num_updates >= self.update_delay:
            self.multiplier = self._linear_step(violation) if self.linear else self._log_step(violation)
        self.num_updates += 1
        return {
            "solver/multiplier": self.multiplier,
            "solver/violation": violation,
            "solver/episode_cost": episode_cost,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned (a state saved before ``log_multiplier`` existed keeps λ)."""
        super().load_state_dict(state)
        if "log_multiplier" not in state and not self.linear:
            self.log_multiplier = math.log(self.multiplier)

    def _log_step(self, violation: float) -> float:
        """``ln λ <- clip(ln λ + lr·λ·(J_c - d), -bound, min(bound, ln max))``; returns the new λ."""
        log_multiplier = self.log_multiplier + self.lr * self.multiplier * violation  # may be ±inf, never NaN
        upper = LOG_MULTIPLIER_BOUND
        if self.max_multiplier is not None:
            upper = min(upper, math.log(self.max_multiplier))
        self.log_multiplier = min(max(log_multiplier, -LOG_MULTIPLIER_BOUND), upper)
        return math.exp(self.log_multiplier)

    def _linear_step(self, violation: float) -> float:
        multiplier = max(0.0, self.multiplier + self.lr * violation)
        return multiplier if self.max_multiplier is None else min(multiplier, self.max_multiplier)


def _validate(lr: float, init: float, cap: float | None, update_delay: int, linear: bool) -> None:
    """Reject settings the update rule cannot honour, naming the offending field (the CLI finds its full key)."""
    if not lr > 0.0:
        raise ConfigError("lr", "a number > 0 (DualAscent's step size)", lr)
    if linear and not init >= 0.0:
        raise ConfigError("init_multiplier", "a number >= 0 (DualAscent's initial λ)", init)
    if not linear and not init > 0.0:
        raise ConfigError(
            "init_multiplier",
            "a number > 0 for DualAscent's log-space update (ln 0 is undefined): a small positive value, "
            "or `linear: true`",
            init,
        )
    if cap is not None and not cap >= init:
        raise ConfigError("max_multiplier", f"None or a number >= DualAscent's `init_multiplier` ({init})", cap)
    if update_delay < 0:
        raise ConfigError("update_delay", "an integer >= 0 (DualAscent's calls that leave λ as it is)", update_delay)
