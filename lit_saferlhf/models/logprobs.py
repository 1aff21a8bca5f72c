"""Log-probs of sampled response tokens under a causal LM, without building the full-vocabulary logits.

Shapes: ``N`` sequences, ``L`` prompt + response columns (prompts left-padded), ``A`` response columns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_saferlhf.losses import chunked_token_logprobs, gather_logprobs


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` counts them, ``(N, P)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


KEEP_LOGITS_BYTES = 256 * 2**20
"""Largest float32 response logits ``(N, A, V)`` that backward may keep (else it recomputes them per chunk)."""


def response_logprobs(
    model: Any, sequences: Tensor, attention: Tensor, start: int, chunk_size: int | None = None
) -> Tensor:
    """Log-probs of the response tokens ``sequences[:, start:]`` under a causal LM, ``(N, A)``.

    From the decoder's last hidden states through :func:`~lit_saferlhf.losses.chunked_token_logprobs`:
    the output layer runs on the response positions only, ``chunk_size`` positions at a time, so the
    ``(N, L, V)`` logits never exist; backward recomputes each chunk's logits instead of keeping them
    when the response logits would take more than ``KEEP_LOGITS_BYTES`` (below that, keeping them
    saves one output-layer matmul). Where the output layer's weights
    are not plain local tensors (FSDP2, FSDP1, ZeRO-3: the wrapper gathers them in the model's own
    forward) or the model transforms its logits beyond a soft cap, the same numbers come from the
    model's full logits instead.

    Args:
        model: A Hugging Face causal LM (possibly wrapped by ``peft``).
        sequences: Prompt + response ids, ``(N, L)``.
        attention: Attention mask, ``(N, L)``; left-padded prompts.
        start: Column of the first response token.
        chunk_size: Positions per chunk of the output layer. None: 64 on CPU (a chunk's logits stay in the
            processor's cache: 20-40% faster than 1024 in ``benchmarks/ppo_step.py``'s shape), 1024 on GPUs.
    """
    positions = position_ids(attention)
    head = model.get_output_embeddings()
    config = model.config
    scaled = any(getattr(config, name, None) is not None for name in ("logit_scale", "logits_scaling"))
    if type(head) is not torch.nn.Linear or scaled or not plain_parameters(model):
        logits = model(input_ids=sequences, attention_mask=attention, position_ids=positions).logits
        return gather_logprobs(logits[:, start - 1 : -1], sequences[:, start:])
    hidden = model.get_decoder()(input_ids=sequences, attention_mask=attention, position_ids=positions)[0]
    softcap = getattr(config, "final_logit_softcapping", None)
    recompute = sequences[:, start:].numel() * head.weight.shape[0] * 4 > KEEP_LOGITS_BYTES  # float32 logits
    chunk_size = chunk_size or (64 if hidden.device.type == "cpu" else 1024)
    return chunked_token_logprobs(
        hidden[:, start - 1 : -1], head.weight, sequences[:, start:], head.bias, chunk_size, softcap, recompute
    )


def plain_parameters(model: Any) -> bool:
    """Whether every parameter of ``model`` is a whole local tensor (not FSDP2, FSDP1 or ZeRO-3 managed)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lit_saferlhf.models.sharding import is_sharded, is_zero3_partitioned

    wrapped = any(isinstance(module, FullyShardedDataParallel) for module in model.modules())
    return not (wrapped or is_sharded(model) or is_zero3_partitioned(model))
