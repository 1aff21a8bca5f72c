"""Schema adapters: raw rows -> validated records, and the loader that runs one over a source.

An adapter knows one schema (PKU-SafeRLHF, HH-RLHF, Alpaca, ...) and turns a row of it into the
records of :mod:`lit_saferlhf.data.records`. Records are validated here, once: a row that does not
fit raises :class:`BadRecordError` naming the file, the line or row, the field, what was expected
and what was found. A row that fits but is left out on purpose (no helpfulness label, say) raises
:class:`Excluded` with a reason; :func:`load_records` counts those by reason. Nothing is dropped
without a count.

Which adapter reads a dataset is chosen in YAML by ``class_path``::

    adapter: {class_path: lit_saferlhf.data.PKUSafeRLHF, init_args: {drop_inconsistent: true}}

To read another schema, subclass :class:`Adapter` and implement the kinds it has.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from lit_saferlhf.data.readers import read_rows
from lit_saferlhf.data.records import (
    BadRecordError,
    Conversation,
    Described,
    Message,
    PreferenceRecord,
    PromptRecord,
    Role,
    SafetyPreferenceRecord,
    SFTRecord,
    user_prompt,
)
from lit_saferlhf.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RecordKind = Literal["sft", "preference", "safety_preference", "prompt"]
KINDS: tuple[RecordKind, ...] = ("sft", "preference", "safety_preference", "prompt")


class Excluded(Exception):  # noqa: N818  (not an error: a row left out on purpose)
    """A row deliberately left out; :func:`load_records` counts it under ``reason``.

    Args:
        reason: Why rows like this one are left out, e.g. ``"inconsistent safety labels"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnsupportedRecordKind(ConfigError, TypeError):
    """The adapter's schema has no records of the asked kind (a configuration error, not a data one)."""


# ----------------------------------------------------------------------------------------------
# The contract and field validation
# ----------------------------------------------------------------------------------------------


class Adapter:
    """Converts rows of one schema into records. Subclasses override the kinds their schema has.

    Every method takes the raw ``row`` and its ``source`` (``"file:line N"``) and returns one
    record, or raises :class:`BadRecordError` (the row does not fit) or :class:`Excluded` (the row
    fits but is left out on purpose).
    """

    def sft(self, row: dict[str, Any], source: str) -> SFTRecord:
        """A demonstration (SFT stage)."""
        raise self.unsupported("sft")

    def preference(self, row: dict[str, Any], source: str) -> PreferenceRecord:
        """A helpfulness comparison (reward model stage)."""
        raise self.unsupported("preference")

    def safety_preference(self, row: dict[str, Any], source: str) -> SafetyPreferenceRecord:
        """A harmlessness comparison with safety labels (cost model stage)."""
        raise self.unsupported("safety_preference")

    def prompt(self, row: dict[str, Any], source: str) -> PromptRecord:
        """A prompt to generate from (PPO stage, evaluation)."""
        raise self.unsupported("prompt")

    @classmethod
    def kinds(cls) -> tuple[RecordKind, ...]:
        """The record kinds this adapter reads (the methods it overrides)."""
        return tuple(kind for kind in KINDS if getattr(cls, kind) is not getattr(Adapter, kind))

    def unsupported(self, kind: RecordKind) -> UnsupportedRecordKind:
        """The error for a kind this schema does not have, naming the adapters that have it."""
        others = sorted(cls.__name__ for cls in _builtin_adapters() if kind in cls.kinds())
        return UnsupportedRecordKind(
            "adapter",
            f"{type(self).__name__} has no {kind} records (it reads: {', '.join(self.kinds()) or 'nothing'}); "
            f"for {kind} records use one of: {', '.join(others)}",
        )


def _builtin_adapters() -> list[type[Adapter]]:
    pending: list[type[Adapter]] = [Adapter]
    found: list[type[Adapter]] = []
    while pending:
        for cls in pending.pop().__subclasses__():
            pending.append(cls)
            found.append(cls)
    return [cls for cls in found if cls.__module__ == __name__]


