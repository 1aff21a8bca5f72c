"""The generation-backend contract: prompt ids in, prompt + response ids out; its default, ``HFGenerate``.

A ``Generator`` turns left-padded prompt ids into sequences (prompt + response). ``HFGenerate`` is
Hugging Face ``generate`` (any causal LM, every ``generation_config`` setting). Other backends live in
``plugins/generators`` (installed as ``lit_saferlhf_plugins.generators``: ``StaticCacheGenerate``) or in
other packages, registered under the entry-point group ``lit_saferlhf.generators``; a stage takes one as
``model.init_args.generator`` without knowing which.

Shapes: ``B`` prompts, ``P`` prompt columns (left-padded), ``G`` samples per prompt, ``A`` response
columns (right-padded with ``pad_id`` after the first EOS).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_saferlhf.errors import require


@dataclass(frozen=True)
class GenerationArgs:
    """How responses are sampled (Safe RLHF's reference: temperature 1, top-p 1, top-k 50)."""

    max_new_tokens: int = 512
    """Longest response in tokens."""
    temperature: float = 1.0
    """Softmax temperature of sampling (0: greedy, with ``StaticCacheGenerate``)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 disables it)."""
    top_k: int = 50
    """Sample among the k most likely tokens (0 disables it)."""
    num_return_sequences: int = 1
    """Responses sampled per prompt."""

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1", self.max_new_tokens)
        require(self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        require(0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        require(self.top_k >= 0, "top_k", "an integer >= 0", self.top_k)
        require(self.num_return_sequences >= 1, "num_return_sequences", "an integer >= 1", self.num_return_sequences)


class Generator(ABC):
    """Samples responses: prompt ids in, prompt + response ids out."""

    @abstractmethod
    def generate(
        self, model: Any, input_ids: Tensor, attention_mask: Tensor, args: GenerationArgs, eos_id: int, pad_id: int
    ) -> Tensor:
        """Sample from ``model`` after left-padded prompts ``(B, P)``; returns ``(B * G, P + A)``.

        Rows that finished early are filled with ``pad_id`` after their EOS.
        """

    def check_model(self, model: Any) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Refuse, when the stage sets up, a model this backend cannot decode (default: every model is fine)."""

    def strategy_problem(self, strategy: str, shards_parameters: bool, world_size: int) -> str | None:
        """Why this backend cannot run under the run's strategy, or None when it can (the default).

        Asked at start-up, before any network is built (``lit_saferlhf.callbacks.guards.StrategyCheck``).

        Args:
            strategy: The strategy's class name, for the message.
            shards_parameters: Whether every rank holds only a shard of each network (FSDP, ZeRO-3).
            world_size: The number of processes.
        """
        return None


class HFGenerate(Generator):
    """Hugging Face ``generate`` with sampling.

    Args:
        synced_gpus: Keep every rank stepping until all finish (needed under ZeRO-3/FSDP, where each
            decoding step gathers sharded weights from every rank). ``None`` = on when distributed.
    """

    def __init__(self, synced_gpus: bool | None = None) -> None:
        self.synced_gpus = synced_gpus

    def generate(
        self, model: Any, input_ids: Tensor, attention_mask: Tensor, args: GenerationArgs, eos_id: int, pad_id: int
    ) -> Tensor:
        """Sample with ``model.generate``."""
        synced = self.synced_gpus
        if synced is None:
            synced = torch.distributed.is_available() and torch.distributed.is_initialized()
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            num_return_sequences=args.num_return_sequences,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            synced_gpus=synced,
        )

    def strategy_problem(self, strategy: str, shards_parameters: bool, world_size: int) -> str | None:
        """``synced_gpus: false`` would hang a sharded run: a rank whose samples end first stops gathering."""
        if self.synced_gpus is False and shards_parameters and world_size > 1:
            return (
                f"model.generator.init_args.synced_gpus is false, but {strategy} shards the policy over "
                f"{world_size} processes, and generation would hang when one rank's samples end before the "
                "others' (each decoding step gathers weights from every rank). Set it to true, or leave it unset "
                "(on whenever the run is distributed)."
            )
        return None
