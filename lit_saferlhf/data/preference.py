"""Pairs for offline preference optimisation: both responses of a row with every label the data has.

A PKU-SafeRLHF row gives a helpfulness ordering (``better_response_id``), a safety ordering
(``safer_response_id``) and a safety label per response; both orderings rank the same two
responses, so one row is one ``PairRow`` and one forward over its two responses serves every
objective. The rows are read through the existing adapters: the adapter's ``preference`` records
and its ``safety_preference`` records of the same source line are joined. HH-RLHF has only the
helpfulness ordering.

The objective of the stage names the labels it needs (``Objective.requires``). Rows that lack one
are excluded and counted; when no row has it, set-up stops and names the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_saferlhf.data.adapters import Adapter, LoadedRecords, PKUSafeRLHF, PromptList, RecordKind, load_records
from lit_saferlhf.data.collate import Encoded, attention_mask, collate_prompts, pad
from lit_saferlhf.data.datamodules import RecordData, UnusableRecordError, pair_problem
from lit_saferlhf.data.records import Conversation, PreferenceRecord, SafetyPreferenceRecord
from lit_saferlhf.errors import DataError
from lit_saferlhf.objectives import LABEL_FIELDS

DATA_LABELS = ("better", "safer", "is_safe")
"""The labels that come from the data (the others come from score models)."""


@dataclass(frozen=True)
class PairRow:
    """One row: a prompt, its two responses, and the labels the data gives (None when absent)."""

    prompt: Conversation
    responses: tuple[str, str]
    better: int | None
    safer: int | None
    is_safe: tuple[bool, bool] | None
    source: str


@dataclass(frozen=True)
class EncodedPair:
    """Both responses of a row, tokenised, with its labels and its position in the split."""

    sides: tuple[Encoded, Encoded]
    row: PairRow
    index: int

    @property
    def truncated(self) -> bool:
        """Whether either side was cut to ``max_length``."""
        return self.sides[0].truncated or self.sides[1].truncated


class MissingLabelError(DataError):
    """The objective needs a label that no row of the data has."""


def join_rows(preference: Sequence[PreferenceRecord], safety: Sequence[SafetyPreferenceRecord]) -> list[PairRow]:
    """One ``PairRow`` per source row: the helpfulness and safety records of the same line, joined.

    Response 0 is the better response when the row has a helpfulness label, else the safer one.
    """
    by_source = {record.source: record for record in safety}
    rows = []
    for record in preference:
        responses = (record.better, record.worse)
        rows.append(_with_safety(record.prompt, responses, 0, by_source.pop(record.source, None), record.source))
    for source, safety_record in by_source.items():  # safety-only rows (no helpfulness label)
        responses = (safety_record.safer, safety_record.unsafer)
        rows.append(_with_safety(safety_record.prompt, responses, None, safety_record, source))
    return rows


def _with_safety(
    prompt: Conversation,
    responses: tuple[str, str],
    better: int | None,
    safety: SafetyPreferenceRecord | None,
    source: str,
) -> PairRow:
    if safety is None:
        return PairRow(prompt, responses, better, None, None, source)
    safer = responses.index(safety.safer)
    flags = (safety.is_safer_safe, safety.is_unsafer_safe)
    is_safe = flags if safer == 0 else flags[::-1]
    return PairRow(prompt, responses, better, safer, is_safe, source)


def has_label(row: PairRow, label: str) -> bool:
    """Whether ``row`` carries ``label`` (``better``, ``safer`` or ``is_safe``)."""
    return getattr(row, label) is not None


class PreferenceData(RecordData):
    """Response pairs with helpfulness and safety labels for ``PreferenceOptimization``.

    Args:
        path: Pair records (see ``RecordData``), e.g. ``safety-world:pairs`` or PKU-SafeRLHF files.
        adapter: Their schema (default ``PKUSafeRLHF``; ``HHRLHF`` gives helpfulness pairs only).
        buffer_path: General helpfulness pairs mixed into every training batch (BFPO's buffer); each
            is labelled better-over-worse and both safe. One buffer pair per training pair, cycling.
        buffer_adapter: Schema of the buffer pairs (default ``PKUSafeRLHF``).
        sample_prompts: Prompts the stage samples responses for (C-DPO's cost estimate, CAN's dual);
            default: the prompts of the training pairs.
        sample_adapter: Schema of ``sample_prompts`` (default ``PromptList``).
        **kwargs: The rest of ``RecordData``'s arguments.
    """

    kind = "preference"

    def __init__(
        self,
        path: str,
        adapter: Adapter | None = None,
        buffer_path: str | None = None,
        buffer_adapter: Adapter | None = None,
        sample_prompts: str | None = None,
        sample_adapter: Adapter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, adapter or PKUSafeRLHF(), **kwargs)
        self.buffer_path, self.buffer_adapter = buffer_path, buffer_adapter or PKUSafeRLHF()
        self.sample_prompts, self.sample_adapter = sample_prompts, sample_adapter or PromptList()
        self.buffer_set: list[EncodedPair] = []

    def setup(self, stage: str) -> None:
        """Pairs (checked against the objective's labels), then the buffer pairs."""
        fresh = not (self.train_set or self.val_set)
        super().setup(stage)
        if fresh and self.buffer_path:
            rows = [
                PairRow(r.prompt, (r.better, r.worse), 0, None, (True, True), r.source)
                for r in self.read(self.buffer_path, self.buffer_adapter, "preference")
            ]
            self.buffer_set = self.encode_all(rows, "buffer")

    def read(self, path: str, adapter: Adapter | None = None, kind: RecordKind | None = None) -> list[Any]:
        """Records of ``kind``; without a kind, ``PairRow``s of ``path`` that carry the objective's labels."""
        if kind is not None:
            return super().read(path, adapter, kind)
        return self.with_labels(self.read_rows(path), path, self.required_labels())

    def read_rows(self, path: str) -> list[PairRow]:
        """Every row of ``path`` as a ``PairRow`` (helpfulness and safety records joined)."""
        self.loaded: dict[str, LoadedRecords | str] = {}
        records = {kind: self.load(path, kind) for kind in ("preference", "safety_preference")}
        return join_rows(records["preference"], records["safety_preference"])

    def load(self, path: str, kind: RecordKind) -> list[Any]:
        """Records of one kind, or none (with the reason kept for a later error) when the data has none."""
        if kind not in self.adapter.kinds():
            self.loaded[kind] = f"{type(self.adapter).__name__} has no {kind} records"
            return []
        try:
            loaded = load_records(
                path, self.adapter, kind, on_bad_record=self.on_bad_record, split=self.split, limit=self.limit
            )
        except ValueError as error:
            if "no records of kind" not in str(error):
                raise
            self.loaded[kind] = str(error)
            return []
        self.loaded[kind] = loaded
        rank_zero_info(loaded.summary())
        return loaded.records

    def required_labels(self) -> tuple[str, ...]:
        """The data labels the stage's objective needs (none without a trainer)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        requires = getattr(getattr(module, "objective", None), "requires", ())
        return tuple(label for label in requires if label in DATA_LABELS)

    def with_labels(self, rows: list[PairRow], path: str, labels: Sequence[str]) -> list[PairRow]:
        """The rows that carry every label in ``labels``; an error naming the field when none does."""
        for label in labels:
            kept = [row for row in rows if has_label(row, label)]
            if not kept:
                raise MissingLabelError(self.missing(path, label))
            if len(kept) < len(rows):
                share = f"{len(kept)} of {len(rows)} pairs kept ({len(kept) / len(rows):.0%})"
                rank_zero_info(f"{path}: {share}, {len(rows) - len(kept)} excluded: no {LABEL_FIELDS[label]}")
            rows = kept
        return rows

    def missing(self, path: str, label: str) -> str:
        """The start-up error for a label no row of ``path`` has."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        objective = type(getattr(module, "objective", None)).__name__
        kind = "preference" if label == "better" else "safety_preference"
        found = self.loaded.get(kind)
        reason = found if isinstance(found, str) else (found.summary() if found else "")
        return (
            f"{path}: the objective {objective} needs {LABEL_FIELDS[label]}, and no pair of the data has it"
            + (f" ({reason})" if reason else "")
            + "; use data with that field, or an objective that does not need it"
        )

    def encode_all(self, records: Sequence[Any], name: str) -> list[Any]:
        """The usable pairs (``RecordData.encode_all``), numbered by position (the stage caches reference log-probs)."""
        return [replace(item, index=i) for i, item in enumerate(super().encode_all(records, name))]

    def encode(self, record: PairRow) -> EncodedPair:
        """Both responses after the same prompt (``encode_all`` numbers them)."""
        first, second = (self.encoder.encode(record.prompt, response) for response in record.responses)
        return EncodedPair((first, second), record, -1)

    def tokenisation_problem(self, record: PairRow, item: EncodedPair) -> UnusableRecordError | None:
        """A pair without a response token on a side, or with the same tokens on both, carries no training signal."""
        return pair_problem(record.source, *item.sides, self.max_length)

    def train_dataloader(self) -> Any:
        """Training pairs; each carries one buffer pair when there is a buffer."""
        if self.buffer_set and not isinstance(self.train_set[0], tuple):
            self.train_set = [
                (item, self.buffer_set[i % len(self.buffer_set)]) for i, item in enumerate(self.train_set)
            ]
        return super().train_dataloader()

    def collate(self, batch: Sequence[EncodedPair | tuple[EncodedPair, EncodedPair]]) -> dict[str, torch.Tensor]:
        """Pairs as ``2B`` right-padded sequences (response 0 and 1 of each pair), labels, and ``buffer_*``."""
        if isinstance(batch[0], tuple):
            paired = cast(Sequence[tuple[EncodedPair, EncodedPair]], batch)  # the loader pairs every item or none
            out = collate_pair_rows([item[0] for item in paired], self.pad_id)
            buffer = collate_pair_rows([item[1] for item in paired], self.pad_id)
            return out | {f"buffer_{key}": value for key, value in buffer.items()}
        return collate_pair_rows(cast(Sequence[EncodedPair], batch), self.pad_id)

    def prompt_batches(self, count: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``count`` distinct prompts to sample from, as left-padded batches (``collate_prompts``)."""
        if self.sample_prompts:
            prompts = [record.prompt for record in self.read(self.sample_prompts, self.sample_adapter, "prompt")]
        else:
            items = [item[0] if isinstance(item, tuple) else item for item in self.train_set]
            prompts = [item.row.prompt for item in items]
        unique = list(dict.fromkeys(prompts))[:count]
        ids = [self.encoder.prompt_ids(prompt)[-self.max_length :] for prompt in unique]
        return [collate_prompts(ids[i : i + batch_size], self.pad_id) for i in range(0, len(ids), batch_size)]


def collate_pair_rows(items: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate B pairs into one batch of their 2B responses.

    Returns ``input_ids``, ``attention_mask``, ``response_mask`` ``(2B, L)`` (pair b's responses at 2b,
    2b + 1), ``index`` ``(B,)``, and the labels every row has: ``better``/``safer`` ``(B,)``, ``is_safe`` ``(B, 2)``.
    """
    sides = [side for item in items for side in item.sides]
    rows = [side.input_ids for side in sides]
    response = [[0] * side.prompt_length + [1] * (len(side.input_ids) - side.prompt_length) for side in sides]
    out = {
        "input_ids": pad(rows, pad_id),
        "attention_mask": attention_mask(rows),
        "response_mask": pad(response, 0).bool(),
        "index": torch.tensor([item.index for item in items]),
    }
    for label in DATA_LABELS:
        values = [getattr(item.row, label) for item in items]
        if all(value is not None for value in values):
            out[label] = torch.tensor(values)
    return out
