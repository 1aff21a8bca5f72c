"""The baselines: DPO and IPO on helpfulness or safety pairs, and KTO on per-response safety labels.

SACPO (Wachi et al., NeurIPS 2024; METHODS.md §5) is two runs of the preference stage with these:
``DPO(pairs=helpfulness, beta=β)`` from the SFT policy, then ``DPO(pairs=safety, beta=β/λ)`` or
``KTO(beta=β/λ)`` with the first run's export as both the starting policy and the reference
(``cli_configs/tiny/offline/sacpo_{helpful,safe}.yaml``); P-SACPO is ``lit-saferlhf merge``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

from torch import Tensor, nn

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import dpo_loss, ipo_loss, kto_loss, ordered
from lit_saferlhf.objectives import Label, Objective, PairBatch
from lit_saferlhf_plugins.objectives.ama import AMA

PairKind = Literal["helpfulness", "safety"]


def _label(pairs: PairKind) -> Label:
    if pairs not in ("helpfulness", "safety"):
        raise ConfigError("pairs", "'helpfulness' or 'safety'", pairs)
    return "better" if pairs == "helpfulness" else "safer"


class DPO(Objective):
    """Direct Preference Optimization, ``−log σ(β h)`` (Rafailov et al., 2023, Eq. 7).

    Args:
        beta: β, the KL weight (DPO and SACPO step 1: 0.1; SACPO step 2: β/λ, e.g. 0.025).
        pairs: Which ordering of each row to learn: ``helpfulness`` (better_response_id) or
            ``safety`` (safer_response_id).
        ama: ADPO (Equilibrate RLHF): sum only the tokens a score model finds decisive, those above
            the baseline in the chosen response and below it in the rejected one (``ama.py`` beside this file).
    """

    requires: ClassVar[tuple[Label, ...]] = ("better",)

    def __init__(self, beta: float = 0.1, pairs: PairKind = "helpfulness", ama: AMA | None = None) -> None:
        self.beta, self.pairs, self.ama = beta, pairs, ama
        self.requires = (_label(pairs),)

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """DPO loss on the chosen ordering."""
        chosen, rejected = ordered(batch.logratios, getattr(batch, self.requires[0]))
        return dpo_loss(chosen, rejected, self.beta)

    def frozen_networks(self, load: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
        """ADPO's token scorer (the score model at ``ama.path``) when ``ama`` is set; else none.

        Args:
            load: The stage's loader of a frozen score model from a dir.
        """
        if self.ama is None:
            return {}  # also IPO's (shared below)
        self.ama_scorer = load(self.ama.path)
        return {"ama": self.ama_scorer}

    def token_weights(self, mask: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The response mask, or ADPO's masks when ``ama`` is set (its scorer built by ``frozen_networks``)."""
        if self.ama is None:
            return Objective.token_weights(self, mask, batch)
        return self.ama.token_weights(mask, batch, batch[self.requires[0]], self.ama_scorer)


class IPO(Objective):
    """Identity Preference Optimization, ``(h − 1/(2τ))²`` (Azar et al., 2023, Eq. 17).

    The log-ratios in ``h`` are sums over response tokens by default, as in the paper's ℓ and OpenRLHF;
    ``logprobs: token_mean`` divides each by its response length, as TRL's ``loss_type="ipo"`` does. The
    target ``1/(2τ)`` is then a per-token margin: in summed log-ratio, a response of n tokens is pushed
    about n times further from the reference than with ``sum``, so τ values do not carry over between the two.

    Args:
        tau: τ; the margin the policy is regressed to is ``1/(2τ)``.
        pairs: ``helpfulness`` or ``safety`` (as in ``DPO``).
        ama: AMA's token masks (as in ``DPO``).
        logprobs: ``sum`` over response tokens (OpenRLHF), or ``token_mean``, the sum over the response
            length (TRL); with ``ama`` the kept tokens' sum is divided by the whole response's length.
    """

    requires: ClassVar[tuple[Label, ...]] = ("better",)

    def __init__(
        self,
        tau: float = 0.1,
        pairs: PairKind = "helpfulness",
        ama: AMA | None = None,
        logprobs: Literal["sum", "token_mean"] = "sum",
    ) -> None:
        if logprobs not in ("sum", "token_mean"):
            raise ConfigError("logprobs", "'sum' or 'token_mean'", logprobs)
        self.tau, self.pairs, self.ama, self.logprobs = tau, pairs, ama, logprobs
        self.requires = (_label(pairs),)

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """IPO loss on the chosen ordering."""
        chosen, rejected = ordered(batch.logratios, getattr(batch, self.requires[0]))
        return ipo_loss(chosen, rejected, self.tau)

    frozen_networks = DPO.frozen_networks

    def token_weights(self, mask: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The mask or AMA's masks (as ``DPO``'s); with ``token_mean`` divided by each response's length."""
        if self.ama is None:
            weights = Objective.token_weights(self, mask, batch)
        else:
            weights = self.ama.token_weights(mask, batch, batch[self.requires[0]], self.ama_scorer)
        return weights if self.logprobs == "sum" else weights / mask.sum(-1, keepdim=True).clamp_min(1)


class KTO(Objective):
    """KTO on both responses of each row, desirable = safe (SACPO's KTO safety step; METHODS.md §5(b)).

    The reference point z: TRL estimates KL(π_θ‖π_ref) from mismatched prompt/response pairs, an
    extra forward per batch. We use the batch mean of ρ_θ over this batch's own responses,
    detached and clamped at 0 (a cheaper estimate of the same quantity; METHODS.md notes the exact
    estimator depends on the TRL version). Decision recorded here, not verified against the paper.

    Args:
        beta: β' = β/λ (SACPO grid: 0.1, 0.05, 0.025, 0.01).
        desirable_weight: w_D (SACPO: 1).
        undesirable_weight: w_U (SACPO: n_desirable / n_undesirable of the data; set it from the counts).
    """

    requires: ClassVar[tuple[Label, ...]] = ("is_safe",)

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """KTO over the 2B responses."""
        logratios = batch.logratios.reshape(-1)  # (2B,)
        return kto_loss(
            logratios,
            batch.is_safe.reshape(-1),
            logratios.detach().mean(),
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
        )
