"""The PPO stages' rollout batch: every tensor of a batch of sampled, scored sequences.

Shapes: ``N`` sequences (prompts x samples per prompt), ``P`` prompt columns, ``A`` response columns, ``K``
constraints (one cost column each, zeros for a constraint without a cost stream).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Everything PPO needs about a batch of sampled sequences; tensors share the first dim ``N``."""

    input_ids: Tensor  # (N, P + A) prompt + response
    attention_mask: Tensor  # (N, P + A)
    mask: Tensor  # (N, A) true on response tokens that exist
    old_logprobs: Tensor  # (N, A)
    ref_logprobs: Tensor  # (N, A)
    reward_values: Tensor  # (N, A)
    cost_values: Tensor  # (N, K, A)
    end_rewards: Tensor  # (N,)
    end_costs: Tensor  # (N, K)
    reward_advantages: Tensor  # (N, A)
    reward_returns: Tensor  # (N, A)
    cost_advantages: Tensor  # (N, K, A)
    cost_returns: Tensor  # (N, K, A)
    cost_weights: Tensor  # (N, K) 1 where a constraint's penalty applies to the response (its category, RePO)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor) -> Rollout:
        """The rows ``index`` of every tensor."""
        return Rollout(**{field.name: getattr(self, field.name)[index] for field in fields(self)})

    def minibatches(self, size: int, epochs: int, generator: torch.Generator | None = None) -> list[Rollout]:
        """``epochs`` shuffled passes over the rollout in minibatches of ``size`` rows."""
        batches = []
        for _ in range(epochs):
            order = torch.randperm(len(self), generator=generator).to(self.input_ids.device)
            batches += [self.select(order[start : start + size]) for start in range(0, len(self), size)]
        return batches