class _Missing:
    """Shown as the ``found`` value of a missing field: says which fields the row does have."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.fields = ", ".join(map(str, row))

    def __repr__(self) -> str:
        return f"no such field (the row has: {self.fields})"


def required(row: dict[str, Any], name: str, source: str, expected: str) -> Any:
    """``row[name]``, or a BadRecordError when the field is missing."""
    if name not in row:
        raise BadRecordError(source, name, expected, _Missing(row))
    return row[name]


def text_field(row: dict[str, Any], name: str, source: str) -> str:
    """``row[name]`` as a non-empty, not only whitespace, string that UTF-8 can encode (returned unchanged)."""
    value = required(row, name, source, "a non-empty string")
    if not isinstance(value, str) or not value.strip():
        raise BadRecordError(source, name, "a non-empty string", value)
    return encodable(value, name, source)


_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str, name: str, source: str) -> str:
    r"""``text`` unchanged, or a BadRecordError when it holds a lone surrogate (e.g. JSON's ``"\ud800"``).

    A tokenizer cannot encode such text (it fails deep inside with a TypeError that names no record).
    """
    match = _SURROGATE.search(text)
    if match is None:
        return text
    found = Described(f"a lone surrogate \\u{ord(match.group()):04x} at character {match.start() + 1}")
    raise BadRecordError(source, name, "text that UTF-8 can encode", found)


def _other_columns(row: dict[str, Any], *used: str) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in used}


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------


class PKUSafeRLHF(Adapter):
    """PKU-SafeRLHF pairs: a prompt, two responses, which one is better and which is safer.

    Schema: ``prompt``, ``response_0``, ``response_1``, ``is_response_0_safe``,
    ``is_response_1_safe``, ``better_response_id``, ``safer_response_id``. Ids must be the ints
    0 or 1; safety labels are booleans (the ints 0 and 1 are accepted as False and True). A pair
    with a null ``better_response_id`` has no helpfulness label and is excluded from preference
    records (the safety-only sets do this); a pair of two identical responses is a bad record.

    Args:
        drop_inconsistent: A pair whose safer response is labelled unsafe while the other is
            labelled safe contradicts itself. By default it is a bad record (stop, or skip it with
            ``on_bad_record: skip``); when true it is excluded and counted instead.
    """

    def __init__(self, drop_inconsistent: bool = False) -> None:
        self.drop_inconsistent = drop_inconsistent

    def prompt(self, row: dict[str, Any], source: str) -> PromptRecord:
        """The pair's prompt (one record per pair, so a prompt with several pairs repeats)."""
        return PromptRecord(user_prompt(text_field(row, "prompt", source)), source)

    def preference(self, row: dict[str, Any], source: str) -> PreferenceRecord:
        """Better and worse response by ``better_response_id``."""
        if row.get("better_response_id", 0) is None:
            raise Excluded("no helpfulness label (better_response_id is null)")
        prompt, responses = self._pair(row, source)
        better = _response_id(row, "better_response_id", source)
        return PreferenceRecord(prompt, responses[better], responses[1 - better], source)

    def safety_preference(self, row: dict[str, Any], source: str) -> SafetyPreferenceRecord:
        """Safer and unsafer response by ``safer_response_id``, with their is_safe labels."""
        if row.get("safer_response_id", 0) is None:
            raise Excluded("no safety label (safer_response_id is null)")
        prompt, responses = self._pair(row, source)
        safer = _response_id(row, "safer_response_id", source)
        safe = (_safe_label(row, "is_response_0_safe", source), _safe_label(row, "is_response_1_safe", source))
        if safe[1 - safer] and not safe[safer]:
            if self.drop_inconsistent:
                raise Excluded("inconsistent safety labels")
            labels = f"is_response_0_safe={safe[0]}, is_response_1_safe={safe[1]}"
            expected = f"{1 - safer} since {labels} (or set the adapter's `drop_inconsistent: true`)"
            raise BadRecordError(source, "safer_response_id", expected, safer)
        return SafetyPreferenceRecord(
            prompt, responses[safer], responses[1 - safer], safe[safer], safe[1 - safer], source
        )

    @staticmethod
    def _pair(row: dict[str, Any], source: str) -> tuple[Conversation, tuple[str, str]]:
        prompt = user_prompt(text_field(row, "prompt", source))
        responses = (text_field(row, "response_0", source), text_field(row, "response_1", source))
        if responses[0] == responses[1]:
            raise BadRecordError(source, "response_1", "a response different from response_0", responses[1])
        return prompt, responses


def _response_id(row: dict[str, Any], name: str, source: str) -> int:
    value = required(row, name, source, "0 or 1")
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise BadRecordError(source, name, "0 or 1", value)
    return value


def _safe_label(row: dict[str, Any], name: str, source: str) -> bool:
    value = required(row, name, source, "true or false")
    if not isinstance(value, int) or value not in (0, 1):  # bool is an int; 0 and 1 are accepted too
        raise BadRecordError(source, name, "true or false", value)
    return bool(value)


class HHRLHF(Adapter):
    r"""Anthropic HH-RLHF: ``chosen`` and ``rejected`` dialogues that differ in the final reply.

    A dialogue is ``"\n\nHuman: ...\n\nAssistant: ..."`` (the leading blank lines are optional).
    Human turns become user messages and Assistant turns assistant messages, each stripped of
    surrounding whitespace; consecutive turns of the same speaker (a few in the real data) are
    merged into one, joined by a blank line. The prompt is every turn before the final Assistant
    reply, which must be non-empty; ``chosen`` and ``rejected`` must share the prompt.
    """

    def prompt(self, row: dict[str, Any], source: str) -> PromptRecord:
        """The conversation before the final reply of ``chosen``."""
        return PromptRecord(parse_hh_dialogue(text_field(row, "chosen", source), source, "chosen")[0], source)

    def sft(self, row: dict[str, Any], source: str) -> SFTRecord:
        """``chosen`` as a demonstration: its final reply to the conversation before it."""
        prompt, reply = parse_hh_dialogue(text_field(row, "chosen", source), source, "chosen")
        return SFTRecord(prompt, reply, source)

    def preference(self, row: dict[str, Any], source: str) -> PreferenceRecord:
        """The final reply of ``chosen`` is better than that of ``rejected``."""
        prompt, better = parse_hh_dialogue(text_field(row, "chosen", source), source, "chosen")
        rejected_prompt, worse = parse_hh_dialogue(text_field(row, "rejected", source), source, "rejected")
        if rejected_prompt != prompt:
            found = _first_difference(prompt, rejected_prompt)
            raise BadRecordError(source, "rejected", "the same conversation as 'chosen' before the final reply", found)
        if better == worse:
            raise BadRecordError(source, "rejected", "a final reply different from that of 'chosen'", worse)
        return PreferenceRecord(prompt, better, worse, source)


def _first_difference(expected: Conversation, found: Conversation) -> str:
    for number, (want, got) in enumerate(zip(expected, found, strict=False), start=1):
        if want != got:
            return f"turn {number} differs: {got.content}"
    return f"{len(found)} turns before the final reply instead of {len(expected)}"


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES: dict[str, Role] = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str, source: str, name: str) -> tuple[Conversation, str]:
    """Split an HH-RLHF dialogue into the conversation before the final reply, and that reply.

    Raises:
        BadRecordError: The text is not a dialogue that starts with a Human turn and ends with a
            non-empty Assistant reply, or it has an empty Human turn.
    """
    parts = _HH_TURN.split(text.lstrip())
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise BadRecordError(source, name, 'a dialogue of turns "\\n\\nHuman: ..." "\\n\\nAssistant: ..."', text)
    turns: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = _HH_ROLES[speaker]
        if turns and turns[-1].role == role:  # a repeated speaker continues its turn
            turns[-1] = Message(role, "\n\n".join(part for part in (turns[-1].content, content.strip()) if part))
        else:
            turns.append(Message(role, content.strip()))
    problem = _hh_problem(turns)
    if problem:
        raise BadRecordError(source, name, problem, "..." + text[-60:] if len(text) > 63 else text)
    return tuple(turns[:-1]), turns[-1].content


