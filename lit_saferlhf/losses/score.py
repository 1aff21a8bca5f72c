"""Score-model losses of Safe RLHF (Dai et al., 2023, Sec. 3.2, Eq. 5 and 6): reward and cost models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_saferlhf.losses.common import end_scores, last_true_index, masked_mean, upcast


def reward_loss(better_end: Tensor, worse_end: Tensor, regularization: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise (Bradley-Terry) loss of the reward model (Dai et al., 2023, Eq. 5).

    ``loss = mean_i[-log σ(r_better_i - r_worse_i)] + reg * mean(concat(r_better, r_worse)^2)``.
    The regulariser is the mean of squares over the ``2B`` scores of both responses, i.e.
    ``reg * (mean(r_better^2) + mean(r_worse^2)) / 2``, as safe-rlhf's
    ``torch.stack([lower, higher]).square().mean()``; it keeps the scores near 0.

    Args:
        better_end: End scores of the preferred responses, ``(B,)``.
        worse_end: End scores of the other responses, ``(B,)``.
        regularization: Weight ``reg`` of the score-magnitude penalty.

    Returns:
        The scalar loss, and detached ``accuracy`` (fraction of pairs with ``r_better > r_worse``) and
        ``margin`` (mean of ``r_better - r_worse``).
    """
    better, worse = upcast(better_end), upcast(worse_end)
    loss = -F.logsigmoid(better - worse).mean()
    if regularization > 0.0:
        loss = loss + regularization * torch.stack([better, worse]).square().mean()
    with torch.no_grad():
        stats = {"accuracy": (better > worse).float().mean(), "margin": (better - worse).mean()}
    return loss, stats


