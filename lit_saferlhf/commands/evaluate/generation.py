"""Generation for ``lit-saferlhf evaluate``: every policy answers every prompt, batched by length, with progress."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lit_saferlhf.commands.evaluate.prompts import PromptSet, prompt_text
from lit_saferlhf.data.collate import Encoder, collate_prompts
from lit_saferlhf.data.records import Conversation, PromptRecord, user_prompt
from lit_saferlhf.data.templates import SafeRLHFTemplate, Template, recorded_template
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.generators import GenerationArgs, Generator, HFGenerate
from lit_saferlhf.losses import response_mask
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm


def device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def progress_bar() -> Progress:
    """A rich progress bar with the task's description, a bar, done/total and the elapsed time."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def batches_by_length(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first), to waste little padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def run_batches(rows: Sequence[Sequence[int]], batch_size: int, description: str, step: Callable) -> list[Any]:
    """``step(batch_rows)`` over length-sorted batches with a progress bar; results in input order."""
    results: list[Any] = [None] * len(rows)
    batches = batches_by_length(rows, batch_size)
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(batches))
        for indices in batches:
            for index, result in zip(indices, step([rows[i] for i in indices]), strict=True):
                results[index] = result
            progress.advance(task)
    return results


def generate_responses(
    policy_dir: str,
    prompts: Sequence[Conversation | str],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    max_prompt_length: int,
    greedy: bool = False,
    generator: Generator | None = None,
    template: Template | None = None,
) -> list[str]:
    """Answer every prompt with the policy saved in ``policy_dir``; the model is freed afterwards.

    Prompts go through the policy's template (``template``, else the one its export recorded in
    ``lit_saferlhf.json``, else Safe RLHF's), keep their last ``max_prompt_length`` tokens (the end
    holds ``ASSISTANT:``), and are left-padded in batches of similar length. Sampling follows the
    reference (temperature 1, top-p 1, top-k 50) through :class:`~lit_saferlhf.generators.HFGenerate`,
    seeded with ``torch.manual_seed(seed)``; ``greedy`` samples from the top-1 token instead.

    Args:
        policy_dir: A Hugging Face causal-LM dir with its tokenizer.
        prompts: Conversations, or plain user texts.
        max_new_tokens: Longest response in tokens.
        batch_size: Prompts per ``generate`` call.
        seed: Sampling seed.
        max_prompt_length: Longest prompt in tokens.
        greedy: Decode the most likely token at every step.
        generator: The generation backend (None: ``HFGenerate``); e.g. ``StaticCacheGenerate``.
        template: Overrides the template the policy recorded.

    Returns:
        The responses, decoded without special tokens and stripped, in the order of ``prompts``.
    """
    source = ModelSource(path=policy_dir)
    tokenizer = load_tokenizer(source)
    # transformers decorates PreTrainedModel.to with functools.wraps(nn.Module.to), whose type keeps the unbound `self`.
    model = build_causal_lm(source, tokenizer).to(device()).eval()  # type: ignore[arg-type]
    template = template or recorded_template(policy_dir) or SafeRLHFTemplate()
    encoder = Encoder(tokenizer, template, max_prompt_length)
    rows = [encoder.prompt_ids(user_prompt(p) if isinstance(p, str) else p)[-max_prompt_length:] for p in prompts]
    args = GenerationArgs(max_new_tokens=max_new_tokens, top_k=1 if greedy else 50)
    torch.manual_seed(seed)
    try:
        step = functools.partial(generate_batch, model, tokenizer, args, generator or HFGenerate(synced_gpus=False))
        return run_batches(rows, batch_size, f"generating ({Path(policy_dir).name})", step)
    finally:
        del model
        release_memory()


@torch.no_grad()
def generate_batch(
    model: Any, tokenizer: Any, args: GenerationArgs, generator: Generator, rows: list[list[int]]
) -> list[str]:
    """Left-pad, sample, cut each response after its first EOS, and decode."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = {key: value.to(model.device) for key, value in collate_prompts(rows, pad_id).items()}
    sequences = generator.generate(model, **batch, args=args, eos_id=eos_id, pad_id=pad_id)
    responses = sequences[:, batch["input_ids"].shape[1] :].cpu()  # (B, A)
    kept = [row[mask].tolist() for row, mask in zip(responses, response_mask(responses, eos_id), strict=True)]
    return [text.strip() for text in tokenizer.batch_decode(kept, skip_special_tokens=True)]


def release_memory() -> None:
    """Hand a freed model's GPU memory back before the next model is loaded.

    On the CPU the model's memory is returned as soon as its last reference goes; ``gc.collect``
    (slow with a large heap) is only worth it to empty the CUDA cache.
    """
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def generate_all(
    policies: dict[str, str], sets: dict[PromptSet, list[PromptRecord]], **generation: Any
) -> list[dict[str, Any]]:
    """One generation per policy x prompt; each policy loads once and answers every set.

    A generation holds the policy, the set's name, the prompt's source (file and row), the prompt
    text, the response, and the prompt file's other columns as ``meta`` when it has any.
    """
    records = [(prompt_set, record) for prompt_set, records in sets.items() for record in records]
    conversations = [record.prompt for _, record in records]
    generations = []
    for policy, policy_dir in policies.items():
        responses = generate_responses(policy_dir, conversations, **generation)
        generations += [
            {"policy": policy, "set": s.name, "source": r.source, "prompt": prompt_text(r.prompt), "response": text}
            | ({"meta": r.meta} if r.meta else {})
            for (s, r), text in zip(records, responses, strict=True)
        ]
    return generations
