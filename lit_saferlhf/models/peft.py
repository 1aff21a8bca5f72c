"""LoRA and QLoRA adapters (``peft``) for every stage: building, exporting, checkpointing trainable tensors.

A network built from a ``ModelSource`` with ``lora`` set is wrapped by ``peft``: its base weights are
frozen and low-rank adapters ``W + (α/r)·B·A`` (Hu et al., 2021, Eq. 3) are trained on the
``target_modules``. A score model wraps only its backbone, so its head always trains.

Exports fold the adapters into the weights (a plain Hugging Face dir) or, with
``export: adapter``, write the adapter alone in ``peft``'s format. Checkpoints keep only the
trainable tensors (``drop_frozen``); the frozen ones are rebuilt from their dirs on resume
(``restore_frozen``). This module is a leaf: it imports nothing else of ``lit_saferlhf.models``, so
``causal_lm`` and ``score_model`` build on it without an import circle. The frozen bases that share
a trained network's weights are in ``lit_saferlhf.models.frozen``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, cast

import torch
from torch import Tensor, nn

from lit_saferlhf.errors import ConfigError, HardwareError

if TYPE_CHECKING:  # peft and transformers are imported where they are used (start-up time)
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import PreTrainedModel

EXPORT_MODE = "lit_saferlhf_export"
"""Attribute of a ``peft`` model that records its ``LoraArgs.export``."""


@dataclass(frozen=True)
class LoraArgs:
    """Low-rank adapters on a frozen base (``peft``'s ``LoraConfig``)."""

    r: int = 16
    """Rank of each adapter ``B·A``."""
    alpha: float = 32.0
    """Scale: the update is ``(alpha / r)·B·A``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """Module names (suffixes) that get adapters, e.g. ``[q_proj, v_proj]``; ``all-linear``: every linear
    layer but the output one."""
    modules_to_save: tuple[str, ...] | None = None
    """Modules trained in full beside the adapters, e.g. ``[lm_head]`` (a score model's head always is)."""
    quantize: Literal["nf4", "fp4"] | None = None
    """QLoRA: load the frozen base in 4 bits (``bitsandbytes``; CUDA only)."""
    export: Literal["merged", "adapter"] = "merged"
    """``merged``: adapters folded into the weights (a plain Hugging Face dir); ``adapter``: the adapter alone,
    in ``peft``'s format (``PeftModel.from_pretrained(base, dir)``)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError("lora.r", "a rank >= 1", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.dropout", "a probability in [0, 1)", self.dropout)


# Stages built in Python keep these in their checkpoints' hyper-parameters (inside ModelSource).
torch.serialization.add_safe_globals([LoraArgs])


def quantization_kwargs(args: LoraArgs | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base in 4 bits for QLoRA; empty otherwise.

    Raises:
        HardwareError: QLoRA was asked for on a machine without CUDA (a RuntimeError).
    """
    if args is None or args.quantize is None:
        return {}
    if not torch.cuda.is_available():
        raise HardwareError(
            "lora.quantize",
            f"{args.quantize!r} (QLoRA) loads the base in 4 bits with bitsandbytes, which needs a "
            "CUDA GPU, and none is available here. Set lora.quantize: null to train LoRA on a full-precision base.",
        )
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quantize,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": config}


def apply_lora(
    model: PreTrainedModel, args: LoraArgs, task_type: str | None, gradient_checkpointing: bool = False
) -> PeftModel:
    """Freeze ``model`` and add adapters: a ``peft`` model whose trainable parameters are the adapters.

    Args:
        model: A Hugging Face model (a causal LM, or a score model's backbone).
        args: The adapters' settings.
        task_type: ``CAUSAL_LM`` for a policy (``generate`` works); None for a backbone.
        gradient_checkpointing: Whether ``model`` recomputes activations in backward.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, args.target_modules)
    if args.quantize is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input that needs grad
    config = LoraConfig(
        task_type=task_type,
        r=args.r,
        lora_alpha=args.alpha,  # type: ignore[arg-type]  # peft annotates int, but divides it: alpha / r
        lora_dropout=args.dropout,
        target_modules=list(args.target_modules) if isinstance(args.target_modules, tuple) else args.target_modules,
        modules_to_save=list(args.modules_to_save) if args.modules_to_save else None,
    )
    peft_model = get_peft_model(model, config)
    assert isinstance(peft_model, PeftModel)  # not a PeftMixedModel: mixed=False
    unsupported = {type(layer).__name__ for layer in lora_layers(peft_model).values()} - {"Linear", "Linear4bit"}
    if unsupported:
        raise ConfigError(
            "lora.target_modules",
            f"adapters on {sorted(unsupported)} layers cannot be merged for export; "
            "target linear layers only (e.g. [q_proj, k_proj, v_proj, o_proj])",
        )
    setattr(peft_model, EXPORT_MODE, args.export)
    return peft_model


def check_target_modules(model: nn.Module, target_modules: str | tuple[str, ...]) -> None:
    """Refuse ``target_modules`` that name no layer of ``model``, naming what was asked for and what exists.

    As ``peft`` matches them: a name matches the modules called so or ending in ``.<name>``; a string other
    than ``all-linear`` is a regular expression on the whole module name. ``peft`` itself fails only when
    no name matches (with a traceback), and leaves a name that matches nothing untrained.

    Raises:
        ConfigError: Some names (or the pattern) match no module of ``model``.
    """
    if target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    pattern = isinstance(target_modules, str)
    asked = [target_modules] if isinstance(target_modules, str) else list(target_modules)

    def matches(wanted: str) -> bool:
        if pattern:
            return any(re.fullmatch(wanted, name) for name in names)
        return any(name == wanted or name.endswith(f".{wanted}") for name in names)

    missing = [wanted for wanted in asked if not matches(wanted)]
    if missing:
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        raise ConfigError(
            "lora.target_modules",
            f"{missing} match no module of {type(model).__name__} (asked for {asked}); "
            f"its linear layers are named {sorted(linear)}",
        )


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The layers of ``model`` that carry LoRA adapters, by name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def is_peft(model: nn.Module) -> TypeGuard[PeftModel]:
    """Whether ``model`` is a ``peft`` wrapper."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def has_adapters(module: nn.Module) -> bool:
    """Whether any ``peft`` adapter layer sits anywhere inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(submodule, BaseTunerLayer) for submodule in module.modules())


def export_view(
    model: PreTrainedModel | PeftModel, state_dict: dict[str, Tensor] | None
) -> tuple[PreTrainedModel | PeftModel, dict[str, Tensor] | None]:
    """What to ``save_pretrained`` for ``model``: itself, its base with merged weights, or its adapter.

    A plain model comes back unchanged. A ``peft`` model comes back as its base model with the adapters
    folded into a new state dict (``export: merged``, the live weights untouched), or as itself, whose
    ``save_pretrained`` writes the adapter alone (``export: adapter``).

    Args:
        model: The network to export.
        state_dict: Its gathered full state when it is sharded; None reads the live weights.
    """
    if not is_peft(model):
        return model, state_dict
    if getattr(model, EXPORT_MODE, "merged") == "adapter":
        return model, state_dict
    base = cast("PreTrainedModel", model.get_base_model())  # peft types it nn.Module: the model it wrapped
    return base, merged_state_dict(model, state_dict)


def merged_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The state of the ``peft`` model ``model`` with ``W + (α/r)·B·A`` folded in, under the base model's names.

    Adapter tensors and the original copies of ``modules_to_save`` are dropped; 4-bit bases are dequantized.

    Args:
        model: A ``peft`` model (``get_peft_model`` output).
        state_dict: Its full state (its own names); None reads the live weights.
    """
    state = dict(state_dict) if state_dict is not None else {k: v.detach() for k, v in model.state_dict().items()}
    for name, layer in lora_layers(model).items():
        base = state[f"{name}.base_layer.weight"]
        if base.dtype == torch.uint8:  # QLoRA: 4-bit packed
            from peft.utils.integrations import dequantize_module_weight

            base = dequantize_module_weight(layer.get_base_layer()).to(torch.bfloat16)
        merged = base.float()
        for adapter in layer.active_adapters:
            down, up = state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"]
            delta = (up.float() @ down.float()) * layer.scaling[adapter]  # (out, in)
            # Every LoRA linear layer (Linear, Linear4bit) sets fan_in_fan_out; peft's LoraLayer does not declare it.
            transposed = layer.fan_in_fan_out  # type: ignore[attr-defined]
            merged = merged + (delta.T if transposed else delta)
        for key in [key for key in state if key.startswith(f"{name}.base_layer.")]:  # the bias, if any
            state[key.replace(".base_layer.", ".", 1)] = state.pop(key)
        state[f"{name}.weight"] = merged.to(base.dtype)
    return {renamed: tensor for key, tensor in state.items() if (renamed := base_name(key)) is not None}


def base_name(key: str) -> str | None:
    """A ``peft`` model's state key under its base model's name; None for adapter tensors."""
    if ".lora_" in key or ".original_module." in key or ".weight." in key:  # adapters, copies, 4-bit quant state
        return None
    return key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Switch off every adapter of the ``peft`` model ``model`` (its base alone computes)."""
    assert is_peft(model)
    with model.disable_adapter():
        yield


def frozen_names(module: nn.Module) -> set[str]:
    """State keys of the parameters of ``module`` that do not train."""
    return {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}


def drop_frozen(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Keep only the trainable tensors (and buffers) in a checkpoint of a stage with adapters; else no-op.

    The frozen bases are rebuilt from their dirs when the stage is configured, so they need no copy.
    A distributed (FSDP2) checkpoint keeps them: Lightning loads it back key by key, every key required.
    """
    from torch.distributed.tensor import DTensor

    if not has_adapters(module) or any(isinstance(value, DTensor) for value in checkpoint["state_dict"].values()):
        return
    frozen = frozen_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}


def restore_frozen(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Fill a checkpoint written by ``drop_frozen`` with the live frozen tensors, so it loads strictly.

    A distributed checkpoint, which the strategy has loaded into the module already, has no ``state_dict`` here.
    """
    if has_adapters(module) and "state_dict" in checkpoint:
        live = module.state_dict()
        for name in frozen_names(module):
            checkpoint["state_dict"].setdefault(name, live[name])


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """Parameters held (each shared tensor once) and trained by ``module``."""
    params = list(module.parameters())  # de-duplicated
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def describe_parameters(module: nn.Module) -> str:
    """One line: parameters held and trained, for the start-up log."""
    held, trained = parameter_counts(module)
    share = 100.0 * trained / max(held, 1)
    return f"{type(module).__name__}: {held / 1e6:,.2f}M parameters held, {trained / 1e6:,.3f}M trained ({share:.2f}%)"
