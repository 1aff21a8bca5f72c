"""``StaticCacheGenerate``: fast rollouts into a preallocated KV cache, sampling on the device.

The left-padded prompts are prefilled once (the output layer on the last position only); each new
token is then decoded into transformers' ``StaticCache`` with an optionally compiled step
(``torch.compile``, CUDA graphs on GPUs), sampling in Hugging Face's warper order on the device, and
a sharded actor (FSDP2, ZeRO-3) is gathered once per rollout into a local copy. Greedy, it gives
``generate``'s tokens exactly; sampled, the same distribution.

Shapes: ``N`` rows (prompts x samples per prompt), ``P`` prompt columns (left-padded, bucketed),
``T`` new tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from lit_saferlhf.errors import ConfigError
from lit_saferlhf.generators import GenerationArgs, Generator
from lit_saferlhf.models.logprobs import plain_parameters, position_ids

GENERATOR_KEY = "model.init_args.generator"
"""Where a PPO-Lagrangian config sets the generation backend, for errors in its settings."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")
"""Model types whose forward this backend drives with a static cache and ``position_ids`` (tested on CPU)."""


GENERATION_CONFIG_NO_OPS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "sequence_bias": None,
}
"""``generation_config`` settings that ``generate`` would apply and this backend does not (their no-op values)."""