def tokenwise_reward_loss(
    better_scores: Tensor,
    worse_scores: Tensor,
    better_ids: Tensor,
    worse_ids: Tensor,
    better_mask: Tensor,
    worse_mask: Tensor,
    regularization: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-wise variant of the reward loss (safe-rlhf ``--loss_type token-wise``).

    For pair ``i`` the loss is averaged over the tokens ``t`` from the divergence point ``d_i`` (the
    first position where the two sequences differ, in ids or in mask) to ``e_i``, the later of the two
    last non-padding positions::

        loss_i = mean_{d_i <= t <= e_i} [-log σ(s_better[i,t] - s_worse[i,t])
                                         + reg * (s_better[i,t]^2 + s_worse[i,t]^2) / 2]
        loss = mean_i loss_i

    The regulariser is the mean of squares over the same token range (safe-rlhf regularises the
    truncated token scores, not only the end scores). Sequences are right-padded; a pair of unequal
    lengths is padded to the longer one. Past the shorter sequence's end its scores at padding are
    used, as in the reference. Checking for identical pairs costs one host sync.

    Args:
        better_scores: Per-token scores of the preferred sequences, ``(B, L)``.
        worse_scores: Per-token scores of the other sequences, ``(B, L')``.
        better_ids: Token ids of the preferred sequences, ``(B, L)``.
        worse_ids: Token ids of the other sequences, ``(B, L')``.
        better_mask: Attention mask of the preferred sequences, ``(B, L)``.
        worse_mask: Attention mask of the other sequences, ``(B, L')``.
        regularization: Weight ``reg`` of the score-magnitude penalty.

    Returns:
        The scalar loss, and detached ``accuracy`` and ``margin`` computed on the end scores, as in
        :func:`reward_loss`.

    Raises:
        ValueError: If a pair's two sequences are identical.
    """
    better, worse, window = _divergence_window(
        better_scores, worse_scores, better_ids, worse_ids, better_mask, worse_mask
    )
    per_token = -F.logsigmoid(better - worse)  # (B, L)
    if regularization > 0.0:
        per_token = per_token + regularization * 0.5 * (better.square() + worse.square())
    loss = masked_mean(per_token, window)
    with torch.no_grad():
        better_end = upcast(end_scores(better_scores, better_mask))
        worse_end = upcast(end_scores(worse_scores, worse_mask))
        stats = {"accuracy": (better_end > worse_end).float().mean(), "margin": (better_end - worse_end).mean()}
    return loss, stats


def cost_loss(
    safer_end: Tensor,
    unsafer_end: Tensor,
    safer_is_safe: Tensor,
    unsafer_is_safe: Tensor,
    regularization: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of the cost model: pairwise ranking plus the safety-sign terms (Dai et al., 2023, Eq. 6).

    With the sign ``s = +1`` for an unsafe response and ``s = -1`` for a safe one::

        loss = mean_i[-log σ(c_unsafer - c_safer) - log σ(s_safer c_safer) - log σ(s_unsafer c_unsafer)]
               + reg * mean(concat(c_safer, c_unsafer)^2)

    The sign terms pin the cost's zero to the safety boundary: safe responses are pushed to a
    negative cost and unsafe ones to a positive cost, which is what makes the constraint
    ``E[C] <= 0`` meaningful. The regulariser is as in :func:`reward_loss`.

    Args:
        safer_end: End costs of the safer responses, ``(B,)``.
        unsafer_end: End costs of the less safe responses, ``(B,)``.
        safer_is_safe: Whether each safer response is labelled safe, ``(B,)`` bool.
        unsafer_is_safe: Whether each less safe response is labelled safe, ``(B,)`` bool.
        regularization: Weight ``reg`` of the score-magnitude penalty.

    Returns:
        The scalar loss, and detached ``accuracy`` (fraction of pairs with ``c_unsafer > c_safer``) and
        ``sign_accuracy`` (fraction of the ``2B`` responses with ``s * c > 0``, i.e. cost > 0 exactly
        for the unsafe ones).
    """
    safer, unsafer = upcast(safer_end), upcast(unsafer_end)
    safer_sign, unsafer_sign = _cost_sign(safer_is_safe, safer), _cost_sign(unsafer_is_safe, unsafer)
    loss = (
        -F.logsigmoid(unsafer - safer) - F.logsigmoid(safer_sign * safer) - F.logsigmoid(unsafer_sign * unsafer)
    ).mean()
    if regularization > 0.0:
        loss = loss + regularization * torch.stack([safer, unsafer]).square().mean()
    with torch.no_grad():
        stats = {
            "accuracy": (unsafer > safer).float().mean(),
            "sign_accuracy": torch.stack([safer_sign * safer > 0, unsafer_sign * unsafer > 0]).float().mean(),
        }
    return loss, stats


def tokenwise_cost_loss(
    safer_scores: Tensor,
    unsafer_scores: Tensor,
    safer_ids: Tensor,
    unsafer_ids: Tensor,
    safer_mask: Tensor,
    unsafer_mask: Tensor,
    safer_is_safe: Tensor,
    unsafer_is_safe: Tensor,
    regularization: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-wise variant of the cost loss (safe-rlhf ``--loss_type token-wise``).

    The three terms of :func:`cost_loss` and the regulariser are each averaged over the tokens from
    the divergence point ``d_i`` to the later end ``e_i`` of pair ``i`` (see
    :func:`tokenwise_reward_loss`), with the response's sign applied at every token::

        loss_i = mean_{d_i <= t <= e_i} [-log σ(c_u[i,t] - c_s[i,t]) - log σ(s_s[i] c_s[i,t])
                                         - log σ(s_u[i] c_u[i,t]) + reg * (c_s[i,t]^2 + c_u[i,t]^2) / 2]
        loss = mean_i loss_i

    Args:
        safer_scores: Per-token costs of the safer sequences, ``(B, L)``.
        unsafer_scores: Per-token costs of the less safe sequences, ``(B, L')``.
        safer_ids: Token ids of the safer sequences, ``(B, L)``.
        unsafer_ids: Token ids of the less safe sequences, ``(B, L')``.
        safer_mask: Attention mask of the safer sequences, ``(B, L)``.
        unsafer_mask: Attention mask of the less safe sequences, ``(B, L')``.
        safer_is_safe: Whether each safer response is labelled safe, ``(B,)`` bool.
        unsafer_is_safe: Whether each less safe response is labelled safe, ``(B,)`` bool.
        regularization: Weight ``reg`` of the score-magnitude penalty.

    Returns:
        The scalar loss, and detached ``accuracy`` and ``sign_accuracy`` computed on the end costs, as
        in :func:`cost_loss`.

    Raises:
        ValueError: If a pair's two sequences are identical.
    """
    safer, unsafer, window = _divergence_window(
        safer_scores, unsafer_scores, safer_ids, unsafer_ids, safer_mask, unsafer_mask
    )
    safer_sign = _cost_sign(safer_is_safe, safer).unsqueeze(-1)  # (B, 1)
    unsafer_sign = _cost_sign(unsafer_is_safe, unsafer).unsqueeze(-1)  # (B, 1)
    per_token = (
        -F.logsigmoid(unsafer - safer) - F.logsigmoid(safer_sign * safer) - F.logsigmoid(unsafer_sign * unsafer)
    )  # (B, L)
    if regularization > 0.0:
        per_token = per_token + regularization * 0.5 * (safer.square() + unsafer.square())
    loss = masked_mean(per_token, window)
    with torch.no_grad():
        _, stats = cost_loss(
            end_scores(safer_scores, safer_mask),
            end_scores(unsafer_scores, unsafer_mask),
            safer_is_safe,
            unsafer_is_safe,
        )
    return loss, stats


def _cost_sign(is_safe: Tensor, like: Tensor) -> Tensor:
    """The sign ``s`` of the cost loss: -1 for a safe response, +1 for an unsafe one, ``(B,)``."""
    is_safe = is_safe.to(device=like.device, dtype=torch.bool)
    return torch.where(is_safe, -1.0, 1.0).to(like.dtype)


def _divergence_window(
    first_scores: Tensor,
    second_scores: Tensor,
    first_ids: Tensor,
    second_ids: Tensor,
    first_mask: Tensor,
    second_mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a pair batch to one length and mark the tokens from the divergence point to the later end.

    Returns the two upcast score tensors ``(B, L)`` and the window ``(B, L)``, true on
    ``d_i <= t <= e_i``. Raises ``ValueError`` if a pair is identical up to its end.
    """
    length = max(first_ids.size(-1), second_ids.size(-1))

    def pad(tensor: Tensor) -> Tensor:
        return F.pad(tensor, (0, length - tensor.size(-1)))

    first_mask, second_mask = pad(first_mask.bool()), pad(second_mask.bool())
    end = torch.maximum(last_true_index(first_mask), last_true_index(second_mask))  # (B,)
    positions = torch.arange(length, device=end.device).expand(end.size(0), length)  # (B, L)
    before_end = positions <= end.unsqueeze(-1)
    differs = ((pad(first_ids) != pad(second_ids)) | (first_mask != second_mask)) & before_end
    has_divergence = differs.any(-1)
    if not bool(has_divergence.all()):
        rows = torch.nonzero(~has_divergence).flatten().tolist()
        raise ValueError(f"The two sequences of pair(s) {rows} are identical; a preference needs two different texts.")
    diverge = differs.int().argmax(-1)  # (B,) first differing position
    window = (positions >= diverge.unsqueeze(-1)) & before_end
    return upcast(pad(first_scores)), upcast(pad(second_scores)), window


def log_odds(logprobs: Tensor) -> Tensor:
    """The log-odds ``log p - log(1 - p)`` of probabilities given as ``log p``, e.g. a guard's p("unsafe").

    A guard model's probability of its "unsafe" answer lies in [0, 1]; its log-odds spread the
    confident ends (p = 0.99 and p = 0.9999 give 4.6 and 9.2) and make 0.5 the zero. ``log(1 - p)``
    is ``log(-expm1(log p))``, exact for small p; ``log p`` is capped at ``log(1 - eps)`` of its dtype,
    so a guard certain in that precision gives a large finite number (about 16 in float32, 36 in
    float64), never an infinity.

    Args:
        logprobs: ``log p``, any shape, ``<= 0``.

    Returns:
        The log-odds, same shape and dtype.
    """
    bound = torch.tensor(-torch.finfo(logprobs.dtype).eps, dtype=torch.float64).log1p().item()  # log(1 - eps)
    capped = logprobs.clamp(max=bound)
    return capped - torch.log(-torch.expm1(capped))
