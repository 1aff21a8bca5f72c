"""Critic-free advantages (GRPO's group z-score, RLOO's leave-one-out mean) from one score per sequence."""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_scores(stream: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's score: its stream summed over the response tokens, ``(N, A) -> (N,)``.

    With the KL in the loss the stream holds only the end score, so this is the reward (or cost)
    model's score; with the KL as a reward penalty it is ``R - β·Σ_t KL_t`` (``C + β·Σ_t KL_t``),
    the undiscounted return of the stream.
    """
    return torch.where(mask.bool(), stream, torch.zeros_like(stream)).sum(-1)


def _groups(scores: Tensor, group_size: int) -> Tensor:
    """``(N,) -> (N / G, G)``, with a clear error when ``N`` is not a multiple of ``G``."""
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(
            f"{scores.numel()} sequences do not split into groups of generation.num_return_sequences = {group_size}"
        )
    return scores.reshape(-1, group_size)


def group_normalized_advantages(scores: Tensor, group_size: int, eps: float = 1e-4, unbiased: bool = True) -> Tensor:
    """GRPO's advantage: each score z-scored within its group (Shao et al., 2024, DeepSeekMath Sec. 4.1.2).

    ``A_i = (s_i - mean_g(s)) / (std_g(s) + ε)`` over the ``G`` consecutive scores of group ``g``,
    with the sample std (``unbiased``, ``G - 1`` in the denominator, as ``torch.std``, TRL and
    align-anything's GRPO) or the population std (``G``). A group whose scores are all equal, and so
    any group of one (``G = 1``), gets advantage 0, never NaN, whatever ``ε``.

    Args:
        scores: Sequence scores, ``(N,)`` with ``N = groups * G``, the samples of a prompt consecutive.
        group_size: ``G``.
        eps: ``ε`` added to the std (align-anything and TRL: 1e-4).
        unbiased: Sample std (True) or population std (False).

    Returns:
        Advantages, ``(N,)``, in the dtype of ``scores`` (at least float32).
    """
    groups = _groups(scores.detach().to(torch.promote_types(scores.dtype, torch.float32)), group_size)
    if group_size == 1:
        return torch.zeros_like(groups).reshape(-1)
    centred = groups - groups.mean(-1, keepdim=True)
    std = groups.std(-1, correction=1 if unbiased else 0, keepdim=True)
    constant = groups.amax(-1, keepdim=True) == groups.amin(-1, keepdim=True)  # rounding must not give ±1
    advantages = torch.where(constant, torch.zeros_like(groups), centred / (std + eps))
    return advantages.reshape(-1)


def leave_one_out_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO's advantage: each score minus the mean of the other ``G - 1`` in its group (Kool et al., 2019).

    ``A_i = s_i - (Σ_j s_j - s_i) / (G - 1) = G / (G - 1) · (s_i - mean_g(s))`` (Ahmadian et al.,
    2024, Eq. 5). ``G = 1`` has no other sample and gets advantage 0; so does a group of equal scores.

    Args:
        scores: Sequence scores, ``(N,)`` with ``N = groups * G``, the samples of a prompt consecutive.
        group_size: ``G``.

    Returns:
        Advantages, ``(N,)``, in the dtype of ``scores`` (at least float32).
    """
    groups = _groups(scores.detach().to(torch.promote_types(scores.dtype, torch.float32)), group_size)
    if group_size == 1:
        return torch.zeros_like(groups).reshape(-1)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    constant = groups.amax(-1, keepdim=True) == groups.amin(-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(groups), groups - baseline).reshape(-1)


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence advantage on every response token of its sequence, zero on padding: ``(N,) -> (N, A)``."""
    return torch.where(mask.bool(), advantages.unsqueeze(-1), advantages.new_zeros(()))
