"""Pure objectives of Safe RLHF: masking, score-model losses, KL shaping, GAE and PPO-Lagrangian.

Every function takes tensors and returns tensors; losses return ``(loss, stats)`` where the stats are
detached tensors, never ``.item()``-ed (that would force a device sync). Nothing here holds state
and nothing imports more than torch. Losses are computed in at least float32 whatever the input
dtype, so bf16 scores and logits do not lose the small differences the objectives depend on.

The maths follows Safe RLHF (Dai et al., 2023, arXiv 2310.12773) and its reference implementation
(PKU-Alignment/safe-rlhf): the score-model losses of Sec. 3.2 (Eq. 5 and 6), the KL-shaped reward
and cost streams, GAE, and the clipped surrogate on the Lagrangian advantage of Sec. 3.3.

Shape glossary:
    B: batch size (sequences, or preference pairs for the score-model losses).
    L: sequence length (prompt and response together, padded).
    P: prompt tokens.
    A: response (action) tokens; rollout tensors are ``(B, A)``, right-padded after EOS.
    V: vocabulary size.

Masks are boolean (or 0/1) tensors that are true on the tokens that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "aggregate",
    "chunked_token_logprobs",
    "cost_loss",
    "end_scores",
    "gae",
    "gather_logprobs",
    "k3_kl_loss",
    "kl_shaped_rewards",
    "kl_to_reference",
    "lagrangian_policy_loss",
    "lm_loss",
    "masked_mean",
    "reward_loss",
    "shaped_cost_stream",
    "shaped_reward_stream",
    "tokenwise_cost_loss",
    "tokenwise_reward_loss",
    "value_loss",
]


def _upcast(tensor: Tensor) -> Tensor:
    """Promote half-precision floats to float32; float32 and float64 pass through unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


# --------------------------------------------------------------------------------------------
# Masking and gathering
# --------------------------------------------------------------------------------------------


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
    last = _last_true_index(mask).clamp_min(0)  # (B,)
    return scores[torch.arange(scores.size(0), device=scores.device), last]


def _last_true_index(mask: Tensor) -> Tensor:
    """Index of the last true entry of each row of a ``(B, L)`` mask; -1 for an empty row."""
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)


# --------------------------------------------------------------------------------------------
# Stage 1: supervised fine-tuning
# --------------------------------------------------------------------------------------------


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
    shift_logits = _upcast(logits[:, :-1]).flatten(0, 1)  # (B*(L-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B*(L-1),)
    counted = shift_labels != ignore_index
    tokens = counted.sum()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    loss = loss / tokens.clamp_min(1)
    with torch.no_grad():
        correct = ((shift_logits.argmax(-1) == shift_labels) & counted).sum()
    return loss, {"correct": correct, "tokens": tokens.detach()}


# --------------------------------------------------------------------------------------------
# Stages 2 and 3: reward and cost models
# --------------------------------------------------------------------------------------------


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
    better, worse = _upcast(better_end), _upcast(worse_end)
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
        better_end = _upcast(end_scores(better_scores, better_mask))
        worse_end = _upcast(end_scores(worse_scores, worse_mask))
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
    safer, unsafer = _upcast(safer_end), _upcast(unsafer_end)
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
    end = torch.maximum(_last_true_index(first_mask), _last_true_index(second_mask))  # (B,)
    positions = torch.arange(length, device=end.device).expand(end.size(0), length)  # (B, L)
    before_end = positions <= end.unsqueeze(-1)
    differs = ((pad(first_ids) != pad(second_ids)) | (first_mask != second_mask)) & before_end
    has_divergence = differs.any(-1)
    if not bool(has_divergence.all()):
        rows = torch.nonzero(~has_divergence).flatten().tolist()
        raise ValueError(f"The two sequences of pair(s) {rows} are identical; a preference needs two different texts.")
    diverge = differs.int().argmax(-1)  # (B,) first differing position
    window = (positions >= diverge.unsqueeze(-1)) & before_end
    return _upcast(pad(first_scores)), _upcast(pad(second_scores)), window


