"""Stage 3 of 4: the cost model, trained on safety pairs and labels (Safe RLHF, Dai et al., 2023, Eq. 6).

Like the reward model, plus two sign terms from the per-response ``is_safe`` labels: safe
responses end with a negative cost and unsafe ones with a positive cost, so ``cost <= 0`` reads
as "safe" and the PPO constraint ``E[C] <= d`` has a meaning.
"""

from __future__ import annotations

from torch import Tensor

from lit_saferlhf.losses import cost_loss, tokenwise_cost_loss
from lit_saferlhf.stages.reward import ScoreModelStage


class CostModelModule(ScoreModelStage):
    """Cost model: the unsafer response scores higher, and the sign of each cost matches its label.

    Arguments as ``ScoreModelStage``.
    """

    sides = ("safer", "unsafer")
    metric_names = ("accuracy", "sign_accuracy")
    score_type = "cost"

    def objective(
        self, batch: dict[str, Tensor], scores: tuple[Tensor, Tensor], ends: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sequence-wise or token-wise pairwise loss plus the sign terms."""
        labels = (batch["is_safer_safe"], batch["is_unsafer_safe"])
        if self.loss_type == "sequence-wise":
            return cost_loss(*ends, *labels, regularization=self.regularization)
        return tokenwise_cost_loss(
            *scores,
            batch["safer_input_ids"],
            batch["unsafer_input_ids"],
            batch["safer_attention_mask"],
            batch["unsafer_attention_mask"],
            *labels,
            regularization=self.regularization,
        )
