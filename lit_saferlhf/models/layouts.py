"""Score-model layouts: which saved format a model dir is in, and where its score head lives.

A score model (reward model, cost model, critic) is a backbone plus a linear head. Three saved
layouts carry a head, told apart from the dir's files and ``config.json``:

- ``lit-saferlhf``: ours. ``score_model.json`` (the side file) beside either ``score_head.safetensors``
  (version 1: the backbone as ``AutoModel`` saves it, the head and normaliser in that file) or, from
  version 2, a transformers ``*ForSequenceClassification`` checkpoint whose head is ``score.weight``.
- ``sequence-classification``: transformers' ``*ForSequenceClassification`` with one label (TRL and
  OpenRLHF reward models, Llama, Qwen2, Mistral, Gemma, GPT-2, ...): head ``score.weight`` (and
  ``score.bias`` where a family has one); the end score is taken at the last token that is not the
  padding token, as transformers takes it.
- ``safe-rlhf``: safe-rlhf's score models (``LlamaForScore`` etc., the Beaver reward and cost
  models): backbone under ``model.``, head ``score_head.weight`` (and ``score_head.bias``), config
  keys ``score_dim``, ``score_type``, ``do_normalize``, ``normalizer_type``, ``momentum`` and the
  normaliser buffers ``normalizer.mean`` / ``normalizer.var`` / ``normalizer.count``.

Anything else with a ``config.json`` is a ``language-model`` (a causal LM or a base model): it has
no score head, and only the reward and cost stages may put a new one on it.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lit_saferlhf.errors import InputNotFoundError, MissingTensorError, ModelDirError, ModelLayoutError

LayoutKind = Literal["lit-saferlhf", "sequence-classification", "safe-rlhf", "language-model"]
EndToken = Literal["attention_mask", "last_non_pad"]
NormalizerKind = Literal["ema", "running"]
NormalizeFunction = Literal["affine", "scale", "identity"]

SIDE_FILE = "score_model.json"
"""Our side file: format version, score type, head bias, normaliser (see ``ScoreModel.save_pretrained``)."""
HEAD_FILE_V1 = "score_head.safetensors"
"""Version 1 of our format kept the head and the normaliser statistics in this file."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Single-file checkpoints; each may instead be sharded with an ``.index.json`` beside it."""

SCORE_LAYOUTS = (
    "lit-saferlhf (score_model.json beside the weights)",
    "transformers *ForSequenceClassification with num_labels=1 (head score.weight)",
    "safe-rlhf *ForScore (head score_head.weight, config score_dim/score_type)",
)
"""The layouts with a score head, as error messages name them."""

SAFE_RLHF_FUNCTIONS: dict[str, NormalizeFunction] = {"reward": "affine", "cost": "scale", "critic": "identity"}
"""safe-rlhf's normalisation by ``score_type`` (``ScoreModelMixin.init_score_head``)."""
SAFE_RLHF_KINDS: dict[str | None, NormalizerKind] = {
    "RunningMeanStd": "running",
    "ExponentialMovingAverage": "ema",
    None: "running",
}
"""safe-rlhf's ``normalizer_type`` -> our ``ScoreNormalizer.kind``."""


@dataclass(frozen=True)
class NormalizerState:
    """A saved normaliser: how it updates, whether and how it transforms end scores, its statistics."""

    kind: NormalizerKind = "running"
    """``running`` (exact mean/variance) or ``ema``."""
    momentum: float = 0.9
    """EMA factor (``ema`` only)."""
    enabled: bool = False
    """Whether end scores are normalised with the statistics."""
    function: NormalizeFunction = "affine"
    """``affine``: ``(x - mean) / std``; ``scale``: ``x / std``; ``identity``: ``x``."""
    mean: float = 0.0
    """Mean of the end scores seen."""
    var: float = 1.0
    """Variance of the end scores seen."""
    count: float = 0.0
    """How many end scores were seen."""


@dataclass(frozen=True)
class Head:
    """A score head read from a checkpoint: ``weight`` ``(1, H)``, ``bias`` ``(1,)`` or None, the normaliser."""

    weight: Tensor
    bias: Tensor | None
    normalizer: NormalizerState