# --------------------------------------------------------------------------------------------
# Stage 4: PPO-Lagrangian
# --------------------------------------------------------------------------------------------


def kl_shaped_rewards(
    end_scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coeff: float = 0.01,
    score_clip: float = 50.0,
    kl_sign: float = -1.0,
) -> Tensor:
    """Per-token stream of a sequence score shaped by the KL to the reference policy.

    ``stream[b, t] = clip(kl_sign * β * (log π(a_t) - log π_ref(a_t)) + 1[t = T_b] * score_b, ±clip)``
    on response tokens and 0 on padding, where ``T_b`` is the last true position of ``mask[b]``
    (the EOS, or the last token of a response that hit the length limit). As in safe-rlhf, the
    clip applies to the whole stream after the score is added. The reward stream uses
    ``kl_sign = -1`` (the KL is a penalty on the reward) and the cost stream ``kl_sign = +1`` (the
    KL adds to the cost); see :func:`shaped_reward_stream` and :func:`shaped_cost_stream`.

    Args:
        end_scores: Sequence scores from the reward or cost model, ``(B,)``.
        logprobs: Log-probabilities of the sampled response tokens under the actor, ``(B, A)``.
        ref_logprobs: The same under the frozen reference policy, ``(B, A)``.
        mask: True on response tokens that exist, ``(B, A)``, right-padded after EOS.
        kl_coeff: The KL coefficient β (0.01 in Safe RLHF).
        score_clip: Half-width of the clip on the shaped stream (50 in Safe RLHF).
        kl_sign: -1 for the reward stream, +1 for the cost stream.

    Returns:
        The shaped stream, ``(B, A)``, detached.
    """
    keep = mask.bool()
    kl = (_upcast(logprobs) - _upcast(ref_logprobs)).detach()  # (B, A)
    positions = torch.arange(keep.size(-1), device=keep.device).expand_as(keep)
    is_end = (positions == _last_true_index(keep).unsqueeze(-1)) & keep  # (B, A)
    stream = kl_sign * kl_coeff * kl + is_end * _upcast(end_scores).detach().unsqueeze(-1).to(kl.dtype)
    stream = stream.clamp(-score_clip, score_clip)
    return torch.where(keep, stream, torch.zeros_like(stream))


def shaped_reward_stream(
    reward_end: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coeff: float = 0.01,
    score_clip: float = 50.0,
) -> Tensor:
    """Reward stream of Safe RLHF: ``-β KL_t`` per token, plus ``R`` at the last response token.

    :func:`kl_shaped_rewards` with ``kl_sign = -1``; shapes as there, result ``(B, A)``.

    Args:
        reward_end: Reward-model end scores ``R``, ``(B,)``.
        logprobs: Actor log-probabilities of the response tokens, ``(B, A)``.
        ref_logprobs: Reference log-probabilities of the response tokens, ``(B, A)``.
        mask: True on response tokens that exist, ``(B, A)``.
        kl_coeff: The KL coefficient β.
        score_clip: Half-width of the clip on the stream.

    Returns:
        The shaped reward stream, ``(B, A)``.
    """
    return kl_shaped_rewards(reward_end, logprobs, ref_logprobs, mask, kl_coeff, score_clip, kl_sign=-1.0)


