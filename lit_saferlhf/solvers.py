"""The constraint-solver contract: the rule that moves the Lagrange multiplier λ.

Concrete solvers live in ``plugins/solvers`` (installed as ``lit_saferlhf_plugins.solvers``);
stages import only this contract. A solver is a plain Python object, not an ``nn.Module``: under
DeepSpeed bf16 a module's buffers would be cast to bf16 (rounding λ to three digits) and under
FSDP they would be sharded. Its state is a few floats and small lists, saved in the Lightning
checkpoint and loadable with ``weights_only=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lit_saferlhf.losses import lagrangian_advantage


class ConstraintSolver(ABC):
    """Owns the Lagrange multiplier λ and the rule that moves it, and says how λ enters PPO.

    ``update`` must receive the globally reduced episode cost ``J_c``, so every rank computes the
    same λ without a broadcast; the rule must be deterministic.

    PPO-Lagrangian asks the solver, never a flag, how λ shapes its training: ``needs_cost_model``
    (may the cost model be left out), ``stream_names`` and ``end_score_streams`` (which per-token
    streams get advantages, one critic each under GAE, and the end score each carries), and
    ``actor_advantages`` (how the streams' advantages merge for the actor). The defaults are Safe
    RLHF's PPO-Lagrangian: a reward and a cost stream, merged as ``(A_r - λ·A_c) / (1 + λ)``.

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

    def actor_advantages(self, reward_advantages: Tensor, cost_advantages: Tensor) -> Tensor:
        """The advantage the actor trains on: Safe RLHF's ``(A_r - λ·A_c) / (1 + λ)`` by default.

        Args:
            reward_advantages: Advantages of the reward stream, ``(N, A)``.
            cost_advantages: Advantages of the cost stream, ``(N, A)`` (zeros for a stream the solver has not).

        Returns:
            The merged advantage, ``(N, A)``, detached (:func:`lit_saferlhf.losses.lagrangian_advantage`).
        """
        # λ as a float32 tensor first, then the advantages' dtype: as the stage has always built it, bit for bit.
        multiplier = torch.tensor(self.multiplier, device=reward_advantages.device)
        return lagrangian_advantage(reward_advantages, cost_advantages, multiplier)

    @abstractmethod
    def update(self, episode_cost: float) -> dict[str, float]:
        """Take one step from the mean episode cost ``J_c``; return metrics to log (``solver/...``)."""

    def state_dict(self) -> dict[str, object]:
        """Plain floats and lists: everything ``update`` reads or writes."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned."""
        vars(self).update(state)
