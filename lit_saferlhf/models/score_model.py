"""Score models: a causal-LM backbone plus a linear head that scores every token.

The reward model, the cost model and the two PPO critics are all score models. The score of a
sequence (its *end score*) is the score at its last non-padding token.

Saved format (see the README and ``layouts``): a transformers ``*ForSequenceClassification`` dir
(``config.json`` with ``num_labels=1`` + ``model.safetensors`` with the head as ``score.weight``,
loadable with ``AutoModelForSequenceClassification``), the tokenizer files, and ``score_model.json``
with what only we need (the head's bias, the normaliser, the score type). Version 1 dirs (the
backbone as ``AutoModel`` saves it + ``score_head.safetensors``) keep loading, and so do
transformers' and safe-rlhf's score models (``layouts.detect_layout``).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
from transformers.utils import logging as transformers_logging

from lit_saferlhf.errors import ModelLayoutError
from lit_saferlhf.losses import end_scores
from lit_saferlhf.models.causal_lm import ModelSource, fit_embeddings, load_config, staged_dir, torch_dtype
from lit_saferlhf.models.layouts import (
    HEAD_FILE_V1,
    SIDE_FILE,
    EndToken,
    Head,
    NormalizeFunction,
    NormalizerKind,
    NormalizerState,
    detect_layout,
    require_score_model,
)
from lit_saferlhf.models.peft import apply_lora, export_view, quantization_kwargs
from lit_saferlhf.models.zero3 import build_partitioned, is_rank_zero, load_partitioned, partitioning

if TYPE_CHECKING:  # peft is imported where it is used
    from peft import PeftModel

HEAD_FILE = HEAD_FILE_V1
META_FILE = SIDE_FILE
logger = logging.getLogger(__name__)


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
        function: How enabled statistics transform an end score ``x`` (safe-rlhf's ``normalize_function``):
            ``affine`` ``(x - mean) / std`` (ours, safe-rlhf's reward models), ``scale`` ``x / std``
            (safe-rlhf's cost models: the sign is kept), ``identity`` ``x`` (critics).
    """

    mean: Tensor  # buffers (see __init__)
    var: Tensor
    count: Tensor

    def __init__(
        self,
        kind: NormalizerKind = "running",
        momentum: float = 0.9,
        enabled: bool = False,
        function: NormalizeFunction = "affine",
    ):
        super().__init__()
        self.kind, self.momentum, self.enabled, self.function = kind, momentum, enabled, function
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @classmethod
    def from_state(cls, state: NormalizerState) -> ScoreNormalizer:
        """A normaliser holding a saved state (see ``layouts.NormalizerState``)."""
        normalizer = cls(state.kind, state.momentum, state.enabled, state.function)
        for name in ("mean", "var", "count"):
            getattr(normalizer, name).fill_(getattr(state, name))
        return normalizer

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

    def affine(self) -> tuple[float, float]:
        """``(a, c)`` with ``forward(x) = a·x + c``: the transform as numbers, e.g. to fold into a head."""
        if not self.enabled or self.function == "identity":
            return 1.0, 0.0
        std = float(self.var.clamp_min(1e-8).sqrt())  # fresh statistics (mean 0, var 1) leave x unchanged
        return 1.0 / std, -float(self.mean) / std if self.function == "affine" else 0.0

    def forward(self, scores: Tensor) -> Tensor:
        """``scores`` transformed by ``function`` when enabled, else unchanged (``std`` is at least 1e-4)."""
        if not self.enabled or self.function == "identity":
            return scores
        std = self.var.clamp_min(1e-8).sqrt()
        centred = scores - self.mean if self.function == "affine" else scores
        return (centred / std).to(scores.dtype)


