"""Conversation templates: how a prompt (a dialogue ending with a user turn) becomes text.

The default is Safe RLHF's: ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:``; earlier
assistant turns of a multi-turn dialogue end with the EOS token, as in safe-rlhf. ``ChatTemplate`` is the
tokenizer's own chat template; ``PlainTemplate`` passes a raw prompt through unchanged (base models and
hub-style reward models trained on raw text). A response is appended after one space and closed with
EOS by the tokenisation step.

A policy export records the template it was trained with in ``lit_saferlhf.json``
(:func:`policy_files`); evaluation and the PPO stage's prompts use it unless told otherwise.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_saferlhf.data.records import Conversation
from lit_saferlhf.errors import ConfigError, ModelLayoutError


class Template(ABC):
    """Turns a conversation into the prompt text the model continues."""

    @abstractmethod
    def format_prompt(self, prompt: Conversation, tokenizer: PreTrainedTokenizerBase) -> str:
        """The text of ``prompt``, ending where the assistant's answer begins."""


class SafeRLHFTemplate(Template):
    """``BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT: {a1}</s> USER: {u2} ASSISTANT:``.

    Args:
        system_prefix: The opening words of every conversation.
    """

    def __init__(self, system_prefix: str = "BEGINNING OF CONVERSATION:") -> None:
        self.system_prefix = system_prefix

    def format_prompt(self, prompt: Conversation, tokenizer: PreTrainedTokenizerBase) -> str:
        """Render the turns; system turns are prepended to the opening words."""
        parts = [self.system_prefix]
        for message in prompt:
            if message.role == "user":
                parts.append(f"USER: {message.content} ASSISTANT:")
            elif message.role == "assistant":
                parts.append(f"{message.content}{tokenizer.eos_token}")
            else:
                parts.insert(1, message.content)
        return " ".join(parts)


class ChatTemplate(Template):
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``), for instruct models."""

    def format_prompt(self, prompt: Conversation, tokenizer: PreTrainedTokenizerBase) -> str:
        """Render with the generation prompt added, as the template's model expects."""
        if tokenizer.chat_template is None:
            raise ConfigError(
                "template", f"{type(tokenizer).__name__} has no chat template; use SafeRLHFTemplate instead"
            )
        messages = [{"role": message.role, "content": message.content} for message in prompt]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False renders one conversation to one string
        return text


class PlainTemplate(Template):
    """The prompt as it is: a single-turn prompt's text unchanged, no wrapper and no special tokens.

    For a policy or score model trained on raw text (no recorded template, no chat template). The turns of a
    multi-turn dialogue are joined by ``separator``.

    Args:
        separator: Put between the turns of a multi-turn dialogue.
    """

    def __init__(self, separator: str = "\n\n") -> None:
        self.separator = separator

    def format_prompt(self, prompt: Conversation, tokenizer: PreTrainedTokenizerBase) -> str:
        """The turns' texts, joined by ``separator`` (a single turn: its text unchanged)."""
        return self.separator.join(message.content for message in prompt)


# ----------------------------------------------------------------------------------------------
# The template a policy was trained with, recorded in its export
# ----------------------------------------------------------------------------------------------

POLICY_FILE = "lit_saferlhf.json"
"""Side file of a policy export: ``{"template": {"class_path": ..., "init_args": {...}}}``."""
SCORE_MODEL_FILE = "score_model.json"
"""A score model's side file (``models.layouts.SIDE_FILE``), which records its template the same way."""


def template_record(template: Template) -> dict[str, Any]:
    """``template`` as ``{"class_path", "init_args"}`` (its attributes are its constructor's arguments)."""
    cls = type(template)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(vars(template))}


def template_from_record(record: dict[str, Any], source: str) -> Template:
    """The template a :func:`template_record` describes (``source`` names the file in errors).

    Raises:
        ModelLayoutError: The class cannot be imported, is not a ``Template``, or rejects the arguments.
    """
    module, _, name = record.get("class_path", "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        template = cls(**record.get("init_args", {}))
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        raise ModelLayoutError(f"{source}: cannot rebuild the recorded template {record} ({error})") from error
    if not isinstance(template, Template):
        raise ModelLayoutError(f"{source}: the recorded template {record['class_path']} is not a Template")
    return template


def policy_files(template: Template | None) -> dict[str, str]:
    """The side file recording ``template`` in a policy export (none when the template is unknown)."""
    if template is None:
        return {}
    return {POLICY_FILE: json.dumps({"template": template_record(template)}, indent=2)}


def recorded_template(model_dir: str | Path) -> Template | None:
    """The template the model in ``model_dir`` was trained with (None: not recorded).

    Policies record it in ``lit_saferlhf.json``, score models in ``score_model.json`` (key ``template``).
    """
    for name in (POLICY_FILE, SCORE_MODEL_FILE):
        path = Path(model_dir) / name
        try:
            record = json.loads(path.read_text()).get("template") if path.is_file() else None
        except (json.JSONDecodeError, AttributeError) as error:
            raise ModelLayoutError(
                f"{path}: expected a JSON object (the side file of an export), found {error}"
            ) from error
        if record is not None:
            return template_from_record(record, str(path))
    return None


def trained_template(module: Any) -> Template | None:
    """The template a stage trains with: its datamodule's, else the one its checkpoint recorded (None: unknown)."""
    try:
        datamodule = module.trainer.datamodule
    except RuntimeError:  # no trainer attached: ``lit-saferlhf export`` rebuilt the stage from a checkpoint
        datamodule = None
    template = getattr(datamodule, "template", None)
    return template if template is not None else getattr(module, "checkpoint_template", None)


def save_template(module: Any, checkpoint: dict[str, Any]) -> None:
    """Keep the stage's template in its checkpoint, so an export from the checkpoint records it too."""
    template = trained_template(module)
    if template is not None:
        checkpoint["template"] = template_record(template)


def load_template(module: Any, checkpoint: dict[str, Any]) -> None:
    """Restore what :func:`save_template` kept (as ``module.checkpoint_template``)."""
    if "template" in checkpoint:
        module.checkpoint_template = template_from_record(checkpoint["template"], "the checkpoint's template")
