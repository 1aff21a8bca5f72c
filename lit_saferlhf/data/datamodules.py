"""LightningDataModules: read and validate records, split, encode, batch.

Each datamodule reads one kind of record through a schema adapter, holds out a validation
split by prompt (so no prompt is in both splits), tokenises with the model's tokenizer and
template, and reports how many records it skipped, excluded and truncated. The tokenizer comes
from the stage module (``trainer.lightning_module.tokenizer``): the model owns it.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from lit_saferlhf.data.adapters import Adapter, PKUSafeRLHF, PromptList, PromptResponse, RecordKind, load_records
from lit_saferlhf.data.collate import Encoded, Encoder, collate_pairs, collate_prompts, collate_sft
from lit_saferlhf.data.records import (
    BadRecordError,
    Described,
    PreferenceRecord,
    PromptRecord,
    SafetyPreferenceRecord,
    SFTRecord,
)
from lit_saferlhf.data.sampling import ResumableLoader, ResumableSampler, global_seed
from lit_saferlhf.data.templates import SafeRLHFTemplate, Template
from lit_saferlhf.errors import DataError, require


class RecordData(L.LightningDataModule, ABC):
    """Common base: ``kind`` names the record kind the subclass reads.

    Args:
        path: Training records: a ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet``/``.csv``/``.txt``
            file, a hub dataset name (needs the ``hub`` extra), or ``safety-world:<split>``.
        adapter: The schema of the records (``PKUSafeRLHF``, ``HHRLHF``, ``Alpaca``, ``PromptResponse``,
            ``PromptList``, or your own ``Adapter`` subclass).
        val_path: Validation records; when unset, ``val_fraction`` of the prompts are held out.
        val_fraction: Share of prompts held out for validation when there is no ``val_path``.
        template: How a conversation becomes prompt text. Unset: the stage's ``default_template`` when it
            has one (PPO: the template recorded in the policy's export), else Safe RLHF's.
        max_length: Longest sequence in tokens (longer ones are right-truncated and counted).
        batch_size: Samples per device per step.
        num_workers: DataLoader worker processes.
        on_bad_record: ``error`` stops at the first bad record (file, line, field); ``skip`` counts
            and reports them.
        limit: Read at most this many rows per file (quick runs).
        split: Split name for hub datasets.
    """

    kind: ClassVar[RecordKind]

    def __init__(
        self,
        path: str,
        adapter: Adapter,
        val_path: str | None = None,
        val_fraction: float = 0.0,
        template: Template | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_record: Literal["error", "skip"] = "error",
        limit: int | None = None,
        split: str = "train",
    ) -> None:
        super().__init__()
        require(0.0 <= val_fraction < 1.0, "val_fraction", "a fraction in [0, 1)", val_fraction)
        require(max_length >= 1, "max_length", "an integer >= 1 (tokens per sequence)", max_length)
        require(batch_size >= 1, "batch_size", "an integer >= 1", batch_size)
        require(num_workers >= 0, "num_workers", "an integer >= 0", num_workers)
        require(limit is None or limit >= 1, "limit", "None or an integer >= 1", limit)
        self.path, self.adapter, self.val_path, self.val_fraction = path, adapter, val_path, val_fraction
        self.template, self.template_given = template or SafeRLHFTemplate(), template is not None
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.on_bad_record, self.limit, self.split = on_bad_record, limit, split
        self.train_set: list[Any] = []
        self.val_set: list[Any] = []
        self.train_loader: ResumableLoader | None = None
        self.train_position: dict[str, int] | None = None  # from a checkpoint, for the training loader

    def setup(self, stage: str) -> None:
        """Read, split and encode once per process."""
        if self.train_set or self.val_set:
            return
        assert self.trainer is not None  # Lightning calls setup from a Trainer
        module = self.trainer.lightning_module
        default = getattr(module, "default_template", None)  # PPO, offline: the policy's recorded template
        if not self.template_given and default is not None:
            self.template = default
        rank_zero_info(f"template: {type(module).__name__} renders prompts with {self.template_origin(default)}")
        # Every stage module owns a tokenizer; nn.Module's __getattr__ types attributes as Tensor | Module.
        self.encoder = Encoder(cast(PreTrainedTokenizerBase, module.tokenizer), self.template, self.max_length)
        train = self.read(self.path)
        val = self.read(self.val_path) if self.val_path else []
        if not self.val_path and self.val_fraction > 0:
            train, val = split_by_prompt(train, self.val_fraction)
            expected = f"a fraction that leaves training data (it held out all {len(val)} records of {self.path})"
            require(bool(train), "data.init_args.val_fraction", expected, self.val_fraction)
        self.train_set = self.encode_all(train, "train")
        if not self.train_set:
            raise DataError(f"{self.path}: no training samples left: none of the {len(train)} records is usable "
                            f"({reasons(self.dropped)}; on_bad_record: skip dropped them)")  # fmt: skip
        self.val_set = self.encode_all(val, "validation")

    def template_origin(self, default: Template | None) -> str:
        """The data's template and why: set in the config, recorded by the policy's export, or the default."""
        name = type(self.template).__name__
        if self.template_given:
            return f"{name}, as data.init_args.template sets"
        if default is not None:
            return f"{name}, as the starting policy's export records (lit_saferlhf.json)"
        return f"{name}, the default: no template set (data.init_args.template) or recorded (PlainTemplate: raw text)"

    def read(self, path: str, adapter: Adapter | None = None, kind: RecordKind | None = None) -> list[Any]:
        """Records of ``kind`` (default ``self.kind``) from ``path``, reporting what was skipped or excluded."""
        adapter, kind = adapter or self.adapter, kind or self.kind
        loaded = load_records(path, adapter, kind, on_bad_record=self.on_bad_record, split=self.split, limit=self.limit)
        rank_zero_info(loaded.summary())
        return loaded.records

    def encode_all(self, records: Sequence[Any], name: str) -> list[Any]:
        """Encode every record; report how many are usable, how many were truncated, and why the others are not.

        A record that tokenisation leaves without a training signal (see ``tokenisation_problem``) is a bad
        record: with ``on_bad_record: error`` the run stops at the first (the line counts the others), with
        ``skip`` they are dropped (kept in ``self.dropped``) and the share kept is logged.
        """
        items, self.dropped = [], []
        for record in records:
            item = self.encode(record)
            problem = self.tokenisation_problem(record, item)
            if problem is None:
                items.append(item)
            else:
                self.dropped.append(problem)
        if self.dropped and self.on_bad_record == "error":
            raise DataError(
                f"{self.dropped[0]} ({len(self.dropped)} of the {len(records)} {name} records are unusable: "
                f"{reasons(self.dropped)}; on_bad_record: skip drops them)"
            ) from self.dropped[0]
        truncated = sum(self.count_truncated(item) for item in items)
        if records:
            rank_zero_info(
                f"{name}: {len(items)} of {len(records)} records usable ({len(items) / len(records):.0%}), "
                f"{truncated} truncated to max_length={self.max_length}"
                + (f"; {len(self.dropped)} dropped: {reasons(self.dropped)}" if self.dropped else "")
            )
        return items

    def tokenisation_problem(self, record: Any, item: Any) -> UnusableRecordError | None:
        """Why tokenisation leaves ``item`` without a training signal, or None (every sample is usable)."""
        return None

    @abstractmethod
    def encode(self, record: Any) -> Any:
        """One record -> one sample."""

    def count_truncated(self, item: Any) -> int:
        """How many sequences of ``item`` were cut short."""
        return int(item.truncated)

    @abstractmethod
    def collate(self, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        """A padded batch."""

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled training batches; a resumed run continues from the checkpoint's position."""
        self.train_loader = self.loader(self.train_set, shuffle=True)
        if self.train_position is not None:
            self.train_loader.load_state_dict(self.train_position)
        return self.train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training batches' position (epoch, seed, batches drawn), saved in every checkpoint.

        Lightning also saves a stateful loader's position, but restores it only if the loader is built
        after the checkpoint is read; ``estimated_stepping_batches`` (the stages' schedules) builds it
        earlier, so the position travels with the datamodule's state, which is always restored.
        """
        return {"train_position": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the training batches where ``state`` left them (before or after the loader is built)."""
        self.train_position = state.get("train_position")
        if self.train_loader is not None and self.train_position is not None:
            self.train_loader.load_state_dict(self.train_position)

    def val_dataloader(self) -> ResumableLoader | list:
        """Validation batches (none when there is no validation split)."""
        return self.loader(self.val_set, shuffle=False) if self.val_set else []

    def loader(self, items: list[Any], shuffle: bool) -> ResumableLoader:
        """This rank's share of ``items`` in batches, resumable mid-epoch (see ``sampling``)."""
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(items, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=global_seed())
        return ResumableLoader(items, self.batch_size, self.collate, sampler, num_workers=self.num_workers)

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id."""
        return self.encoder.tokenizer.pad_token_id


class SFTData(RecordData):
    """Demonstrations for supervised fine-tuning (stage 1); see ``RecordData`` for the arguments."""

    kind = "sft"

    def __init__(self, path: str, adapter: Adapter | None = None, **kwargs: Any) -> None:
        super().__init__(path, adapter or PromptResponse(), **kwargs)

    def encode(self, record: SFTRecord) -> Encoded:
        """Prompt + response + EOS."""
        return self.encoder.encode(record.prompt, record.response)

    def tokenisation_problem(self, record: SFTRecord, item: Encoded) -> UnusableRecordError | None:
        """A prompt that fills ``max_length`` leaves no response token to learn (a loss of 0)."""
        return no_response_left(record.source, item, self.max_length)

    def collate(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (prompt masked out)."""
        return collate_sft(batch, self.pad_id)


class PairData(RecordData):
    """Common base of ``RewardData`` and ``CostData``: a sample starts with two responses to one prompt."""

    def __init__(self, path: str, adapter: Adapter | None = None, **kwargs: Any) -> None:
        super().__init__(path, adapter or PKUSafeRLHF(), **kwargs)

    def count_truncated(self, item: tuple[Any, ...]) -> int:
        """A pair counts once if either side (``item[0]``, ``item[1]``) was cut."""
        return int(item[0].truncated or item[1].truncated)

    def tokenisation_problem(self, record: Any, item: tuple[Any, ...]) -> UnusableRecordError | None:
        """Two sides with the same tokens teach nothing (their loss is log 2 whatever the model)."""
        return pair_problem(record.source, item[0], item[1], self.max_length)


class RewardData(PairData):
    """Helpfulness pairs (better/worse) for the reward model (stage 2); see ``RecordData``."""

    kind = "preference"

    def encode(self, record: PreferenceRecord) -> tuple[Encoded, Encoded]:
        """Both answers after the same prompt."""
        return self.encoder.encode(record.prompt, record.better), self.encoder.encode(record.prompt, record.worse)

    def collate(self, batch: Sequence[tuple[Encoded, Encoded]]) -> dict[str, torch.Tensor]:
        """``better_*`` and ``worse_*`` ids and masks, padded to one width."""
        return collate_pairs(batch, self.pad_id, ("better", "worse"))


class CostData(PairData):
    """Harmlessness pairs (safer/unsafer + is_safe labels) for the cost model (stage 3)."""

    kind = "safety_preference"

    def encode(self, record: SafetyPreferenceRecord) -> tuple[Encoded, Encoded, bool, bool]:
        """Both answers plus their safety labels."""
        safer, unsafer = (
            self.encoder.encode(record.prompt, record.safer),
            self.encoder.encode(record.prompt, record.unsafer),
        )
        return safer, unsafer, record.is_safer_safe, record.is_unsafer_safe

    def collate(self, batch: Sequence[tuple[Encoded, Encoded, bool, bool]]) -> dict[str, torch.Tensor]:
        """``safer_*``/``unsafer_*`` ids and masks, ``is_safer_safe`` and ``is_unsafer_safe`` ``(B,)``."""
        out = collate_pairs([(item[0], item[1]) for item in batch], self.pad_id, ("safer", "unsafer"))
        out["is_safer_safe"] = torch.tensor([item[2] for item in batch])
        out["is_unsafer_safe"] = torch.tensor([item[3] for item in batch])
        return out


class PromptData(RecordData):
    """Prompts for PPO rollouts (stage 4): left-padded, ``max_length`` caps the prompt tokens.

    Args:
        path: Prompt records (see ``RecordData``).
        adapter: Their schema (default ``PromptList``).
        ptx_path: Demonstrations for the PTX loss (Safe RLHF's pre-training mix); each prompt batch
            then carries as many ``ptx_*`` demonstrations, cycling through them.
        ptx_adapter: Schema of the demonstrations (default ``PromptResponse``).
        ptx_max_length: Longest demonstration in tokens.
        category_column: The prompt records' column that holds each prompt's category (the safety world's
            ``risk_category``, a harm-category label): constraints bounded on one category read it
            (``model.init_args.constraints[].category``). Every record must have it.
        **kwargs: The rest of ``RecordData``'s arguments.

    Batches hold ``input_ids`` and ``attention_mask``, and for the scorers the user's prompt texts
    (``prompts``) and their categories (``categories``, None without ``category_column``).
    """

    kind = "prompt"

    # The RL stages sample and score in training only, with no validation loop: PromptData offers no validation
    # batches (RecordData's method, inherited, would make Lightning warn of a val_dataloader without validation_step).
    val_dataloader = L.LightningDataModule.val_dataloader

    def __init__(
        self,
        path: str,
        adapter: Adapter | None = None,
        ptx_path: str | None = None,
        ptx_adapter: Adapter | None = None,
        ptx_max_length: int = 512,
        category_column: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, adapter or PromptList(), **kwargs)
        no_validation = "unset: the RL stages that read prompts have no validation loop"
        require(self.val_path is None, "val_path", no_validation, self.val_path)
        require(self.val_fraction == 0, "val_fraction", no_validation, self.val_fraction)
        require(ptx_max_length >= 1, "ptx_max_length", "an integer >= 1 (tokens per demonstration)", ptx_max_length)
        self.ptx_path, self.ptx_adapter, self.ptx_max_length = ptx_path, ptx_adapter or PromptResponse(), ptx_max_length
        self.category_column = category_column

    def setup(self, stage: str) -> None:
        """Prompts, then (with ``ptx_path``) one demonstration paired with each prompt."""
        paired = bool(self.train_set) and isinstance(self.train_set[0], tuple)
        super().setup(stage)
        if self.ptx_path and not paired:
            ptx_encoder = Encoder(self.encoder.tokenizer, self.template, self.ptx_max_length)
            records = self.read(self.ptx_path, self.ptx_adapter, "sft")
            demonstrations = [ptx_encoder.encode(record.prompt, record.response) for record in records]
            demonstrations = self.usable_demonstrations(records, demonstrations)
            self.train_set = [(item, demonstrations[i % len(demonstrations)]) for i, item in enumerate(self.train_set)]

    def usable_demonstrations(self, records: list[SFTRecord], encoded: list[Encoded]) -> list[Encoded]:
        """The demonstrations that keep a response token within ``ptx_max_length`` (others: bad records)."""
        usable = []
        for record, item in zip(records, encoded, strict=True):
            problem = no_response_left(record.source, item, self.ptx_max_length)
            if problem is not None and self.on_bad_record == "error":
                raise problem
            usable += [item] if problem is None else []
        if not usable:
            raise DataError(f"{self.ptx_path}: no PTX demonstration keeps a response token within ptx_max_length")
        share = f"{len(usable)} of {len(encoded)} demonstrations usable ({len(usable) / len(encoded):.0%})"
        rank_zero_info(f"ptx: {share}, {len(encoded) - len(usable)} dropped: no response token within ptx_max_length")
        return usable

    def encode(self, record: PromptRecord) -> EncodedPrompt:
        """The templated prompt; a long one keeps its end (the part next to the answer)."""
        ids = self.encoder.prompt_ids(record.prompt)
        return EncodedPrompt(
            ids[-self.max_length :],
            min(len(ids), self.max_length),
            len(ids) > self.max_length,
            text=record.prompt[-1].content,
            category=self.category_of(record),
        )

    def category_of(self, record: PromptRecord) -> str | None:
        """The record's ``category_column`` as text (None without one); a record without it is a bad record."""
        if self.category_column is None:
            return None
        value = record.meta.get(self.category_column)
        if value is None or str(value) == "":
            expected = f"a prompt category in column {self.category_column!r} (data.init_args.category_column)"
            raise BadRecordError(record.source, self.category_column, expected, Described("no value"))
        return str(value)

    def categories(self) -> set[str]:
        """The distinct prompt categories of the training prompts (empty without ``category_column``)."""
        items = [item[0] if isinstance(item, tuple) else item for item in self.train_set]
        return {item.category for item in items if item.category is not None}

    def collate(self, batch: Sequence[EncodedPrompt | tuple[EncodedPrompt, Encoded]]) -> dict[str, Any]:
        """Left-padded ``input_ids`` and ``attention_mask``, the prompts' texts and categories, ``ptx_*`` if paired."""
        prompts = [item[0] if isinstance(item, tuple) else item for item in batch]
        out: dict[str, Any] = collate_prompts([item.input_ids for item in prompts], self.pad_id)
        out |= {"prompts": [item.text for item in prompts], "categories": [item.category for item in prompts]}
        if isinstance(batch[0], tuple):
            paired = cast(Sequence[tuple[Encoded, Encoded]], batch)  # setup pairs every prompt or none
            ptx = collate_sft([item[1] for item in paired], self.pad_id)
            out |= {f"ptx_{key}": value for key, value in ptx.items()}
        return out


@dataclass(frozen=True)
class EncodedPrompt(Encoded):
    """A templated prompt's ids, with the user's text and its category for the scorers."""

    text: str = ""
    category: str | None = None


class UnusableRecordError(BadRecordError):
    """A valid record that tokenisation leaves without a training signal; ``reason``: the cause reports count."""

    def __init__(self, source: str, field: str, expected: str, found: str, reason: str) -> None:
        super().__init__(source, field, expected, Described(found))
        self.reason = reason


def no_response_left(source: str, item: Encoded, max_length: int) -> UnusableRecordError | None:
    """A demonstration whose prompt fills ``max_length``: no response token is left to learn from."""
    if item.prompt_length < len(item.input_ids):
        return None
    expected = f"a prompt shorter than max_length={max_length} tokens, leaving room for the response"
    found, reason = f"a prompt of {item.prompt_length}+ tokens", f"no response token within max_length={max_length}"
    return UnusableRecordError(source, "prompt", expected, found, reason)


def pair_problem(source: str, first: Encoded, second: Encoded, max_length: int) -> UnusableRecordError | None:
    """Why a pair's two responses give no comparison (no response token left, or the same tokens), or None.

    The cause is named: a prompt that fills ``max_length``; responses that differ only past ``max_length``;
    or responses that differ as text but that the tokenizer encodes alike (unknown words, whitespace).
    """
    for item in (first, second):
        if item.prompt_length >= len(item.input_ids):
            return no_response_left(source, item, max_length)
    if first.input_ids != second.input_ids:
        return None
    if first.truncated or second.truncated:
        expected = f"two responses that still differ within max_length={max_length} tokens"
        found = f"responses whose first {len(first.input_ids) - first.prompt_length} tokens, all that fit, are the same"
        return UnusableRecordError(source, "(pair)", expected, found, f"responses alike within max_length={max_length}")
    expected = "two responses the tokenizer tells apart (not truncated: the tokenizer made the tie)"
    found = "different texts with the same ids (words outside its vocabulary, or spacing)"
    return UnusableRecordError(source, "(pair)", expected, found, "responses the tokenizer encodes alike")


def reasons(problems: Sequence[UnusableRecordError]) -> str:
    """``N <reason>`` per distinct reason, e.g. ``3 no response token within max_length=8``."""
    counts = Counter(problem.reason for problem in problems)
    return ", ".join(f"{count} {reason}" for reason, count in counts.items())


def split_by_prompt(records: Sequence[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of the distinct prompts (by a stable hash), with all their records."""
    train: list[Any] = []
    val: list[Any] = []
    for record in records:
        key = "\x1f".join(message.content for message in record.prompt).encode()
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (val if bucket < fraction else train).append(record)
    return train, val