@dataclass(frozen=True)
class Layout:
    """What :func:`detect_layout` found in a model dir."""

    kind: LayoutKind
    """Which layout (see the module docstring)."""
    path: str
    """The dir or hub name as given."""
    local_dir: Path
    """A local dir holding at least the dir's JSON files (the dir itself, or a hub snapshot)."""
    config: dict[str, Any]
    """The raw ``config.json``."""
    side: dict[str, Any] | None = None
    """Our side file (``lit-saferlhf`` only)."""

    @property
    def has_head(self) -> bool:
        """Whether the dir holds a trained score head."""
        return self.kind != "language-model"

    @property
    def end_token(self) -> EndToken:
        """Where the end score is read: the last attended token, or transformers' last non-padding token."""
        if self.kind == "lit-saferlhf":
            return (self.side or {}).get("end_token", "attention_mask")
        return "last_non_pad" if self.kind == "sequence-classification" else "attention_mask"

    def describe(self) -> str:
        """A short name for messages, e.g. ``safe-rlhf score model (LlamaForScore)``."""
        architectures = ", ".join(self.config.get("architectures") or []) or self.config.get("model_type", "?")
        return f"{self.kind} ({architectures})"

    def read_head(self) -> Head:
        """The head and normaliser saved in the dir (reads only the head's tensors).

        Raises:
            ModelLayoutError: The dir has no head, or its head is not ``Linear(hidden, 1)``.
        """
        if self.kind == "language-model":
            raise ModelLayoutError(f"{self.path}: a {self.describe()} has no score head")
        if self.kind == "lit-saferlhf":
            return self._read_ours()
        prefix = "score" if self.kind == "sequence-classification" else "score_head"
        tensors = read_tensors(self, [f"{prefix}.weight"], optional=[f"{prefix}.bias", *NORMALIZER_KEYS])
        weight = tensors[f"{prefix}.weight"]
        if weight.ndim != 2 or weight.shape[0] != 1:
            raise ModelLayoutError(
                f"{self.path}: the score head {prefix}.weight has shape {tuple(weight.shape)}; a score model needs "
                "one score per token, shape (1, hidden)"
            )
        bias = tensors.get(f"{prefix}.bias")
        normalizer = self._safe_rlhf_normalizer(tensors) if self.kind == "safe-rlhf" else NormalizerState()
        return Head(weight=weight, bias=None if bias is None else bias.reshape(1), normalizer=normalizer)

    def _read_ours(self) -> Head:
        """Version 1: head + statistics in ``score_head.safetensors``; version 2: ``score.weight`` + side file."""
        meta = self.side or {}
        saved = meta.get("normalizer", {})
        if meta.get("version", 1) == 1:
            tensors = read_local_safetensors(self, HEAD_FILE_V1)
            stats = {name: float(tensors[f"normalizer.{name}"]) for name in ("mean", "var", "count")}
            normalizer = NormalizerState(**(_settings(saved) | stats))
            return Head(weight=tensors["weight"], bias=tensors.get("bias"), normalizer=normalizer)
        weight = read_tensors(self, ["score.weight"])["score.weight"]
        bias = meta["head"]["bias"]
        stats = {name: float(saved[name]) for name in ("mean", "var", "count")}
        normalizer = NormalizerState(**(_settings(saved) | stats))
        return Head(weight=weight, bias=None if bias is None else torch.tensor([bias]), normalizer=normalizer)

    def _safe_rlhf_normalizer(self, tensors: dict[str, Tensor]) -> NormalizerState:
        """safe-rlhf's normaliser: buffers from the weights (else ``mean``/``var`` from the config)."""
        score_type = self.config.get("score_type", "reward")
        if score_type not in SAFE_RLHF_FUNCTIONS:
            raise ModelLayoutError(
                f"{self.path}: config.json score_type must be one of reward, cost, critic, found {score_type!r}"
            )
        normalizer_type = self.config.get("normalizer_type")
        if normalizer_type not in SAFE_RLHF_KINDS:
            raise ModelLayoutError(
                f"{self.path}: config.json normalizer_type {normalizer_type!r} is not one safe-rlhf knows"
            )

        def stat(name: str, default: float) -> float:
            if f"normalizer.{name}" in tensors:
                return float(tensors[f"normalizer.{name}"].reshape(-1)[0])
            value = self.config.get(name)
            return float(value[0] if isinstance(value, list) else value) if value is not None else default

        return NormalizerState(
            kind=SAFE_RLHF_KINDS[normalizer_type],
            momentum=float(self.config.get("momentum") or 0.9),
            enabled=bool(self.config.get("do_normalize", False)),
            function=SAFE_RLHF_FUNCTIONS[score_type],
            mean=stat("mean", 0.0),
            var=stat("var", 1.0),
            count=stat("count", 0.0),
        )


