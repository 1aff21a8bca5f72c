"""Stage 2 of 4: the reward model, trained on helpfulness pairs (Safe RLHF, Dai et al., 2023, Eq. 5).

``ScoreModelStage`` holds what the reward and cost stages share (a score model, one batched
forward over both sides of each pair, metrics, export); each stage adds its objective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_saferlhf.data.templates import load_template, save_template, template_record, trained_template
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.losses import reward_loss, tokenwise_reward_loss
from lit_saferlhf.models.causal_lm import ModelSource
from lit_saferlhf.models.peft import LoraArgs, drop_frozen, restore_frozen
from lit_saferlhf.models.score_model import ScoreModel
from lit_saferlhf.models.sharding import full_state_dict, shard
from lit_saferlhf.optim import OptimizerArgs, build_optimizer

LossType = Literal["sequence-wise", "token-wise"]


class ScoreMetrics(nn.Module):
    """Pair accuracies and the mean and std of end scores, exact under DDP (torchmetrics)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.means = nn.ModuleDict({name: MeanMetric() for name in (*names, "score_mean", "score_square")})

    def mean(self, name: str) -> MeanMetric:
        """The running mean ``name`` (``ModuleDict`` types its values as any ``Module``)."""
        return cast(MeanMetric, self.means[name])

    def update(self, stats: dict[str, Tensor], scores: Tensor) -> None:
        """Fold in one batch's accuracies and its end scores ``(2B,)``."""
        for name in self.names:
            self.mean(name).update(stats[name], weight=len(scores) // 2)
        self.mean("score_mean").update(scores.detach().float().mean(), weight=len(scores))
        self.mean("score_square").update(scores.detach().float().square().mean(), weight=len(scores))

    def compute_and_reset(self, prefix: str) -> dict[str, Tensor]:
        """``{prefix}/<accuracy>``..., ``{prefix}/score_mean`` and ``{prefix}/score_std``."""
        values = {name: self.mean(name).compute() for name in self.means}
        with torch.inference_mode(False):  # states made under `validate`'s inference mode would break a later fit
            for name in self.means:
                self.mean(name).reset()
        std = (values.pop("score_square") - values["score_mean"].square()).clamp_min(0).sqrt()
        return {f"{prefix}/{name}": value for name, value in {**values, "score_std": std}.items()}


class ScoreModelStage(L.LightningModule, ABC):
    """A score model trained on pairs; subclasses name the pair sides and the objective.

    Args:
        model: Where the backbone comes from (usually the SFT export); a saved score model resumes.
        loss_type: ``sequence-wise`` compares end scores; ``token-wise`` every token after the pair diverges.
        regularization: Weight of the score-magnitude penalty (reference: 0.001).
        optimizer: AdamW and schedule (reference: lr 2e-5, cosine, warm-up 0.03, weight decay 0.1).
        export_dir: Where to write the score model dir at the end of ``fit`` (None: no export).
        dtype: Weights dtype when loading (None: float32).
        gradient_checkpointing: Recompute the backbone's activations in backward.
        lora: Train LoRA adapters on the backbone instead of its full weights (None: full fine-tuning); the
            score head always trains in full.
    """

    sides: ClassVar[tuple[str, str]]
    metric_names: ClassVar[tuple[str, ...]]
    score_type: ClassVar[str]
    """``reward`` or ``cost``: recorded in the export's ``score_model.json``."""

    def __init__(
        self,
        model: ModelSource,
        loss_type: LossType = "sequence-wise",
        regularization: float = 0.0,
        optimizer: OptimizerArgs = OptimizerArgs(),
        export_dir: str | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraArgs | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = model.with_build_settings(dtype, gradient_checkpointing, lora)
        self.loss_type, self.regularization = loss_type, regularization
        self.optimizer_args, self.export_dir = optimizer, export_dir
        self.tokenizer = load_tokenizer(model)
        self.model: ScoreModel | None = None  # built by configure_model
        self.train_metrics, self.val_metrics = ScoreMetrics(self.metric_names), ScoreMetrics(self.metric_names)

    def configure_model(self) -> None:
        """Build the score model here, so sharded strategies can place it as it is created."""
        if self.model is None:
            # A new head on a causal LM (the SFT export) is the point of this stage; it is logged once.
            role = f"{self.score_type} model"
            model = ScoreModel.from_source(self.source, self.tokenizer, new_head_ok=True, role=role)
            model = model.train()  # from_pretrained returns eval mode
            self.model = shard(model, self.device_mesh)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The pair objective on one batch."""
        loss, stats, ends = self.pair_step(batch)
        assert self.model is not None  # configure_model ran
        self.model.normalizer.update(ends)
        self.train_metrics.update(stats, ends)
        self.log_dict(
            {"train/loss": loss, **{f"train/{k}": v for k, v in stats.items()}},
            prog_bar=True,
            batch_size=len(ends) // 2,
        )
        return loss

    def pair_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Score both sides in one forward; the loss, its stats and the ``2B`` end scores."""
        first, second = self.sides
        ids = torch.cat([batch[f"{first}_input_ids"], batch[f"{second}_input_ids"]])  # (2B, L)
        mask = torch.cat([batch[f"{first}_attention_mask"], batch[f"{second}_attention_mask"]])  # (2B, L)
        assert self.model is not None  # configure_model ran
        output = self.model(ids, mask)
        scores, ends = output.scores.chunk(2), output.end_scores.chunk(2)
        loss, stats = self.objective(batch, scores, ends)
        return loss, stats, output.end_scores

    @abstractmethod
    def objective(
        self, batch: dict[str, Tensor], scores: tuple[Tensor, Tensor], ends: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss from per-token ``scores`` and end scores ``ends`` of (first side, second side)."""

    def on_train_epoch_end(self) -> None:
        """Epoch-level accuracies and score statistics."""
        self.log_dict(self.train_metrics.compute_and_reset("train_epoch"))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate held-out accuracies."""
        loss, stats, ends = self.pair_step(batch)
        self.val_metrics.update(stats, ends)
        self.log("val/loss", loss, batch_size=len(ends) // 2, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        """Log held-out accuracies and score statistics."""
        self.log_dict(self.val_metrics.compute_and_reset("val"), prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Same as validation, on the test split."""
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """Log test accuracies and score statistics."""
        self.log_dict(self.val_metrics.compute_and_reset("test"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA, only the trainable tensors: the frozen base is rebuilt from its dir. Keeps the template."""
        drop_frozen(checkpoint, self)
        save_template(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA, the frozen base comes from its dir, not the checkpoint. Restores the template."""
        restore_frozen(checkpoint, self)
        load_template(self, checkpoint)

    def on_train_end(self) -> None:
        """Export the score model (backbone, head, normaliser, tokenizer)."""
        state = full_state_dict(self, "model")  # every rank takes part in gathering a sharded model
        if self.export_dir and self.trainer.is_global_zero:
            self.export_to(self.export_dir, state)

    def export_to(self, out: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the score model dir (also what ``lit-saferlhf export`` writes).

        Args:
            out: The dir to write (replaced atomically if it exists).
            state_dict: The score model's gathered full state when it is sharded; None writes the live weights.
        """
        template = trained_template(self)
        record = None if template is None else template_record(template)
        assert self.model is not None  # configure_model ran
        return self.model.save_pretrained(
            out, self.tokenizer, state_dict=state_dict, score_type=self.score_type, template=record
        )

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW without decay on biases and norms; warm-up then the configured decay, per step."""
        assert self.model is not None  # configure_model ran
        optimizer, scheduler = build_optimizer(
            [(self.model, self.optimizer_args)], self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RewardModelModule(ScoreModelStage):
    """Reward model: the better response of each pair should score higher (see ``ScoreModelStage``)."""

    sides = ("better", "worse")
    metric_names = ("accuracy",)
    score_type = "reward"

    def objective(
        self, batch: dict[str, Tensor], scores: tuple[Tensor, Tensor], ends: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sequence-wise or token-wise pairwise loss."""
        if self.loss_type == "sequence-wise":
            loss, stats = reward_loss(*ends, regularization=self.regularization)
        else:
            loss, stats = tokenwise_reward_loss(
                *scores,
                batch["better_input_ids"],
                batch["worse_input_ids"],
                batch["better_attention_mask"],
                batch["worse_attention_mask"],
                regularization=self.regularization,
            )
        return loss, {"accuracy": stats["accuracy"]}
