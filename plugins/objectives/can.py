"""CAN: one-shot safety alignment by optimal dualization (Huang et al., NeurIPS 2024; METHODS.md §4).

λ* is found once, before training, from the closed-form dual on reference samples
(``lit_saferlhf.objectives.solve_can_dual``); then one unconstrained alignment pass uses
``r + λ*·g`` (g = −c). MoCAN takes r and c from reward and cost models; PeCAN from the implicit
rewards of two DPO-aligned policies (the stage's ``reward_model`` / ``cost_model`` score sources
with ``implicit_beta``). λ* is logged and saved in the export's ``objective.json``.

Decisions (METHODS.md: the dual is medium confidence, the policy step low): one constraint (the
stage has one cost source); the constraint is an improvement over the reference,
``E_π[g] − E_ref[g] ≥ b`` (``margin`` = b); λ is bounded by ``max_multiplier``; MoCAN's policy step is
DPO on soft labels ``σ(r_λ*(y_1) − r_λ*(y_0))`` of the data's pairs; PeCAN's the MODPO-style margin
(``policy_step: margin``) or the same soft labels from the implicit rewards (``policy_step: labels``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import lagrangian_preference, ordered, pecan_loss, soft_dpo_loss, solve_can_dual
from lit_saferlhf.objectives import Label, Objective, PairBatch


class _Dualized(Objective):
    """λ* from the dual on ``dual_samples`` reference samples per prompt (shared by MoCAN and PeCAN)."""

    def __init__(
        self, beta: float, margin: float, dual_samples: int, sample_prompts: int, max_multiplier: float
    ) -> None:
        if dual_samples < 2:
            raise ConfigError("dual_samples", "at least 2 samples per prompt", dual_samples)
        self.beta, self.margin, self.dual_samples = beta, margin, dual_samples
        self.sample_prompts, self.max_multiplier = sample_prompts, max_multiplier
        self.lam: float | None = None

    @property
    def multiplier(self) -> float | None:
        """λ* (None before ``fit_dual``)."""
        return self.lam

    def fit_dual(self, rewards: Tensor, costs: Tensor) -> dict[str, float]:
        """λ* = argmin D̂(λ) from reward and cost scores of reference samples, ``(n, N)`` each."""
        lam, stats = solve_can_dual(
            rewards, -costs.unsqueeze(-1), self.beta, self.margin, max_multiplier=self.max_multiplier
        )
        self.lam = float(lam[0])
        return {"multiplier": self.lam, **stats}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore λ*."""
        if state.get("multiplier") is not None:
            self.lam = float(state["multiplier"])

    def lam_or_fail(self) -> float:
        """λ*, which the stage sets before the first step."""
        if self.lam is None:
            raise RuntimeError(f"{type(self).__name__}: λ* is not set; the stage calls fit_dual before training")
        return self.lam


class MoCAN(_Dualized):
    """Model-based CAN: λ* from reward/cost-model scores, then DPO on soft labels from ``r + λ*g``.

    Args:
        beta: β, the KL weight of both the dual and the policy step (paper: 0.1).
        margin: b, the required gain in E[g] = −E[c] over the reference.
        dual_samples: N, reference samples per prompt for the dual (METHODS.md proposes 64 or more).
        sample_prompts: n, prompts for the dual.
        max_multiplier: Upper bound on λ*.
    """

    requires: ClassVar[tuple[Label, ...]] = ("rewards", "costs")

    def __init__(
        self,
        beta: float = 0.1,
        margin: float = 0.0,
        dual_samples: int = 64,
        sample_prompts: int = 128,
        max_multiplier: float = 100.0,
    ) -> None:
        super().__init__(beta, margin, dual_samples, sample_prompts, max_multiplier)

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Soft-label DPO with ``p = σ(r_λ*(y_1) − r_λ*(y_0))``."""
        prob_second = lagrangian_preference(batch.rewards, batch.costs, self.lam_or_fail())
        loss, stats = soft_dpo_loss(batch.logratios[:, 1], batch.logratios[:, 0], prob_second, self.beta)
        stats["label_second"] = prob_second.detach().mean()
        return loss, stats


class PeCAN(_Dualized):
    """Preference-based CAN: implicit rewards of pre-aligned DPO models; λ* from the dual, then one policy step.

    Configure the stage's ``reward_model`` as the helpfulness-DPO policy with ``implicit_beta: β_r``
    and its ``cost_model`` as the safety-DPO policy with ``implicit_beta: β_g`` and ``negate: true``
    (both DPO runs from the same reference as this one), so ``r̂ = β_r ρ_{π_r}`` and ``c = −ĝ = −β_g ρ_{π_g}``.

    The policy step (METHODS.md §4(b) marks it [mem]: the paper's text could not be read here):

    - ``margin`` (default, METHODS.md's reading): the MODPO-style margin on the data's helpfulness
      pairs, ``−log σ(β h − λ*(ĝ_w − ĝ_l))``. The helpfulness part comes from the data's labels, not
      from r̂: with (near-)deterministic labels its implied reward gap is unbounded, so the margin
      only weakens the push towards a more helpful but less safe response, never reverses it.
    - ``labels``: DPO on soft pseudo-labels from the combined implicit reward,
      ``p(y_1 ≻ y_0) = σ((r̂ + λ*ĝ)(y_1) − (r̂ + λ*ĝ)(y_0))`` (MoCAN's step with the implicit
      rewards): the same r̂ and ĝ scale as the dual that chose λ*; needs no helpfulness label.

    Args:
        beta, margin, dual_samples, sample_prompts, max_multiplier: As ``MoCAN`` (paper: β = 0.1 or 0.025).
        policy_step: ``margin`` or ``labels`` (above).
    """

    requires: ClassVar[tuple[Label, ...]] = ("better", "rewards", "costs")

    def __init__(
        self,
        beta: float = 0.1,
        margin: float = 0.0,
        dual_samples: int = 64,
        sample_prompts: int = 128,
        max_multiplier: float = 100.0,
        policy_step: Literal["margin", "labels"] = "margin",
    ) -> None:
        super().__init__(beta, margin, dual_samples, sample_prompts, max_multiplier)
        if policy_step not in ("margin", "labels"):
            raise ConfigError("policy_step", "'margin' or 'labels'", policy_step)
        self.policy_step = policy_step
        self.requires = ("better", "rewards", "costs") if policy_step == "margin" else ("rewards", "costs")

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """``−log σ(β h − λ*(ĝ_w − ĝ_l))`` on the helpfulness ordering, or soft-label DPO on ``r̂ + λ*ĝ``."""
        if self.policy_step == "labels":
            prob_second = lagrangian_preference(batch.rewards, batch.costs, self.lam_or_fail())
            loss, stats = soft_dpo_loss(batch.logratios[:, 1], batch.logratios[:, 0], prob_second, self.beta)
            stats["label_second"] = prob_second.detach().mean()
            return loss, stats
        chosen, rejected = ordered(batch.logratios, batch.better)
        cost_chosen, cost_rejected = ordered(batch.costs, batch.better)
        loss, stats = pecan_loss(chosen, rejected, cost_chosen, cost_rejected, self.lam_or_fail(), self.beta)
        stats["safety_gap"] = torch.mean(cost_rejected - cost_chosen).detach()
        return loss, stats
