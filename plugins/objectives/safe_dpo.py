"""SafeDPO (Kim et al., LG AI Research; arXiv 2505.20065; METHODS.md §6.1)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lit_saferlhf.losses import ordered, safe_dpo_loss, safe_dpo_transform
from lit_saferlhf.objectives import Label, Objective, PairBatch


class SafeDPO(Objective):
    """DPO on transformed helpfulness pairs with a margin Δ on safe-over-unsafe pairs.

    T(D): keep a pair whose more helpful response is safe, swap it when that one is unsafe and the
    other safe, drop it when both are unsafe; then ``−log σ(β h − (ũ_l − ũ_w)Δ)``.

    Decision (METHODS.md: Δ's default and the both-unsafe rule are [mem], no authors' code): both-
    unsafe pairs are dropped (the third-party reimplementation's rule), and Δ defaults to 1.0, a
    margin of 1/β = 10 nats of log-ratio at β = 0.1; neither is verified against the paper.

    Args:
        beta: β.
        delta: Δ ≥ 0, the extra margin of safe-over-unsafe pairs (0 is DPO on T(D)).
    """

    requires: ClassVar[tuple[Label, ...]] = ("better", "is_safe")

    def __init__(self, beta: float = 0.1, delta: float = 1.0) -> None:
        self.beta, self.delta = beta, delta

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """SafeDPO loss on T(helpfulness pairs)."""
        chosen_index, keep, unsafe_gap = safe_dpo_transform(batch.better, batch.is_safe)
        chosen, rejected = ordered(batch.logratios, chosen_index)
        return safe_dpo_loss(chosen, rejected, unsafe_gap, keep, self.beta, self.delta)
