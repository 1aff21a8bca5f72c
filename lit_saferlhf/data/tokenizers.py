"""Tokenizers of the networks a stage builds: a model's own, or the embedded safety world's word-level one.

This lives with the data, not with the models: the ``safety-world`` tokenizer's vocabulary is the
safety world's (``lit_saferlhf.data.safety_world``), and ``lit_saferlhf.models`` imports no data module.
"""

from __future__ import annotations

from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.errors import ModelDirError, ModelLayoutError
from lit_saferlhf.models.causal_lm import SAFETY_WORLD_TOKENIZER, ModelSource


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of ``source``, with a padding token (one is added when it has none)."""
    name = source.tokenizer or source.path
    assert name is not None  # ModelSource: a model built from a config names its tokenizer
    tokenizer: PreTrainedTokenizerBase
    if name == SAFETY_WORLD_TOKENIZER:
        tokenizer = build_tokenizer()
    else:
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