def _hh_problem(turns: list[Message]) -> str | None:
    """What is wrong with a parsed dialogue, as an "expected ..." phrase, or None."""
    if turns[-1].role != "assistant":
        return "a dialogue that ends with an Assistant turn"
    if not turns[-1].content:
        return "a non-empty final Assistant reply"
    if not all(turn.content for turn in turns if turn.role == "user"):
        return "non-empty Human turns"
    return None


class Alpaca(Adapter):
    """Alpaca instructions: ``instruction``, ``input`` (optional, may be empty) and ``output``.

    The prompt is the instruction, followed by a blank line and the input when the input is not
    empty. Other columns go to the prompt record's ``meta``.
    """

    def prompt(self, row: dict[str, Any], source: str) -> PromptRecord:
        """The instruction (and input) as a single user turn."""
        return PromptRecord(self._prompt(row, source), source, _other_columns(row, "instruction", "input", "output"))

    def sft(self, row: dict[str, Any], source: str) -> SFTRecord:
        """The instruction (and input) answered by ``output``."""
        return SFTRecord(self._prompt(row, source), text_field(row, "output", source), source)

    @staticmethod
    def _prompt(row: dict[str, Any], source: str) -> Conversation:
        instruction = text_field(row, "instruction", source)
        extra = row.get("input")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise BadRecordError(source, "input", "a string (may be empty)", extra)
        encodable(extra, "input", source)
        return user_prompt(f"{instruction}\n\n{extra}" if extra.strip() else instruction)


