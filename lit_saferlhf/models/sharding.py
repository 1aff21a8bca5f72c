"""FSDP2 sharding (``torch.distributed.fsdp.fully_shard``) and the full state of a network under any strategy.

``shard`` is used by every stage's ``configure_model`` when Lightning's ``ModelParallelStrategy`` gives
the module a device mesh: each decoder layer (the model's ``_no_split_modules``) becomes its own FSDP
unit, then the whole network, so parameters are gathered layer by layer in forward and backward.
Frozen networks are sharded the same way.

``full_state_dict`` gathers a network's unsharded weights for the end-of-fit export, under FSDP2,
Lightning's FSDP (FSDP1) strategy and DeepSpeed ZeRO-3 alike.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TypeVar, cast

import lightning as L
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType, fully_shard
from torch.distributed.tensor import DTensor

from lit_saferlhf.models.peft import is_peft

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def layer_classes(model: nn.Module) -> set[str]:
    """Names of the classes Hugging Face marks as not to be split (the decoder layers)."""
    return {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}


def shard(model: ModuleT, mesh: DeviceMesh | None) -> ModuleT:
    """Apply ``fully_shard`` per decoder layer, then to ``model``; a no-op without a mesh."""
    if mesh is None:
        return model
    names = layer_classes(model)
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    # A peft wrapper's generate() calls its base model directly: the base must be the root unit, so
    # that its own forward gathers the root's weights (embeddings, final norm).
    fully_shard(model.get_base_model() if is_peft(model) else model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded by FSDP2)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the parameters of ``model`` (they carry a ``ds_id``)."""
    return any(hasattr(param, "ds_id") for param in model.parameters())


def fsdp1_root(module: L.LightningModule) -> nn.Module | None:
    """The FSDP1 root that Lightning's ``FSDPStrategy`` wrapped around ``module``; None under other strategies."""
    root = module.trainer.strategy.model
    if root is not None and any(isinstance(submodule, FullyShardedDataParallel) for submodule in root.modules()):
        return root
    return None


def full_state_dict(module: L.LightningModule, name: str) -> dict[str, Tensor] | None:
    """The unsharded state of the network ``module.<name>`` on CPU, for its export; None if it is not sharded.

    A collective under every sharding strategy: every rank must call it. Keys are the network's own
    (no ``<name>.`` prefix); rank 0 gets the tensors, other ranks may get an empty dict. None means
    the live tensors are already whole (one device, DDP, DeepSpeed ZeRO-1/2).

    - FSDP2 (``ModelParallelStrategy``, DTensor parameters): torch's ``get_model_state_dict``.
    - DeepSpeed ZeRO-3 (parameters carry ``ds_id``): each parameter is gathered in turn and copied on rank 0.
    - FSDP1 (Lightning's ``FSDPStrategy`` wraps the whole LightningModule): the root's ``FULL_STATE_DICT``,
      gathered on rank 0, keeping the keys under ``<name>.``.

    Args:
        module: The stage module, attached to its trainer.
        name: The attribute that holds the network (``"model"``, ``"actor"``).
    """
    network = getattr(module, name)
    if is_sharded(network):
        state = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return cast(dict[str, Tensor], state)  # torch types values as any state value; a model's are tensors
    if is_zero3_partitioned(network):
        return gathered_zero3_state(network, keep=module.global_rank == 0)
    root = fsdp1_root(module)
    if root is not None:
        return fsdp1_full_state(root, prefix=f"{name}.")
    return None


def gathered_zero3_state(network: nn.Module, keep: bool) -> dict[str, Tensor]:
    """The full state of a ZeRO-3 partitioned ``network``, one parameter gathered at a time (bounded memory).

    Every rank must call it (each gather is a collective); only where ``keep`` is the state copied to CPU.
    """
    import deepspeed

    state: dict[str, Tensor] = {}
    for key, value in network.state_dict(keep_vars=True).items():  # buffers are not partitioned
        partitioned = hasattr(value, "ds_id")
        with deepspeed.zero.GatheredParameters([value], modifier_rank=None) if partitioned else nullcontext():
            if keep:
                state[key] = value.detach().to("cpu", copy=True)  # a copy: the gathered data is freed on exit
    return state


def fsdp1_full_state(root: nn.Module, prefix: str) -> dict[str, Tensor]:
    """The full state of the FSDP1-wrapped ``root`` on rank 0 (CPU): the keys under ``prefix``, without it.

    Every rank must call it; other ranks get an empty dict. FSDP strips its own and the activation
    checkpointing wrappers' names from the keys.
    """
    # Offloading gathers each unit to CPU as it goes (GPU memory stays bounded); torch's FSDP1 crashes offloading
    # weights that already are on the CPU (gloo runs), which need no offloading.
    offload = any(param.device.type != "cpu" for param in root.parameters())
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def full_tensor(param: Tensor) -> Tensor:
    """A detached whole copy of ``param``, gathered when FSDP2 or ZeRO-3 shards it (a collective then)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor().detach().clone()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach().clone()