def shaped_cost_stream(
    cost_end: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coeff: float = 0.01,
    score_clip: float = 50.0,
) -> Tensor:
    """Cost stream of Safe RLHF: ``+β KL_t`` per token, plus ``C`` at the last response token.

    :func:`kl_shaped_rewards` with ``kl_sign = +1``: since the cost is minimised, drifting from the
    reference policy adds to it. Shapes as there, result ``(B, A)``.

    Args:
        cost_end: Cost-model end scores ``C``, ``(B,)``.
        logprobs: Actor log-probabilities of the response tokens, ``(B, A)``.
        ref_logprobs: Reference log-probabilities of the response tokens, ``(B, A)``.
        mask: True on response tokens that exist, ``(B, A)``.
        kl_coeff: The KL coefficient β.
        score_clip: Half-width of the clip on the stream.

    Returns:
        The shaped cost stream, ``(B, A)``.
    """
    return kl_shaped_rewards(cost_end, logprobs, ref_logprobs, mask, kl_coeff, score_clip, kl_sign=1.0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens (Schulman et al., 2016, Eq. 16).

    Backwards over ``t`` (one Python step per response token, vectorised over the batch)::

        δ_t = r_t + γ V_{t+1} m_{t+1} - V_t
        Â_t = δ_t + γ λ Â_{t+1} m_{t+1}
        R_t = Â_t + V_t

    with ``V`` and ``Â`` taken as 0 past the last valid token. Safe RLHF runs it once per critic
    (reward and cost) with ``γ = 1``, ``λ = 0.95``. With ``λ = 1`` the advantage is the reward-to-go
    minus the value; with ``λ = 0`` it is the one-step TD error. Inputs are detached: the outputs are
    targets, not part of the graph.

    Args:
        rewards: Per-token rewards or costs (a shaped stream), ``(B, A)``.
        values: Critic values of the response tokens, ``(B, A)``.
        mask: True on response tokens that exist, ``(B, A)``.
        gamma: Discount factor γ.
        lam: GAE parameter λ (``lam``, since ``lambda`` is a keyword and λ names the multiplier).

    Returns:
        ``(advantages, returns)``, each ``(B, A)``, zero at masked positions.
    """
    keep = mask.to(values.dtype)
    values = values.detach() * keep
    rewards = rewards.detach().to(values.dtype) * keep
    next_values = torch.zeros_like(values[:, 0])  # V_{t+1} m_{t+1}
    next_advantages = torch.zeros_like(values[:, 0])  # Â_{t+1} m_{t+1}
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(-1))):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        next_advantages = (delta + gamma * lam * next_advantages) * keep[:, t]
        next_values = values[:, t]
        advantages[:, t] = next_advantages
    return advantages, (advantages + values) * keep


def lagrangian_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Tensor,
    mask: Tensor,
    multiplier: Tensor | float,
    clip_eps: float = 0.2,
    normalize: bool = True,
    aggregation: str = "sequence_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate on the Lagrangian advantage used by Safe RLHF.

    Reward and cost advantages are merged as ``A = (A_r - λ·A_c) / (1 + λ)`` (``A_r - λ·A_c`` when
    ``normalize`` is false); dividing by ``1 + λ`` keeps the step size bounded as λ grows (Dai et al.,
    2023, Eq. 31). The merged advantage then goes through PPO's clipped objective (Schulman et al.,
    2017, Eq. 7) with ``ρ = exp(logprobs - old_logprobs)``::

        loss = -masked_mean(min(ρ A, clip(ρ, 1 - ε, 1 + ε) A), mask)

    where :func:`masked_mean` averages each sequence and then the batch (``aggregation =
    "token_mean"`` averages over all tokens instead, see :func:`aggregate`). λ = 0 is plain PPO.

    Args:
        logprobs: Log-probabilities of the response tokens under the current policy, ``(B, A)``.
        old_logprobs: The same tokens under the policy that sampled them, ``(B, A)``.
        reward_advantages: GAE advantages of the reward, ``(B, A)``.
        cost_advantages: GAE advantages of the cost, ``(B, A)``.
        mask: True on response tokens that count towards the loss, ``(B, A)``.
        multiplier: The Lagrange multiplier λ >= 0, a scalar. Treated as a constant.
        clip_eps: Half-width ε of the trust region on the probability ratio.
        normalize: Divide the merged advantage by ``1 + λ``.
        aggregation: ``sequence_mean`` (safe-rlhf) or ``token_mean`` (GRPO as in align-anything).

    Returns:
        The scalar loss to minimise, and detached ``policy/clip_fraction`` (share of tokens with
        ``|ρ - 1| > ε``), ``policy/approx_kl`` (masked mean of ``(logprobs - old_logprobs)^2 / 2``) and
        ``policy/ratio`` (masked mean of ρ).
    """
    multiplier = torch.as_tensor(multiplier, dtype=reward_advantages.dtype, device=reward_advantages.device).detach()
    advantages = (reward_advantages - multiplier * cost_advantages).detach()
    if normalize:
        advantages = advantages / (1 + multiplier)
    log_ratio = _upcast(logprobs) - _upcast(old_logprobs).detach()
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -aggregate(surrogate, mask, aggregation)
    with torch.no_grad():
        stats = {
            "policy/clip_fraction": masked_mean(((ratio - 1).abs() > clip_eps).to(ratio.dtype), mask),
            "policy/approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "policy/ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float = 5.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of a critic (reward or cost), as in safe-rlhf's ``critic_loss_fn``.

    ``V_clip = V_old + clip(V - V_old, -c, c)`` and
    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2), mask)``, averaging each sequence and
    then the batch.

    Args:
        values: Values of the current critic, ``(B, A)``.
        old_values: Values of the critic at rollout time, ``(B, A)``.
        returns: GAE returns (targets), ``(B, A)``.
        mask: True on response tokens that count towards the loss, ``(B, A)``.
        clip_range: Half-width ``c`` of the clip on the value change (5 in Safe RLHF).

    Returns:
        The scalar loss, and detached ``clip_fraction`` (share of tokens with ``|V - V_old| > c``) and
        ``value`` (masked mean of ``V``). The keys carry no prefix: the stage names the critic.
    """
    values = _upcast(values)
    old_values, returns = _upcast(old_values).detach(), _upcast(returns).detach()
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss = 0.5 * masked_mean(torch.maximum((values - returns).square(), (clipped - returns).square()), mask)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(((values - old_values).abs() > clip_range).to(values.dtype), mask),
            "value": masked_mean(values, mask),
        }
    return loss, stats


@torch.no_grad()
def kl_to_reference(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence-level KL estimate to the reference policy, for logging.

    ``mean_b sum_t m[b,t] (log π(a_t) - log π_ref(a_t))``: the sampled-token estimate of
    ``KL(π || π_ref)`` summed over each response, then averaged over the batch.

    Args:
        logprobs: Actor log-probabilities of the response tokens, ``(B, A)``.
        ref_logprobs: Reference log-probabilities of the same tokens, ``(B, A)``.
        mask: True on response tokens that exist, ``(B, A)``.

    Returns:
        A detached scalar.
    """
    kl = _upcast(logprobs) - _upcast(ref_logprobs)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# Critic-free (GRPO-style) options: loss aggregation and the k3 KL term
