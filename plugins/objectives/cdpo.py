"""C-DPO: Constrained DPO (Liu, Sun, Zheng 2024; arXiv 2403.02475; METHODS.md §3)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import dpo_loss, lagrangian_preference, soft_dpo_loss
from lit_saferlhf.objectives import Label, Objective, PairBatch
from lit_saferlhf.solvers import ConstraintSolver


class CDPO(Objective):
    """DPO on pairs relabelled by the Lagrangian reward ``r − λc``; λ moved by a constraint solver.

    Primal step: DPO on pairs whose preferred response is ``argmax r_λ`` (hard, the default) or with
    the soft target ``p*_λ = σ(r_λ(y_1) − r_λ(y_0))``. Dual step: the stage samples the current policy
    on held-out prompts, scores the samples with the cost model and hands the mean to ``solver``
    (any ``ConstraintSolver``: ``DualAscent`` is the paper's ``λ ← max(0, λ + η(Ĉ − d))`` in its linear
    form), every ``update_every`` steps or at the end of every epoch.

    Decisions (no authors' code; METHODS.md rates the details low-medium): hard relabelling by
    default; the policy warm-starts across dual steps (training simply continues, one optimiser and
    schedule for the whole run) rather than restarting from π_ref; the reference stays π_ref.

    Args:
        solver: Moves λ from the policy's mean cost-model score; its ``cost_limit`` is d.
        beta: β of the DPO step.
        soft: Train on the soft target ``p*_λ`` instead of the hard argmax label.
        update_every: Optimiser steps between dual steps; None steps λ once per epoch.
        sample_prompts: Held-out prompts sampled for each dual step (Ĉ).
    """

    requires: ClassVar[tuple[Label, ...]] = ("rewards", "costs")

    def __init__(
        self,
        solver: ConstraintSolver,
        beta: float = 0.1,
        soft: bool = False,
        update_every: int | None = None,
        sample_prompts: int = 64,
    ) -> None:
        if update_every is not None and update_every < 1:
            raise ConfigError(
                "update_every", "a positive number of optimiser steps, or null (once per epoch)", update_every
            )
        self.solver, self.beta, self.soft = solver, beta, soft
        self.update_every, self.sample_prompts = update_every, sample_prompts

    def __call__(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """DPO on the pairs as labelled by ``r − λc`` now."""
        prob_second = lagrangian_preference(batch.rewards, batch.costs, self.solver.multiplier)  # (B,) p(y_1 ≻ y_0)
        first, second = batch.logratios[:, 0], batch.logratios[:, 1]
        if self.soft:
            loss, stats = soft_dpo_loss(second, first, prob_second, self.beta)
        else:
            second_wins = prob_second > 0.5
            chosen = second.where(second_wins, first)
            rejected = first.where(second_wins, second)
            loss, stats = dpo_loss(chosen, rejected, self.beta)
        stats["label_second"] = prob_second.detach().mean()
        return loss, stats
