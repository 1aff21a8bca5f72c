"""Samples/s of our PPO-Lagrangian step, split into generation, scoring and update: old vs new settings.

- ``old``: ``HFGenerate`` (Hugging Face ``generate``, dynamic cache) and log-probs from the model's full
  ``(N, L, V)`` logits (the stage's ``response_logprobs`` before issue 11, restored by this script);
- ``new``: ``StaticCacheGenerate`` and log-probs from hidden states in chunks (the stage as shipped).

Random Llama-shaped actor (the reference is its copy) and reward/cost score models with GPT-2's
vocabulary size (50,258), the safety world's prompts and tokenizer (its ids sit inside the large
vocabulary), run through the real CLI (``cli_configs/tiny/ppo_lag.yaml`` with overrides). Each fit
runs ``1 + --steps`` prompt batches; the first is a warm-up (compilation, allocator) and is dropped.
Fits alternate old, new, old, new (``--repeats``); the table gives per-step medians::

    OMP_NUM_THREADS=1 python benchmarks/ppo_step.py --device cpu --out benchmarks/results/ppo_step_cpu.md
    python benchmarks/ppo_step.py --device cuda --batch 64 --out benchmarks/results/ppo_step_cuda_b64.md
    python benchmarks/ppo_step.py --device cuda --batch 16 --strategy deepspeed_zero3 --out ...

CPU shape (issue 11): actor and score models hidden 128, 2 layers, 4 heads, MLP 512, fp32; prompt
batch 16, prompts <= 32 tokens, 64 new tokens, one PPO epoch in one minibatch of 16. CUDA shape
(safe-rlhf's measurement): actor hidden 1024, 24 layers, 16 heads, MLP 3072 (0.45B), score models
20 layers (0.40B), bf16, prompts <= 128 tokens + 384 new (max_length 512), PTX on; safe-rlhf ran
4.45 samples/s there at batch 64 (0.19 at ZeRO-3, batch 16).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import csv
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import lit_saferlhf.stages.ppo_lag as ppo_lag
from lit_saferlhf.commands.fit import cli_main
from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.losses import gather_logprobs
from lit_saferlhf.models.logprobs import position_ids
from lit_saferlhf.models.score_model import ScoreModel

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "cpu": {"hidden_size": 128, "layers": 2, "score_layers": 2, "heads": 4, "kv_heads": 4, "mlp": 512,
            "dtype": "float32", "prompt": 32, "new_tokens": 64, "batch": 16},
    "cuda": {"hidden_size": 1024, "layers": 24, "score_layers": 20, "heads": 16, "kv_heads": 16, "mlp": 3072,
             "dtype": "bfloat16", "prompt": 128, "new_tokens": 384, "batch": 64},
}  # fmt: skip
VOCAB = 50258
TIMES = ("time/generation_s", "time/scoring_s", "time/update_s")


def full_logits_logprobs(model: torch.nn.Module, sequences: torch.Tensor, attention: torch.Tensor, start: int):
    """The stage's log-probs before issue 11: the model's full logits, then a gather."""
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=position_ids(attention)).logits
    return gather_logprobs(logits[:, start - 1 : -1], sequences[:, start:])


def llama_config(shape: dict, layers: int, tokenizer) -> LlamaConfig:
    """A Llama config of ``shape`` with GPT-2's vocabulary size and the tokenizer's special ids."""
    return LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=layers,
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                       intermediate_size=shape["mlp"], max_position_embeddings=1024, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)  # fmt: skip


def make_models(root: Path, shape: dict) -> dict[str, Path]:
    """Save a random policy and random reward/cost score models (fp32 files) under ``root``."""
    tokenizer = build_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    torch.manual_seed(0)
    policy = LlamaForCausalLM(llama_config(shape, shape["layers"], tokenizer))
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    paths = {"policy": root / "policy"}
    for name in ("reward", "cost"):
        backbone = AutoModel.from_config(llama_config(shape, shape["score_layers"], tokenizer))
        ScoreModel(backbone).save_pretrained(root / name, tokenizer, score_type=name)
        paths[name] = root / name
    return paths


def fit(setting: str, paths: dict[str, Path], out: Path, options: argparse.Namespace, shape: dict) -> list[dict]:
    """One ``lit-saferlhf fit`` of ``1 + steps`` PPO steps; the logged times of the steps after the first."""
    ppo_lag.response_logprobs = full_logits_logprobs if setting == "old" else NEW_LOGPROBS
    new_generator = "lit_saferlhf_plugins.generators.StaticCacheGenerate"
    generator = "lit_saferlhf.generators.HFGenerate" if setting == "old" else new_generator
    shutil.rmtree(out, ignore_errors=True)
    batch = options.batch or shape["batch"]
    args = [
        "fit", f"--config={REPO / 'cli_configs/tiny/ppo_lag.yaml'}",
        f"--model.init_args.policy={paths['policy']}", f"--model.init_args.reward_model={paths['reward']}",
        f"--model.init_args.cost_model={paths['cost']}", f"--model.init_args.generator={generator}",
        f"--model.init_args.generation.max_new_tokens={shape['new_tokens']}",
        f"--model.init_args.ppo.minibatch_size={batch}", f"--model.init_args.dtype={shape['dtype']}",
        f"--data.init_args.batch_size={batch}", f"--data.init_args.max_length={shape['prompt']}",
        f"--trainer.limit_train_batches={1 + options.steps}", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
    ]  # fmt: skip
    if options.device == "cuda":
        args += ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-true",
                 "--data.init_args.ptx_path=safety-world:sft"]  # fmt: skip
        if options.strategy:
            args.append(f"--config={REPO / 'cli_configs/strategies' / f'{options.strategy}.yaml'}")
    cli_main(args)
    (log,) = sorted((out / "logs").glob("version_*/metrics.csv"))[-1:]
    with log.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(TIMES[0])]
    return [{key: float(row[key]) for key in TIMES} for row in rows[1:]]


NEW_LOGPROBS = ppo_lag.response_logprobs


def machine(device: str) -> str:
    """One line on the hardware and versions."""
    import transformers

    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}, transformers {transformers.__version__}"
            f"{gpu}")  # fmt: skip


def table(steps: dict[str, list[dict]], batch: int) -> tuple[list[str], float]:
    """Markdown rows (median seconds per phase, samples/s) and the new/old samples/s ratio."""
    lines = ["| setting | generation s | scoring s | update s | step s | samples/s |", "|---|---:|---:|---:|---:|---:|"]
    rates = {}
    for setting, rows in steps.items():
        phases = [statistics.median(row[key] for row in rows) for key in TIMES]
        step = statistics.median(sum(row.values()) for row in rows)
        rates[setting] = batch / step
        lines.append(f"| {setting} | " + " | ".join(f"{value:.3f}" for value in phases) + f" | {step:.3f} | "
                     f"{rates[setting]:.2f} |")  # fmt: skip
    return lines, rates["new"] / rates["old"]


def main() -> None:
    """Build the models, alternate old and new fits, print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, help="prompt batch (default: the shape's)")
    parser.add_argument("--steps", type=int, default=2, help="timed PPO steps per fit (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="old/new fit pairs, alternated")
    parser.add_argument("--strategy", help="a cli_configs/strategies fragment (CUDA), e.g. deepspeed_zero3")
    parser.add_argument("--out", type=Path, help="also write the table here")
    options = parser.parse_args()
    shape = SHAPES[options.device]
    batch = options.batch or shape["batch"]
    root = Path(tempfile.mkdtemp(prefix="ppo_step_"))
    try:
        paths = make_models(root / "models", shape)
        steps: dict[str, list[dict]] = {"old": [], "new": []}
        for repeat in range(options.repeats):
            for setting in steps:
                steps[setting] += fit(setting, paths, root / f"{setting}{repeat}", options, shape)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, ratio = table(steps, batch)
    lines = [
        f"# PPO-Lagrangian step, {options.device}",
        "",
        f"- Command: `{shlex.join(['python', *sys.argv])}`",
        f"- Machine: {machine(options.device)}",
        f"- Actor hidden {shape['hidden_size']}, {shape['layers']} layers (score models {shape['score_layers']}), "
        f"vocabulary {VOCAB}, {shape['dtype']}; prompt batch {batch}, prompts <= {shape['prompt']} tokens, "
        f"{shape['new_tokens']} new tokens; {options.repeats} old/new fit pairs x {options.steps} timed steps "
        "(first step of each fit dropped); medians per step",
        "- old: HFGenerate + full-logits log-probs; new: StaticCacheGenerate + chunked hidden-state log-probs",
        "",
        *rows,
        "",
        f"PPO step speedup (new vs old samples/s): {ratio:.2f}",
        f"Target (issue 11, CPU: the step >= 2x faster than the old setting): "
        f"{'holds' if ratio >= 2.0 else 'does not hold'} ({ratio:.2f}x)",
    ]
    text = "\n".join(lines)
    print(text)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