class PromptResponse(Adapter):
    """Generic demonstrations: a prompt column and a response column (other columns are ignored).

    Args:
        prompt_column: Column holding the prompt text.
        response_column: Column holding the response to learn.
    """

    def __init__(self, prompt_column: str = "prompt", response_column: str = "response") -> None:
        self.prompt_column, self.response_column = prompt_column, response_column

    def prompt(self, row: dict[str, Any], source: str) -> PromptRecord:
        """The prompt; columns other than prompt and response go to ``meta``."""
        text = text_field(row, self.prompt_column, source)
        return PromptRecord(user_prompt(text), source, _other_columns(row, self.prompt_column, self.response_column))

    def sft(self, row: dict[str, Any], source: str) -> SFTRecord:
        """The prompt answered by the response."""
        prompt = user_prompt(text_field(row, self.prompt_column, source))
        return SFTRecord(prompt, text_field(row, self.response_column, source), source)


class PromptList(Adapter):
    """Prompts only, one per row, e.g. evaluation sets; the other columns go to ``meta``.

    Common columns: XSTest and BeaverTails ``prompt``, AdvBench ``goal``, HarmBench ``Behavior``,
    Alpaca ``instruction``.

    Args:
        column: Column holding the prompt text.
    """

    def __init__(self, column: str = "prompt") -> None:
        self.column = column

    def prompt(self, row: dict[str, Any], source: str) -> PromptRecord:
        """The prompt, with every other column as ``meta``."""
        return PromptRecord(user_prompt(text_field(row, self.column, source)), source, _other_columns(row, self.column))


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedRecords:
    """The records read from one source, and what was left out of them.

    Attributes:
        path: The source that was read.
        kind: The record kind that was asked for.
        records: The records, in the order of the source.
        skipped: The messages of bad rows skipped with ``on_bad_record="skip"``.
        excluded: How many rows the adapter left out on purpose, by reason.
    """

    path: str
    kind: str
    records: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line, e.g. ``data.jsonl: 1200 preference records, 3 skipped (bad), 40 excluded: no label``."""
        parts = [f"{len(self.records)} {self.kind} records"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (bad)")
        if self.excluded:
            parts.append(f"{sum(self.excluded.values())} excluded: {self.reasons()}")
        return f"{self.path}: " + ", ".join(parts)

    def reasons(self) -> str:
        """The exclusion reasons, with counts when there are several."""
        if len(self.excluded) == 1:
            return next(iter(self.excluded))
        return "; ".join(f"{count} {reason}" for reason, count in self.excluded.items())


def load_records(
    path: str,
    adapter: Adapter,
    kind: RecordKind,
    *,
    on_bad_record: Literal["error", "skip"] = "error",
    split: str = "train",
    limit: int | None = None,
) -> LoadedRecords:
    """Read ``path`` and convert every row into a record of ``kind`` with ``adapter``.

    Args:
        path: A file, a hub dataset name or ``safety-world:<split>`` (see :func:`read_rows`).
        adapter: The schema of the rows.
        kind: Which records to make: ``sft``, ``preference``, ``safety_preference`` or ``prompt``.
        on_bad_record: ``error`` raises at the first bad row; ``skip`` counts it and goes on.
        split: Split of a hub dataset.
        limit: Read at most this many rows (before any are skipped or excluded).

    Returns:
        The records, the skipped rows' messages and the excluded counts.

    Raises:
        BadRecordError: A bad row, with ``on_bad_record="error"`` (file, line, field, expected, found).
        ValueError: No records at all, or an unknown ``kind`` or ``on_bad_record``.
    """
    if kind not in KINDS or on_bad_record not in ("error", "skip"):
        raise ValueError(
            f"kind: expected one of {KINDS}, on_bad_record: 'error' or 'skip'; got {kind!r}, {on_bad_record!r}"
        )
    convert, loaded = getattr(adapter, kind), LoadedRecords(path, kind)
    for location, row in itertools.islice(read_rows(path, split=split), limit):
        outcome = row if isinstance(row, BadRecordError) else _convert(convert, row, location)
        if isinstance(outcome, Excluded):
            loaded.excluded[outcome.reason] = loaded.excluded.get(outcome.reason, 0) + 1
        elif isinstance(outcome, BadRecordError) and on_bad_record == "error":
            raise outcome.with_traceback(None)  # the message says it all; the adapter's frames do not help
        elif isinstance(outcome, BadRecordError):
            loaded.skipped.append(str(outcome))
        else:
            loaded.records.append(outcome)
    if not loaded.records:
        raise _no_records(loaded)
    _log(loaded)
    return loaded


def _no_records(loaded: LoadedRecords) -> DataError:
    reasons = f": {loaded.reasons()}" if loaded.excluded else ""
    first = f"; first skipped: {loaded.skipped[0]}" if loaded.skipped else ""
    return DataError(
        f"{loaded.path}: no records of kind {loaded.kind!r} ({len(loaded.skipped)} skipped, "
        f"{sum(loaded.excluded.values())} excluded{reasons}){first}"
    )


def _convert(convert: Any, row: dict[str, Any], location: str) -> Any:
    """The record, or the BadRecordError or Excluded that the adapter raised for the row."""
    try:
        return convert(row, location)
    except (BadRecordError, Excluded) as outcome:
        return outcome


def _log(loaded: LoadedRecords) -> None:
    if not (loaded.skipped or loaded.excluded):
        log.info(loaded.summary())
        return
    shown = "".join(f"\n  {message}" for message in loaded.skipped[:3])
    more = f"\n  ... and {len(loaded.skipped) - 3} more" if len(loaded.skipped) > 3 else ""
    log.warning(loaded.summary() + shown + more)
