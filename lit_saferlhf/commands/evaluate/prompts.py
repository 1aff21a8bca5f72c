"""Prompt sets of ``lit-saferlhf evaluate``: files (or safety-world splits) read as prompts, with a name each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lit_saferlhf.data.adapters import PromptList, load_records
from lit_saferlhf.data.readers import READERS, SAFETY_WORLD_PREFIX
from lit_saferlhf.data.records import Conversation, PromptRecord
from lit_saferlhf.errors import ConfigError


@dataclass(frozen=True)
class PromptSet:
    """A prompt set named by a spec string ``path`` or ``path#column``."""

    name: str
    """File name without its suffix, or the split of a safety-world set; names rows of the summary."""
    path: str
    """A file, a hub dataset or ``safety-world:<split>``."""
    column: str = "prompt"
    """The column holding the prompt text."""

    @property
    def has_truth(self) -> bool:
        """Whether the safety world's ground truth applies (a ``safety-world:`` set)."""
        return self.path.startswith(SAFETY_WORLD_PREFIX)

    @classmethod
    def parse(cls, spec: str) -> PromptSet:
        """``"data/advbench.csv#goal"`` -> ``PromptSet("advbench", "data/advbench.csv", "goal")``."""
        path, _, column = spec.partition("#")
        if not path or (_ and not column):
            raise ConfigError("prompt_sets", "`path` or `path#column`", spec)
        if path.startswith(SAFETY_WORLD_PREFIX):
            return cls(path[len(SAFETY_WORLD_PREFIX) :], path, column or "prompt")
        name = Path(path).name
        suffix = next((s for s in sorted(READERS, key=len, reverse=True) if name.lower().endswith(s)), "")
        return cls(name[: len(name) - len(suffix)], path, column or "prompt")


def load_prompt_sets(specs: Sequence[str], limit: int | None) -> dict[PromptSet, list[PromptRecord]]:
    """Parse and read each prompt set (at most ``limit`` rows each), keyed by set, in order.

    Raises:
        ConfigError: Two sets share a name, or a set has no prompts.
        BadRecordError: A row lacks the prompt column (the message names file, row and column).
    """
    sets = [PromptSet.parse(spec) for spec in specs]
    names = [prompt_set.name for prompt_set in sets]
    if len(set(names)) != len(names) or not sets:
        raise ConfigError("prompt_sets", "at least one set and distinct names", names)
    adapters = {prompt_set: PromptList(column=prompt_set.column) for prompt_set in sets}
    return {s: load_records(s.path, adapters[s], "prompt", limit=limit).records for s in sets}


def prompt_text(conversation: Conversation) -> str:
    """The last user turn: the text the truth functions and the generations file refer to."""
    return conversation[-1].content
