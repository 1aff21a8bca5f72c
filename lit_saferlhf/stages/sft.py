"""Stage 1 of 4: supervised fine-tuning of the policy (Safe RLHF, Dai et al., 2023, Sec. 3).

The causal-LM loss is taken on response tokens only: prompt tokens are labelled ``-100``. At the
end of ``fit`` the model and tokenizer are exported as a Hugging Face dir that the reward, cost
and PPO stages start from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lit_saferlhf.data.templates import load_template, policy_files, save_template, trained_template
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.losses import lm_loss
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from lit_saferlhf.models.peft import LoraArgs, drop_frozen, restore_frozen
from lit_saferlhf.models.sharding import full_state_dict, shard
from lit_saferlhf.optim import OptimizerArgs, build_optimizer

if TYPE_CHECKING:  # peft is imported where it is used
    from peft import PeftModel


class TokenMetrics(torch.nn.Module):
    """Token-weighted loss and accuracy, exact under DDP; perplexity is ``exp(loss)``."""

    def __init__(self) -> None:
        super().__init__()
        self.loss, self.accuracy = MeanMetric(), MeanMetric()

    def update(self, loss: Tensor, correct: Tensor, tokens: Tensor) -> None:
        """Fold in one batch."""
        self.loss.update(loss.detach(), weight=tokens)
        self.accuracy.update(correct / tokens.clamp_min(1), weight=tokens)

    def compute_and_reset(self, prefix: str) -> dict[str, Tensor]:
        """``{prefix}/loss``, ``{prefix}/token_accuracy``, ``{prefix}/perplexity``."""
        loss, accuracy = self.loss.compute(), self.accuracy.compute()
        with torch.inference_mode(False):  # states made under `validate`'s inference mode would break a later fit
            self.loss.reset()
            self.accuracy.reset()
        return {f"{prefix}/loss": loss, f"{prefix}/token_accuracy": accuracy, f"{prefix}/perplexity": loss.exp()}


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM on demonstrations.

    Args:
        model: The policy to fine-tune: a hub name or dir, or a config for random weights.
        optimizer: AdamW and schedule (Safe RLHF's reference: lr 2e-5, cosine, warm-up 0.03).
        export_dir: Where to write the Hugging Face dir at the end of ``fit`` (None: no export).
        dtype: Weights dtype when loading (None: float32).
        gradient_checkpointing: Recompute the policy's activations in backward.
        lora: Train LoRA adapters instead of full weights (None: full fine-tuning).
    """

    def __init__(
        self,
        model: ModelSource,
        optimizer: OptimizerArgs = OptimizerArgs(),
        export_dir: str | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraArgs | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source = model.with_build_settings(dtype, gradient_checkpointing, lora)
        self.optimizer_args, self.export_dir = optimizer, export_dir
        self.tokenizer = load_tokenizer(model)
        self.model: PreTrainedModel | PeftModel | None = None  # built by configure_model
        self.train_metrics, self.val_metrics = TokenMetrics(), TokenMetrics()

    def configure_model(self) -> None:
        """Build the network here, so sharded strategies can place it as it is created."""
        if self.model is None:
            model = build_causal_lm(self.source, self.tokenizer).train()  # from_pretrained returns eval mode
            self.model = shard(model, self.device_mesh)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Response-only LM loss on one batch of demonstrations."""
        loss, stats = self.lm_step(batch)
        self.train_metrics.update(loss, stats["correct"], stats["tokens"])
        accuracy = stats["correct"] / stats["tokens"].clamp_min(1)
        self.log_dict(
            {"train/loss": loss, "train/token_accuracy": accuracy}, prog_bar=True, batch_size=len(batch["input_ids"])
        )
        return loss

    def lm_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward the batch; the loss and its token counts."""
        assert self.model is not None  # configure_model ran
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
        return lm_loss(logits, batch["labels"])

    def on_train_epoch_end(self) -> None:
        """Epoch-level loss, accuracy and perplexity over every token of the epoch."""
        self.log_dict(self.train_metrics.compute_and_reset("train_epoch"))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Accumulate validation loss and accuracy."""
        loss, stats = self.lm_step(batch)
        self.val_metrics.update(loss, stats["correct"], stats["tokens"])

    def on_validation_epoch_end(self) -> None:
        """Log validation loss, token accuracy and perplexity."""
        self.log_dict(self.val_metrics.compute_and_reset("val"), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA, only the trainable tensors: the frozen base is rebuilt from its dir. Keeps the template."""
        drop_frozen(checkpoint, self)
        save_template(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA, the frozen base comes from its dir, not the checkpoint. Restores the template."""
        restore_frozen(checkpoint, self)
        load_template(self, checkpoint)

    def on_train_end(self) -> None:
        """Export the fine-tuned policy as a Hugging Face dir."""
        state = full_state_dict(self, "model")  # every rank takes part in gathering a sharded model
        if self.export_dir and self.trainer.is_global_zero:
            self.export_to(self.export_dir, state)

    def export_to(self, out: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the policy and tokenizer as a Hugging Face dir (also what ``lit-saferlhf export`` writes).

        ``lit_saferlhf.json`` records the template the policy was trained with (see ``data.templates``).

        Args:
            out: The dir to write (replaced atomically if it exists).
            state_dict: The policy's gathered full state when it is sharded; None writes the live weights.
        """
        assert self.model is not None  # configure_model ran
        return export(
            self.model, self.tokenizer, out, state_dict=state_dict, extra_files=policy_files(trained_template(self))
        )

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW without decay on biases and norms; warm-up then the configured decay, per step."""
        assert self.model is not None  # configure_model ran
        optimizer, scheduler = build_optimizer(
            [(self.model, self.optimizer_args)], self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
