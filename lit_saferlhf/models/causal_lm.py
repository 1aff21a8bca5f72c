"""Load, build and export Hugging Face causal language models and their tokenizers.

Every stage reads and writes the Hugging Face format: a model from the hub or a local dir goes
in, and ``export`` writes a dir (safetensors + tokenizer) that ``AutoModelForCausalLM`` loads.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_saferlhf.errors import ConfigError, writing
from lit_saferlhf.models.layouts import check_model_path, require_policy
from lit_saferlhf.models.peft import LoraArgs, apply_lora, export_view, quantization_kwargs
from lit_saferlhf.models.zero3 import build_partitioned, partitioning

if TYPE_CHECKING:  # peft is imported where it is used
    from peft import PeftModel

SAFETY_WORLD_TOKENIZER = "safety-world"
"""Tokenizer name that selects the embedded safety world's word-level tokenizer."""
SAFETY_WORLD_GUARD_TOKENIZER = "safety-world-guard"
"""Tokenizer name that selects the safety world's tokenizer plus the tiny guard's answer words and codes."""


@dataclass(frozen=True)
class ModelSource:
    """Where a network comes from: a hub name or local dir, or a config for random weights.

    Exactly one of ``path`` and ``config`` is set. ``dtype``, ``gradient_checkpointing`` and ``lora``
    say how to build it; a stage's config sets them as the stage's own arguments (``model.init_args.dtype``,
    ``model.init_args.gradient_checkpointing``, ``model.init_args.lora`` in every stage) and the stage
    merges them in (``with_build_settings``), so they are left unset under a stage's ``model``.
    """

    path: str | None = None
    """Hugging Face hub name or local directory of a saved model (``save_pretrained`` output)."""
    config: dict[str, Any] | None = None
    """Transformers config (with ``model_type``) to build a randomly initialised model, for tiny runs."""
    tokenizer: str | None = None
    """Tokenizer hub name or dir; defaults to ``path``. ``safety-world`` selects the embedded one
    (``safety-world-guard``: the same plus the tiny guard's answer words and category codes)."""
    dtype: str | None = None
    """Weights dtype when loading (``bfloat16``, ``float16``, ``float32``); None keeps float32. In a stage's
    config: the stage's ``dtype`` (``model.init_args.dtype``), not this field."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with a hub model. Off unless you trust the source."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory. In a stage's config: the stage's
    ``gradient_checkpointing`` (``model.init_args.gradient_checkpointing``), not this field."""
    lora: LoraArgs | None = None
    """Train low-rank adapters on the frozen weights (``peft``; see ``models/peft.py``); None: full fine-tuning.
    In a stage's config: the stage's ``lora`` (``model.init_args.lora``), not this field."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ConfigError("model", "set exactly one of `path` (hub name or dir) and `config` (random weights)")
        if self.config is not None and "model_type" not in self.config:
            raise ConfigError("model.config", "needs a `model_type` key, e.g. {model_type: llama, hidden_size: 64}")
        if self.path is None and self.tokenizer is None:
            raise ConfigError("model.tokenizer", "a model built from `config` needs a tokenizer name or dir")
        for key in ("path", "tokenizer"):
            if getattr(self, key) not in (None, SAFETY_WORLD_TOKENIZER, SAFETY_WORLD_GUARD_TOKENIZER):
                check_model_path(getattr(self, key), key)
        torch_dtype(self.dtype)  # a dtype torch does not have fails at start-up
        if self.lora is not None and self.lora.quantize is not None and self.path is None:
            expected = "null when the model is built from `config` (QLoRA quantizes pretrained weights: set `path`)"
            raise ConfigError("lora.quantize", expected, self.lora.quantize)

    def with_build_settings(
        self, dtype: str | None, gradient_checkpointing: bool, lora: LoraArgs | None
    ) -> ModelSource:
        """This source with a stage's build settings, which have one config path in every stage.

        Args:
            dtype: The stage's ``dtype``.
            gradient_checkpointing: The stage's ``gradient_checkpointing``.
            lora: The stage's ``lora``.

        Raises:
            ConfigError: This source sets one of them itself (``model.init_args.model.lora``): a second path,
                refused so that every stage reads them from ``model.init_args.<setting>``.
        """
        for key in BUILD_SETTINGS:
            if getattr(self, key) != BUILD_SETTINGS[key]:
                raise ConfigError(
                    f"model.init_args.model.{key}",
                    f"is not a `model` setting here: set it as the stage's own `model.init_args.{key}`, "
                    "the same path in every stage",
                )
        return replace(self, dtype=dtype, gradient_checkpointing=gradient_checkpointing, lora=lora)


BUILD_SETTINGS: dict[str, Any] = {"dtype": None, "gradient_checkpointing": False, "lora": None}
"""The ``ModelSource`` fields a stage sets from its own arguments, and their defaults (unset)."""


# Stages built in Python (not by the CLI) keep these in their checkpoints' hyper-parameters.
torch.serialization.add_safe_globals([ModelSource])


def load_config(source: ModelSource, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The transformers config of ``source``, with the special-token ids of ``tokenizer``."""
    if source.path is not None:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    else:
        assert source.config is not None  # ModelSource sets exactly one of path and config
        kwargs = {key: value for key, value in source.config.items() if key != "model_type"}
        config = AutoConfig.for_model(source.config["model_type"], vocab_size=len(tokenizer), **kwargs)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    return config


