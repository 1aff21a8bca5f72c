"""Constraint solvers: hand-computed updates, direction, projection, delay and state round trips."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

import pytest
import torch

from lit_saferlhf.solvers import ConstraintSolver
from lit_saferlhf_plugins.solvers import DualAscent, FixedPenalty, PIDLagrangian

COSTS = [3.0, 2.5, -1.0, 4.0, 0.5, -2.0, -2.0, 1.5, 6.0, -0.25]
"""An arbitrary episode-cost sequence crossing the limit both ways."""

SOLVER_FACTORIES: dict[str, Callable[[], ConstraintSolver]] = {
    "fixed": lambda: FixedPenalty(multiplier=2.0, cost_limit=0.5),
    "dual_log": lambda: DualAscent(cost_limit=0.5, lr=0.1, update_delay=2),
    "dual_linear": lambda: DualAscent(cost_limit=0.5, lr=0.3, init_multiplier=0.0, linear=True),
    "pid": lambda: PIDLagrangian(cost_limit=0.5, kp=0.5, ki=0.2, kd=0.5, derivative_delay=3),
    "pid_uncapped": lambda: PIDLagrangian(cost_limit=0.5, max_multiplier=None, init_integral=1.0),
}


def _trajectory(solver: ConstraintSolver, costs: list[float]) -> list[dict[str, float]]:
    return [solver.update(cost) for cost in costs]


def _torch_round_trip(state: dict[str, object]) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------- state, determinism, metrics


@pytest.mark.parametrize("name", sorted(SOLVER_FACTORIES))
def test_state_dict_round_trip_resumes_the_same_trajectory(name: str) -> None:
    uninterrupted = _trajectory(SOLVER_FACTORIES[name](), COSTS)

    first = SOLVER_FACTORIES[name]()
    head = _trajectory(first, COSTS[:5])
    state = _torch_round_trip(first.state_dict())  # what a Lightning checkpoint does, weights_only
    resumed = SOLVER_FACTORIES[name]()
    resumed.load_state_dict(state)
    tail = _trajectory(resumed, COSTS[5:])

    assert head + tail == uninterrupted  # exact equality: same float64 arithmetic
    assert resumed.state_dict() == _torch_round_trip(resumed.state_dict())


@pytest.mark.parametrize("name", sorted(SOLVER_FACTORIES))
def test_state_is_plain_python_data(name: str) -> None:
    solver = SOLVER_FACTORIES[name]()
    _trajectory(solver, COSTS[:3])
    for key, value in solver.state_dict().items():
        assert value is None or isinstance(value, (bool, int, float, list)), (key, type(value))
        if isinstance(value, list):
            assert all(type(item) is float for item in value), key


@pytest.mark.parametrize("name", sorted(SOLVER_FACTORIES))
def test_metrics_are_named_floats_and_multiplier_is_float64(name: str) -> None:
    solver = SOLVER_FACTORIES[name]()
    metrics = solver.update(torch.tensor(2.0, dtype=torch.float32))  # a reduced tensor from the stage
    assert metrics, "a solver must report at least its multiplier"
    assert all(key.startswith("solver/") and type(value) is float for key, value in metrics.items())
    assert metrics["solver/multiplier"] == solver.multiplier
    assert metrics["solver/episode_cost"] == 2.0
    assert metrics["solver/violation"] == 2.0 - solver.cost_limit
    assert type(solver.multiplier) is float


# ---------------------------------------------------------------- FixedPenalty


def test_fixed_penalty_never_moves() -> None:
    solver = FixedPenalty(multiplier=2.0, cost_limit=1.0)
    for metrics in _trajectory(solver, [100.0, -100.0, 1.0, 0.0]):
        assert metrics["solver/multiplier"] == 2.0
    assert solver.multiplier == 2.0
    assert solver.update(4.0)["solver/violation"] == 3.0  # 4 - 1


def test_fixed_penalty_is_reward_shaping_and_zero_is_plain_ppo() -> None:
    rewards, costs = torch.tensor([1.0, -0.5, 4.0]), torch.tensor([0.5, 2.0, -1.0])
    shaping = FixedPenalty(multiplier=2.0)
    assert shaping.stream_names() == ("reward",)  # ONE stream R - λC, no cost critic
    assert shaping.end_score_streams(rewards, costs).keys() == {"reward"}
    assert torch.equal(shaping.end_score_streams(rewards, costs)["reward"], rewards - 2.0 * costs)
    for solver in (DualAscent(init_multiplier=2.0), PIDLagrangian(init_multiplier=2.0)):  # Safe RLHF's two streams
        assert solver.stream_names() == ("reward", "cost")
        streams = solver.end_score_streams(rewards, costs)
        assert torch.equal(streams["reward"], rewards)
        assert torch.equal(streams["cost"], costs)
    assert FixedPenalty().multiplier == 0.0
    assert FixedPenalty().needs_cost_model() is False  # plain PPO: no cost model, no cost critic
    assert FixedPenalty(multiplier=5.0).needs_cost_model() is True
    assert DualAscent().needs_cost_model() is True
    assert PIDLagrangian().needs_cost_model() is True


def test_fixed_penalty_rejects_negative_multiplier() -> None:
    with pytest.raises(ValueError, match=r"^multiplier: expected a number >= 0 \(FixedPenalty's"):
        FixedPenalty(multiplier=-0.1)


# ---------------------------------------------------------------- DualAscent


def test_dual_ascent_log_space_hand_computed() -> None:
    solver = DualAscent(cost_limit=0.0, lr=0.1, init_multiplier=1.0, max_multiplier=5.0)
    # ln λ = 0 + 0.1 * 1 * (2 - 0) = 0.2  ->  λ = e^0.2
    assert solver.update(2.0)["solver/multiplier"] == pytest.approx(1.2214027581601699, rel=1e-12)
    # ln λ = 0.2 + 0.1 * 1.2214027581601699 * (-1) = 0.07785972418398301  ->  λ = e^0.0778...
    assert solver.update(-1.0)["solver/multiplier"] == pytest.approx(1.0809710139432163, rel=1e-12)
    # ln λ = 0.0779 + 0.1 * 1.081 * 30 = 3.32 > ln 5 = 1.609  ->  capped: λ = 5
    assert solver.update(30.0)["solver/multiplier"] == pytest.approx(5.0, rel=1e-12)
    # ln λ = ln 5 + 0.1 * 5 * (-2) = 1.6094 - 1 = 0.6094  ->  λ = 5 / e = 1.8393972058572117
    assert solver.update(-2.0)["solver/multiplier"] == pytest.approx(1.8393972058572117, rel=1e-12)


def test_dual_ascent_linear_hand_computed() -> None:
    solver = DualAscent(cost_limit=1.0, lr=0.5, init_multiplier=1.0, max_multiplier=2.0, linear=True)
    # λ = 1 + 0.5 * (2 - 1) = 1.5
    assert solver.update(2.0) == {"solver/multiplier": 1.5, "solver/violation": 1.0, "solver/episode_cost": 2.0}
    # λ = 1.5 + 0.5 * (4 - 1) = 3.0  ->  capped at 2.0
    assert solver.update(4.0)["solver/multiplier"] == 2.0
    # λ = 2.0 + 0.5 * (-5 - 1) = -1.0  ->  projected to 0.0
    assert solver.update(-5.0)["solver/multiplier"] == 0.0
    # λ = 0.0 + 0.5 * (3 - 1) = 1.0
    assert solver.update(3.0)["solver/multiplier"] == 1.0


@pytest.mark.parametrize("linear", [False, True])
def test_dual_ascent_direction(linear: bool) -> None:
    above = DualAscent(cost_limit=1.0, init_multiplier=1.0, linear=linear)
    assert above.update(1.5)["solver/multiplier"] > 1.0  # cost above the limit raises λ
    below = DualAscent(cost_limit=1.0, init_multiplier=1.0, linear=linear)
    assert below.update(0.5)["solver/multiplier"] < 1.0  # cost below the limit lowers λ
    at = DualAscent(cost_limit=1.0, init_multiplier=1.0, linear=linear)
    assert at.update(1.0)["solver/multiplier"] == 1.0  # on the limit: no move


@pytest.mark.parametrize("linear", [False, True])
def test_dual_ascent_projection(linear: bool) -> None:
    solver = DualAscent(cost_limit=0.0, lr=0.5, init_multiplier=1.0, max_multiplier=3.0, linear=linear)
    lambdas = [m["solver/multiplier"] for m in _trajectory(solver, [10.0] * 20)]
    assert max(lambdas) == pytest.approx(3.0, rel=1e-12)
    assert lambdas[-1] == pytest.approx(3.0, rel=1e-12)
    lambdas = [m["solver/multiplier"] for m in _trajectory(solver, [-10.0] * 200)]
    assert min(lambdas) >= 0.0
    if linear:
        assert lambdas[-1] == 0.0  # projected onto 0
    else:
        assert 0.0 < lambdas[-1] < 0.05  # ln λ -> -inf: λ decays towards 0 but stays positive


def test_dual_ascent_without_cap_grows_past_five() -> None:
    solver = DualAscent(lr=0.5, max_multiplier=None, linear=True)
    _trajectory(solver, [10.0] * 3)
    assert solver.multiplier == 16.0  # 1 + 3 * 0.5 * 10


def test_dual_ascent_update_delay_counts_calls_without_moving() -> None:
    solver = DualAscent(cost_limit=0.0, lr=0.5, init_multiplier=1.0, update_delay=2, linear=True)
    assert solver.update(4.0)["solver/multiplier"] == 1.0  # call 1: delayed
    resumed = DualAscent(cost_limit=0.0, lr=0.5, init_multiplier=1.0, update_delay=2, linear=True)
    resumed.load_state_dict(solver.state_dict())  # the delay counter is part of the state
    assert resumed.update(4.0)["solver/multiplier"] == 1.0  # call 2: delayed
    assert resumed.update(4.0)["solver/multiplier"] == 3.0  # call 3: 1 + 0.5 * 4
    assert resumed.num_updates == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_multiplier": 0.0}, "init_multiplier"),
        ({"init_multiplier": -1.0, "linear": True}, "init_multiplier"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1, "linear": True}, "lr"),
        ({"init_multiplier": 2.0, "max_multiplier": 1.0}, "max_multiplier"),
        ({"update_delay": -1}, "update_delay"),
    ],
)
def test_dual_ascent_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: expected .*DualAscent"):
        DualAscent(**kwargs)


def test_dual_ascent_linear_accepts_zero_init() -> None:
    assert DualAscent(init_multiplier=0.0, linear=True).multiplier == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_dual_ascent_uncapped_log_multiplier_stays_finite_and_positive(seed: int) -> None:
    # Heavy-tailed random episode costs: with λ (not ln λ) as the state, a large violation underflowed
    # λ to 0.0 and the next update raised "math domain error", and a large λ raised OverflowError.
    rng = random.Random(seed)
    solver = DualAscent(cost_limit=0.0, lr=0.1, init_multiplier=1.0, max_multiplier=None)
    for _ in range(40):
        multiplier = solver.update(rng.gauss(0.0, 1.0) * 10 ** rng.uniform(0, 3))["solver/multiplier"]
        assert math.isfinite(multiplier)
        assert multiplier > 0.0
        assert solver.log_multiplier == pytest.approx(math.log(multiplier), abs=1e-9)
    resumed = DualAscent(cost_limit=0.0, lr=0.1, max_multiplier=None)
    resumed.load_state_dict(_torch_round_trip(solver.state_dict()))
    assert resumed.update(5.0) == solver.update(5.0)


def test_dual_ascent_extreme_violations_hit_the_log_bounds() -> None:
    from lit_saferlhf_plugins.solvers.dual_ascent import LOG_MULTIPLIER_BOUND

    solver = DualAscent(lr=1.0, max_multiplier=None)
    for _ in range(3):
        solver.update(1e300)  # lr·λ·violation overflows to +inf: ln λ lands on the upper bound
    assert solver.log_multiplier == LOG_MULTIPLIER_BOUND
    assert math.isfinite(solver.multiplier)
    solver.update(-1e300)
    assert solver.log_multiplier == -LOG_MULTIPLIER_BOUND
    assert solver.multiplier > 0.0
    assert solver.update(1.0)["solver/multiplier"] > 0.0  # a λ near 0 still moves, and never raises
    with pytest.raises(ValueError, match="finite"):
        solver.update(float("nan"))


def test_dual_ascent_loads_a_state_saved_before_log_multiplier_existed() -> None:
    solver = DualAscent(max_multiplier=None)
    solver.load_state_dict({"multiplier": 2.0, "num_updates": 3})
    assert solver.log_multiplier == pytest.approx(math.log(2.0))


# ---------------------------------------------------------------- PIDLagrangian


def test_pid_hand_computed() -> None:
    solver = PIDLagrangian(
        cost_limit=1.0, kp=0.5, ki=0.1, kd=1.0, max_multiplier=5.0,
        derivative_delay=2, proportional_ema=0.5, derivative_ema=0.5,
    )  # fmt: skip
    # J=3, δ=2: E=3 (first cost), history [3, 3]; P = 0.5*0 + 0.5*2 = 1; D = max(0, 3-3) = 0;
    # I = 0 + 0.1*2 = 0.2 (<= 5 - 0.5*1); λ = 0.5*1 + 0.2 + 1*0 = 0.7
    expected = {"solver/multiplier": 0.7, "solver/pid_p": 0.5, "solver/pid_i": 0.2, "solver/pid_d": 0.0}
    assert solver.update(3.0) == pytest.approx({**expected, "solver/violation": 2.0, "solver/episode_cost": 3.0})
    # J=5, δ=4: E = 0.5*3 + 0.5*5 = 4; P = 0.5*1 + 0.5*4 = 2.5; D = max(0, 4 - 3) = 1, history [3, 4];
    # I = 0.2 + 0.4 = 0.6; λ = 1.25 + 0.6 + 1 = 2.85
    metrics = solver.update(5.0)
    assert [metrics[f"solver/{k}"] for k in ("pid_p", "pid_i", "pid_d")] == pytest.approx([1.25, 0.6, 1.0])
    assert metrics["solver/multiplier"] == pytest.approx(2.85)
    # J=1, δ=0: E = 0.5*4 + 0.5*1 = 2.5; P = 1.25; D = max(0, 2.5 - 3) = 0, history [4, 2.5];
    # I = 0.6; λ = 0.625 + 0.6 + 0 = 1.225
    assert solver.update(1.0)["solver/multiplier"] == pytest.approx(1.225)
    # J=-3, δ=-4: E = 1.25 - 1.5 = -0.25; P = 0.625 - 2 = -1.375; D = max(0, -0.25 - 4) = 0;
    # I = max(0, 0.6 - 0.4) = 0.2; λ = max(0, -0.6875 + 0.2 + 0) = 0
    metrics = solver.update(-3.0)
    assert metrics["solver/pid_i"] == pytest.approx(0.2)
    assert metrics["solver/multiplier"] == 0.0
    # J=-3, δ=-4: P = -0.6875 - 2 = -2.6875; I = max(0, 0.2 - 0.4) = 0; λ = 0
    metrics = solver.update(-3.0)
    assert metrics["solver/pid_i"] == 0.0
    assert metrics["solver/multiplier"] == 0.0
    assert solver.cost_ema_history == pytest.approx([-0.25, -1.625])  # E4, E5 = 0.5*-0.25 + 0.5*-3


def test_pid_direction() -> None:
    def after(cost: float) -> float:
        solver = PIDLagrangian(cost_limit=1.0, kp=0.5, ki=0.1, kd=0.5, init_multiplier=1.0, init_integral=1.0)
        return solver.update(cost)["solver/multiplier"]

    assert after(1.5) > 1.0  # cost above the limit raises λ
    assert after(0.5) < 1.0  # cost below the limit lowers λ
    assert after(1.0) == 1.0  # on the limit, first update: P = 0, D = 0, I unchanged


def test_pid_derivative_reacts_to_a_rising_cost_only() -> None:
    rising = PIDLagrangian(cost_limit=10.0, kp=0.0, ki=0.0, kd=1.0, derivative_delay=1, derivative_ema=0.0)
    # δ < 0 throughout, so P and I give nothing: λ is the derivative alone, E = J (no smoothing)
    assert [m["solver/multiplier"] for m in _trajectory(rising, [1.0, 3.0, 2.0, 2.5])] == [0.0, 2.0, 0.0, 0.5]


def test_pid_projection_at_zero_and_cap() -> None:
    solver = PIDLagrangian(cost_limit=0.0, kp=0.5, ki=0.5, kd=0.5, max_multiplier=3.0)
    lambdas = [m["solver/multiplier"] for m in _trajectory(solver, [20.0] * 30)]
    assert max(lambdas) == 3.0
    assert lambdas[-1] == 3.0
    lambdas = [m["solver/multiplier"] for m in _trajectory(solver, [-20.0] * 30)]
    assert min(lambdas) == 0.0
    assert lambdas[-1] == 0.0
    assert solver.integral == 0.0


def test_pid_anti_windup_keeps_the_integral_under_the_cap() -> None:
    solver = PIDLagrangian(cost_limit=0.0, kp=1.0, ki=1.0, kd=0.0, max_multiplier=5.0, proportional_ema=0.0)
    # J=4: P = 4; I = min(0 + 4, 5 - 1*4) = 1; λ = 4 + 1 = 5
    assert solver.update(4.0)["solver/multiplier"] == 5.0
    assert solver.integral == 1.0
    # J=10: P = 10; I = max(0, min(1 + 10, 5 - 10)) = 0; λ = min(10 + 0, 5) = 5
    assert solver.update(10.0)["solver/multiplier"] == 5.0
    assert solver.integral == 0.0
    # J=-1: P = -1; I = max(0, 0 - 1) = 0; λ = 0 at once (a wound-up I of 13 would have held λ at 5)
    assert solver.update(-1.0)["solver/multiplier"] == 0.0


def test_pid_integral_only_is_linear_dual_ascent() -> None:
    pid = PIDLagrangian(cost_limit=0.5, kp=0.0, ki=0.3, kd=0.0, max_multiplier=2.0)
    dual = DualAscent(cost_limit=0.5, lr=0.3, init_multiplier=0.0, max_multiplier=2.0, linear=True)
    pid_lambdas = [m["solver/multiplier"] for m in _trajectory(pid, COSTS)]
    assert pid_lambdas == [m["solver/multiplier"] for m in _trajectory(dual, COSTS)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kp": -0.1}, "kp"),
        ({"ki": -0.1}, "ki"),
        ({"kd": -0.1}, "kd"),
        ({"init_multiplier": -1.0}, "init_multiplier"),
        ({"init_integral": -1.0}, "init_integral"),
        ({"init_multiplier": 2.0, "max_multiplier": 1.0}, "max_multiplier"),
        ({"derivative_delay": 0}, "derivative_delay"),
        ({"proportional_ema": 1.0}, "proportional_ema"),
        ({"derivative_ema": -0.5}, "derivative_ema"),
    ],
)
def test_pid_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: expected .*PIDLagrangian"):
        PIDLagrangian(**kwargs)


# ---------------------------------------------------------------- closed loop


def _closed_loop(solver: ConstraintSolver, updates: int) -> list[float]:
    """A lagged plant: the policy moves 20% of the way to the cost 4 - 2λ per update (λ* = 2 at d = 0)."""
    cost, lambdas = 4.0, []
    for _ in range(updates):
        lambdas.append(solver.update(cost)["solver/multiplier"])
        cost += 0.2 * (4.0 - 2.0 * lambdas[-1] - cost)
    return lambdas


def test_pid_overshoots_less_than_dual_ascent_on_a_lagged_plant() -> None:
    steady = 2.0  # 4 - 2λ* = 0
    log_overshoot = max(_closed_loop(DualAscent(), 50)) - steady  # Safe RLHF defaults
    linear_overshoot = max(_closed_loop(DualAscent(linear=True), 50)) - steady
    pid_overshoot = max(_closed_loop(PIDLagrangian(), 50)) - steady  # this project's defaults
    assert log_overshoot == pytest.approx(3.0)  # runs up to the cap 5
    assert linear_overshoot == pytest.approx(0.658, abs=1e-3)
    assert pid_overshoot == pytest.approx(0.107, abs=1e-3)
    assert pid_overshoot < linear_overshoot / 5 < log_overshoot
    assert math.isclose(_closed_loop(PIDLagrangian(), 200)[-1], steady, abs_tol=1e-3)  # and it still settles


def test_pid_integral_starts_at_the_initial_multiplier() -> None:
    solver = PIDLagrangian(cost_limit=0.0, kp=0.0, ki=0.1, kd=0.0, init_multiplier=1.0)
    solver.update(0.0)  # no violation: λ stays where it started instead of collapsing to kp·P = 0
    assert solver.multiplier == pytest.approx(1.0)
    assert PIDLagrangian(init_multiplier=1.0, init_integral=0.25).integral == 0.25
