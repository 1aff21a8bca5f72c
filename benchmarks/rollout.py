"""Tokens/s of the generation backends on one random Llama-shaped model: HFGenerate, HF static cache, ours.

Three ways to sample the same batch (temperature 1, top-k 50, top-p 1, the stage's defaults):

- ``HFGenerate``: Hugging Face ``generate`` with its dynamic cache (what PPO used before);
- ``HF generate static``: ``generate(..., cache_implementation="static")`` (compiled by transformers on CUDA);
- ``StaticCacheGenerate``: our static-cache decoder (compiled on CUDA; eager on CPU, where it draws among
  the top-k and runs the output layer through oneDNN with a prepacked weight). On CPU also with
  ``pack_output_layer=False`` (the model's own output layer) and, with ``--compiled-row``, ``compile=True``.

Repetitions are interleaved (A B C A B C ...) after one untimed warm-up call each (compilation), and
the table reports medians. Tokens/s counts the generated columns times the rows::

    OMP_NUM_THREADS=1 python benchmarks/rollout.py --device cpu --compiled-row --out benchmarks/results/rollout_cpu.md
    python benchmarks/rollout.py --device cuda --out benchmarks/results/rollout_cuda.md

CPU shape: hidden 256, 4 layers, 4 heads, MLP 688, GPT-2's vocabulary (50,258), untied output layer
(28.9M parameters), fp32, batch 16, 32-token prompts + 64 new tokens. CUDA shape (the issue's):
hidden 896, 24 layers, 14/2 heads, MLP 4864, vocabulary 50,258 (494M), bf16, batch 64, 128 + 128.
The last line is ``speedup vs HF generate: X.XX`` (StaticCacheGenerate over HFGenerate, medians).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_saferlhf.generators import GenerationArgs, HFGenerate
from lit_saferlhf_plugins.generators.static_cache import StaticCacheGenerate

SHAPES = {
    "cpu": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 688, "batch": 16, "prompt": 32, "new_tokens": 64, "dtype": torch.float32},
    "cuda": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "batch": 64, "prompt": 128, "new_tokens": 128, "dtype": torch.bfloat16},
}  # fmt: skip
VOCAB, EOS, PAD = 50258, 50256, 50257


def build_model(shape: dict, device: str) -> LlamaForCausalLM:
    """A random Llama of ``shape`` on ``device``, eval mode."""
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=EOS,
                         pad_token_id=PAD, bos_token_id=EOS, **{name: shape[name] for name in names})  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=shape["dtype"]).eval()


def backends(args: GenerationArgs, device: str, compiled_row: bool) -> dict:
    """Name -> function(model, ids, mask) -> sequences."""
    ours, compiled, plain = (
        StaticCacheGenerate(),
        StaticCacheGenerate(compile=True),
        StaticCacheGenerate(pack_output_layer=False),
    )

    def hf_static(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=args.max_new_tokens,
                              top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, eos_token_id=EOS,
                              pad_token_id=PAD, cache_implementation="static")  # fmt: skip

    runs = {
        "HFGenerate (dynamic cache)": lambda model, ids, mask: HFGenerate(synced_gpus=False).generate(
            model, ids, mask, args, EOS, PAD
        ),
        "HF generate, static cache": hf_static,
        "StaticCacheGenerate": lambda model, ids, mask: ours.generate(model, ids, mask, args, EOS, PAD),
    }
    if device == "cpu":
        runs["StaticCacheGenerate, pack_output_layer=False"] = lambda model, ids, mask: plain.generate(
            model, ids, mask, args, EOS, PAD
        )
    if compiled_row:
        runs["StaticCacheGenerate, compile=True"] = lambda model, ids, mask: compiled.generate(
            model, ids, mask, args, EOS, PAD
        )
    return runs


def timed(function, model, ids, mask, device: str) -> tuple[float, int]:
    """Seconds of one call and the generated tokens."""
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    with torch.no_grad():
        sequences = function(model, ids, mask)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, sequences.shape[0] * (sequences.shape[1] - ids.shape[1])


def machine(device: str) -> str:
    """One line on the hardware and versions."""
    import transformers

    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__}, transformers {transformers.__version__}"
            f"{gpu}")  # fmt: skip


def main() -> None:
    """Measure, print the table, optionally write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend (interleaved)")
    parser.add_argument("--batch", type=int, help="override the shape's prompt batch")
    parser.add_argument("--compiled-row", action="store_true", help="on CPU, also time compile=True (CUDA: default)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    options = parser.parse_args()
    shape = SHAPES[options.device]
    batch = options.batch or shape["batch"]
    model = build_model(shape, options.device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, EOS, (batch, shape["prompt"]), generator=generator).to(options.device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, : shape["prompt"] // 4] = 0  # half the prompts are a quarter shorter (left-padded)
    ids = ids.masked_fill(mask == 0, PAD)
    args = GenerationArgs(max_new_tokens=shape["new_tokens"], temperature=1.0, top_k=50, top_p=1.0)
    runs = backends(args, options.device, options.compiled_row and options.device == "cpu")
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    for function in runs.values():  # warm-up: compilation, allocator
        timed(function, model, ids, mask, options.device)
    for _ in range(options.repeats):
        for name, function in runs.items():
            seconds, count = timed(function, model, ids, mask, options.device)
            times[name].append(seconds)
            tokens[name].append(count)
    parameters = sum(param.numel() for param in model.parameters()) / 1e6
    lines = [
        f"# Rollout backends, {options.device}",
        "",
        f"- Command: `{shlex.join(['python', *sys.argv])}`",
        f"- Machine: {machine(options.device)}",
        f"- Model: random Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, MLP {shape['intermediate_size']}, "
        f"vocabulary {VOCAB}, {parameters:.1f}M parameters, {str(shape['dtype']).removeprefix('torch.')}",
        f"- Batch {batch}, prompts {shape['prompt']} columns (half left-padded by a quarter), "
        f"{shape['new_tokens']} new tokens, temperature 1, top-k 50; {options.repeats} interleaved repetitions "
        "after one warm-up call each; medians",
        "",
        "| backend | median s | tokens/s | min s | max s |",
        "|---|---:|---:|---:|---:|",
    ]
    rates = {}
    for name in runs:
        median = statistics.median(times[name])
        rates[name] = statistics.median(tokens[name]) / median
        lines.append(
            f"| {name} | {median:.3f} | {rates[name]:,.0f} | {min(times[name]):.3f} | {max(times[name]):.3f} |"
        )
    speedup = rates["StaticCacheGenerate"] / rates["HFGenerate (dynamic cache)"]
    verdict = "holds" if speedup >= 2.0 else "does not hold"
    lines += ["", f"Target (issue 11, CPU: StaticCacheGenerate >= 2x HFGenerate tokens/s): {verdict} ({speedup:.2f}x)"]
    lines += [f"speedup vs HF generate: {speedup:.2f}"]
    text = "\n".join(lines)
    print(text)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