class StaticCacheGenerate(Generator):
    """Decode into a preallocated (static) KV cache, one optionally compiled step per token, sampling on the device.

    The left-padded prompts are prefilled once; each new token is then decoded into transformers'
    ``StaticCache`` of ``P + max_new_tokens`` columns with fixed shapes, so ``torch.compile`` compiles the
    step once per run (on CUDA as a CUDA graph, mode ``reduce-overhead``). Sampling follows Hugging Face's
    ``generate`` (float32 scores; temperature, then top-k, then top-p; greedy when the temperature is 0), but
    draws among the top-k candidates instead of over the whole vocabulary. Rows are padded with ``pad_id``
    after their EOS and the output is cut where ``generate`` would stop, so the result has the same contract
    and, greedy, the same tokens. Under FSDP2 or ZeRO-3 the actor's full weights are gathered once per rollout
    into a local copy that decodes with no collective per token (``gather``).

    For Llama, Mistral, Qwen2/3, Gemma and GPT-2 model types; any other is refused (use ``HFGenerate``).

    Args:
        compile: Compile the decode step with ``torch.compile``. None: on CUDA only (on CPU the step is
            dominated by the output layer and compiling does not pay; see ``benchmarks/rollout.py``).
        check_every: Look whether every row has finished once every this many tokens (each look is one
            host-device synchronisation); 1 stops as early as ``generate``, the output is the same either way.
        prompt_bucket: Left-pad the prompts to a multiple of this many columns, so the cache and the compiled
            step keep their shapes from one rollout to the next (extra columns are masked and cut off again).
        gather: Under FSDP2 or DeepSpeed ZeRO-3, copy the actor's full weights once per rollout into a local
            unsharded copy and decode that. None: when the full actor fits in a third of the free device
            memory (always on CPU). False: decode the sharded actor, every rank running all ``max_new_tokens``
            steps in lock step (the ``synced_gpus`` way, one gather per layer and token).
        pack_output_layer: On CPU (float32, eager), run the output layer through oneDNN with its weight
            prepacked once per rollout (:class:`OutputLayer`: about 2x faster than ``linear`` at the benchmark's
            shape; logits equal up to float32 rounding). False: the model's own output layer.
    """

    def __init__(
        self,
        compile: bool | None = None,
        check_every: int = 8,
        prompt_bucket: int = 16,
        gather: bool | None = None,
        pack_output_layer: bool = True,
    ) -> None:
        if check_every < 1 or prompt_bucket < 1:
            raise ConfigError(GENERATOR_KEY, f"StaticCacheGenerate: check_every and prompt_bucket must be >= 1, got "
                              f"{check_every}, {prompt_bucket}")  # fmt: skip
        self.compile, self.check_every, self.prompt_bucket, self.gather = compile, check_every, prompt_bucket, gather
        self.pack_output_layer = pack_output_layer
        self._cache: Any = None
        self._step: Any = None
        self._local: LocalCopy | None = None

    def check_model(self, model: Any) -> None:
        """Refuse an unsupported model type or ``generation_config`` (see :func:`check_supported`) at set-up."""
        check_supported(model)

    @torch.no_grad()
    def generate(
        self, model: Any, input_ids: Tensor, attention_mask: Tensor, args: GenerationArgs, eos_id: int, pad_id: int
    ) -> Tensor:
        """Sample with a static cache; ``(B * n, P + A)`` like ``HFGenerate``."""
        check_supported(model)
        network, lock_step = self.decoding_network(model)
        n, prompt_columns = args.num_return_sequences, input_ids.shape[1]
        input_ids = left_pad(input_ids.repeat_interleave(n, dim=0), self.prompt_bucket, pad_id)
        attention_mask = left_pad(attention_mask.repeat_interleave(n, dim=0), self.prompt_bucket, 0)
        try:
            tokens = self.decode(network, input_ids, attention_mask, args, eos_id, pad_id, lock_step)  # (N, T)
        finally:
            if self._local is not None and not self.compiles(network):
                self._local = None  # free the gathered copy; a compiled step keeps it (stable addresses)
        sequences = torch.cat([input_ids[:, input_ids.shape[1] - prompt_columns :], tokens], dim=1)
        return sequences[:, : prompt_columns + stop_length(tokens, eos_id)]

    def decode(
        self,
        model: Any,
        input_ids: Tensor,
        attention_mask: Tensor,
        args: GenerationArgs,
        eos_id: int,
        pad_id: int,
        lock_step: bool,
    ) -> Tensor:
        """Prefill, then one token per step until ``max_new_tokens`` or every row has finished, ``(N, T)``."""
        rows, columns, steps = *input_ids.shape, args.max_new_tokens
        head = self.output_layer(model, rows)
        network = model.get_decoder() if head is not None else model
        cache = {cache_argument(network): self.static_cache(model, rows, columns + steps)}  # keyword found once
        mask = torch.cat([attention_mask, attention_mask.new_ones(rows, steps)], dim=1)  # (N, P + T), fixed shape
        positions = position_ids(attention_mask)  # (N, P)
        logits = decode_step(network, head, cache, input_ids, mask, positions)  # (N, V)
        position = positions[:, -1:]  # (N, 1)
        tokens = input_ids.new_full((rows, steps), pad_id)
        finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        step = self.decode_step(model)
        for t in range(steps):
            token = torch.where(finished, pad_id, sample_next_token(logits, args.temperature, args.top_k, args.top_p))
            tokens[:, t] = token
            finished |= token == eos_id
            last = t == steps - 1
            if last or (not lock_step and (t + 1) % self.check_every == 0 and bool(finished.all())):
                break
            position = position + 1
            logits = step(network, head, cache, token[:, None], mask, position)
        return tokens

    def static_cache(self, model: Any, rows: int, length: int) -> Any:
        """The run's static cache, reset; a new one when the shape or the network changes."""
        from transformers import StaticCache

        key = (id(model), rows, length)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, StaticCache(config=model.config, max_cache_len=length))
        cache = self._cache[1]
        cache.reset()
        return cache

    def output_layer(self, model: Any, rows: int) -> OutputLayer | None:
        """``model``'s output layer prepacked for this rollout's ``rows``, or None.

        Prepacked with ``pack_output_layer`` and an eager step on a CPU; None: the model's own forward
        computes the logits.
        """
        head = model.get_output_embeddings()
        if not self.pack_output_layer or self.compiles(model) or not OutputLayer.applies(head, model):
            return None
        return OutputLayer(head, rows)

    def compiles(self, model: Any) -> bool:
        """Whether the decode step is compiled for ``model``'s device."""
        return self.compile if self.compile is not None else next(model.parameters()).device.type == "cuda"

    def decode_step(self, model: Any) -> Any:
        """The function that decodes one token: ``decode_step``, compiled once per run if ``compiles``."""
        if not self.compiles(model):
            return decode_step
        if self._step is None:
            cuda = next(model.parameters()).device.type == "cuda"
            compiled = torch.compile(decode_step, mode="reduce-overhead" if cuda else None, fullgraph=False)
            self._step = compiled if not cuda else cudagraph_steps(compiled)
        return self._step

    def decoding_network(self, model: Any) -> tuple[Any, bool]:
        """The network to decode with, and whether ranks must step together (a sharded actor, not gathered)."""
        from lit_saferlhf.models.sharding import is_sharded, is_zero3_partitioned

        if not (is_sharded(model) or is_zero3_partitioned(model)):
            return model, False
        if not (self.gather if self.gather is not None else fits_locally(model)):
            return model, True
        if self._local is None:
            self._local = LocalCopy(model)
        return self._local.refresh(model), False