NORMALIZER_KEYS = ("normalizer.mean", "normalizer.var", "normalizer.count")


def _settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The non-statistics fields of a saved normaliser (our side file)."""
    return {
        "kind": saved.get("kind", "running"),
        "momentum": float(saved.get("momentum", 0.9)),
        "enabled": bool(saved.get("enabled", False)),
        "function": saved.get("function", "affine"),
    }


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------


def detect_layout(path: str | Path) -> Layout:
    """Which layout the model dir (or hub name) ``path`` is in, from its files and ``config.json``.

    Raises:
        InputNotFoundError: No such dir (and no such hub model), or it has no ``config.json``.
        ModelLayoutError: A sequence classifier with more than one label, a safe-rlhf model with ``score_dim`` > 1,
            or a weights file of a local dir that is cut short (see :func:`check_weight_files`).
    """
    path = str(path)
    local = local_json_dir(path)
    if not (local / "config.json").is_file():
        raise InputNotFoundError(
            f"{path}: no config.json, so this is not a Hugging Face model dir; expected one of the score-model "
            f"layouts {list(SCORE_LAYOUTS)} or a causal LM"
        )
    check_weight_files(path)
    config = json.loads((local / "config.json").read_text())
    architectures = config.get("architectures") or []
    if (local / SIDE_FILE).is_file():
        return Layout("lit-saferlhf", path, local, config, json.loads((local / SIDE_FILE).read_text()))
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
        if labels != 1:
            raise ModelLayoutError(
                f"{path}: a {architectures[0]} with {labels} labels; a reward or cost model has one "
                "(num_labels=1, one score per sequence)"
            )
        return Layout("sequence-classification", path, local, config)
    if any(name.endswith("ForScore") for name in architectures) or "score_dim" in config:
        if int(config.get("score_dim", 1)) != 1:
            raise ModelLayoutError(f"{path}: a safe-rlhf score model with score_dim={config['score_dim']}; expected 1")
        return Layout("safe-rlhf", path, local, config)
    return Layout("language-model", path, local, config)


def require_score_model(path: str | Path, role: str) -> Layout:
    """The layout of ``path``, which must hold a trained score head (``role`` names it in the error).

    Raises:
        ModelLayoutError: ``path`` is a causal LM or base model (no head), naming the layouts looked for.
    """
    layout = detect_layout(path)
    if not layout.has_head:
        raise ModelLayoutError(
            f"{role}: {path} is a {layout.describe()} without a score head; a {role} must be a trained score "
            f"model in one of the layouts {list(SCORE_LAYOUTS)}. Only the reward and cost stages put a new head "
            "on a language model (train one first with cli_configs/.../reward.yaml or cost.yaml)"
        )
    return layout


def require_policy(path: str | Path, role: str = "policy") -> None:
    """Refuse a score model given where a causal language model belongs (``role`` names the place).

    A dir this module cannot read (no ``config.json``: a LoRA adapter, a hub name offline) passes:
    transformers then loads it or says why not.

    Raises:
        ModelLayoutError: ``path`` holds a score model (it would load with a random language-model head).
    """
    try:
        layout = detect_layout(path)
    except FileNotFoundError:
        return
    if layout.has_head:
        raise ModelLayoutError(
            f"{role}: {path} is a score model ({layout.describe()}), not a causal language model; give the "
            "policy dir here (e.g. the SFT export) and score models as reward_model / cost_model"
        )


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def local_json_dir(path: str) -> Path:
    """``path`` when it is a local dir; for a hub name, a snapshot of the repo's JSON files."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json"]))
    except Exception as error:  # a bad repo id, no network, no such repo: all mean "not found" here
        raise InputNotFoundError(f"{path}: no such model dir, and not found as a hub model ({error})") from error


