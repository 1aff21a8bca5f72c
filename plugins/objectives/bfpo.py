"""BFPO: Bi-Factorial Preference Optimization (Zhang, Torr, Elhoseiny, Bibi; ICLR 2025; METHODS.md §1)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import bfpo_loss, bfpo_targets, ordered
from lit_saferlhf.objectives import Label, Objective, PairBatch


class BFPO(Objective):
    """``(h − g/τ)²`` on helpfulness pairs, with the target ``g`` set by both responses' safety labels.

    Defaults are the authors' (wx-zhang/bfpo ``configs.py`` and the zephyr recipe): B1 = 3,
    α = 0.5, τ = 0.01. The buffer of general helpfulness pairs (the datamodule's ``buffer_path``,
    every buffer pair labelled safe-over-safe, g = 1 − α) adds the same loss on one buffer batch per
    step, weighted by ``buffer_weight`` (the authors' code: 1, not tunable; METHODS.md asks for a knob).

    Args:
        tau: τ (the code's ``beta``).
        b1: B1 (> 1); B3 = 1/(B1 − 1).
        alpha: α, the shift of the labelling function.
        buffer_weight: Weight of the buffer batch's loss.
    """

    requires: ClassVar[tuple[Label, ...]] = ("better", "is_safe")

    def __init__(self, tau: float = 0.01, b1: float = 3.0, alpha: float = 0.5, buffer_weight: float = 1.0) -> None:
        if b1 <= 1:
            raise ConfigError("b1", "a number > 1 (B3 = 1/(B1 - 1))", b1)
        self.tau, self.b1, self.alpha, self.buffer_weight = tau, b1, alpha, buffer_weight

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """BFPO loss on the helpfulness ordering."""
        chosen, rejected = ordered(batch.logratios, batch.better)
        safe_chosen, safe_rejected = ordered(batch.is_safe.long(), batch.better)
        targets = bfpo_targets(safe_chosen, safe_rejected, self.b1, self.alpha)
        loss, stats = bfpo_loss(chosen, rejected, targets, self.tau)
        stats["target"] = targets.mean()
        return loss, stats