def check_supported(model: Any) -> None:
    """Refuse a model this backend cannot drive exactly: its type, or ``generation_config`` settings it ignores."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            GENERATOR_KEY,
            f"StaticCacheGenerate: model type {model_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}); use model.generator: "
            "{class_path: lit_saferlhf.generators.HFGenerate} for this model",
        )
    config = getattr(model, "generation_config", None)
    active = {
        name: getattr(config, name)
        for name, no_op in GENERATION_CONFIG_NO_OPS.items()
        if getattr(config, name, no_op) not in (None, no_op)
    }
    if active:
        raise ConfigError(
            GENERATOR_KEY,
            f"StaticCacheGenerate: the model's generation_config sets {active}, which Hugging Face generate "
            "applies and this backend does not; reset them in generation_config.json or use "
            "lit_saferlhf.generators.HFGenerate",
        )


def sample_next_token(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Draw the next token as Hugging Face's sampling does, on CPU among the top-k candidates only.

    Warpers in ``generate``'s order on float32 scores: divide by the temperature, keep the ``top_k``
    highest scores and every score equal to the k-th (``TopKLogitsWarper`` keeps ties), keep the smallest
    set of the highest whose probability reaches ``top_p`` (the most likely token always stays), then draw
    from the softmax of what is left. On CPU the softmax and the draw are over the k candidates from
    ``topk``, not the whole vocabulary (the same distribution: the other tokens get probability 0), unless
    some row has a score outside the k candidates equal to the k-th (a tie): then every row takes the
    whole-vocabulary path, as ``generate`` does. On other devices the whole-vocabulary path always (its passes
    cost microseconds there, and a tie check would read the device every token). Temperature 0 is greedy.

    Args:
        logits: Next-token scores, ``(N, V)``.
        temperature: Softmax temperature; 0 for greedy decoding.
        top_k: Candidates kept (0: all).
        top_p: Nucleus mass (1.0: no nucleus filter).

    Returns:
        The drawn token ids, ``(N,)``, int64.
    """
    scores = logits.float()
    if temperature == 0:
        return scores.argmax(dim=-1)
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        values, candidates = scores.topk(top_k, dim=-1)  # (N, k), descending
        kth = values[:, -1:]  # (N, 1)
        if scores.device.type == "cpu" and not bool(((scores >= kth).sum(dim=-1) > top_k).any()):
            return draw(values, top_p, candidates)
        scores = scores.masked_fill(scores < kth, float("-inf"))  # TopKLogitsWarper, ties kept
    return draw(scores, top_p)


def draw(scores: Tensor, top_p: float, candidates: Tensor | None = None) -> Tensor:
    """A token per row ``(N,)`` from the softmax of ``scores`` ``(N, C)`` after the nucleus filter.

    ``candidates`` ``(N, C)`` maps the C columns to token ids (None: the columns are the ids).
    """
    if top_p < 1.0:
        scores = nucleus(scores, top_p)
    choice = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)  # (N, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


def nucleus(scores: Tensor, top_p: float) -> Tensor:
    """Hugging Face's ``TopPLogitsWarper`` on ``(N, C)`` scores: the tail whose mass is <= ``1 - top_p`` gets -inf."""
    ascending, order = torch.sort(scores, descending=False)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False  # keep at least the most likely token
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def stop_length(tokens: Tensor, eos_id: int) -> int:
    """Columns ``generate`` keeps: up to the step at which the last row emitted its first EOS (or all)."""
    has_eos = (tokens == eos_id).any(dim=-1)  # (N,)
    first_eos = (tokens == eos_id).long().argmax(dim=-1)  # (N,)
    return int(torch.where(has_eos, first_eos + 1, tokens.shape[1]).max())


def left_pad(tensor: Tensor, multiple: int, value: int) -> Tensor:
    """Left-pad ``(N, P)`` with ``value`` to the next multiple of ``multiple`` columns."""
    extra = -tensor.shape[1] % multiple
    return torch.nn.functional.pad(tensor, (extra, 0), value=value) if extra else tensor


def cache_argument(model: Any) -> str:
    """The keyword of the model's forward that takes the cache (``cache`` in newer transformers 5 releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward(
    model: Any, cache: dict[str, Any], input_ids: Tensor, mask: Tensor, positions: Tensor, **kwargs: Any
) -> Tensor:
    """The model's logits for ``input_ids`` written into the static cache ``{keyword: cache}``, ``(N, L, V)``."""
    return model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache, **kwargs
    ).logits


def decode_step(
    network: Any, head: OutputLayer | None, cache: dict[str, Any], input_ids: Tensor, mask: Tensor, positions: Tensor
) -> Tensor:
    """Float32 scores ``(N, V)`` of the token after ``input_ids`` ``(N, L)`` at ``positions`` ``(N, L)``.

    Prefill passes the prompts, decoding one token. ``network`` is the decoder and ``head`` the output
    layer, applied to the last position only, or ``head`` is None and ``network`` the whole causal LM
    (``logits_to_keep=1``).
    """
    if head is None:
        return forward(network, cache, input_ids, mask, positions, logits_to_keep=1)[:, -1].float()
    hidden = network(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)[0]
    return head(hidden[:, -1]).float()


