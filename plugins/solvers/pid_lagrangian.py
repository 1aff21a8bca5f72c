"""PID control of the Lagrange multiplier (Stooke, Achiam, Abbeel 2020, arXiv 2007.03964)."""

from __future__ import annotations

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.solvers import ConstraintSolver


class PIDLagrangian(ConstraintSolver):
    """A PID controller on λ: the integral is plain dual ascent, P and D damp its oscillation.

    Algorithm 2 of Stooke, Achiam and Abbeel (2020), as in their ``rlpyt`` code, with
    ``delta = J_c - d``:

    - integral ``I <- max(0, I + ki·delta)``;
    - proportional ``P <- a_p·P + (1 - a_p)·delta`` (an EMA of the error);
    - derivative ``D <- max(0, E_t - E_{t-derivative_delay})`` where ``E <- a_d·E + (1 - a_d)·J_c`` is
      an EMA of the cost, so only a *rising* cost pushes λ up early;
    - ``λ = min(max(0, kp·P + I + kd·D), max_multiplier)``.

    Start-up: like ``rlpyt``, ``P`` starts at 0, so the P term builds
    up over ~1/(1 - a_p) updates instead of kicking λ by ``kp·delta_1`` at once (the first cost, of
    the uncensored SFT policy, is usually the largest). Unlike ``rlpyt``, which also starts the cost
    EMA and the derivative history at 0, the cost EMA ``E`` starts at the first cost and the
    history of the last ``derivative_delay`` values of ``E`` is filled with it, so ``D = 0`` on the
    first update: with zeros, a positive cost (Safe RLHF's cost model scores unsafe answers > 0)
    would read as a rising cost for the first ``derivative_delay`` updates and kick λ up for no
    reason. Anti-windup: λ is capped, so the integral is also clamped to
    ``0 <= I <= max_multiplier - kp·P`` (when a cap is set): it cannot wind up past the point where
    λ saturates and then take many updates of negative error to unwind.

    Default gains are for Safe RLHF cost units (cost-model scores of order 1-10, limit ``d = 0``,
    a few hundred solver updates per run), not Safety Gym's (episode costs of order 25-100, for
    which the paper's gains were tuned); re-tune them when the cost scale or the run length
    changes. ``ki = 0.05``: the integral alone is linear dual ascent, so a violation of 1 moves λ
    by 0.05 per update and λ can cross [0, 5] in about 100 updates. Safe RLHF's log-space step
    ``lr·λ²·(J_c - d)`` is 0.1 at λ = 1 but 0.4 at λ = 2 and 2.5 at λ = 5, which is what makes it
    overshoot when the policy answers λ with a lag. ``kp = 0.5``: a sustained violation of 1 adds
    0.5 to λ (through the EMA), about what the integral gathers in 10 updates; when the cost falls
    under the limit the P term pulls λ down before the integral has unwound, damping the
    overshoot. ``kd = 0.5``: a cost EMA rising by 1 over ``derivative_delay`` updates adds 0.5 to
    λ. On a lagged plant ``J <- J + 0.2·(4 - 2λ - J)`` (λ* = 2) these gains overshoot λ* by 0.11
    in 50 updates, against 0.66 for linear dual ascent (lr 0.1) and 3.0 (up to the cap) for Safe
    RLHF's log-space update (see ``tests/unit/test_solvers.py``).

    Args:
        cost_limit: The threshold ``d`` in ``J_c <= d``.
        kp: Proportional gain (>= 0), on the EMA of the error ``J_c - d``.
        ki: Integral gain (>= 0); with ``kp = kd = 0`` this is linear dual ascent with step ``ki``.
        kd: Derivative gain (>= 0), on the rise of the cost EMA over ``derivative_delay`` updates.
        init_multiplier: λ before the first update (>= 0). The first update recomputes λ from the
            PID terms; the integral starts at ``init_multiplier`` (unless ``init_integral`` is set), so
            λ carries on from it instead of dropping to ``kp·P``.
        max_multiplier: The cap on λ (>= ``init_multiplier``); ``None`` for no cap.
        derivative_delay: How many updates back (>= 1) the derivative compares the cost EMA with.
        proportional_ema: EMA coefficient ``a_p`` in [0, 1) of the error for P (0: no smoothing).
        derivative_ema: EMA coefficient ``a_d`` in [0, 1) of the cost for D (0: no smoothing).
        init_integral: The integral ``I`` before the first update (>= 0); None: ``init_multiplier``.
    """

    def __init__(
        self,
        cost_limit: float = 0.0,
        kp: float = 0.5,
        ki: float = 0.05,
        kd: float = 0.5,
        init_multiplier: float = 0.0,
        max_multiplier: float | None = 5.0,
        derivative_delay: int = 10,
        proportional_ema: float = 0.95,
        derivative_ema: float = 0.95,
        init_integral: float | None = None,
    ) -> None:
        init_integral = init_multiplier if init_integral is None else init_integral
        _validate_gains(kp=kp, ki=ki, kd=kd, init_multiplier=init_multiplier, init_integral=init_integral)
        _validate_filters(init_multiplier, max_multiplier, derivative_delay, proportional_ema, derivative_ema)
        super().__init__(cost_limit=cost_limit, init_multiplier=init_multiplier)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.max_multiplier = None if max_multiplier is None else float(max_multiplier)
        self.derivative_delay = int(derivative_delay)
        self.proportional_ema = float(proportional_ema)
        self.derivative_ema = float(derivative_ema)
        self.integral = float(init_integral)
        self.proportional = 0.0
        self.cost_ema = 0.0
        self.cost_ema_history: list[float] = []
        self.num_updates = 0

    def update(self, episode_cost: float) -> dict[str, float]:
        """Update P, I, D from the mean episode cost and recompute λ from them.

        Args:
            episode_cost: The globally reduced mean episode cost ``J_c``.

        Returns:
            ``solver/multiplier``, the terms ``solver/pid_p`` (``kp·P``), ``solver/pid_i`` (``I``)
            and ``solver/pid_d`` (``kd·D``), ``solver/violation`` and ``solver/episode_cost``.
        """
        episode_cost = float(episode_cost)
        delta = episode_cost - self.cost_limit
        self._filter(episode_cost, delta)
        derivative = max(0.0, self.cost_ema - self.cost_ema_history[0])
        self.cost_ema_history = [*self.cost_ema_history[1:], self.cost_ema]
        self.integral = max(0.0, self.integral + self.ki * delta)
        if self.max_multiplier is not None:  # anti-windup: kp·P + I never above the cap
            self.integral = max(0.0, min(self.integral, self.max_multiplier - self.kp * self.proportional))
        output = max(0.0, self.kp * self.proportional + self.integral + self.kd * derivative)
        self.multiplier = output if self.max_multiplier is None else min(output, self.max_multiplier)
        self.num_updates += 1
        return {
            "solver/multiplier": self.multiplier,
            "solver/pid_p": self.kp * self.proportional,
            "solver/pid_i": self.integral,
            "solver/pid_d": self.kd * derivative,
            "solver/violation": delta,
            "solver/episode_cost": episode_cost,
        }

    def _filter(self, episode_cost: float, delta: float) -> None:
        """Advance the EMA of the error (P, from 0) and of the cost (for D, from the first cost)."""
        if self.num_updates == 0:
            self.cost_ema = episode_cost
            self.cost_ema_history = [episode_cost] * self.derivative_delay
        else:
            self.cost_ema = self.derivative_ema * self.cost_ema + (1.0 - self.derivative_ema) * episode_cost
        self.proportional = self.proportional_ema * self.proportional + (1.0 - self.proportional_ema) * delta


def _validate_gains(**values: float) -> None:
    """Gains and starting values must be >= 0; the error names the field (the CLI finds its full key)."""
    for name, value in values.items():
        if not value >= 0.0:
            raise ConfigError(name, "a number >= 0 (a PIDLagrangian gain or starting value)", value)


def _validate_filters(init: float, cap: float | None, delay: int, ema_p: float, ema_d: float) -> None:
    """The cap, the derivative delay and the EMA coefficients must be usable."""
    if cap is not None and not cap >= init:
        raise ConfigError("max_multiplier", f"None or a number >= PIDLagrangian's `init_multiplier` ({init})", cap)
    if delay < 1:
        raise ConfigError("derivative_delay", "an integer >= 1 (PIDLagrangian's updates back)", delay)
    for name, value in (("proportional_ema", ema_p), ("derivative_ema", ema_d)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(name, "a number in [0, 1) (a PIDLagrangian EMA coefficient)", value)
