"""Shared pieces of every objective: masked means, token log-probs, end scores, the LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def upcast(tensor: Tensor) -> Tensor:
    """Promote half-precision floats to float32; float32 and float64 pass through unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked entries of each row, then mean over the rows (safe-rlhf's convention).

    ``mean_b( sum_t m[b,t] x[b,t] / sum_t m[b,t] )``: every sequence weighs the same whatever its
    length, as in safe-rlhf's ``masked_mean``. A row whose mask is empty has no mean and is
    excluded from the mean over rows (it neither counts as zero nor produces NaN); if every row is
    empty the result is 0. Values at masked-out positions are never read, so ``inf``/``NaN`` there
    is harmless. With no empty rows, the mean of this function over two equal halves of a batch
    equals its value on the whole batch.

    Args:
        values: The values to average, ``(B, A)``; a 1-D tensor is treated as a single row.
            Leading dimensions beyond the first are averaged like rows.
        mask: True where a value counts, the same shape as ``values``.

    Returns:
        A scalar tensor in the dtype of ``values``.
    """
    keep = mask.bool()
    weights = keep.to(values.dtype)
    row_counts = weights.sum(-1)
    row_sums = torch.where(keep, values, torch.zeros_like(values)).sum(-1)
    row_means = row_sums / row_counts.clamp_min(1)
    nonempty = (row_counts > 0).to(values.dtype)
    return (row_means * nonempty).sum() / nonempty.sum().clamp_min(1)


def gather_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probabilities of the given tokens, ``log_softmax(logits)[b, t, tokens[b, t]]``, in float32.

    No shift is applied: ``logits[:, t]`` must already be the distribution of ``tokens[:, t]``
    (for a causal LM, pass ``logits[:, :-1]`` and ``input_ids[:, 1:]``). The full
    ``(B, L, V)`` log-softmax is never materialised: float32 logits use
    ``logit[token] - logsumexp(logits)``, and half-precision logits are upcast one row at a time,
    so at most one ``(L, V)`` float32 copy exists at once (as TRL's ``selective_log_softmax``).

    Args:
        logits: Unnormalised next-token scores, ``(B, L, V)``.
        tokens: Token ids whose log-probabilities to gather, ``(B, L)``, int64.

    Returns:
        Log-probabilities, ``(B, L)``, float32 (float64 if the logits are float64).
    """
    index = tokens.long().unsqueeze(-1)  # (B, L, 1)
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows = [
        torch.log_softmax(row.float(), dim=-1).gather(-1, row_index).squeeze(-1)
        for row, row_index in zip(logits, index, strict=True)
    ]
    return torch.stack(rows)


def end_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Score at the last position where ``mask`` is true in each row.

    This is the score model's sequence score (Dai et al., 2023, Sec. 3.2: the score of the last
    token). Right padding (``1 1 1 0 0``) and left padding (``0 0 1 1 1``) both work, since only the
    last true position matters. A row with an empty mask returns the score at position 0.

    Args:
        scores: Per-token scores, ``(B, L)`` (or ``(B, L, D)`` for ``D`` scores per token).
        mask: Attention mask, true on real tokens, ``(B, L)``.

    Returns:
        End scores, ``(B,)`` (or ``(B, D)``).
    """
    last = last_true_index(mask).clamp_min(0)  # (B,)
    return scores[torch.arange(scores.size(0), device=scores.device), last]


def last_true_index(mask: Tensor) -> Tensor:
    """Index of the last true entry of each row of a ``(B, L)`` mask; -1 for an empty row."""
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """Causal language-modelling cross-entropy, with the one-token shift done here.

    ``loss = -1/N * sum_{t: labels[t+1] != ignore} log p(labels[t+1] | logits[t])``: ``logits[:, :-1]``
    predict ``labels[:, 1:]`` and the mean runs over the ``N`` non-ignored target tokens of the whole
    batch (token-level mean, as Hugging Face's causal LM loss). A batch with no target token gives a
    loss of 0, not NaN.

    Args:
        logits: Next-token scores of the model, ``(B, L, V)``.
        labels: Target ids aligned with the inputs, ``(B, L)``; ``ignore_index`` marks positions that
            are not trained on (prompt and padding).
        ignore_index: Label value excluded from the loss and from the counts.

    Returns:
        The scalar loss, and the detached counts ``correct`` (arg-max predictions equal to the target)
        and ``tokens`` (targets counted), int64 scalars, so that token accuracy aggregates exactly over
        batches and ranks as ``sum(correct) / sum(tokens)``.
    """
    shift_logits = upcast(logits[:, :-1]).flatten(0, 1)  # (B*(L-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B*(L-1),)
    counted = shift_labels != ignore_index
    tokens = counted.sum()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    loss = loss / tokens.clamp_min(1)
    with torch.no_grad():
        correct = ((shift_logits.argmax(-1) == shift_labels) & counted).sum()
    return loss, {"correct": correct, "tokens": tokens.detach()}


def aggregate(values: Tensor, mask: Tensor, aggregation: str = "sequence_mean") -> Tensor:
    """Reduce per-token loss terms to a scalar: per-sequence mean (safe-rlhf) or token mean (GRPO).

    - ``sequence_mean``: :func:`masked_mean`, ``mean_b( Σ_t m x / Σ_t m )``: every sequence weighs the
      same whatever its length (safe-rlhf's ``masked_mean``, the DeepSeekMath GRPO objective).
    - ``token_mean``: ``Σ_{b,t} m x / Σ_{b,t} m``: every token weighs the same, so long responses
      weigh more (align-anything's GRPO, DAPO's token-level loss).

    Args:
        values: Per-token terms, ``(B, A)``.
        mask: True on the tokens that count, ``(B, A)``.
        aggregation: ``sequence_mean`` or ``token_mean``.

    Returns:
        A scalar tensor in the dtype of ``values``; 0 when the mask is empty.
    """
    if aggregation == "sequence_mean":
        return masked_mean(values, mask)
    if aggregation == "token_mean":
        keep = mask.bool()
        total = torch.where(keep, values, torch.zeros_like(values)).sum()
        return total / keep.sum().clamp_min(1).to(values.dtype)
    raise ValueError(f"aggregation must be 'sequence_mean' or 'token_mean', got {aggregation!r}")


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    logit_softcap: float | None = None,
    recompute: bool = True,
) -> Tensor:
    """Log-probabilities of ``tokens`` under the output layer, computed from hidden states a chunk at a time.

    ``log_softmax(h W^T + b)[token] = z[token] - logsumexp(z)`` with ``z = h W^T + b`` (optionally
    ``cap·tanh(z / cap)``, Gemma 2's soft cap), for at most ``chunk_size`` positions at once: only one
    chunk's ``(chunk_size, V)`` logits ever exist instead of ``(B, L, V)``. With gradients and
    ``recompute``, each chunk is checkpointed (its logits are recomputed in backward, one chunk at a
    time), so backward holds no logits either; without it, autograd keeps every chunk's logits (the
    memory of the full logits, one matmul less). Logits are taken in at least float32; equal to
    :func:`gather_logprobs` of the full logits up to rounding.

    Args:
        hidden: Last hidden states (after the final norm), ``(B, L, H)``.
        weight: Output-layer weight, ``(V, H)``.
        tokens: Token ids whose log-probabilities to take, ``(B, L)``; no shift is applied.
        bias: Output-layer bias, ``(V,)``, or None.
        chunk_size: Positions per chunk.
        logit_softcap: Soft cap of the logits (``final_logit_softcapping``), or None.
        recompute: Checkpoint each chunk when gradients are needed (backward keeps no logits).

    Returns:
        Log-probabilities, ``(B, L)``, float32 (float64 for float64 inputs).
    """
    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long()
    pieces = []
    for start in range(0, flat_tokens.shape[0], chunk_size):
        chunk = (flat_hidden[start : start + chunk_size], weight, bias, flat_tokens[start : start + chunk_size])
        if recompute and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_logprobs, *chunk, logit_softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*chunk, logit_softcap))
    return torch.cat(pieces).reshape(tokens.shape)


def _chunk_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, logit_softcap: float | None
) -> Tensor:
    """``log_softmax(logits)[token]`` for one chunk of positions, ``(C,)``."""
    logits = upcast(F.linear(hidden, weight, bias))  # (C, V)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def ordered(values: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
    """``(values[b, first[b]], values[b, 1 - first[b]])``: a ``(B, 2)`` tensor ordered by an index ``(B,)``."""
    first = first.long().unsqueeze(-1)
    return values.gather(-1, first).squeeze(-1), values.gather(-1, 1 - first).squeeze(-1)


def response_mask(responses: Tensor, eos_id: int) -> Tensor:
    """True on response tokens up to and including the first EOS (all of them if none), ``(N, A)``."""
    is_eos = responses == eos_id
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS tokens strictly before t
    return eos_before == 0
