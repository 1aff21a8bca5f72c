"""Critic-free estimators: a sample's sequence score against the other samples of its prompt.

Both read ``G = generation.num_return_sequences`` samples per prompt (consecutive rows of the
rollout), score each sequence with the sum of its stream, compare it with its group, and put the
result on every response token. The stage calls them once for the reward stream and once for the
cost stream, so each is normalised within its group separately before λ combines them.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lit_saferlhf.advantages import AdvantageEstimator
from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import (
    broadcast_to_tokens,
    group_normalized_advantages,
    leave_one_out_advantages,
    sequence_scores,
)

KEY = "model.init_args.advantage"
"""Where a PPO-Lagrangian config sets the estimator, for errors in its settings."""


class GroupNormalized(AdvantageEstimator):
    """GRPO's estimator: each stream's sequence score z-scored within its group, no critic.

    ``A_i = (s_i - mean_g(s)) / (std_g(s) + ε)`` on every response token of sample ``i``
    (:func:`lit_saferlhf.advantages.group_normalized_advantages`). Constrained GRPO (arXiv
    2602.05863) z-scores reward and cost separately, as here, before ``(A_r - λ·A_c) / (1 + λ)``.

    Args:
        eps: ``ε`` added to the group's std (1e-4, as TRL and align-anything).
        std: ``sample`` (divide by ``G - 1``, as ``torch.std``) or ``population`` (divide by ``G``).
    """

    needs_critics = False
    min_group_size = 2

    def __init__(self, eps: float = 1e-4, std: Literal["sample", "population"] = "sample") -> None:
        if std not in ("sample", "population"):
            raise ConfigError(KEY, f"GroupNormalized: `std` must be 'sample' or 'population', got {std!r}")
        if not eps >= 0.0:
            raise ConfigError(KEY, f"GroupNormalized: `eps` must be >= 0, got {eps}")
        self.eps, self.std = eps, std

    def estimate(
        self, stream: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Group z-scores of the stream's sequence scores, on the response tokens; no returns."""
        scores = sequence_scores(stream, mask)  # (N,)
        advantages = group_normalized_advantages(scores, group_size, self.eps, unbiased=self.std == "sample")
        return broadcast_to_tokens(advantages, mask), None


class LeaveOneOut(AdvantageEstimator):
    """RLOO's estimator: each sequence score minus the mean of the other ``G - 1`` of its group, no critic.

    ``A_i = s_i - (Σ_j s_j - s_i) / (G - 1)`` on every response token of sample ``i``
    (:func:`lit_saferlhf.advantages.leave_one_out_advantages`); unlike the z-score it keeps the
    score's units, so λ weighs reward and cost in the reward and cost models' own scales.
    """

    needs_critics = False
    min_group_size = 2

    def estimate(
        self, stream: Tensor, mask: Tensor, group_size: int, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Leave-one-out advantages of the stream's sequence scores, on the response tokens; no returns."""
        scores = sequence_scores(stream, mask)  # (N,)
        return broadcast_to_tokens(leave_one_out_advantages(scores, group_size), mask), None