class OutputLayer:
    """A linear output layer ``h W^T + b`` on CPU through oneDNN with its weight prepacked once per rollout.

    At the benchmark's shape (batch 16, hidden 256, vocabulary 50,258, one thread) the output layer is
    most of a decoding step; with the weight reordered into oneDNN's blocked layout (what inductor's CPU
    weight "freezing" does) it runs in about 4 ms instead of 9 ms for ``linear``. Same float32 math, another
    summation order: logits differ from ``linear``'s by float32 rounding (a few 1e-6 at that shape).
    Built again for every rollout from the layer's current weight (the policy changes between rollouts).
    """

    def __init__(self, layer: torch.nn.Linear, rows: int) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
        self.bias = None if layer.bias is None else layer.bias.detach()

    @staticmethod
    def applies(layer: Any, model: Any) -> bool:
        """Whether ``layer`` (``model``'s output layer) can be prepacked.

        It must be a plain float32 linear map on a CPU with oneDNN's prepacked linear, and ``model`` must
        not transform its logits beyond it.
        """
        transforms = ("logit_scale", "logits_scaling", "final_logit_softcapping")
        return (
            type(layer) is torch.nn.Linear
            and layer.weight.device.type == "cpu"
            and layer.weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # inductor's CPU op (a private API)
            and not any(getattr(model.config, name, None) is not None for name in transforms)
            and plain_parameters(model)
        )

    def __call__(self, hidden: Tensor) -> Tensor:
        """Logits ``(N, V)`` of hidden states ``(N, H)``."""
        return torch.ops.mkldnn._linear_pointwise(hidden, self.weight, self.bias, "none", [], "")


def cudagraph_steps(compiled: Any) -> Any:
    """A CUDA-graph step that marks each call as a new step (its outputs are read before the next replay)."""

    def step(*args: Any) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    return step


def fits_locally(model: Any) -> bool:
    """Whether a full copy of ``model`` takes at most a third of the free memory of its device (CPU: yes)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return True
    full_bytes = sum(param.numel() * param.element_size() for param in model.parameters())  # numel is the full size
    free, _ = torch.cuda.mem_get_info(device)
    return 3 * full_bytes <= free


class LocalCopy:
    """An unsharded copy of a sharded actor (FSDP2 DTensors or ZeRO-3 partitions), refreshed once per rollout.

    Built once from the actor's config (plain transformers class, same dtype and device); ``refresh``
    gathers the actor's parameters one at a time (every rank takes part, in the same order) and copies
    them and the buffers in place, so the copy keeps its addresses between rollouts (a compiled step stays valid).
    """

    def __init__(self, model: Any) -> None:
        from transformers import AutoModelForCausalLM

        first = next(model.parameters())
        device = first.device if not hasattr(first, "ds_id") else torch.device("cuda", torch.cuda.current_device())
        with torch.device("meta"):  # no memory and no random init (which would move the sampling seed)
            network = AutoModelForCausalLM.from_config(model.config, dtype=first.dtype)
        self.network = network.to_empty(device=device).requires_grad_(False)

    def refresh(self, model: Any) -> Any:
        """Copy ``model``'s full weights into the local network; returns it, in ``model``'s train/eval mode."""
        from torch.distributed.tensor import DTensor

        if hasattr(model, "peft_config"):  # LoRA: the copy is the base with the adapters folded in
            return self.refresh_merged(model)
        local = dict(self.network.named_parameters())
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                local[name].copy_(param.full_tensor())
            elif hasattr(param, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    local[name].copy_(param.data)
            else:
                local[name].copy_(param)
        local_buffers = dict(self.network.named_buffers())
        for name, buffer in model.named_buffers():  # buffers (rotary frequencies) are never sharded
            local_buffers[name].copy_(buffer)
        self.network.train(model.training)
        return self.network

    def refresh_merged(self, model: Any) -> Any:
        """``refresh`` for a ``peft`` actor: its gathered weights, adapters merged, under the base model's names."""
        from lit_saferlhf.models.peft import base_name, merged_state_dict
        from lit_saferlhf.models.sharding import full_tensor

        full = {name: full_tensor(param) for name, param in model.named_parameters()}  # one at a time, every rank
        local = dict(self.network.named_parameters())
        for name, tensor in merged_state_dict(model, full).items():
            local[name].copy_(tensor)
        local_buffers = dict(self.network.named_buffers())
        for name, buffer in model.named_buffers():
            local_buffers[base_name(name)].copy_(buffer)
        self.network.train(model.training)
        return self.network
