"""Scoring for ``lit-saferlhf evaluate``: the reward and cost models' end scores of every answer."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_saferlhf.commands.evaluate.generation import device, release_memory, run_batches
from lit_saferlhf.data.collate import Encoder, attention_mask, pad
from lit_saferlhf.data.records import Conversation, user_prompt
from lit_saferlhf.data.templates import SafeRLHFTemplate, recorded_template
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.errors import ModelDirError
from lit_saferlhf.models.causal_lm import ModelSource
from lit_saferlhf.models.layouts import require_score_model
from lit_saferlhf.models.score_model import ScoreModel


def check_score_model_dir(path: str, role: str) -> None:
    """Raise a clear error unless ``path`` is a score model in a layout ``layouts`` reads."""
    if not Path(path).is_dir():
        raise ModelDirError(role, path)
    require_score_model(path, role)


def score_texts(
    score_model_dir: str,
    prompts: Sequence[Conversation | str],
    responses: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
) -> list[float]:
    """End scores of ``prompt + response + EOS`` under the score model saved in ``score_model_dir``.

    Each text is templated with the template the score model recorded (else Safe RLHF's) and tokenised
    as in training (:meth:`Encoder.encode`, right-truncated to
    ``max_length``) and right-padded in batches of similar length; the model runs in eval mode
    without gradients and is freed afterwards.

    Args:
        score_model_dir: A dir written by :meth:`ScoreModel.save_pretrained`.
        prompts: Conversations, or plain user texts.
        responses: One response per prompt.
        batch_size: Texts per forward pass.
        max_length: Longest text in tokens.

    Returns:
        One end score per response (a reward or a cost, depending on the model).
    """
    check_score_model_dir(score_model_dir, "score model")
    source = ModelSource(path=score_model_dir)
    tokenizer = load_tokenizer(source)
    model = ScoreModel.from_source(source, tokenizer, role="score model").to(device()).eval()
    encoder = Encoder(tokenizer, recorded_template(score_model_dir) or SafeRLHFTemplate(), max_length)
    conversations = [user_prompt(p) if isinstance(p, str) else p for p in prompts]
    rows = [encoder.encode(c, r).input_ids for c, r in zip(conversations, responses, strict=True)]

    try:
        step = functools.partial(score_batch, model, tokenizer.pad_token_id)
        return run_batches(rows, batch_size, f"scoring ({Path(score_model_dir).name})", step)
    finally:
        del model
        release_memory()


@torch.no_grad()
def score_batch(model: ScoreModel, pad_id: int, rows: list[list[int]]) -> list[float]:
    """Right-pad and return the end scores."""
    on = next(model.parameters()).device
    return model(pad(rows, pad_id).to(on), attention_mask(rows).to(on)).end_scores.float().cpu().tolist()


def score_all(
    generations: list[dict[str, Any]],
    prompts: Sequence[Conversation],
    reward_model: str,
    cost_model: str,
    **scoring: Any,
) -> list[dict[str, Any]]:
    """Add ``reward`` and ``cost`` to every generation; each score model loads once for all of them."""
    responses = [g["response"] for g in generations]
    rewards = score_texts(reward_model, prompts, responses, **scoring)
    costs = score_texts(cost_model, prompts, responses, **scoring)
    return [{**g, "reward": r, "cost": c} for g, r, c in zip(generations, rewards, costs, strict=True)]
