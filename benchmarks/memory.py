"""Peak memory of one PPO-Lagrangian step, full fine-tuning vs LoRA: measured at small shapes, estimated at 7B.

**Measured.** Random-weight networks of one shape (a Llama policy, reward and cost score models) are
written to a scratch dir; then, for full fine-tuning and for LoRA (``cli_configs/peft/lora.yaml``),
a child process runs ``lit-saferlhf fit --config cli_configs/tiny/ppo_lag.yaml`` for ONE rollout
(``--batch`` prompts, ``--new_tokens`` sampled tokens) and its PPO updates. On CPU the figure is the
child's peak resident set size (``resource.getrusage().ru_maxrss``, which counts torch's C++
allocations; ``tracemalloc`` would not) minus its RSS after imports. On CUDA (``--device cuda``, bf16
weights) it is ``torch.cuda.max_memory_allocated()``, at the ``0.5b``, ``1.5b`` and ``7b`` shapes.

**Estimated** (Llama-2-7B shape, bf16, built on the ``meta`` device so nothing is allocated): parameter
counts of the actor (``LlamaForCausalLM``), a score model (``LlamaModel`` + head) and their LoRA adapters
(``peft`` on the meta model), then bytes per parameter: 2 for a frozen bf16 weight; 16 for a trained
one (bf16 weight 2 + bf16 gradient 2 + fp32 master copy 4 + AdamW's two fp32 moments 8). Activations
at batch 16 x 512 tokens with gradient checkpointing: each trained network keeps one ``(B, L, H)``
bf16 tensor per layer for backward, one layer is recomputed at a time (its attention and MLP
intermediates), and the output layer's log-probs come in 1024-position chunks (fp32). Rollout: the KV
cache of the actor at the full length. The step's peak is the weights and optimizer states plus the
larger of the rollout and the update phases.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --out benchmarks/results/memory.md      # CPU, ~2 min
    python benchmarks/memory.py --device cuda --shapes 0.5b 1.5b 7b                      # a GPU machine
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-style shapes (the safety world's tokenizer: a small vocabulary)
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
    "medium": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
    "0.5b": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16},
    "1.5b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24, "num_attention_heads": 16},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
}
LLAMA2_7B = {"vocab_size": 32000, **SHAPES["7b"], "max_position_embeddings": 4096}
LORA = {"r": 16, "alpha": 32.0, "target_modules": "all-linear"}
"""The adapters of ``cli_configs/peft/lora.yaml``."""
GB = 1e9


# ----------------------------------------------------------------------------------------------
# Measured: one rollout and its updates through the CLI, in a child process
# ----------------------------------------------------------------------------------------------


def write_models(shape: str, root: Path, dtype: str) -> dict[str, Path]:
    """Random-weight policy, reward and cost dirs of ``shape`` in ``dtype`` (as the SFT, reward and cost stages
    export them)."""
    import torch

    from lit_saferlhf.data.tokenizers import load_tokenizer
    from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
    from lit_saferlhf.models.score_model import ScoreModel

    torch.manual_seed(0)
    config = {"model_type": "llama", **SHAPES[shape], "max_position_embeddings": 1024}
    source = ModelSource(config=config, tokenizer="safety-world")
    tokenizer = load_tokenizer(source)
    weights = getattr(torch, dtype)
    dirs = {"policy": export(build_causal_lm(source, tokenizer).to(weights), tokenizer, root / "policy")}
    for name in ("reward", "cost"):
        dirs[name] = ScoreModel.from_source(source, tokenizer).to(weights).save_pretrained(root / name, tokenizer)
    return dirs


def child(args: argparse.Namespace) -> None:
    """One rollout + its PPO updates; prints ``{"peak_gb": ..., "summary": ...}`` as the last line."""
    import torch

    from lit_saferlhf.commands.fit import cli_main

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes, after imports
    dirs, out = json.loads(args.dirs), Path(args.out)
    cuda = args.device == "cuda"
    fit_args = [
        "fit", f"--config={REPO / 'cli_configs/tiny/ppo_lag.yaml'}",
        *([f"--config={REPO / 'cli_configs/peft/lora.yaml'}"] if args.lora else []),
        f"--model.init_args.policy={dirs['policy']}", f"--model.init_args.reward_model={dirs['reward']}",
        f"--model.init_args.cost_model={dirs['cost']}", f"--data.init_args.batch_size={args.batch}",
        f"--model.init_args.ppo.minibatch_size={args.batch}",
        f"--model.init_args.generation.max_new_tokens={args.new_tokens}",
        "--trainer.limit_train_batches=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={out}",
        "--model.init_args.export_dir=null", f"--trainer.accelerator={'gpu' if cuda else 'cpu'}",
        f"--trainer.precision={'bf16-true' if cuda else '32-true'}",
        *(["--model.init_args.dtype=bfloat16", "--model.init_args.gradient_checkpointing=true"] if cuda else []),
    ]  # fmt: skip
    cli_main(fit_args)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak_gb": peak / GB}))


def measure(shape: str, lora: bool, dirs: dict[str, Path], args: argparse.Namespace, scratch: Path) -> float | None:
    """Peak memory (GB) of one step of ``shape`` in a fresh child process; None when it ran out of memory."""
    command = [
        sys.executable, __file__, "--child", f"--dirs={json.dumps({k: str(v) for k, v in dirs.items()})}",
        f"--out={scratch / f'{shape}_{lora}'}", f"--device={args.device}", f"--batch={args.batch}",
        f"--new_tokens={args.new_tokens}", *(["--lora"] if lora else []),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if run.returncode != 0 and "OutOfMemoryError" in run.stderr:
        return None
    if run.returncode != 0:
        raise RuntimeError(f"child failed ({shape}, lora={lora}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_gb"]


# ----------------------------------------------------------------------------------------------
# Estimated: Llama-2-7B from parameter counts on the meta device
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one run's networks."""

    policy: int
    """A causal LM (actor, reference)."""
    score: int
    """A score model: backbone + ``Linear(hidden, 1)``."""
    policy_lora: int
    """LoRA parameters of the actor."""
    score_lora: int
    """LoRA parameters of a critic's backbone (its head trains in full too)."""


