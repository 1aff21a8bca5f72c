"""The constraint-solver contract: the rule that moves the Lagrange multiplier λ.

Concrete solvers live in ``plugins/solvers`` (installed as ``lit_saferlhf_plugins.solvers``);
stages import only this contract. A solver is a plain Python object, not an ``nn.Module``: under
DeepSpeed bf16 a module's buffers would be cast to bf16 (rounding λ to three digits) and under
FSDP they would be sharded. Its state is a few floats and small lists, saved in the Lightning
checkpoint and loadable with ``weights_only=True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ConstraintSolver(ABC):
    """Owns the Lagrange multiplier λ and the rule that moves it.

    ``update`` must receive the globally reduced episode cost ``J_c``, so every rank computes the
    same λ without a broadcast; the rule must be deterministic.

    Args:
        cost_limit: The constraint threshold ``d`` in ``J_c <= d``.
        init_multiplier: λ before the first update.
    """

    normalize_advantage: bool = True
    """Divide the combined advantage ``A_r - λ·A_c`` by ``1 + λ`` (Safe RLHF's default)."""
    shapes_reward: bool = False
    """Train on ONE stream, the end score ``R - λ·C`` shaped with the KL once, with no cost critic
    (safe-rlhf's ``PPORewardShapingTrainer``), instead of separate reward and cost streams."""

    def __init__(self, cost_limit: float, init_multiplier: float) -> None:
        self.cost_limit = float(cost_limit)
        self.multiplier = float(init_multiplier)

    @property
    def uses_cost(self) -> bool:
        """Whether the cost model and cost critic are needed at all (false for plain PPO)."""
        return True

    @abstractmethod
    def update(self, episode_cost: float) -> dict[str, float]:
        """Take one step from the mean episode cost ``J_c``; return metrics to log (``solver/...``)."""

    def state_dict(self) -> dict[str, object]:
        """Plain floats and lists: everything ``update`` reads or writes."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned."""
        vars(self).update(state)