# --------------------------------------------------------------------------------------------


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


def k3_kl_loss(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, aggregation: str = "sequence_mean"
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference policy as a loss term, with Schulman's k3 estimator (GRPO's form).

    Per token, with ``δ_t = log π_ref(a_t) - log π_θ(a_t)``::

        k3_t = exp(δ_t) - δ_t - 1 >= 0

    an unbiased, always non-negative estimate of ``KL(π_θ || π_ref)`` for tokens sampled from π_θ
    (Schulman, "Approximating KL divergence", 2020; DeepSeekMath Eq. 4), reduced by
    :func:`aggregate`. The stage adds ``β·loss`` to the actor loss instead of shaping the rewards.
    Gradients flow through ``logprobs``; the reference is a constant.

    Args:
        logprobs: Log-probabilities of the response tokens under the current policy, ``(B, A)``.
        ref_logprobs: The same under the frozen reference policy, ``(B, A)``.
        mask: True on response tokens that count, ``(B, A)``.
        aggregation: ``sequence_mean`` or ``token_mean`` (see :func:`aggregate`).

    Returns:
        The scalar loss (without β), and a detached ``policy/k3_kl`` (the same value).
    """
    delta = _upcast(ref_logprobs).detach() - _upcast(logprobs)
    k3 = torch.exp(delta) - delta - 1
    loss = aggregate(k3, mask, aggregation)
    return loss, {"policy/k3_kl": loss.detach()}


# --------------------------------------------------------------------------------------------
# Log-probabilities from hidden states, without the full-vocabulary logits
# --------------------------------------------------------------------------------------------


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
    logits = _upcast(F.linear(hidden, weight, bias))  # (C, V)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# --------------------------------------------------------------------------------------------
# AMA (Equilibrate RLHF): token masks of ADPO and APPO (lit_saferlhf.ama has the decisions)
# --------------------------------------------------------------------------------------------


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


def appo_token_mask(values: Tensor, advantages: Tensor, mask: Tensor, baseline: float = 0.0) -> Tensor:
    """APPO's mask: tokens whose critic value agrees in sign (against ``b``) with their advantage.

    ``M_t = resp_t · (1[V_t > b] if A_t ≥ 0 else 1[V_t < b])`` (``appo_trainer.py`` L363-379, as meant).

    Args:
        values: Critic values ``V_t`` of the response tokens, ``(B, A)``.
        advantages: Per-token advantages ``A_t``, ``(B, A)``.
        mask: True on response tokens, ``(B, A)``.
        baseline: ``b``.

    Returns:
        A bool mask ``(B, A)``.
    """
    agrees = torch.where(advantages >= 0, values > baseline, values < baseline)
    return agrees & mask.bool()


def appo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Tensor,
    reward_values: Tensor,
    cost_values: Tensor,
    mask: Tensor,
    multiplier: Tensor | float,
    clip_eps: float = 0.2,
    normalize: bool = True,
    baseline: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """APPO: :func:`lagrangian_policy_loss` on the tokens of :func:`appo_token_mask`, averaged over all B sequences.

    With ``V = V_r − λ·V_c`` and ``A = A_r − λ·A_c`` (the Lagrangian value and advantage; the
    ``1/(1+λ)`` normalisation changes no sign) and ``M = appo_token_mask(V, A, mask, b)``::

        loss = −(1/B) Σ_i [ Σ_t M_it · min(r_it A_it, clip(r_it, 1−ε, 1+ε) A_it) / Σ_t M_it ]

    (``appo_trainer.py`` L363-379 with OpenRLHF's per-sequence masked mean; METHODS.md §2 (b-2)). A
    sequence with no kept token contributes 0 and still counts in ``1/B``.

    Args:
        logprobs, old_logprobs, reward_advantages, cost_advantages, mask, multiplier, clip_eps,
            normalize: As in :func:`lagrangian_policy_loss`, ``(B, A)`` each.
        reward_values: Reward-critic values at rollout time, ``(B, A)`` (zeros when the run has none).
        cost_values: Cost-critic values at rollout time, ``(B, A)`` (zeros when the run has none).
        baseline: ``b`` of the mask.

    Returns:
        The scalar loss, :func:`lagrangian_policy_loss`'s stats on the kept tokens, and
        ``policy/ama_kept_fraction`` (kept share of the response tokens) and
        ``policy/ama_empty_fraction`` (share of sequences with no kept token).
    """
    multiplier = torch.as_tensor(multiplier, dtype=reward_advantages.dtype, device=reward_advantages.device).detach()
    values = (reward_values - multiplier * cost_values).detach()
    advantages = (reward_advantages - multiplier * cost_advantages).detach()
    kept = appo_token_mask(values, advantages, mask, baseline)  # (B, A)
    loss, stats = lagrangian_policy_loss(
        logprobs, old_logprobs, reward_advantages, cost_advantages, kept, multiplier, clip_eps, normalize
    )
    nonempty = kept.any(-1)  # masked_mean averaged over the non-empty rows only: rescale to all B rows
    loss = loss * nonempty.sum() / max(kept.shape[0], 1)
    with torch.no_grad():
        stats["policy/ama_kept_fraction"] = kept.sum() / mask.bool().sum().clamp_min(1)
        stats["policy/ama_empty_fraction"] = 1 - nonempty.to(torch.float32).mean()
    return loss, stats
