"""Score models: a causal-LM backbone plus a linear head that scores every token.

The reward model, the cost model and the two PPO critics are all score models. The score of a
sequence (its *end score*) is the score at its last non-padding token.

Saved format (a Hugging Face dir; see the README): the backbone as ``save_pretrained`` writes it
(``config.json`` + ``model.safetensors``, loadable with ``AutoModel``), the tokenizer files, and
``score_head.safetensors`` holding the head (``weight``, ``bias``) and the normaliser statistics.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from lit_saferlhf.losses import end_scores
from lit_saferlhf.models.causal_lm import ModelSource, fit_embeddings, load_config, replace_dir, torch_dtype
from lit_saferlhf.models.lora import apply_lora, export_view, quantization_kwargs
from lit_saferlhf.models.zero3 import build_partitioned, load_partitioned, partitioning

HEAD_FILE = "score_head.safetensors"
META_FILE = "score_model.json"


@dataclass
class ScoreOutput:
    """Per-token scores ``(B, L)`` and the end score of each row ``(B,)``."""

    scores: Tensor
    end_scores: Tensor


class ScoreNormalizer(nn.Module):
    """Running statistics of end scores, used to standardise them when ``enabled``.

    ``ema``: ``mean <- m·mean + (1-m)·batch_mean`` (same for the variance); ``running``: the exact
    mean and variance of every score seen (Chan et al.'s parallel update).

    Args:
        kind: ``ema`` or ``running``.
        momentum: The EMA factor ``m`` (``ema`` only).
        enabled: Standardise end scores with the statistics; off means statistics are only tracked.
    """

    def __init__(self, kind: Literal["ema", "running"] = "running", momentum: float = 0.9, enabled: bool = False):
        super().__init__()
        self.kind, self.momentum, self.enabled = kind, momentum, enabled
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, scores: Tensor) -> None:
        """Fold a batch of end scores ``(N,)`` into the statistics."""
        scores = scores.detach().to(torch.float64)
        batch_mean, batch_var, n = scores.mean(), scores.var(unbiased=False), scores.numel()
        if self.kind == "ema" and self.count > 0:
            self.mean.mul_(self.momentum).add_((1 - self.momentum) * batch_mean)
            self.var.mul_(self.momentum).add_((1 - self.momentum) * batch_var)
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            self.var.copy_((self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total)
            self.mean.add_(delta * n / total)
        self.count.add_(n)

    def forward(self, scores: Tensor) -> Tensor:
        """``(scores - mean) / std`` when enabled, else ``scores`` unchanged."""
        if not self.enabled or self.count == 0:
            return scores
        std = self.var.clamp_min(1e-8).sqrt()
        return ((scores - self.mean) / std).to(scores.dtype)


class ScoreHead(nn.Linear):
    """``Linear(hidden, 1)`` whose bias starts at 0, so scores start centred.

    Zeroed in ``reset_parameters`` (inside the constructor) rather than after it, because DeepSpeed
    ZeRO-3 partitions a layer as soon as its constructor returns.
    """

    def reset_parameters(self) -> None:
        """Default weight initialisation; zero bias."""
        super().reset_parameters()
        nn.init.zeros_(self.bias)


class ScoreModel(nn.Module):
    """A backbone (``AutoModel``) plus ``Linear(hidden, 1)`` with a zero bias at init.

    Args:
        backbone: Any Hugging Face base model (LLaMA, GPT-2, Qwen2, Mistral, ...).
        normalizer: Optional statistics of end scores, saved with the model.
    """

    def __init__(self, backbone: PreTrainedModel, normalizer: ScoreNormalizer | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.score_head = ScoreHead(hidden, 1, dtype=backbone.dtype)
        self.normalizer = normalizer or ScoreNormalizer()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> ScoreOutput:
        """Score every token of ``input_ids`` ``(B, L)``; padding is where ``attention_mask`` is 0."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # skip left padding, as generation does
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        hidden = outputs.last_hidden_state  # (B, L, H)
        scores = self.score_head(hidden).squeeze(-1).float()  # (B, L)
        return ScoreOutput(scores=scores, end_scores=self.normalizer(end_scores(scores, attention_mask)))

    @classmethod
    def from_source(cls, source: ModelSource, tokenizer: PreTrainedTokenizerBase) -> ScoreModel:
        """Build from a hub name or dir (a causal LM, a base model or a saved score model) or a config."""
        config = load_config(source, tokenizer)
        kwargs = {"config": config, "trust_remote_code": source.trust_remote_code}
        if partitioning():  # DeepSpeed ZeRO-3 (see ``zero3``)
            backbone = build_partitioned(AutoModel, config, source.path, source.trust_remote_code)
        elif source.path is None:
            backbone = AutoModel.from_config(**kwargs)
        else:
            quantization = quantization_kwargs(source.lora)
            backbone = AutoModel.from_pretrained(source.path, dtype=torch_dtype(source.dtype), **kwargs, **quantization)
        fit_embeddings(backbone, tokenizer)
        if source.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
        if source.lora is not None:  # adapters on the backbone only: the head always trains
            backbone = apply_lora(backbone, source.lora, None, source.gradient_checkpointing)
        model = cls(backbone)
        if source.path is not None and (Path(source.path) / HEAD_FILE).is_file():
            model.load_head(Path(source.path))
        return model

    def load_head(self, model_dir: Path) -> None:
        """Load the head and normaliser saved by ``save_pretrained``."""
        tensors = load_file(model_dir / HEAD_FILE)
        meta = json.loads((model_dir / META_FILE).read_text())
        head = {"weight": tensors["weight"], "bias": tensors["bias"]}
        if partitioning():
            load_partitioned(self.score_head, head)
        else:
            self.score_head.load_state_dict(head)
        self.normalizer.kind, self.normalizer.momentum = meta["normalizer"]["kind"], meta["normalizer"]["momentum"]
        self.normalizer.enabled = meta["normalizer"]["enabled"]
        for name in ("mean", "var", "count"):
            getattr(self.normalizer, name).copy_(tensors[f"normalizer.{name}"])

    def save_pretrained(
        self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, state_dict: dict[str, Tensor] | None = None
    ) -> Path:
        """Write the backbone, tokenizer, head and normaliser as one dir, atomically.

        ``state_dict`` (this module's keys) replaces the live tensors: the gathered state of a sharded model.
        """
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        state = state_dict or {name: tensor.detach() for name, tensor in self.state_dict().items()}
        backbone = {name.removeprefix("backbone."): t for name, t in state.items() if name.startswith("backbone.")}
        network, backbone = export_view(self.backbone, backbone)  # LoRA: merged, or the adapter alone
        network.save_pretrained(staging, safe_serialization=True, state_dict=backbone)
        tokenizer.save_pretrained(staging)
        head = {name: state[f"score_head.{name}"].cpu().contiguous() for name in ("weight", "bias")}
        stats = {f"normalizer.{name}": state[f"normalizer.{name}"].cpu() for name in ("mean", "var", "count")}
        save_file({**head, **stats}, staging / HEAD_FILE)
        normalizer = {"kind": self.normalizer.kind, "momentum": self.normalizer.momentum}
        meta = {
            "format": "lit-saferlhf score model",
            "version": 1,
            "normalizer": {**normalizer, "enabled": self.normalizer.enabled},
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        replace_dir(staging, out_dir)
        return out_dir