def count_parameters() -> Counts:
    """Parameter counts of the Llama-2-7B shape and its adapters, on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from lit_saferlhf.models.peft import LoraArgs, apply_lora

    config = AutoConfig.for_model("llama", **LLAMA2_7B)
    args = LoraArgs(**LORA)
    with torch.device("meta"):
        policy, backbone = AutoModelForCausalLM.from_config(config), AutoModel.from_config(config)
        policy_numel, score_numel = policy.num_parameters(), backbone.num_parameters() + config.hidden_size + 1
        policy_lora = sum(p.numel() for p in apply_lora(policy, args, "CAUSAL_LM").parameters() if p.requires_grad)
        score_lora = sum(p.numel() for p in apply_lora(backbone, args, None).parameters() if p.requires_grad)
    return Counts(policy_numel, score_numel, policy_lora, score_lora)


def estimate(counts: Counts, lora: bool, batch: int = 16, length: int = 512) -> dict[str, float]:
    """GB per part of one 7B PPO-Lagrangian step (see the module docstring for the model)."""
    h, layers, inter, vocab = (LLAMA2_7B[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                       "vocab_size"))  # fmt: skip
    trained_bytes, frozen_bytes = 16, 2
    if lora:  # three bases (policy, reward, cost), frozen; adapters (and the critics' heads) trained
        frozen = counts.policy + 2 * counts.score
        trained = counts.policy_lora + 2 * (counts.score_lora + h + 1)
        held = frozen * frozen_bytes + trained * 2
        optimizer = trained * (trained_bytes - 2)
    else:  # six networks: actor and two critics trained, reference, reward and cost models frozen
        frozen = counts.policy + 2 * counts.score
        trained = counts.policy + 2 * counts.score
        held = frozen * frozen_bytes + trained * 2
        optimizer = trained * (trained_bytes - 2)
    tokens = batch * length
    checkpoints = 3 * layers * tokens * h * 2  # actor + 2 critics, one bf16 (B, L, H) per layer
    recompute = tokens * (6 * h + 3 * inter) * 2 + batch * 32 * length * length * 2  # one layer + its scores
    logits = batch * min(length, 1024) * vocab * 4 * 2  # one chunk of fp32 log-softmax and its grad
    update = checkpoints + recompute + logits
    kv_cache = 2 * layers * tokens * h * 2
    rollout = kv_cache + logits / 2
    return {
        "weights": held / GB,
        "grads + optimizer": optimizer / GB,
        "activations (update)": update / GB,
        "rollout (KV cache)": rollout / GB,
        "peak": (held + optimizer + max(update, rollout)) / GB,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, measured: dict[str, tuple[float | None, float | None]], counts: Counts) -> str:
    """The markdown table and the 7B line."""
    full, lora = estimate(counts, lora=False), estimate(counts, lora=True)
    how = "peak RSS - RSS after imports (ru_maxrss)" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    lines = [
        "# Peak memory of one PPO-Lagrangian step: full fine-tuning vs LoRA",
        "",
        f"- Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        f"- Command: `OMP_NUM_THREADS=1 python benchmarks/memory.py {' '.join(sys.argv[1:])}`",
        f"- Measured ({args.device}): one rollout of {args.batch} prompts x {args.new_tokens} new tokens and its "
        f"updates through `lit-saferlhf fit`, random weights; {how}.",
        f"- LoRA: r={LORA['r']}, alpha={LORA['alpha']}, {LORA['target_modules']} (cli_configs/peft/lora.yaml).",
        "",
        "| shape | full fine-tuning GB | LoRA GB | LoRA / full |",
        "|---|---:|---:|---:|",
    ]
    for shape, (full_gb, lora_gb) in measured.items():
        ratio = f"{lora_gb / full_gb:.2f}" if full_gb and lora_gb else "-"
        lines.append(f"| {shape} (measured) | {gb(full_gb)} | {gb(lora_gb)} | {ratio} |")
    lines += [
        "",
        "Estimate, Llama-2-7B shape, bf16, batch 16 x 512 tokens, gradient checkpointing "
        f"(actor {counts.policy / 1e9:.2f}B, score model {counts.score / 1e9:.2f}B, LoRA "
        f"{counts.policy_lora / 1e6:.1f}M + 2 x {counts.score_lora / 1e6:.1f}M parameters):",
        "",
        "| part | full fine-tuning GB | LoRA GB |",
        "|---|---:|---:|",
        *(f"| {part} | {full[part]:.1f} | {lora[part]:.1f} |" for part in full),
        "",
        f"7B PPO-Lagrangian, full fine-tuning: {full['peak']:.1f} GB",
        f"7B PPO-Lagrangian, LoRA: {lora['peak']:.1f} GB",
        f"Target (issue 12: the 7B LoRA step fits in 80 GB on one GPU), by this estimate: "
        f"{'holds' if lora['peak'] <= 80.0 else 'does not hold'} ({lora['peak']:.1f} GB)",
    ]
    return "\n".join(lines) + "\n"


def gb(value: float | None) -> str:
    """A measured figure, or ``OOM``."""
    return "OOM" if value is None else f"{value:.3f}"


def main() -> None:
    """Measure at the given shapes, estimate at 7B, print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", nargs="*", default=None, help="default: small medium on CPU, 0.5b 1.5b 7b on CUDA")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dirs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    shapes = (
        args.shapes
        if args.shapes is not None
        else (["small", "medium"] if args.device == "cpu" else ["0.5b", "1.5b", "7b"])
    )
    measured: dict[str, tuple[float | None, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="memory_bench_") as scratch:
        for shape in shapes:
            dirs = write_models(shape, Path(scratch) / shape, "float32" if args.device == "cpu" else "bfloat16")
            measured[shape] = (
                measure(shape, False, dirs, args, Path(scratch)),
                measure(shape, True, dirs, args, Path(scratch)),
            )
    text = report(args, measured, count_parameters())
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
