"""Pretrained weights into networks that DeepSpeed ZeRO-3 partitions as they are built.

Under ``DeepSpeedStrategy(stage=3)`` Lightning runs ``configure_model`` inside ``deepspeed.zero.Init``:
every parameter is split across the ranks the moment it is created, so each rank holds an empty
``(0,)`` tensor and ``from_pretrained`` cannot copy a checkpoint in ("size mismatch ... torch.Size([0])",
Lightning issue #19259). The model builders then create the network from its config (partitioned,
never whole on one rank) and :func:`load_partitioned` fills it module by module: a module's own
parameters are gathered, rank 0 copies the checkpoint's values in, and leaving the gather partitions
them again with rank 0's values. Only rank 0 reads the checkpoint.

DeepSpeed is imported here only when ZeRO-3 is in use.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lit_saferlhf.errors import InputNotFoundError, MissingTensorError

if TYPE_CHECKING:  # transformers is imported where it is used
    from transformers import PreTrainedModel

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def partitioning() -> bool:
    """Whether parameters created now are partitioned by an enclosing ``deepspeed.zero.Init``."""
    if "deepspeed" not in sys.modules:  # nothing imported DeepSpeed, so no ZeRO-3 context can be open
        return False
    from deepspeed.runtime.zero import partition_parameters

    return partition_parameters.zero_init_context > 0


def is_rank_zero() -> bool:
    """Rank 0 of the job, or a run that is not distributed."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def read_weights(model_dir: str | Path) -> dict[str, Tensor]:
    """A Hugging Face dir's safetensors weights (one file or an index of shards); empty on ranks other than 0."""
    model_dir = Path(model_dir)
    if not is_rank_zero():
        return {}
    if (model_dir / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((model_dir / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    elif (model_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise InputNotFoundError(
            f"{model_dir}: under DeepSpeed ZeRO-3 pretrained weights are read from {WEIGHTS} or {WEIGHTS_INDEX}, "
            "and neither is there (a .bin-only checkpoint: re-save it with save_pretrained(safe_serialization=True))"
        )
    state: dict[str, Tensor] = {}
    for name in files:
        state |= load_file(model_dir / name)
    return state


def build_partitioned(
    auto_class: Any, config: Any, path: str | None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """``auto_class`` (``AutoModel``, ``AutoModelForCausalLM``) built partitioned, holding ``path``'s weights.

    Built from ``config`` with transformers' own initialisation switched off (it cannot index empty
    partitions), then filled from the checkpoint, or, with no ``path``, randomly initialised: gathered
    whole once for that, which only small from-config models do.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    if path is not None:
        load_partitioned(model, strip_prefix(read_weights(path), model))
        return model
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if is_rank_zero():
            model.initialize_weights()
    return model


def strip_prefix(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Keys of a causal-LM checkpoint (``model.layers...``) as a base model names them (``layers...``)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    own = {name for name, _ in model.named_parameters()}
    if prefix == "." or any(key in own for key in state):
        return dict(state)
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def load_partitioned(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into ``model``, whose parameters ZeRO-3 partitioned, one module at a time (a collective).

    Every rank must call this; only rank 0's ``state`` is read (the others may pass ``{}``). Buffers are
    not partitioned: they are copied on every rank from rank 0's values by broadcast.

    Raises:
        MissingTensorError: On rank 0, when the checkpoint lacks parameters of ``model`` (tied weights excepted).
    """
    import deepspeed

    rank_zero = is_rank_zero()
    loaded: set[int] = set()  # ids of the parameters filled
    unfilled: dict[int, str] = {}  # id -> key of the parameters the checkpoint lacks (under some name)
    for prefix, module in model.named_modules():
        params = dict(module.named_parameters(prefix=prefix, recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if rank_zero:
                for key, param in params.items():
                    if key in state:
                        param.data.copy_(state[key])
                        loaded.add(id(param))
                    else:
                        unfilled.setdefault(id(param), key)
    missing = [key for param_id, key in unfilled.items() if param_id not in loaded]  # tied weights are filled once
    for key, buffer in model.named_buffers():
        if rank_zero and key in state:
            buffer.copy_(state[key])
    if torch.distributed.is_initialized():  # every rank gets rank 0's buffers, and stops if rank 0 must
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
        count = torch.tensor([len(missing)], device=deepspeed.get_accelerator().current_device_name())
        torch.distributed.broadcast(count, src=0)
        if count.item() and not missing:
            raise MissingTensorError(f"rank 0 found {count.item()} parameters of the model missing from the checkpoint")
    if missing:
        raise MissingTensorError(
            f"the checkpoint has no values for {len(missing)} parameters of the model, e.g. {missing[:5]}"
        )
