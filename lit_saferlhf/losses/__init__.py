"""Every equation of lit-saferlhf, as pure functions: tensors in, tensors out.

Losses return ``(loss, stats)``; the stats are detached tensors, never ``.item()``-ed (that would force
a device sync). Nothing here holds state and nothing imports more than torch, so ``import
lit_saferlhf.losses`` works with torch alone. Losses are computed in at least float32 whatever the
input dtype, so bf16 scores and logits keep the small differences the objectives depend on.

Modules, by family:

- ``common``: masked means, token log-probs (chunked), end scores, the LM loss, loss aggregation.
- ``score``: the reward and cost models' losses (Safe RLHF, Dai et al., 2023, Sec. 3.2, Eq. 5, 6).
- ``ppo``: KL-shaped reward and cost streams, GAE, the clipped Lagrangian surrogate (Sec. 3.3),
  the critics' value loss, the k3 KL term, APPO's token masks (Equilibrate RLHF).
- ``group``: critic-free advantages (GRPO's group z-score, RLOO's leave-one-out mean).
- ``preference``: offline objectives (DPO, IPO, BFPO, SafeDPO, KTO, PeCAN, ADPO's masks) and pair
  metrics (METHODS.md §1-§5).
- ``dual``: CAN's dual, which sets λ* from scored reference samples.

Glossary of symbols (one meaning each, in every module):

    B   batch size: sequences, or preference pairs (a pair's two responses are ``(B, 2)``).
    N   every sequence of one rollout (``N = n · G``), rows ordered prompt-major.
    n   prompts.
    G   samples per prompt (``generation.num_return_sequences``); a group is one prompt's G samples.
    L   sequence length (prompt and response together, padded).
    P   prompt tokens.
    A   response (action) tokens; rollout tensors are ``(N, A)``, right-padded after EOS.
    V   vocabulary size.
    m   number of constraints (CAN's utilities ``(n, G, m)``).
    K   number of constraints of PPO-Lagrangian (cost streams ``(N, K, A)``).
    λ   the Lagrange multiplier (``multiplier`` in code; ``lam`` is GAE's λ).
    β   KL (or DPO) temperature; ε the PPO clip half-width.
    ℓ_θ(y|x) = Σ_t log π_θ(y_t|x, y_<t) over response tokens; ρ_θ(y) = ℓ_θ(y|x) − ℓ_ref(y|x);
    h = ρ_θ(y_w) − ρ_θ(y_l) a pair margin; σ the logistic function.

Masks are boolean (or 0/1) tensors, true on the tokens that count.
"""

from __future__ import annotations

from lit_saferlhf.losses.common import (
    aggregate,
    chunked_token_logprobs,
    end_scores,
    gather_logprobs,
    last_true_index,
    lm_loss,
    masked_mean,
    ordered,
    response_mask,
    upcast,
)
from lit_saferlhf.losses.dual import (
    can_dual,
    solve_can_dual,
)
from lit_saferlhf.losses.group import (
    broadcast_to_tokens,
    group_normalized_advantages,
    leave_one_out_advantages,
    sequence_scores,
)
from lit_saferlhf.losses.ppo import (
    appo_lagrangian_mask,
    appo_policy_loss,
    appo_surrogate_loss,
    appo_token_mask,
    clipped_surrogate_loss,
    constrained_advantage,
    gae,
    k3_kl_loss,
    kl_shaped_rewards,
    kl_to_reference,
    lagrangian_advantage,
    lagrangian_policy_loss,
    rectified_costs,
    shaped_cost_stream,
    shaped_reward_stream,
    value_loss,
)
from lit_saferlhf.losses.preference import (
    adpo_token_mask,
    bfpo_loss,
    bfpo_targets,
    dpo_loss,
    ipo_loss,
    kto_loss,
    lagrangian_preference,
    pair_metrics,
    pecan_loss,
    safe_dpo_loss,
    safe_dpo_transform,
    soft_dpo_loss,
)
from lit_saferlhf.losses.score import (
    cost_loss,
    log_odds,
    reward_loss,
    tokenwise_cost_loss,
    tokenwise_reward_loss,
)

__all__ = [
    "adpo_token_mask",
    "aggregate",
    "appo_lagrangian_mask",
    "appo_policy_loss",
    "appo_surrogate_loss",
    "appo_token_mask",
    "bfpo_loss",
    "bfpo_targets",
    "broadcast_to_tokens",
    "can_dual",
    "chunked_token_logprobs",
    "clipped_surrogate_loss",
    "constrained_advantage",
    "cost_loss",
    "dpo_loss",
    "end_scores",
    "gae",
    "gather_logprobs",
    "group_normalized_advantages",
    "ipo_loss",
    "k3_kl_loss",
    "kl_shaped_rewards",
    "kl_to_reference",
    "kto_loss",
    "lagrangian_advantage",
    "lagrangian_policy_loss",
    "lagrangian_preference",
    "last_true_index",
    "leave_one_out_advantages",
    "lm_loss",
    "log_odds",
    "masked_mean",
    "ordered",
    "pair_metrics",
    "pecan_loss",
    "rectified_costs",
    "response_mask",
    "reward_loss",
    "safe_dpo_loss",
    "safe_dpo_transform",
    "sequence_scores",
    "shaped_cost_stream",
    "shaped_reward_stream",
    "soft_dpo_loss",
    "solve_can_dual",
    "tokenwise_cost_loss",
    "tokenwise_reward_loss",
    "upcast",
    "value_loss",
]