class ScoreHead(nn.Linear):
    """``Linear(hidden, 1)``, bias-free unless a loaded checkpoint has a bias (transformers' and safe-rlhf's default).

    A new head has no bias, like transformers' ``*ForSequenceClassification`` heads, so an export loads in
    transformers with the same end scores; a bias, where a checkpoint has one, starts at 0 (zeroed inside
    the constructor because DeepSpeed ZeRO-3 partitions a layer as soon as its constructor returns).
    """

    def reset_parameters(self) -> None:
        """Default weight initialisation; zero bias."""
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ScoreModel(nn.Module):
    """A backbone (``AutoModel``) plus ``Linear(hidden, 1)``: a score for every token.

    Args:
        backbone: Any Hugging Face base model (LLaMA, GPT-2, Qwen2, Mistral, ...).
        normalizer: Optional statistics of end scores, saved with the model.
        head_bias: Give the head a bias (only checkpoints that have one do).
        end_token: Where the end score is read: ``attention_mask``, the last attended token (ours,
            safe-rlhf's); ``last_non_pad``, the last token that is not ``pad_token_id`` (transformers').
        pad_token_id: The padding id of ``last_non_pad``.
    """

    def __init__(
        self,
        backbone: PreTrainedModel | PeftModel,
        normalizer: ScoreNormalizer | None = None,
        head_bias: bool = False,
        end_token: EndToken = "attention_mask",
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if end_token == "last_non_pad" and pad_token_id is None:
            raise ValueError("ScoreModel: end_token='last_non_pad' needs a pad_token_id")
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.score_head = ScoreHead(hidden, 1, bias=head_bias, dtype=backbone.dtype)
        self.normalizer = normalizer or ScoreNormalizer()
        self.end_token, self.pad_token_id = end_token, pad_token_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> ScoreOutput:
        """Score every token of ``input_ids`` ``(B, L)``; padding is where ``attention_mask`` is 0."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # skip left padding, as generation does
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        hidden = outputs.last_hidden_state  # (B, L, H)
        scores = self.score_head(hidden).squeeze(-1).float()  # (B, L)
        ends = end_mask(input_ids, attention_mask, self.end_token, self.pad_token_id)
        return ScoreOutput(scores=scores, end_scores=self.normalizer(end_scores(scores, ends)))

    @classmethod
    def from_source(
        cls,
        source: ModelSource,
        tokenizer: PreTrainedTokenizerBase,
        new_head_ok: bool = False,
        role: str = "score model",
    ) -> ScoreModel:
        """Build from a saved score model in any layout of ``layouts``, or a config (random weights).

        Args:
            source: A dir or hub name, or a config.
            tokenizer: The tokenizer the model will read (its padding id joins the config).
            new_head_ok: Allow a causal LM or base model without a score head: a new head goes on it
                (logged once). Only the reward and cost stages, which train that head, set it.
            role: What the model is for, named in errors (``reward_model``, ``cost_critic``, ...).

        Raises:
            ValueError: ``source`` holds no score head and ``new_head_ok`` is false, naming the dir and
                the layouts looked for; or its backbone weights miss tensors of the network.
        """
        layout = None if source.path is None else detect_layout(source.path)
        if layout is not None and not layout.has_head and not new_head_ok:
            require_score_model(layout.path, role)
        head = layout.read_head() if layout is not None and layout.has_head else None
        config = load_config(source, tokenizer)
        backbone = load_backbone(source, config)
        fit_embeddings(backbone, tokenizer)
        if source.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
        network: PreTrainedModel | PeftModel = backbone
        if source.lora is not None:  # adapters on the backbone only: the head always trains
            network = apply_lora(backbone, source.lora, None, source.gradient_checkpointing)
        end_token = "attention_mask" if layout is None else layout.end_token
        pad_token_id = layout.config.get("pad_token_id") if layout is not None else None  # the checkpoint's own
        pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        model = cls(network, None, head is not None and head.bias is not None, end_token, pad_token_id)
        if head is not None:
            model.load_head(head)
        elif layout is not None and is_rank_zero():
            logger.warning("%s: %s has no score head; a new one is initialised on it", role, source.path)
        return model

    def load_head(self, head: Head) -> None:
        """Load a head and normaliser read by ``Layout.read_head``."""
        weights = {"weight": head.weight.to(self.score_head.weight.dtype)}
        if head.bias is not None:
            weights["bias"] = head.bias.to(self.score_head.weight.dtype)
        if partitioning():
            load_partitioned(self.score_head, weights)
        else:
            self.score_head.load_state_dict(weights)
        self.normalizer = ScoreNormalizer.from_state(head.normalizer).to(self.normalizer.mean.device)

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        state_dict: dict[str, Tensor] | None = None,
        score_type: str | None = None,
        template: dict[str, Any] | None = None,
    ) -> Path:
        """Write the backbone, tokenizer, head and normaliser as one dir, atomically.

        The dir is a transformers ``*ForSequenceClassification`` checkpoint (``num_labels=1``, head
        ``score.weight``), so ``AutoModelForSequenceClassification`` loads it; an enabled normaliser is
        folded into that head (``w' = a·w``, ``b' = a·b + c`` for ``normalize(x) = a·x + c``). What
        transformers cannot hold goes into ``score_model.json``: the head's bias ``b'`` (transformers'
        heads have none: where ``b' != 0``, which an affine normaliser with a non-zero mean or a
        bias-carrying head give, transformers' scores are ours minus ``b'``, and a warning says so),
        the normaliser's statistics, the score type and the cost sign convention. A family without a
        sequence-classification class, or a LoRA adapter exported alone, is written in version 1 of
        our format (``score_head.safetensors``).

        Args:
            out_dir: The dir to write (replaced atomically if it exists).
            tokenizer: Saved beside the weights.
            state_dict: This module's keys: the gathered state of a sharded model (None: live weights).
            score_type: ``reward`` or ``cost`` (recorded in the side file; None: unknown).
            template: The template the model was trained with, as ``data.templates.template_record`` gives it
                (recorded in the side file; evaluation scores with it).
        """
        out_dir = Path(out_dir)
        with staged_dir(out_dir) as staging:
            state = state_dict or {name: tensor.detach() for name, tensor in self.state_dict().items()}
            own = {name.removeprefix("backbone."): t for name, t in state.items() if name.startswith("backbone.")}
            network, backbone = export_view(self.backbone, own)  # LoRA: merged, or the adapter alone
            tokenizer.save_pretrained(staging)
            classifier = sequence_classification_class(network)
            if classifier is None:
                network.save_pretrained(str(staging), safe_serialization=True, state_dict=backbone)  # peft: a str
                side = self._write_v1_head(staging, state)
            else:
                assert isinstance(network, PreTrainedModel)  # sequence_classification_class found its class
                side = self._write_classifier(staging, network, classifier, backbone, state)
            side = {"format": "lit-saferlhf score model", **side, "score_type": score_type}
            if template is not None:
                side["template"] = template
            if score_type == "cost":
                side["cost_sign"] = "cost <= 0 means safe (the sign terms of the cost loss)"
            (staging / META_FILE).write_text(json.dumps(side, indent=2))
        return out_dir

    def _write_v1_head(self, staging: Path, state: dict[str, Tensor]) -> dict[str, Any]:
        """Version 1: head and statistics in ``score_head.safetensors``; returns the side file's fields."""
        head = {
            name: state[f"score_head.{name}"].cpu().contiguous()
            for name in ("weight", "bias")
            if f"score_head.{name}" in state
        }
        stats = {f"normalizer.{name}": state[f"normalizer.{name}"].cpu() for name in ("mean", "var", "count")}
        save_file({**head, **stats}, staging / HEAD_FILE)
        return {"version": 1, "end_token": self.end_token, "normalizer": self._normalizer_settings()}

    def _write_classifier(
        self,
        staging: Path,
        network: PreTrainedModel,
        classifier: type[PreTrainedModel],
        backbone: dict[str, Tensor] | None,
        state: dict[str, Tensor],
    ) -> dict[str, Any]:
        """Version 2: a ``*ForSequenceClassification`` checkpoint plus the side file's fields (returned)."""
        scale, shift = self.normalizer.affine()
        weight = state["score_head.weight"].double() * scale
        bias = float(state["score_head.bias"].double() * scale + shift) if "score_head.bias" in state else shift
        config = copy.deepcopy(network.config)
        config.architectures, config.num_labels = [classifier.__name__], 1
        if self.pad_token_id is not None:  # transformers' end token: the last one that is not this id
            config.pad_token_id = self.pad_token_id
        with torch.device("meta"):
            shell = classifier._from_config(config, dtype=network.dtype)
        backbone = backbone if backbone is not None else {k: v.detach() for k, v in network.state_dict().items()}
        weights = {f"{classifier.base_model_prefix}.{name}": t for name, t in backbone.items()}
        weights["score.weight"] = weight.to(state["score_head.weight"].dtype).cpu().contiguous()
        shell.save_pretrained(staging, safe_serialization=True, state_dict=weights)
        if bias != 0.0:
            logger.warning(
                "score model export: the head's offset %.6g (bias and/or normaliser mean) is kept in %s only; "
                "transformers' %s has no head bias, so its scores are ours minus %.6g",
                bias,
                META_FILE,
                classifier.__name__,
                bias,
            )
        folded = self.normalizer.enabled and self.normalizer.function != "identity"
        settings = {**self._normalizer_settings(), "enabled": self.normalizer.enabled and not folded}
        head = {
            "weight": "score.weight",
            "bias": bias if "score_head.bias" in state or shift else None,
            "normalizer_folded": folded,
        }
        return {"version": 2, "end_token": self.end_token, "head": head, "normalizer": settings}

    def _normalizer_settings(self) -> dict[str, Any]:
        """The normaliser as the side file records it (statistics as floats)."""
        normalizer = self.normalizer
        stats = {name: float(getattr(normalizer, name)) for name in ("mean", "var", "count")}
        settings = {"kind": normalizer.kind, "momentum": normalizer.momentum, "enabled": normalizer.enabled}
        return {**settings, "function": normalizer.function, **stats}


def end_mask(input_ids: Tensor, attention_mask: Tensor, end_token: EndToken, pad_token_id: int | None) -> Tensor:
    """Where a row's end score may be read: its attended tokens, or (``last_non_pad``) its non-padding ones."""
    if end_token == "attention_mask":
        return attention_mask
    assert pad_token_id is not None  # ScoreModel requires one for last_non_pad
    return input_ids != pad_token_id


def sequence_classification_class(network: nn.Module) -> type[PreTrainedModel] | None:
    """The transformers ``*ForSequenceClassification`` class of ``network``'s family (None: none, or LoRA)."""
    if not isinstance(network, PreTrainedModel):
        return None
    # transformers types the lazy auto mappings' values as classes or (tokenizer) class pairs; this one holds classes.
    return cast(
        "type[PreTrainedModel] | None", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(network.config), None)
    )


def load_backbone(source: ModelSource, config: Any) -> PreTrainedModel:
    """The backbone (``AutoModel``) of ``source``; every parameter must come from the checkpoint.

    Raises:
        ValueError: The checkpoint lacks tensors of the backbone (they would be random).
    """
    kwargs = {"config": config, "trust_remote_code": source.trust_remote_code}
    if partitioning():  # DeepSpeed ZeRO-3 (see ``zero3``)
        return build_partitioned(AutoModel, config, source.path, source.trust_remote_code)
    if source.path is None:
        return AutoModel.from_config(**kwargs)
    quantization = quantization_kwargs(source.lora)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the head's keys are "UNEXPECTED" for AutoModel: read apart
    try:
        backbone, info = AutoModel.from_pretrained(
            source.path, dtype=torch_dtype(source.dtype), output_loading_info=True, **kwargs, **quantization
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelLayoutError(
            f"{source.path}: the checkpoint has no values for {len(missing)} backbone tensors, e.g. {missing[:3]}; "
            "they would start random (is the backbone saved under an unusual prefix?)"
        )
    return backbone
