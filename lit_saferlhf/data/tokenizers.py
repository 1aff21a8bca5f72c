"""Tokenizers of the networks a stage builds: a model's own, or the embedded safety world's word-level one.

This lives with the data, not with the models: the ``safety-world`` tokenizer's vocabulary is the
safety world's (``lit_saferlhf.data.safety_world``), and ``lit_saferlhf.models`` imports no data module.

Networks that exchange token ids (PPO's policy and its score models, the offline stage's policy, reference
and score sources, the models of ``lit-saferlhf merge``) must share one tokenizer; :func:`check_tokenizers`
stops at start-up when they do not (docs/configs.md, "One tokenizer for networks that exchange ids").
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_info
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lit_saferlhf.data.safety_world import build_guard_tokenizer, build_tokenizer
from lit_saferlhf.data.templates import recorded_template
from lit_saferlhf.errors import ModelDirError, ModelLayoutError
from lit_saferlhf.models.causal_lm import SAFETY_WORLD_GUARD_TOKENIZER, SAFETY_WORLD_TOKENIZER, ModelSource
from lit_saferlhf.models.layouts import require_tokenizer_files

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
"""The special tokens two networks that exchange ids must agree on."""
PROBE = "Hello, World! It's 2024: naïve café-goers ask 'why?'"
"""A text both tokenizers encode: the same vocabulary with another normaliser or BOS rule gives other ids."""
MATCHING = "docs/configs.md#one-tokenizer-for-networks-that-exchange-ids"
"""Where the docs say how to make tokenizers match."""


class TokenizerMismatchError(ModelLayoutError):
    """Two networks that exchange token ids whose tokenizers differ (vocabulary, special tokens or encoding)."""


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of ``source``, with a padding token (one is added when it has none)."""
    name = source.tokenizer or source.path
    assert name is not None  # ModelSource: a model built from a config names its tokenizer
    tokenizer: PreTrainedTokenizerBase
    if name == SAFETY_WORLD_TOKENIZER:
        tokenizer = build_tokenizer()
    elif name == SAFETY_WORLD_GUARD_TOKENIZER:
        tokenizer = build_guard_tokenizer()
    else:
        require_tokenizer_files(name, "tokenizer" if source.tokenizer else "path")  # not a sentencepiece hint
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=source.trust_remote_code)
        except OSError as error:  # not a local dir, and the hub has no such model (or cannot be reached)
            key, reason = "tokenizer" if source.tokenizer else "path", " ".join(str(error).split())[:200]
            raise ModelDirError(key, name, "model dir not found, nor a model on the hub", reason) from error
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if tokenizer.eos_token is None:
        raise ModelLayoutError(f"tokenizer {name!r} has no EOS token: responses need one to end")
    return tokenizer


def check_tokenizers(networks: Sequence[tuple[str, str | None]]) -> None:
    """Stop unless every network has the first one's tokenizer; log what they share and the templates they record.

    Token ids pass between these networks as they are (PPO's score models read the policy's samples, a merge
    keeps the first model's tokenizer), so the same id must mean the same token in each. There is no
    re-tokenisation path: the networks must be trained with one tokenizer (see ``MATCHING``).

    Args:
        networks: ``(config key, model dir or hub name)`` pairs; the first is the network whose ids the others
            read (the policy). A ``None`` dir is a network the run does not build; a dir listed twice is read once.

    Raises:
        TokenizerMismatchError: Two tokenizers differ; the message names the key and both dirs.
    """
    present = [(key, path) for key, path in networks if path is not None]
    loaded = {path: load_tokenizer(ModelSource(path=path)) for path in dict.fromkeys(path for _, path in present)}
    (first_key, first_path), *others = present
    for key, path in others:
        difference = tokenizer_difference(loaded[first_path], loaded[path])
        if difference is not None:
            raise TokenizerMismatchError(
                f"{key}: the tokenizer of {path} differs from the one of {first_path} ({first_key}): {difference}; "
                f"they would read each other's token ids as other tokens. Train both from one tokenizer ({MATCHING})"
            )
    if others:
        templates = ", ".join(f"{key} {template_name(path)}" for key, path in present)
        shared = f"{len(present)} networks share one tokenizer ({len(loaded[first_path])} tokens)"
        rank_zero_info(f"tokenizers: {shared}; the templates their exports record: {templates}")


def tokenizer_difference(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> str | None:
    """How ``second`` reads ``first``'s token ids differently, or None (same vocabulary, special tokens, encoding)."""
    first_vocab, second_vocab = first.get_vocab(), second.get_vocab()
    if first_vocab != second_vocab:
        moved = sorted(token for token in first_vocab.keys() & second_vocab.keys()
                       if first_vocab[token] != second_vocab[token])  # fmt: skip
        only = sorted(first_vocab.keys() ^ second_vocab.keys())
        example = (moved or only)[0]
        shown = (first_vocab.get(example), second_vocab.get(example))
        return (
            f"vocabularies of {len(first_vocab)} and {len(second_vocab)} tokens, {len(moved)} with another id and "
            f"{len(only)} in only one (e.g. {example!r}: id {shown[0]} vs {shown[1]})"
        )
    for name in SPECIAL_TOKENS:
        if getattr(first, name) != getattr(second, name):
            return f"{name} {getattr(first, name)!r} vs {getattr(second, name)!r}"
    first_ids, second_ids = first(PROBE)["input_ids"], second(PROBE)["input_ids"]
    if first_ids != second_ids:
        return f"the same vocabulary, but {PROBE!r} encodes as {first_ids} vs {second_ids} (normaliser or BOS rule)"
    return None


def template_name(path: str) -> str:
    """The class of the template the export at ``path`` records (``none`` when it records none)."""
    template = recorded_template(path)
    return "none" if template is None else type(template).__name__
