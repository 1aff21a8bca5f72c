"""The offline-objective contract and the pure preference losses behind it.

An offline objective (DPO, IPO, BFPO, SafeDPO, C-DPO, SACPO's steps, MoCAN, PeCAN) sees one batch of
response pairs as **per-sequence summed** response log-probabilities of the trained policy and of
the frozen reference, plus the pair's labels, and returns ``(loss, stats)``. The stage
(``lit_saferlhf.stages.PreferenceOptimization``) computes those sums; the built-in objectives live
in ``plugins/objectives`` (installed as ``lit_saferlhf_plugins.objectives``).

Every pair is one data row with two responses ``k = 0, 1`` (PKU-SafeRLHF's ``response_0`` and
``response_1``; HH-RLHF's chosen and rejected). A row's helpfulness pair and its safety pair are two
orderings of the same two responses, so one forward over both responses serves every objective:
``better`` and ``safer`` index the preferred response of each ordering.

Notation (METHODS.md §0): ℓ_θ(y|x) = Σ_t log π_θ(y_t|x, y_<t) over response tokens; the log-ratio
ρ_θ(y) = ℓ_θ(y|x) − ℓ_ref(y|x); a pair margin h = ρ_θ(y_w) − ρ_θ(y_l); σ the logistic function.
Shapes: B pairs, ``(B, 2)`` one value per response, N samples per prompt, n prompts.

Token-level hook: ``Objective.token_weights`` returns the weight of each response token in the
sums (default: the response mask itself). An objective that masks or weights tokens (e.g. a
token-mask variant of DPO) overrides it; the stage applies the same weights to the policy and the
reference sums, so a precomputed reference stays consistent as long as the weights do not depend
on the trained policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from lit_saferlhf.solvers import ConstraintSolver

Label = Literal["better", "safer", "is_safe", "rewards", "costs"]


LABEL_FIELDS: dict[str, str] = {
    "better": "better_response_id (which response is more helpful)",
    "safer": "safer_response_id (which response is safer)",
    "is_safe": "is_response_0_safe / is_response_1_safe (per-response safety labels)",
    "rewards": "model.init_args.reward_model (a reward score source)",
    "costs": "model.init_args.cost_model (a cost score source)",
}
"""Where each label comes from, for start-up errors."""


@dataclass
class PairBatch:
    """Per-sequence summed log-probs of both responses of B pairs, and the labels the data has.

    A label the data lacks is None; an objective lists the labels it needs in ``requires`` and the
    stage refuses to start without them.
    """

    logprobs: Tensor  # (B, 2) ℓ_θ(y_k|x) of the trained policy (with grad)
    ref_logprobs: Tensor  # (B, 2) ℓ_ref(y_k|x) of the frozen reference
    better: Tensor | None = None  # (B,) long, index of the more helpful response
    safer: Tensor | None = None  # (B,) long, index of the safer response
    is_safe: Tensor | None = None  # (B, 2) bool, per-response safety label s(y_k)
    rewards: Tensor | None = None  # (B, 2) reward scores r(x, y_k)
    costs: Tensor | None = None  # (B, 2) cost scores c(x, y_k) (> 0 harmful)

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    @property
    def logratios(self) -> Tensor:
        """ρ_θ(y_k) = ℓ_θ − ℓ_ref, ``(B, 2)``."""
        return self.logprobs - self.ref_logprobs.detach()

    def available(self) -> set[str]:
        """The labels that are present."""
        return {f.name for f in fields(self) if f.name in LABEL_FIELDS and getattr(self, f.name) is not None}


class Objective(ABC):
    """An offline preference objective: a ``PairBatch`` in, ``(loss, stats)`` out.

    Class attributes a subclass may set:

    - ``requires``: the labels it needs (``better``, ``safer``, ``is_safe``, ``rewards``, ``costs``).
    - ``buffer_weight``: weight of the loss on the buffer batch, when the data carries one (BFPO).
    - ``solver``: a constraint solver the stage steps during training from the mean cost-model score
      of the policy's own samples (C-DPO); its ``multiplier`` is λ.
    - ``update_every``: with a ``solver``, the optimiser steps between two dual steps; None steps λ
      once at the end of every epoch.
    - ``dual_samples``: responses per prompt the stage samples from the reference before training,
      scores, and hands to ``fit_dual`` (CAN); 0 for none.
    - ``sample_prompts``: how many prompts the stage samples for a dual step or for ``fit_dual``.

    The stage reads nothing else of an objective: frozen networks it scores with come through
    ``frozen_networks``, token weights through ``token_weights``.
    """

    requires: ClassVar[tuple[Label, ...]] = ()
    buffer_weight: float = 1.0
    solver: ConstraintSolver | None = None
    update_every: int | None = None
    dual_samples: int = 0
    sample_prompts: int = 64

    @abstractmethod
    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss to minimise and detached diagnostics (``stats``, names without prefix)."""

    @property
    def multiplier(self) -> float | None:
        """λ, for objectives that have one (logged every step and saved in the export)."""
        return None if self.solver is None else self.solver.multiplier

    def frozen_networks(self, load: Callable[[str], nn.Module]) -> dict[str, nn.Module]:
        """Build the frozen networks the objective scores with (default: none); called once, in ``configure_model``.

        The stage owns what this returns: it registers the networks as its submodules, so the strategy
        places them on the device, keeps them in eval mode and treats them as its other frozen networks
        (with LoRA, checkpoints leave them out: they are rebuilt from their dirs). The objective keeps its
        own references to use them in its hooks (``token_weights``).

        Args:
            load: The stage's loader of a frozen score model from a dir (its dtype and sharding).

        Returns:
            The networks by name (a valid ``nn.ModuleDict`` key each).
        """
        return {}

    def token_weights(self, mask: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Weight of each response token in the summed log-probs, ``(2B, L)`` (default: the mask).

        Args:
            mask: True on the response tokens of every sequence (both responses of each pair, pair
                by pair), aligned with the shifted targets ``input_ids[:, 1:]``, ``(2B, L)``.
            batch: The collated batch, for objectives that weight tokens from data.
        """
        return mask.to(torch.float32)

    def fit_dual(self, rewards: Tensor, costs: Tensor) -> dict[str, float]:
        """Set λ from the scores of reference samples, ``(n, N)`` each (only when ``dual_samples`` > 0)."""
        raise NotImplementedError(f"{type(self).__name__} has no dual to fit (dual_samples = 0)")

    def state_dict(self) -> dict[str, object]:
        """Plain numbers to checkpoint and to save beside the export (λ, the solver's state)."""
        state: dict[str, object] = {"objective": type(self).__name__, "multiplier": self.multiplier}
        if self.solver is not None:
            state["solver"] = {"class": type(self.solver).__name__, **self.solver.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what ``state_dict`` returned."""
        solver_state = state.get("solver")
        if self.solver is not None and isinstance(solver_state, dict):
            self.solver.load_state_dict({k: v for k, v in solver_state.items() if k != "class"})