def build_causal_lm(source: ModelSource, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel | PeftModel:
    """A causal LM from ``source``: pretrained weights, or random weights from a config.

    The embeddings are resized when the tokenizer grew (an added padding token). Under DeepSpeed
    ZeRO-3 the pretrained weights are copied into the partitioned network (see ``zero3``).

    Raises:
        ValueError: ``source.path`` is a score model (see ``layouts``), which has no language-model head.
    """
    if source.path is not None:
        require_policy(source.path)
    config = load_config(source, tokenizer)
    if partitioning():
        model = build_partitioned(AutoModelForCausalLM, config, source.path, source.trust_remote_code)
    elif source.path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            source.path,
            config=config,
            dtype=torch_dtype(source.dtype),
            trust_remote_code=source.trust_remote_code,
            **quantization_kwargs(source.lora),
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=source.trust_remote_code)
    fit_embeddings(model, tokenizer)
    if source.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model if source.lora is None else apply_lora(model, source.lora, "CAUSAL_LM", source.gradient_checkpointing)


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the input (and tied output) embeddings when the tokenizer has more tokens."""
    rows = cast(int, model.get_input_embeddings().num_embeddings)  # nn.Module's __getattr__ types it Tensor | Module
    if len(tokenizer) > rows and partitioning():
        raise ConfigError(
            "trainer.strategy",
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings {rows} rows, and they cannot be "
            "resized once DeepSpeed ZeRO-3 has partitioned them: resize and save the model first (e.g. run the "
            "SFT stage without ZeRO-3, or load it, call resize_token_embeddings and save_pretrained)",
        )
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))


def torch_dtype(name: str | None) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; None -> float32."""
    if name is None:
        return torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError("dtype", "one of bfloat16, float16, float32", name)
    return dtype


def export(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face dir (safetensors), atomically.

    The dir is written beside its destination and renamed into place, so an interrupted export
    never leaves a half-written dir that looks valid. ``state_dict`` replaces the model's own
    tensors (the gathered full state of a sharded model). A LoRA model is written with its adapters
    merged, or as its adapter alone (``LoraArgs.export``). ``extra_files`` (file name -> text, e.g.
    ``multiplier_history.json``) are written into the dir before it is renamed into place too.
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:
        network, state_dict = export_view(model, state_dict)
        network.save_pretrained(str(staging), safe_serialization=True, state_dict=state_dict)  # peft: a str
        tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return out_dir


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """A staging dir beside ``out_dir`` to write an export into, renamed into place once the block ends.

    If the block fails, the staging dir is removed and an older ``out_dir`` stays as it was; a full disk
    is a ``DiskFullError`` naming ``out_dir``. (safetensors writes each file to a temporary name and
    renames it, so a full disk shows only here, not as a failed write of a named file.) The export gets the
    modes the user's umask gives (:func:`umask_modes`), like anything else the user writes.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = new_dir(out_dir.parent, prefix=f".{out_dir.name}.")
    try:
        with writing(out_dir):
            yield staging
        umask_modes(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, out_dir)


def new_dir(parent: Path, prefix: str) -> Path:
    """A new dir in ``parent`` named ``prefix`` + random letters, with the umask's mode (``mkdtemp``'s is 0700)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def umask_modes(folder: Path) -> None:
    """Give everything under ``folder`` the mode the umask gives new files and dirs, as ``folder`` got it.

    Libraries write some files through private temporary files (safetensors: mode 0600); ``folder`` was made by
    ``mkdir``, so its mode is 0777 less the umask (read from it: setting the umask to read it is not thread-safe).
    """
    dir_mode = folder.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else dir_mode & 0o666)


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move ``staging`` to ``out_dir``, replacing an older ``out_dir`` (rename is atomic)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
