"""The offline-objective contract and the pure preference losses behind it.

An offline objective (DPO, IPO, BFPO, SafeDPO, C-DPO, SACPO's steps, MoCAN, PeCAN) sees one batch of
response pairs as **per-sequence summed** response log-probabilities of the trained policy and of
the frozen reference, plus the pair's labels, and returns ``(loss, stats)``. The stage
(``lit_saferlhf.stages.PreferenceOptimization``) computes those sums; the built-in objectives live
in ``plugins/objectives`` (installed as ``lit_saferlhf_plugins.objectives``).

Every pair is one data row with two responses ``k = 0, 1`` (PKU-SafeRLHF's ``response_0`` and
``response_1``; HH-RLHF's chosen and rejected). A row's helpfulness pair and its safety pair are two
orderings of the same two responses, so one forward over both responses serves every objective:
``better`` and ``safer`` index the preferred response of each ordering.

Notation (METHODS.md §0): ℓ_θ(y|x) = Σ_t log π_θ(y_t|x, y_<t) over response tokens; the log-ratio
ρ_θ(y) = ℓ_θ(y|x) − ℓ_ref(y|x); a pair margin h = ρ_θ(y_w) − ρ_θ(y_l); σ the logistic function.
Shapes: B pairs, ``(B, 2)`` one value per response, N samples per prompt, n prompts.

Token-level hook: ``Objective.token_weights`` returns the weight of each response token in the
sums (default: the response mask itself). An objective that masks or weights tokens (e.g. a
token-mask variant of DPO) overrides it; the stage applies the same weights to the policy and the
reference sums, so a precomputed reference stays consistent as long as the weights do not depend
on the trained policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_saferlhf.solvers import ConstraintSolver

Label = Literal["better", "safer", "is_safe", "rewards", "costs"]

LABEL_FIELDS: dict[str, str] = {
    "better": "better_response_id (which response is more helpful)",
    "safer": "safer_response_id (which response is safer)",
    "is_safe": "is_response_0_safe / is_response_1_safe (per-response safety labels)",
    "rewards": "model.init_args.reward_model (a reward score source)",
    "costs": "model.init_args.cost_model (a cost score source)",
}
"""Where each label comes from, for start-up errors."""


@dataclass
class PairBatch:
    """Per-sequence summed log-probs of both responses of B pairs, and the labels the data has.

    A label the data lacks is None; an objective lists the labels it needs in ``requires`` and the
    stage refuses to start without them.
    """

    logprobs: Tensor  # (B, 2) ℓ_θ(y_k|x) of the trained policy (with grad)
    ref_logprobs: Tensor  # (B, 2) ℓ_ref(y_k|x) of the frozen reference
    better: Tensor | None = None  # (B,) long, index of the more helpful response
    safer: Tensor | None = None  # (B,) long, index of the safer response
    is_safe: Tensor | None = None  # (B, 2) bool, per-response safety label s(y_k)
    rewards: Tensor | None = None  # (B, 2) reward scores r(x, y_k)
    costs: Tensor | None = None  # (B, 2) cost scores c(x, y_k) (> 0 harmful)

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    @property
    def logratios(self) -> Tensor:
        """ρ_θ(y_k) = ℓ_θ − ℓ_ref, ``(B, 2)``."""
        return self.logprobs - self.ref_logprobs.detach()

    def available(self) -> set[str]:
        """The labels that are present."""
        return {f.name for f in fields(self) if f.name in LABEL_FIELDS and getattr(self, f.name) is not None}


def ordered(values: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
    """``(values[b, first[b]], values[b, 1 - first[b]])``: a ``(B, 2)`` tensor ordered by an index ``(B,)``."""
    first = first.long().unsqueeze(-1)
    return values.gather(-1, first).squeeze(-1), values.gather(-1, 1 - first).squeeze(-1)


class Objective(ABC):
    """An offline preference objective: a ``PairBatch`` in, ``(loss, stats)`` out.

    Class attributes a subclass may set:

    - ``requires``: the labels it needs (``better``, ``safer``, ``is_safe``, ``rewards``, ``costs``).
    - ``buffer_weight``: weight of the loss on the buffer batch, when the data carries one (BFPO).
    - ``solver``: a constraint solver the stage steps during training from the mean cost-model score
      of the policy's own samples (C-DPO); its ``multiplier`` is λ.
    - ``dual_samples``: responses per prompt the stage samples from the reference before training,
      scores, and hands to ``fit_dual`` (CAN); 0 for none.
    - ``sample_prompts``: how many prompts the stage samples for a dual step or for ``fit_dual``.
    """

    requires: ClassVar[tuple[Label, ...]] = ()
    buffer_weight: float = 1.0
    solver: ConstraintSolver | None = None
    dual_samples: int = 0
    sample_prompts: int = 64

    @abstractmethod
    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss to minimise and detached diagnostics (``stats``, names without prefix)."""

    @property
    def multiplier(self) -> float | None:
        """λ, for objectives that have one (logged every step and saved in the export)."""
        return None if self.solver is None else self.solver.multiplier

    def token_weights(self, mask: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Weight of each response token in the summed log-probs, ``(2B, L)`` (default: the mask).

        Args:
            mask: True on the response tokens of every sequence (both responses of each pair, pair
                by pair), aligned with the shifted targets ``input_ids[:, 1:]``, ``(2B, L)``.
            batch: The collated batch, for objectives that weight tokens from data.
        """
        return mask.to(torch.float32)

    def fit_dual(self, rewards: Tensor, costs: Tensor) -> dict[str, float]:
        """Set λ from the scores of reference samples, ``(n, N)`` each (only when ``dual_samples`` > 0)."""
        raise NotImplementedError(f"{type(self).__name__} has no dual to fit (dual_samples = 0)")

    def state_dict(self) -> dict[str, object]:
        """Plain numbers to checkpoint and to save beside the export (λ, the solver's state)."""
        state: dict[str, object] = {"objective": type(self).__name__, "multiplier": self.multiplier}
        if self.solver is not None:
            state["solver"] = {"class": type(self.solver).__name__, **self.solver.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned."""
        if self.solver is not None and isinstance(state.get("solver"), dict):
            self.solver.load_state_dict({k: v for k, v in state["solver"].items() if k != "class"})


# ----------------------------------------------------------------------------------------------
# Pure losses: tensors in, (loss, stats) out
# ----------------------------------------------------------------------------------------------


def dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO: ``mean −log σ(β·(ρ_θ(y_w) − ρ_θ(y_l)))`` (Rafailov et al., 2023, Eq. 7).

    Args:
        chosen_logratios: ρ_θ(y_w), ``(B,)``.
        rejected_logratios: ρ_θ(y_l), ``(B,)``.
        beta: β, the KL weight.

    Returns:
        The batch mean, and the mean margin h and accuracy ``h > 0``.
    """
    margin = chosen_logratios - rejected_logratios
    loss = F.softplus(-beta * margin).mean()
    return loss, _margin_stats(margin)


def soft_dpo_loss(
    first_logratios: Tensor, second_logratios: Tensor, prob_first: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO on soft labels: ``mean −[p log σ(β h) + (1 − p) log σ(−β h)]``, h = ρ(y_1st) − ρ(y_2nd).

    The cross-entropy of the Bradley-Terry probability ``σ(β h)`` against a target ``p``, used by
    C-DPO's soft relabelling and MoCAN's model-made labels (METHODS.md §3(b), §4(b)). ``p = 1`` is DPO.

    Args:
        first_logratios: ρ_θ of the first response, ``(B,)``.
        second_logratios: ρ_θ of the second response, ``(B,)``.
        prob_first: Target probability that the first is preferred, ``(B,)``, in [0, 1].
        beta: β, the KL weight.
    """
    margin = first_logratios - second_logratios
    prob_first = prob_first.detach().to(margin.dtype)
    loss = (prob_first * F.softplus(-beta * margin) + (1 - prob_first) * F.softplus(beta * margin)).mean()
    return loss, _margin_stats(margin)


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, tau: float) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO: ``mean (h − 1/(2τ))²`` (Azar et al., 2023, Eq. 17), h = ρ_θ(y_w) − ρ_θ(y_l).

    Args:
        chosen_logratios: ρ_θ(y_w), ``(B,)``.
        rejected_logratios: ρ_θ(y_l), ``(B,)``.
        tau: τ, the regularisation weight; the target margin is ``1/(2τ)``.
    """
    margin = chosen_logratios - rejected_logratios
    return (margin - 1 / (2 * tau)).square().mean(), _margin_stats(margin)


def bfpo_targets(safe_chosen: Tensor, safe_rejected: Tensor, b1: float = 3.0, alpha: float = 0.5) -> Tensor:
    """BFPO's labelling function ``g = B1·B3·s_w − B3·s_l − α`` with ``B3 = 1/(B1 − 1)`` (METHODS.md §1(b)).

    With the defaults: (s_w, s_l) = (1, 0) → 1, (1, 1) → 0.5, (0, 0) → −0.5, (0, 1) → −1
    (Zhang et al., 2025; ``src/alignment/trainer/bfpo.py`` L28-30, L125-137 of wx-zhang/bfpo).

    Args:
        safe_chosen: s(y_hw) of the more helpful response, ``(B,)`` bool or 0/1.
        safe_rejected: s(y_hl) of the less helpful response, ``(B,)``.
        b1: B1 (> 1).
        alpha: α, the shift.
    """
    b3 = 1.0 / (b1 - 1.0)
    return b1 * b3 * safe_chosen.float() - b3 * safe_rejected.float() - alpha


def bfpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, targets: Tensor, tau: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """BFPO: ``mean (h − g/τ)²`` on helpfulness pairs (Zhang et al., ICLR 2025; METHODS.md §1(b)).

    An IPO-like regression whose target ``g`` (``bfpo_targets``) depends on the two responses'
    safety labels; unlike IPO there is no factor 1/2 (the authors' code). Worked example: h = 2,
    τ = 0.5 gives losses 0, 1, 9, 16 for (s_w, s_l) = (1,0), (1,1), (0,0), (0,1); ∂L/∂h = 2(h − g/τ).

    Args:
        chosen_logratios: ρ_θ(y_hw) of the more helpful response, ``(B,)``.
        rejected_logratios: ρ_θ(y_hl), ``(B,)``.
        targets: g per pair, ``(B,)``.
        tau: τ (the code's ``beta``).
    """
    margin = chosen_logratios - rejected_logratios
    return (margin - targets.to(margin.dtype) / tau).square().mean(), _margin_stats(margin)


def safe_dpo_transform(better: Tensor, is_safe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SafeDPO's pair transform T(D) (Kim et al., 2025; METHODS.md §6.1).

    Keep a helpfulness pair whose more helpful response is safe; swap it when that response is
    unsafe and the other safe; drop it when both are unsafe.

    Args:
        better: Index of the more helpful response, ``(B,)``.
        is_safe: Safety label of each response, ``(B, 2)`` bool.

    Returns:
        ``chosen`` index after the transform ``(B,)``, ``keep`` ``(B,)`` bool, and ``unsafe_gap``
        ``ũ_l − ũ_w`` ``(B,)`` (1 for a safe-over-unsafe pair, 0 for a safe-over-safe pair).
    """
    better = better.long()
    safe_better, safe_other = ordered(is_safe.long(), better)
    swap = (safe_better == 0) & (safe_other == 1)
    chosen = torch.where(swap, 1 - better, better)
    keep = (safe_better + safe_other) > 0
    safe_chosen, safe_rejected = ordered(is_safe.long(), chosen)
    unsafe_gap = (1 - safe_rejected) - (1 - safe_chosen)
    return chosen, keep, unsafe_gap * keep


def safe_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, unsafe_gap: Tensor, keep: Tensor, beta: float, delta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """SafeDPO: ``mean over kept pairs of −log σ(β h − (ũ_l − ũ_w)·Δ)`` (Kim et al., 2025; METHODS.md §6.1).

    Safe-over-unsafe pairs must clear an extra margin Δ; the others are plain DPO. Example: β h = 0.2,
    Δ = 1: 1.171101 (safe vs unsafe), 0.598139 (safe vs safe). A batch with no kept pair has loss 0.

    Args:
        chosen_logratios: ρ_θ of the chosen response after ``safe_dpo_transform``, ``(B,)``.
        rejected_logratios: ρ_θ of the other response, ``(B,)``.
        unsafe_gap: ũ_l − ũ_w, ``(B,)``.
        keep: Pairs that survive the transform, ``(B,)`` bool.
        beta: β.
        delta: Δ, the extra margin of safe-over-unsafe pairs.
    """
    margin = chosen_logratios - rejected_logratios
    losses = F.softplus(-(beta * margin - unsafe_gap.to(margin.dtype) * delta))
    weights = keep.to(margin.dtype)
    loss = (losses * weights).sum() / weights.sum().clamp_min(1)
    stats = _margin_stats(margin)
    stats["kept_fraction"] = weights.mean().detach()
    return loss, stats


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO on unpaired responses (Ethayarajh et al., 2024, Eq. 8; SACPO's safety step, METHODS.md §5(b)).

    ``w_D·(1 − σ(β(ρ − z)))`` for a desirable response, ``w_U·(1 − σ(β(z − ρ)))`` for an undesirable
    one, averaged over responses; z is a detached KL estimate clamped at 0. Example: β = 0.1, ρ = 2,
    z = 0.5: 0.462570 (desirable), 0.537430 (undesirable).

    Args:
        logratios: ρ_θ(y) of every response, ``(N,)``.
        desirable: Whether each response is desirable (safe), ``(N,)`` bool.
        kl: z, the reference point, a scalar (detached and clamped at 0 here).
        beta: β (SACPO: β/λ).
        desirable_weight: w_D.
        undesirable_weight: w_U (SACPO: n_desirable / n_undesirable of the data).
    """
    z = kl.detach().clamp_min(0)
    desirable = desirable.bool()
    gap = torch.where(desirable, logratios - z, z - logratios)
    weight = torch.where(desirable, torch.full_like(gap, desirable_weight), torch.full_like(gap, undesirable_weight))
    loss = (weight * (1 - torch.sigmoid(beta * gap))).mean()
    with torch.no_grad():
        stats = {
            "kl": z,
            "desirable_logratio": _masked(logratios, desirable),
            "undesirable_logratio": _masked(logratios, ~desirable),
        }
    return loss, stats


def lagrangian_preference(rewards: Tensor, costs: Tensor, multiplier: float | Tensor) -> Tensor:
    """``p*_λ(y_1 ≻ y_0) = σ(r_λ(y_1) − r_λ(y_0))`` with ``r_λ = r − λ c`` (C-DPO, Liu et al., 2024; §3(b)).

    Example: r = (1, 2), c = (−1, 1.5): λ = 0 → 0.731059, λ = 0.5 → 0.437823, λ = 1 → 0.182426.

    Args:
        rewards: r of both responses, ``(B, 2)``.
        costs: c of both responses, ``(B, 2)``.
        multiplier: λ ≥ 0.

    Returns:
        The probability that response 1 is preferred, ``(B,)``.
    """
    lagrangian = rewards - multiplier * costs
    return torch.sigmoid(lagrangian[:, 1] - lagrangian[:, 0])


def can_dual(
    multiplier: Tensor, rewards: Tensor, utilities: Tensor, beta: float, margin: Tensor | float = 0.0
) -> Tensor:
    """CAN's empirical dual ``D̂(λ)`` (Huang et al., NeurIPS 2024; METHODS.md §4(b)).

    ``D̂(λ) = (β/n) Σ_i log((1/N) Σ_j exp((r_ij + ⟨λ, ḡ_ij⟩)/β)) − ⟨λ, b⟩``, with ``ḡ_ij = g_ij − mean_j g_ij``
    (the constraints are improvements over the reference), computed with logsumexp so that β = 0.1
    does not overflow. Convex in λ; its gradient is ``E_{π_λ}[ḡ] − b``. Example: r = (0, 1), g = (1, −1),
    β = 1, b = 0: D̂(0) = D̂(1) = 0.620115, minimum D̂(0.5) = 0.5.

    Args:
        multiplier: λ ≥ 0, ``(m,)``.
        rewards: r_ij of N reference samples for each of n prompts, ``(n, N)``.
        utilities: Safety utilities g_ij = −c_ij, ``(n, N, m)``.
        beta: β, the KL weight of the alignment that follows.
        margin: b, the required improvement of E[g] over the reference's, ``(m,)`` or a float.

    Returns:
        D̂(λ), a scalar (differentiable in λ).
    """
    centred = utilities - utilities.mean(dim=1, keepdim=True)  # (n, N, m)
    logits = (rewards + centred @ multiplier) / beta  # (n, N)
    log_mean = torch.logsumexp(logits, dim=1) - torch.log(torch.tensor(float(rewards.shape[1]), dtype=logits.dtype))
    return beta * log_mean.mean() - (multiplier * torch.as_tensor(margin, dtype=logits.dtype)).sum()


def solve_can_dual(
    rewards: Tensor,
    utilities: Tensor,
    beta: float,
    margin: Tensor | float = 0.0,
    max_multiplier: float = 100.0,
    steps: int = 500,
    tolerance: float = 1e-8,
) -> tuple[Tensor, dict[str, float]]:
    """λ* = argmin_{0 ≤ λ ≤ λ_max} D̂(λ) by projected gradient descent with backtracking, in float64.

    The dual is smooth and convex, so projected gradient with an Armijo line search converges; the
    box bound keeps λ finite when the constraint cannot be met (D̂ then decreases for ever).

    Args:
        rewards: ``(n, N)``; utilities: ``(n, N, m)``; beta, margin: as in ``can_dual``.
        max_multiplier: Upper bound on every λ_j.
        steps: Most gradient steps.
        tolerance: Stop when a step moves λ by less than this (max norm).

    Returns:
        λ* ``(m,)`` float64, and ``{"dual_value", "dual_steps", "dual_gradient"}``.
    """
    rewards, utilities = rewards.double(), utilities.double()
    lam = torch.zeros(utilities.shape[-1], dtype=torch.float64)
    step_size, taken = 1.0, 0
    for taken in range(1, steps + 1):  # noqa: B007  (the count is reported)
        value, grad = _dual_and_grad(lam, rewards, utilities, beta, margin)
        while True:  # Armijo backtracking on the projected step
            proposal = (lam - step_size * grad).clamp(0.0, max_multiplier)
            new_value, _ = _dual_and_grad(proposal, rewards, utilities, beta, margin)
            if new_value <= value - (grad * (lam - proposal)).sum() + (lam - proposal).square().sum() / (2 * step_size):
                break
            step_size /= 2
        moved = (proposal - lam).abs().max().item()
        lam, step_size = proposal, step_size * 2
        if moved < tolerance:
            break
    value, grad = _dual_and_grad(lam, rewards, utilities, beta, margin)
    return lam, {"dual_value": value.item(), "dual_steps": float(taken), "dual_gradient": grad.abs().max().item()}


def _dual_and_grad(
    lam: Tensor, rewards: Tensor, utilities: Tensor, beta: float, margin: Tensor | float
) -> tuple[Tensor, Tensor]:
    lam = lam.detach().requires_grad_(True)
    value = can_dual(lam, rewards, utilities, beta, margin)
    (grad,) = torch.autograd.grad(value, lam)
    return value.detach(), grad


def pecan_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_costs: Tensor,
    rejected_costs: Tensor,
    multiplier: float,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PeCAN's policy step: ``mean −log σ(β h − λ*(ĝ(y_hw) − ĝ(y_hl)))`` with ``ĝ = −c`` (METHODS.md §4(b)).

    The safety model's implicit reward ĝ = β_g ρ_{π_g} enters as a MODPO-style margin, so the policy's
    implicit reward must explain the helpfulness preference minus its safety part. Example: β = 0.1,
    h = 3, λ* = 1, ĝ_w − ĝ_l = 0.1: logit 0.2, loss 0.598139.

    Args:
        chosen_logratios: ρ_θ(y_hw), ``(B,)``.
        rejected_logratios: ρ_θ(y_hl), ``(B,)``.
        chosen_costs: c(y_hw) = −ĝ(y_hw), ``(B,)``.
        rejected_costs: c(y_hl), ``(B,)``.
        multiplier: λ*.
        beta: β of the policy step.
    """
    margin = chosen_logratios - rejected_logratios
    safety_gap = (rejected_costs - chosen_costs).detach().to(margin.dtype)  # ĝ_w − ĝ_l
    loss = F.softplus(-(beta * margin - multiplier * safety_gap)).mean()
    return loss, _margin_stats(margin)


def pair_metrics(logratios: Tensor, better: Tensor | None, safer: Tensor | None) -> dict[str, Tensor]:
    """Implicit-reward margins ``ρ(y_w) − ρ(y_l)`` and accuracies, for helpfulness and safety pairs separately.

    Args:
        logratios: ρ_θ of both responses, ``(B, 2)``.
        better: Index of the more helpful response ``(B,)``, or None when the data has none.
        safer: Index of the safer response ``(B,)``, or None.

    Returns:
        ``helpful/margin``, ``helpful/accuracy``, ``safety/margin``, ``safety/accuracy`` for the labels present.
    """
    stats: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, index in (("helpful", better), ("safety", safer)):
            if index is not None:
                chosen, rejected = ordered(logratios, index)
                for key, value in _margin_stats(chosen - rejected).items():
                    stats[f"{name}/{key}"] = value
    return stats


def _margin_stats(margin: Tensor) -> dict[str, Tensor]:
    margin = margin.detach()
    return {"margin": margin.mean(), "accuracy": (margin > 0).float().mean()}


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(values.dtype)
    return (values.detach() * mask).sum() / mask.sum().clamp_min(1)
