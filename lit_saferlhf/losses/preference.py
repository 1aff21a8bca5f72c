"""Offline preference losses (METHODS.md §1-§5): DPO, IPO, BFPO, SafeDPO, KTO, PeCAN, ADPO's masks, pair metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_saferlhf.losses.common import ordered


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

    ρ is whatever the caller reduced: summed log-ratios (OpenRLHF) or per-token means (TRL's ``ipo``);
    the target margin ``1/(2τ)`` is per sequence in the first case and per token in the second.

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


def adpo_token_mask(scores: Tensor, mask: Tensor, chosen: Tensor, baseline: float = 0.0) -> Tensor:
    """ADPO's token weights: chosen responses keep tokens scoring above ``b``, rejected ones tokens below.

    ``w[2i + k, t] = resp[2i + k, t] · (1[s > b] if k == chosen[i] else 1[s < b])`` (METHODS.md §2 (b-2)).

    Args:
        scores: Per-token scores ``s_t`` of both responses of each pair, pair i at rows 2i, 2i + 1, ``(2B, L)``.
        mask: True on response tokens, ``(2B, L)``.
        chosen: Index (0 or 1) of the preferred response of each pair, ``(B,)``.
        baseline: ``b``.

    Returns:
        Float weights ``(2B, L)`` in {0, 1}.
    """
    side = torch.arange(scores.shape[0], device=scores.device) % 2  # (2B,) k of each row
    is_chosen = (side == chosen.to(scores.device).long().repeat_interleave(2)).unsqueeze(-1)  # (2B, 1)
    keep = torch.where(is_chosen, scores > baseline, scores < baseline)
    return (keep & mask.bool()).to(torch.float32)
