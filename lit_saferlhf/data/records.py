"""Record types every adapter produces and every datamodule consumes.

Records are validated once, at the edge, by the adapters; past this point nothing re-checks them.
Each record remembers where it came from (``source`` = ``"file:line N"``) so later errors can point
at the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lit_saferlhf.errors import DataError

Role = Literal["system", "user", "assistant"]


class BadRecordError(DataError):
    """A record that does not fit its schema.

    The message always names the location (file and line or row), the field, what was expected
    and what was found, so a user can open the file and fix it.
    """

    def __init__(self, source: str, field: str, expected: str, found: object = None) -> None:
        self.source, self.field, self.expected = source, field, expected
        shown = repr(found)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{source}: field {field!r}: expected {expected}, found {shown}")


class Described(str):
    """A ``found`` value that is a description, shown without quotes (``found a prompt of 60 tokens``)."""

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str


Conversation = tuple[Message, ...]
"""A dialogue that ends with a user turn: the prompt a response answers."""


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to generate from (PPO rollouts, evaluation)."""

    prompt: Conversation
    source: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SFTRecord:
    """A demonstration: the response the model should learn to give to the prompt."""

    prompt: Conversation
    response: str
    source: str


@dataclass(frozen=True)
class PreferenceRecord:
    """A helpfulness comparison: ``better`` was preferred over ``worse`` (reward model data)."""

    prompt: Conversation
    better: str
    worse: str
    source: str


@dataclass(frozen=True)
class SafetyPreferenceRecord:
    """A harmlessness comparison with per-response safety labels (cost model data)."""

    prompt: Conversation
    safer: str
    unsafer: str
    is_safer_safe: bool
    is_unsafer_safe: bool
    source: str


def user_prompt(text: str) -> Conversation:
    """The single-turn conversation ``USER: text``."""
    return (Message("user", text),)
