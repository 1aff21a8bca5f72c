"""PPO-Lagrangian (Safe RLHF, Sec. 3.3): KL-shaped streams, GAE, the clipped Lagrangian surrogate, critics, APPO."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_saferlhf.losses.common import aggregate, last_true_index, masked_mean, upcast


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
    kl = (upcast(logprobs) - upcast(ref_logprobs)).detach()  # (B, A)
    positions = torch.arange(keep.size(-1), device=keep.device).expand_as(keep)
    is_end = (positions == last_true_index(keep).unsqueeze(-1)) & keep  # (B, A)
    stream = kl_sign * kl_coeff * kl + is_end * upcast(end_scores).detach().unsqueeze(-1).to(kl.dtype)
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


def lagrangian_advantage(
    reward_advantages: Tensor, cost_advantages: Tensor, multiplier: Tensor | float, normalize: bool = True
) -> Tensor:
    """Safe RLHF's Lagrangian advantage ``A = (A_r - λ·A_c) / (1 + λ)`` (Dai et al., 2023, Eq. 31).

    Dividing by ``1 + λ`` keeps the step size bounded as λ grows; with ``normalize`` false the
    advantage is ``A_r - λ·A_c`` (reward shaping's, where ``A_c`` is 0 and ``A_r`` is already the
    advantage of ``R - λ·C``). λ = 0 gives ``A_r``.

    Args:
        reward_advantages: Advantages of the reward stream, ``(B, A)``.
        cost_advantages: Advantages of the cost stream, ``(B, A)`` (zeros when the run has none).
        multiplier: The Lagrange multiplier λ >= 0, a scalar. Treated as a constant.
        normalize: Divide by ``1 + λ``.

    Returns:
        The merged advantage, ``(B, A)``, detached, in ``reward_advantages``' dtype.
    """
    multiplier = torch.as_tensor(multiplier, dtype=reward_advantages.dtype, device=reward_advantages.device).detach()
    advantages = (reward_advantages - multiplier * cost_advantages).detach()
    if normalize:
        advantages = advantages / (1 + multiplier)
    return advantages


def constrained_advantage(
    reward_advantages: Tensor,
    cost_advantages: Tensor,
    multipliers: Tensor,
    weights: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """The Lagrangian advantage of several constraints, ``A = (A_r - Σ_k λ_k w_k A_ck) / (1 + Σ_k λ_k w_k)``.

    METHODS.md §6.2: Safe RLHF's ``(A_r - λ·A_c) / (1 + λ)`` (Dai et al., 2023, Eq. 31) with one
    multiplier per constraint. Example: ``A_r = 1``, ``A_c = (0.5, -1)``, ``λ = (1, 3)`` gives
    ``(1 - 0.5 + 3) / 5 = 0.7``. With one constraint and no weights it is
    :func:`lagrangian_advantage`, bit for bit. The weight ``w_k`` of a response is 1 where
    constraint ``k`` applies to it and 0 where it does not: a constraint bounded on one prompt
    category weighs only that category's responses; a response that no constraint weighs trains on
    ``A_r`` alone. With ``normalize`` false the divisor is dropped: Constrained GRPO's
    ``A_r - Σ_k λ_k A_ck`` (Girgis et al., 2026), where each stream was normalised on its own first.

    Args:
        reward_advantages: Advantages of the reward stream, ``(N, A)``.
        cost_advantages: Advantages of each constraint's cost stream, ``(N, K, A)``.
        multipliers: ``λ_k >= 0``, ``(K,)``. Treated as constants.
        weights: ``w_k`` per response, ``(N, K)`` (0 or 1); None weighs every response 1.
        normalize: Divide by ``1 + Σ_k λ_k w_k``.

    Returns:
        The merged advantage, ``(N, A)``, detached, in ``reward_advantages``' dtype.
    """
    multipliers = torch.as_tensor(multipliers, dtype=reward_advantages.dtype, device=reward_advantages.device)
    numerator, denominator = reward_advantages, 1
    for k, multiplier in enumerate(multipliers.detach()):
        scale = multiplier if weights is None else multiplier * weights[:, k, None].to(reward_advantages.dtype)
        numerator = numerator - scale * cost_advantages[:, k]
        denominator = denominator + scale
    advantages = numerator.detach()
    return advantages / denominator if normalize else advantages


def rectified_costs(costs: Tensor, bound: float) -> Tensor:
    """RePO's rectified cost ``{C(x, y) - d}^+ = max(0, C - d)`` per response (Peng et al., 2024; METHODS.md §6.3).

    RePO bounds every response's cost, ``C(x, y) <= d``, instead of the mean, and maximises
    ``E[r] - λ·E[{C - d}^+]``: a response at or below its bound adds nothing to the penalty, one above it
    adds its excess. As a cost stream (advantages against its own critic or group), a response at or below
    the bound scores 0, the best a response can, so it is credited for being within the bound while only
    the excess of the others is penalised. Its mean is the mean rectified violation that drives λ.

    Args:
        costs: End costs, ``(N,)``.
        bound: The per-response bound ``d``.

    Returns:
        ``(N,)`` float32, ``>= 0``.
    """
    return (costs.float() - bound).clamp(min=0)


def clipped_surrogate_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    aggregation: str = "sequence_mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al., 2017, Eq. 7) with ``ρ = exp(logprobs - old_logprobs)``.

    ::

        loss = -masked_mean(min(ρ A, clip(ρ, 1 - ε, 1 + ε) A), mask)

    where :func:`masked_mean` averages each sequence and then the batch (``aggregation =
    "token_mean"`` averages over all tokens instead, see :func:`aggregate`).

    Args:
        logprobs: Log-probabilities of the response tokens under the current policy, ``(B, A)``.
        old_logprobs: The same tokens under the policy that sampled them, ``(B, A)``.
        advantages: Per-token advantages ``A``, ``(B, A)``; treated as constants.
        mask: True on response tokens that count towards the loss, ``(B, A)``.
        clip_eps: Half-width ε of the trust region on the probability ratio.
        aggregation: ``sequence_mean`` (safe-rlhf) or ``token_mean`` (GRPO as in align-anything).

    Returns:
        The scalar loss to minimise, and detached ``policy/clip_fraction`` (share of tokens with
        ``|ρ - 1| > ε``), ``policy/approx_kl`` (masked mean of ``(logprobs - old_logprobs)^2 / 2``) and
        ``policy/ratio`` (masked mean of ρ).
    """
    advantages = advantages.detach()
    log_ratio = upcast(logprobs) - upcast(old_logprobs).detach()
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

    :func:`clipped_surrogate_loss` on :func:`lagrangian_advantage`: reward and cost advantages are
    merged as ``A = (A_r - λ·A_c) / (1 + λ)`` (``A_r - λ·A_c`` when ``normalize`` is false; Dai et
    al., 2023, Eq. 31), then go through PPO's clipped objective (Schulman et al., 2017, Eq. 7)::

        loss = -masked_mean(min(ρ A, clip(ρ, 1 - ε, 1 + ε) A), mask)

    λ = 0 is plain PPO.

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
        The scalar loss to minimise, and :func:`clipped_surrogate_loss`'s detached stats.
    """
    advantages = lagrangian_advantage(reward_advantages, cost_advantages, multiplier, normalize)
    return clipped_surrogate_loss(logprobs, old_logprobs, advantages, mask, clip_eps, aggregation)


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
    values = upcast(values)
    old_values, returns = upcast(old_values).detach(), upcast(returns).detach()
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
    kl = upcast(logprobs) - upcast(ref_logprobs)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum(-1).mean()


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
    delta = upcast(ref_logprobs).detach() - upcast(logprobs)
    k3 = torch.exp(delta) - delta - 1
    loss = aggregate(k3, mask, aggregation)
    return loss, {"policy/k3_kl": loss.detach()}


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


def appo_lagrangian_mask(
    reward_values: Tensor,
    cost_values: Tensor,
    reward_advantages: Tensor,
    cost_advantages: Tensor,
    mask: Tensor,
    multiplier: Tensor | float,
    baseline: float = 0.0,
) -> Tensor:
    """:func:`appo_token_mask` on the Lagrangian value ``V = V_r − λ·V_c`` and advantage ``A = A_r − λ·A_c``.

    The ``1/(1+λ)`` normalisation changes no sign, so the mask is taken before it.

    Args:
        reward_values: Reward-critic values at rollout time, ``(B, A)`` (zeros when the run has none).
        cost_values: Cost-critic values at rollout time, ``(B, A)`` (zeros when the run has none).
        reward_advantages: Advantages of the reward stream, ``(B, A)``.
        cost_advantages: Advantages of the cost stream, ``(B, A)`` (zeros when the run has none).
        mask: True on response tokens, ``(B, A)``.
        multiplier: The Lagrange multiplier λ >= 0, a scalar.
        baseline: ``b`` of the mask.

    Returns:
        A bool mask ``(B, A)``.
    """
    multiplier = torch.as_tensor(multiplier, dtype=reward_advantages.dtype, device=reward_advantages.device).detach()
    values = (reward_values - multiplier * cost_values).detach()
    advantages = lagrangian_advantage(reward_advantages, cost_advantages, multiplier, normalize=False)
    return appo_token_mask(values, advantages, mask, baseline)


def appo_surrogate_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, kept: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """APPO's actor loss: :func:`clipped_surrogate_loss` on the ``kept`` tokens, averaged over all B sequences.

    ``loss = −(1/B) Σ_i [ Σ_t M_it · min(r_it A_it, clip(r_it, 1−ε, 1+ε) A_it) / Σ_t M_it ]`` with
    ``M = kept`` (``appo_trainer.py`` L363-379 with OpenRLHF's per-sequence masked mean; METHODS.md
    §2 (b-2)). A sequence with no kept token contributes 0 and still counts in ``1/B``.

    Args:
        logprobs: Log-probabilities of the response tokens under the current policy, ``(B, A)``.
        old_logprobs: The same tokens under the policy that sampled them, ``(B, A)``.
        advantages: The actor's per-token advantages, ``(B, A)``.
        kept: APPO's token mask (:func:`appo_lagrangian_mask`), ``(B, A)``.
        mask: True on response tokens, ``(B, A)``.
        clip_eps: Half-width ε of the trust region on the probability ratio.

    Returns:
        The scalar loss, :func:`clipped_surrogate_loss`'s stats on the kept tokens, and
        ``policy/ama_kept_fraction`` (kept share of the response tokens) and
        ``policy/ama_empty_fraction`` (share of sequences with no kept token).
    """
    loss, stats = clipped_surrogate_loss(logprobs, old_logprobs, advantages, kept, clip_eps)
    nonempty = kept.any(-1)  # masked_mean averaged over the non-empty rows only: rescale to all B rows
    loss = loss * nonempty.sum() / max(kept.shape[0], 1)
    with torch.no_grad():
        stats["policy/ama_kept_fraction"] = kept.sum() / mask.bool().sum().clamp_min(1)
        stats["policy/ama_empty_fraction"] = 1 - nonempty.to(torch.float32).mean()
    return loss, stats


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

    (:func:`appo_lagrangian_mask`, then :func:`appo_surrogate_loss` on :func:`lagrangian_advantage`).

    Args:
        logprobs: Log-probabilities of the response tokens under the current policy, ``(B, A)``.
        old_logprobs: The same tokens under the policy that sampled them, ``(B, A)``.
        reward_advantages: Advantages of the reward stream, ``(B, A)``.
        cost_advantages: Advantages of the cost stream, ``(B, A)``.
        mask: True on response tokens, ``(B, A)``.
        multiplier: The Lagrange multiplier λ >= 0, a scalar, treated as a constant.
        clip_eps: Half-width ε of the trust region on the probability ratio.
        normalize: Divide the merged advantage by ``1 + λ``.
        reward_values: Reward-critic values at rollout time, ``(B, A)`` (zeros when the run has none).
        cost_values: Cost-critic values at rollout time, ``(B, A)`` (zeros when the run has none).
        baseline: ``b`` of the mask.

    Returns:
        The scalar loss and :func:`appo_surrogate_loss`'s stats.
    """
    multiplier = torch.as_tensor(multiplier, dtype=reward_advantages.dtype, device=reward_advantages.device).detach()
    advantages = (reward_advantages, cost_advantages)
    kept = appo_lagrangian_mask(reward_values, cost_values, *advantages, mask, multiplier, baseline)  # (B, A)
    merged = lagrangian_advantage(*advantages, multiplier, normalize)
    return appo_surrogate_loss(logprobs, old_logprobs, merged, kept, mask, clip_eps)
