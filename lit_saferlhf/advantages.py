"""The advantage-estimator contract, its default (GAE with a critic per stream) and the group maths.

PPO-Lagrangian turns each of its two per-token streams (reward, cost) into advantages, and the actor
loss merges them as ``(A_r - λ·A_c) / (1 + λ)``. An ``AdvantageEstimator`` does the first part for
ONE stream at a time, so reward and cost are always estimated (and, for the group estimators,
normalised) separately, before λ combines them: normalising the combined score instead would
silently reweight the two terms and change what λ means (Constrained GRPO, Girgis et al., 2026,
arXiv 2602.05863; ``METHODS.md`` §6.2 has a numeric example).

- ``GAE`` (here, the stage's default): one critic per stream, Safe RLHF's estimator.
- ``GroupNormalized`` (GRPO) and ``LeaveOneOut`` (RLOO) in ``plugins/advantages`` (installed as
  ``lit_saferlhf_plugins.advantages``): no critic; ``G = generation.num_return_sequences`` samples
  per prompt form a group, and each sample's sequence score is compared with its group's.

The stage imports only this module. Other packages register estimators under the entry-point group
``lit_saferlhf.advantages`` (see ``lit_saferlhf.registry``).

Shapes: ``N`` sequences in the rollout, ordered prompt-major (the ``G`` samples of one prompt are
consecutive rows, as Hugging Face ``generate`` returns them), ``A`` response tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import gae


class AdvantageEstimator(ABC):
    """Turns one per-token stream (reward or cost) into per-token advantages.

    The stream is the KL-shaped reward or cost of the rollout, ``(N, A)``: the end score at the last
    response token, plus ``∓β·KL_t`` per token when the KL is a reward penalty (``ppo.kl_penalty:
    reward``); with the KL as a loss term the stream is the end score alone.
    """

    needs_critics: bool = True
    """Whether the estimator reads critic values: when false the stage builds, trains and saves no critics."""
    min_group_size: int = 1
    """The fewest samples per prompt (``generation.num_return_sequences``) the estimator can use."""

    @abstractmethod
    def estimate(
        self, stream: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Advantages of one stream, and the critic's targets (None when the estimator uses no critic).

        Args:
            stream: Per-token rewards (or costs) of the rollout, ``(N, A)``, zero on padding.
            mask: True on response tokens that exist, ``(N, A)``.
            group_size: ``G``, consecutive rows sampled from the same prompt; ``N`` is a multiple of it.
            values: The stream's critic values, ``(N, A)``; None when ``needs_critics`` is false.

        Returns:
            ``(advantages, returns)``, each ``(N, A)`` and zero on padding; ``returns`` is None
            without a critic.
        """


class GAE(AdvantageEstimator):
    """Generalised advantage estimation with a critic per stream (Safe RLHF's estimator, the default).

    :func:`lit_saferlhf.losses.gae` on the stream and its critic's values: ``δ_t = r_t + γ V_{t+1} - V_t``,
    ``Â_t = δ_t + γ λ_GAE Â_{t+1}``, returns ``Â_t + V_t`` (Schulman et al., 2016, Eq. 16).

    Args:
        gamma: Discount γ (1.0 in Safe RLHF).
        lam: GAE's λ (0.95 in Safe RLHF), not the Lagrange multiplier.
    """

    def __init__(self, gamma: float = 1.0, lam: float = 0.95) -> None:
        for name, value in (("gamma", gamma), ("lam", lam)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError("model.init_args.advantage", f"GAE: `{name}` must be in [0, 1], got {value}")
        self.gamma, self.lam = gamma, lam

    def estimate(
        self, stream: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """GAE advantages and returns of ``stream`` against ``values`` (``group_size`` is not used)."""
        if values is None:
            raise ValueError("GAE needs the critic's values of the stream; the stage passed none")
        return gae(stream, values, mask, self.gamma, self.lam)
