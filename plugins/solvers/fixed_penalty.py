"""A multiplier that never moves: Safe RLHF's reward-shaping baseline, and plain PPO at λ = 0."""

from __future__ import annotations

from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.solvers import ConstraintSolver


class FixedPenalty(ConstraintSolver):
    """Reward shaping with a constant penalty: the policy trains on ``R - λ·C``; λ never moves.

    This is Safe RLHF's reward-shaping baseline, as safe-rlhf's ``PPORewardShapingTrainer`` runs it:
    the end score ``R - λ·C`` forms ONE stream (``end_score_streams``), shaped once with the KL
    penalty ``-β·KL_t`` and clipped like the reward stream, whose advantages (GAE with the reward
    critic alone, no cost critic) drive the actor as they are: no cost stream, so no ``1 + λ``
    normaliser. With a critic-free estimator the same single score is normalised within
    its group. A large λ trades reward for cost at a fixed rate whatever the observed cost: a large
    multiplier (e.g. 5.0) makes the policy over-safe, refusing benign requests. ``multiplier=0`` is
    plain PPO (or plain GRPO/RLOO): then ``needs_cost_model()`` is false and the stage may leave out
    the cost model altogether.

    Args:
        multiplier: The constant penalty λ >= 0 on the cost; 0 is plain (unconstrained) PPO.
        cost_limit: The threshold ``d`` in ``J_c <= d``; only used to log the violation
            ``J_c - d``, since the penalty does not react to it.
    """

    def __init__(self, multiplier: float = 0.0, cost_limit: float = 0.0) -> None:
        if not multiplier >= 0.0:
            raise ConfigError("multiplier", "a number >= 0 (FixedPenalty's constant penalty λ)", multiplier)
        super().__init__(cost_limit=cost_limit, init_multiplier=multiplier)

    def needs_cost_model(self) -> bool:
        """Whether the cost model is needed: not at λ = 0, which is plain PPO."""
        return self.multiplier > 0.0

    def stream_names(self) -> tuple[str, ...]:
        """One stream, ``reward``, carrying ``R - λ·C``: no cost stream, no cost critic."""
        return ("reward",)

    def end_score_streams(self, rewards: Tensor, costs: Tensor) -> dict[str, Tensor]:
        """The shaped end score ``R - λ·C`` as the one ``reward`` stream.

        Args:
            rewards: Reward-model end scores ``R``, ``(N,)``.
            costs: Cost-model end scores ``C``, ``(N,)`` (zeros without a cost model).

        Returns:
            ``{"reward": R - λ·C}``.
        """
        return {"reward": rewards - self.multiplier * costs}

    def update(self, episode_cost: float) -> dict[str, float]:
        """Leave λ where it is; report it with the observed violation ``J_c - d``.

        Args:
            episode_cost: The globally reduced mean episode cost ``J_c``.

        Returns:
            ``solver/multiplier``, ``solver/violation`` and ``solver/episode_cost``.
        """
        episode_cost = float(episode_cost)
        return {
            "solver/multiplier": self.multiplier,
            "solver/violation": episode_cost - self.cost_limit,
            "solver/episode_cost": episode_cost,
        }
