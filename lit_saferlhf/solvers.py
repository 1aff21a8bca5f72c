"""The constraint-solver contract: the rule that moves the Lagrange multiplier λ.

Concrete solvers live in ``plugins/solvers`` (installed as ``lit_saferlhf_plugins.solvers``);
stages import only this contract. A solver is a plain Python object, not an ``nn.Module``: under
DeepSpeed bf16 a module's buffers would be cast to bf16 (rounding λ to three digits) and under
FSDP they would be sharded. Its state is a few floats and small lists, saved in the Lightning
checkpoint and loadable with ``weights_only=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class ConstraintSolver(ABC):
    """Owns the Lagrange multiplier λ and the rule that moves it, and says how λ enters PPO.

    ``update`` must receive the globally reduced episode cost ``J_c``, so every rank computes the
    same λ without a broadcast; the rule must be deterministic.

    PPO-Lagrangian asks the solver, never a flag, how λ shapes its training: ``needs_cost_model``
    (may the cost model be left out), ``stream_names`` and ``end_score_streams`` (which per-token
    streams get advantages, one critic each under GAE, and the end score each carries). The defaults
    are Safe RLHF's PPO-Lagrangian: a reward and a cost stream, which the stage merges for the actor as
    ``(A_r - λ·A_c) / (1 + λ)`` (with several constraints, ``(A_r - Σ_k λ_k A_ck) / (1 + Σ_k λ_k)`` over
    those that keep a cost stream: :func:`lit_saferlhf.losses.constrained_advantage`).

    Args:
        cost_limit: The constraint threshold ``d`` in ``J_c <= d``.
        init_multiplier: λ before the first update.
    """

    def __init__(self, cost_limit: float, init_multiplier: float) -> None:
        self.cost_limit = float(cost_limit)
        self.multiplier = float(init_multiplier)

    def needs_cost_model(self) -> bool:
        """Whether the stage needs a cost model at all (the default: yes; plain PPO: no)."""
        return True

    def stream_names(self) -> tuple[str, ...]:
        """The per-token streams that get advantages (and one critic each under GAE).

        They are the keys of ``end_score_streams``, each ``reward`` or ``cost``, ``reward`` first.
        Default: ``("reward", "cost")``.
        """
        return ("reward", "cost")

    def end_score_streams(self, rewards: Tensor, costs: Tensor) -> dict[str, Tensor]:
        """The end score of each stream, which the stage then shapes with the KL per token.

        Args:
            rewards: Reward-model end scores ``R``, ``(N,)``.
            costs: Cost-model end scores ``C``, ``(N,)`` (zeros when the run has no cost model).

        Returns:
            ``{"reward": R, "cost": C}`` by default; the keys are ``stream_names()``. A ``reward``
            stream gets the KL as a penalty, a ``cost`` stream as an addition.
        """
        return {"reward": rewards, "cost": costs}

    @abstractmethod
    def update(self, episode_cost: float) -> dict[str, float]:
        """Take one step from the mean episode cost ``J_c``; return metrics to log (``solver/...``)."""

    def state_dict(self) -> dict[str, object]:
        """Plain floats and lists: everything ``update`` reads or writes."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned."""
        vars(self).update(state)
