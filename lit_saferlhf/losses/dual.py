"""The dual of CAN (Huang et al., 2024; METHODS.md §5): λ* from scored reference samples."""

from __future__ import annotations

import torch
from torch import Tensor


def can_dual(
    multiplier: Tensor, rewards: Tensor, utilities: Tensor, beta: float, margin: Tensor | float = 0.0
) -> Tensor:
    """CAN's empirical dual ``D̂(λ)`` (Huang et al., NeurIPS 2024; METHODS.md §4(b)).

    ``D̂(λ) = (β/n) Σ_i log((1/G) Σ_j exp((r_ij + ⟨λ, ḡ_ij⟩)/β)) − ⟨λ, b⟩``, with ``ḡ_ij = g_ij − mean_j g_ij``
    (the constraints are improvements over the reference), computed with logsumexp so that β = 0.1
    does not overflow. Convex in λ; its gradient is ``E_{π_λ}[ḡ] − b``. Example: r = (0, 1), g = (1, −1),
    β = 1, b = 0: D̂(0) = D̂(1) = 0.620115, minimum D̂(0.5) = 0.5.

    Args:
        multiplier: λ ≥ 0, ``(m,)``.
        rewards: r_ij of G reference samples for each of n prompts, ``(n, G)``.
        utilities: Safety utilities g_ij = −c_ij, ``(n, G, m)``.
        beta: β, the KL weight of the alignment that follows.
        margin: b, the required improvement of E[g] over the reference's, ``(m,)`` or a float.

    Returns:
        D̂(λ), a scalar (differentiable in λ).
    """
    centred = utilities - utilities.mean(dim=1, keepdim=True)  # (n, G, m)
    logits = (rewards + centred @ multiplier) / beta  # (n, G)
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
        rewards: r_ij of G reference samples for each of n prompts, ``(n, G)``.
        utilities: Safety utilities g_ij = −c_ij, ``(n, G, m)``.
        beta: β, the KL weight of the alignment that follows (as in ``can_dual``).
        margin: b, the required improvement of E[g] over the reference's (as in ``can_dual``).
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