def check_weight_files(path: str) -> None:
    """Refuse a local model dir whose weights file is cut short or corrupt, naming the file.

    transformers and torch report such a file without its name ("incomplete metadata", "failed finding
    central directory"). Only headers are read: each ``*.safetensors`` file's (which must cover the
    whole file) and the zip directory of each ``*.bin`` file that ``torch.save`` wrote as a zip archive.

    Raises:
        ModelLayoutError: ``FILE: a weights file that is cut short or corrupt (...)``.
    """
    folder = Path(path)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError as error:
            raise ModelLayoutError(f"{file}: a weights file that is cut short or corrupt ({error})") from error
    for file in sorted(folder.glob("*.bin")):
        with file.open("rb") as handle:
            zipped = handle.read(4) == ZIP_MAGIC  # torch.save's format; older pickles are not checked
        if zipped and not zipfile.is_zipfile(file):
            raise ModelLayoutError(f"{file}: a weights file that is cut short or corrupt (no zip directory at its end)")


ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of a zip archive, the format of ``torch.save`` (and so of ``pytorch_model.bin``)."""


def require_tokenizer_files(path: str, key: str) -> None:
    """Refuse a local model dir without tokenizer files (transformers would blame a missing sentencepiece).

    Args:
        path: The model dir (a hub name passes: the hub says whether it has a tokenizer).
        key: The setting that names the dir, for the message.

    Raises:
        ModelDirError: ``KEY: no tokenizer files in the model dir: PATH (...)``.
    """
    folder = Path(path)
    if folder.is_dir() and not any(_is_tokenizer_file(file.name) for file in folder.iterdir()):
        raise ModelDirError(
            key,
            path,
            "no tokenizer files in the model dir",
            "expected tokenizer.json, tokenizer_config.json, tokenizer.model or vocab.* beside config.json; "
            "save the tokenizer there too (tokenizer.save_pretrained(dir))",
        )


def _is_tokenizer_file(name: str) -> bool:
    """A file a transformers tokenizer loads from (fast, sentencepiece, BPE, WordPiece or tiktoken vocabularies)."""
    return name.startswith(("tokenizer", "vocab", "spiece")) or name.endswith((".model", ".tiktoken"))


def local_file(layout: Layout, name: str) -> Path:
    """A file of the model dir, downloaded from the hub when ``layout.path`` is a hub name."""
    if Path(layout.path).is_dir():
        return Path(layout.path) / name
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(layout.path, name))


def read_local_safetensors(layout: Layout, name: str) -> dict[str, Tensor]:
    """Every tensor of one safetensors file of the dir."""
    with safe_open(local_file(layout, name), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def weight_map(layout: Layout) -> dict[str, str]:
    """Tensor name -> file, from a shard index, or every name of the single weights file.

    Raises:
        InputNotFoundError: The dir has no ``model.safetensors`` or ``pytorch_model.bin`` (sharded or not).
    """
    for single in WEIGHT_FILES:
        index = layout.local_dir / f"{single}.index.json"
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
    for single in WEIGHT_FILES:
        try:
            file = local_file(layout, single)
        except Exception:  # not on the hub either
            continue
        if file.is_file():
            return dict.fromkeys(_keys(file), single)
    raise InputNotFoundError(f"{layout.path}: no weights ({' or '.join(WEIGHT_FILES)}, sharded or not)")


def _keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))


def read_tensors(layout: Layout, names: list[str], optional: list[str] | tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The named tensors of the dir's checkpoint (``optional`` ones only when present), read file by file.

    Raises:
        MissingTensorError: A required tensor is missing (the message lists the head-like names found).
    """
    files = weight_map(layout)
    missing = [name for name in names if name not in files]
    if missing:
        heads = sorted(key for key in files if not key.startswith(("model.", "transformer.", "gpt_neox.")))[:10]
        raise MissingTensorError(
            f"{layout.path}: the checkpoint has no {missing} (a {layout.describe()}); other tensors: {heads}"
        )
    wanted = [name for name in (*names, *optional) if name in files]
    tensors: dict[str, Tensor] = {}
    for file in dict.fromkeys(files[name] for name in wanted):
        path = local_file(layout, file)
        keys = [name for name in wanted if files[name] == file]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as handle:
                tensors |= {key: handle.get_tensor(key) for key in keys}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            tensors |= {key: state[key].clone() for key in keys}
    return tensors


HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""A Hugging Face hub id (``gpt2``, ``org/name``); any other path must be a local dir."""


def check_model_path(path: str, key: str) -> None:
    """Refuse a model path that is neither an existing local dir nor a hub id.

    Args:
        path: A local dir or a hub id (``org/name``).
        key: The setting that names it (``path``, ``policy``, ...), for the message.

    Raises:
        ModelDirError: ``model dir not found: PATH`` (a hub id that does not exist fails when it is loaded).
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return
    if local.exists():
        raise ModelDirError(key, path, "not a model dir (a file, expected a dir)")
    if path.startswith((".", "/", "~")) or not HUB_NAME.fullmatch(path):
        raise ModelDirError(key, path)
