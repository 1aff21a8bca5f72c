"""``lit-saferlhf evaluate``: sample from policies, score with the reward and cost models, summarise.

This is Safe RLHF's evaluation (Dai et al., 2023, Sec. 5): every policy answers the same prompts;
the reward model judges helpfulness and the cost model harmlessness (a response is *harmless* when
its cost is <= 0, the sign the cost model was trained to give); two policies also meet in an
*arena* that counts, prompt by prompt, which answer the reward model prefers and whether each is
safe. On the embedded safety world every number is also checked against the ground truth.

Prompt sets are named by a spec string: ``path`` or ``path#column``, where ``column`` is the
prompt column read by :class:`~lit_saferlhf.data.adapters.PromptList` (default ``prompt``)::

    safety-world:prompts-eval                           # the held-out safety-world prompts
    ../shared/data/eval/xstest_prompts.csv              # column "prompt"
    ../shared/data/eval/advbench.csv#goal
    ../shared/data/eval/alpaca_harmless_prompts_6k.json#instruction

Outputs in ``out_dir``: ``generations.jsonl`` (one line per policy x prompt), ``summary.csv`` and
``summary.json`` (one row per policy x prompt set), and ``arena.json`` when two policies meet. A run
stopped by Ctrl-C writes the answers of the policies that had finished, unscored, to
``generations.partial.jsonl`` and says so in one line.
Each policy is loaded once, answers every set, and is freed before the next one is loaded; the
reward and cost models are each loaded once afterwards and score every answer in large batches.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_saferlhf.commands.evaluate.arena import arena_of
from lit_saferlhf.commands.evaluate.generation import generate_all
from lit_saferlhf.commands.evaluate.judging import judge, summary_rows
from lit_saferlhf.commands.evaluate.prompts import load_prompt_sets
from lit_saferlhf.commands.evaluate.scoring import check_score_model_dir, score_all
from lit_saferlhf.data.templates import Template
from lit_saferlhf.errors import ConfigError, ModelDirError
from lit_saferlhf.generators import Generator
from lit_saferlhf.models.layouts import require_policy


def check_inputs(policies: dict[str, str], reward_model: str, cost_model: str, arena_names: list[str] | None) -> None:
    """Fail before any generation when a dir is missing or the arena names unknown policies."""
    if not policies:
        raise ConfigError("policies", "name at least one policy, e.g. {sft: outputs/tiny/sft/model}")
    for name, path in policies.items():
        if not Path(path).is_dir():
            raise ModelDirError(f"policies.{name}", path)
        require_policy(path, f"policy {name!r}")
    check_score_model_dir(reward_model, "reward_model")
    check_score_model_dir(cost_model, "cost_model")
    if arena_names is not None and (len(arena_names) != 2 or not set(arena_names) <= set(policies)):
        raise ConfigError("arena", f"two of the policies {sorted(policies)}", arena_names)


def evaluate(
    policies: dict[str, str],
    reward_model: str,
    cost_model: str,
    prompt_sets: list[str],
    out_dir: str,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    arena: list[str] | None = None,
    max_prompt_length: int = 512,
    generator: Generator | None = None,
    template: Template | None = None,
) -> dict[str, Any]:
    """Compare policies on prompt sets with a reward model and a cost model (Safe RLHF, Sec. 5).

    Args:
        policies: Policy name -> Hugging Face causal-LM dir, e.g. ``{sft: out/sft/model, ppo_lag: ...}``.
        reward_model: Dir of the reward model (a score model).
        cost_model: Dir of the cost model (a score model; cost <= 0 means harmless).
        prompt_sets: Spec strings ``path`` or ``path#column``, e.g. ``safety-world:prompts-eval``.
        out_dir: Where generations.jsonl, summary.csv, summary.json and arena.json are written.
        max_new_tokens: Longest response in tokens.
        batch_size: Prompts per generation batch and texts per scoring batch.
        seed: Sampling seed (the same for every policy).
        limit: Read at most this many prompts per set.
        arena: Two policy names ``[A, B]`` to compare prompt by prompt, from A's point of view.
        max_prompt_length: Longest prompt in tokens (longer ones keep their end).
        generator: The generation backend, as the PPO stage's ``model.generator`` (None: ``HFGenerate``).
        template: How every policy's prompts are rendered. Unset: each policy's own, as its export
            recorded it (``lit_saferlhf.json``), else Safe RLHF's ``BEGINNING OF CONVERSATION`` template.

    Returns:
        ``{"rows": [one summary row per policy x set], "arena": ..., "out_dir": ...}``, where the
        arena (None without ``arena``) names ``a`` and ``b``, holds :func:`arena`'s numbers over
        every prompt, and the same per prompt set under ``by_set``.
    """
    check_inputs(policies, reward_model, cost_model, arena)
    sets = load_prompt_sets(prompt_sets, limit)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "generator": generator,
    }
    options["template"] = template
    generations: list[dict[str, Any]] = []
    try:
        for name, policy_dir in policies.items():  # one policy at a time: Ctrl-C keeps the finished ones
            generations += generate_all({name: policy_dir}, sets, max_prompt_length=max_prompt_length, **options)
        prompts = [record.prompt for records in sets.values() for record in records] * len(policies)
        scoring = {"batch_size": batch_size, "max_length": max_prompt_length + max_new_tokens + 1}
        generations = score_all(generations, prompts, reward_model, cost_model, **scoring)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(keep_partial(Path(out_dir), generations)) from None
    truth = {s.name: s.has_truth for s in sets}
    generations = [judge(g, truth[g["set"]]) for g in generations]
    summary: dict[str, Any] = {
        "rows": summary_rows(generations, policies, truth),
        "arena": None,
        "out_dir": str(out_dir),
    }
    if arena is not None:
        summary["arena"] = {"a": arena[0], "b": arena[1], **arena_of(generations, *arena)}
    write_outputs(Path(out_dir), generations, summary)
    return summary


def keep_partial(out_dir: Path, generations: Sequence[dict[str, Any]]) -> str:
    """Write the unscored answers of an interrupted run to ``generations.partial.jsonl``; what was kept, in words."""
    if not generations:
        return "no policy had answered every prompt, nothing written"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "generations.partial.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(g, ensure_ascii=False, default=str) + "\n" for g in generations)
    policies = ", ".join(dict.fromkeys(g["policy"] for g in generations))
    return f"the answers of {policies} ({len(generations)}, unscored) kept in {path}"


def write_outputs(out_dir: Path, generations: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write generations.jsonl, summary.csv, summary.json and (with an arena) arena.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generations.jsonl", "w", encoding="utf-8") as handle:
        # ``default=str``: a prompt file's other columns (``meta``) may hold dates or other non-JSON values.
        handle.writelines(json.dumps(g, ensure_ascii=False, default=str) + "\n" for g in generations)
    rows = summary["rows"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out_dir / "summary.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    if summary["arena"] is not None:
        (out_dir / "arena.json").write_text(json.dumps(summary["arena"], indent=2, allow_nan=False) + "\n")


def evaluate_command(argv: Sequence[str]) -> None:
    """``lit-saferlhf evaluate``: generate from policies, score, summarise, and run the arena.

    Example (every flag can also come from a YAML given with ``--config``)::

        lit-saferlhf evaluate --policies '{sft: outputs/tiny/sft/model, ppo_lag: outputs/tiny/ppo_lag/model}'
            --reward_model outputs/tiny/reward/model --cost_model outputs/tiny/cost/model
            --prompt_sets '[safety-world:prompts-eval]' --arena '[ppo_lag, sft]' --out_dir outputs/tiny/eval
    """
    from jsonargparse import ActionConfigFile, ArgumentParser
    from rich.console import Console

    from lit_saferlhf.commands.report import summary_tables
    from lit_saferlhf.registry import load_plugins

    load_plugins()  # generators of other packages resolve by short name (``--generator VLLMGenerate``)
    description = (
        "Generate from policies, score the answers with a reward and a cost model, summarise per policy and "
        "prompt set, and run the arena. A YAML given with --config sets any option; later flags override it."
    )
    parser = ArgumentParser(prog="lit-saferlhf evaluate", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with any of the options below")
    parser.add_function_arguments(evaluate)
    options = parser.instantiate_classes(parser.parse_args(list(argv))).as_dict()  # builds the generator
    options.pop("config", None)
    summary = evaluate(**options)
    console = Console()
    for table in summary_tables(summary):
        console.print(table)
    console.print(f"Written to {summary['out_dir']}/ (generations.jsonl, summary.csv, summary.json)")
