"""Adaptive Message-wise Alignment (AMA; Equilibrate RLHF, ``METHODS.md`` §2 (b-2)): token masks from scores.

AMA trains only the decisive tokens of each response. The DPO family takes its masks through the
objective contract's ``token_weights`` hook (``DPO(ama=AMA(...))``, "ADPO"), PPO-Lagrangian's actor
loss through ``PPOArgs.appo`` ("APPO", :func:`lit_saferlhf.losses.appo_surrogate_loss`). The masks are
pure functions in ``lit_saferlhf.losses`` (:func:`~lit_saferlhf.losses.adpo_token_mask`,
:func:`~lit_saferlhf.losses.appo_token_mask`); this module holds ADPO's scorer setting. The scorer's
network is built by the preference stage, through the objective contract's ``frozen_networks`` hook.

**ADPO**, for a pair with per-token scores ``s_t`` of a score model and baseline ``b``::

    m^w_t = 1[s^w_t > b] · resp^w_t          m^l_t = 1[s^l_t < b] · resp^l_t
    L_ADPO = −log σ( β [ (ℓ̃_θ(y_w) − ℓ̃_ref(y_w)) − (ℓ̃_θ(y_l) − ℓ̃_ref(y_l)) ] ),  ℓ̃ = Σ_t m_t log π(y_t|…)

with the same masks in the policy's and the reference's sums, so masked tokens leave the margin.
An empty mask makes its ℓ̃ an empty sum, 0 (never NaN): the pair then trains through its other side.

**APPO**: ``M_t = resp_t · (1[V_t > b] if A_t ≥ 0 else 1[V_t < b])`` and the clipped surrogate is
averaged over each sequence's kept tokens, then over all B sequences; an all-masked sequence adds 0.

Decisions on the ambiguities of ``METHODS.md`` §2 (the authors' AMA code does not run):

1. Score source: per-token scores ``s_t`` of one of our score models (its head scores every
   position; the score of token ``y_t`` is read at ``y_t``'s own position, after the model has seen
   it), passed through the model's end-score normaliser when it has one. A reward model gives
   ``s_t`` as is; a cost model with ``negate: true`` gives ``s_t = −c_t`` (safe tokens score high).
   Token-level, not sentence-level: "message-wise" segmenting is not done.
2. APPO's advantage is per token (GAE, the stage's default estimator). With two critics the value
   is the Lagrangian one, ``V_t = V^r_t − λ·V^c_t``, matching ``A_t = A^r_t − λ·A^c_t`` (the
   ``1/(1+λ)`` normalisation changes no sign); both are the rollout's (the policy that sampled).
   Critic-free estimators (GRPO, RLOO) have no ``V_t`` and are refused with APPO.
3. An all-masked sequence contributes 0 and still counts in ``1/B`` (the formula's batch mean), so
   masking shrinks the step rather than re-weighting the surviving sequences; ADPO's empty masks
   give empty sums (0). ``b = 0`` by default, as the authors'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_saferlhf.losses import adpo_token_mask


@dataclass(frozen=True)
class AMA:
    """ADPO's token scorer: a score model, its sign and the baseline (an option of ``DPO`` and ``IPO``)."""

    path: str
    """A score-model export (reward or cost stage) that scores every token."""
    negate: bool = False
    """Use ``−s_t`` (a cost model: safe tokens then score high)."""
    baseline: float = 0.0
    """``b``: chosen responses keep tokens scoring above it, rejected ones tokens below it."""

    def token_weights(self, mask: Tensor, batch: dict[str, Tensor], chosen: Tensor, scorer: nn.Module) -> Tensor:
        """:func:`adpo_token_mask` of the batch's sequences, aligned with the targets ``input_ids[:, 1:]``.

        Args:
            mask: True on response targets, ``(2B, L - 1)``.
            batch: The collated pairs: ``input_ids`` and ``attention_mask`` ``(2B, L)``.
            chosen: Index of each pair's preferred response, ``(B,)``.
            scorer: The frozen score model at ``path``, as the stage built it.
        """
        scores = self.token_scores(scorer, batch["input_ids"], batch["attention_mask"])[:, 1:]  # (2B, L - 1)
        return adpo_token_mask(scores, mask, chosen, self.baseline)

    @torch.no_grad()
    def token_scores(self, scorer: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``s_t`` at every position ``(N, L)``: the scorer's per-token scores, normalised as its end scores.

        Args:
            scorer: The frozen score model at ``path``, as the stage built it.
            input_ids: Token ids, ``(N, L)``.
            attention_mask: Attention mask, ``(N, L)``.
        """
        scores = scorer.normalizer(scorer(input_ids, attention_mask).scores)
        return -scores if self.negate else scores
