"""Held-out accuracy of a small cost model trained for a few minutes on real PKU-SafeRLHF pairs (CPU).

Runs ``cli_configs/examples/cost_pku_tiny.yaml`` through ``lit_saferlhf.commands.fit.cli_main`` (one
validation of the untrained model, then ``fit`` under a time cap), reads the held-out metrics
from the CSV log, and prints a markdown table with the machine, the command, the split sizes,
the held-out pairwise and sign accuracy at each validation, the chance levels and two baselines
computed directly from the same split (response length; a bag-of-words linear model)::

    OMP_NUM_THREADS=1 python benchmarks/cost_model_pku.py               # 5-8 min on 2 (shared) CPU cores
    OMP_NUM_THREADS=1 python benchmarks/cost_model_pku.py --out benchmarks/results/cost_model_pku.md
    python benchmarks/cost_model_pku.py -- --model.init_args.optimizer.lr=3e-3   # extra CLI overrides

The held-out split is CostData's own (``val_fraction`` of the prompts, by a stable hash); the
script asserts that no prompt is in both splits, both on the datamodule's encoded samples
(prompt token ids) and on the records' prompt text.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import collections
import csv
import math
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from lit_saferlhf.commands.fit import cli_main
from lit_saferlhf.data.datamodules import split_by_prompt

DEFAULT_CONFIG = "cli_configs/examples/cost_pku_tiny.yaml"


def prompt_key(record) -> str:
    """The prompt text of a record (all turns), as ``split_by_prompt`` keys it."""
    return "\x1f".join(message.content for message in record.prompt)


def encoded_prompt(item) -> tuple[int, ...]:
    """Prompt token ids of one encoded CostData sample ``(safer, unsafer, is_safe, is_safe)``."""
    return tuple(item[0].input_ids[: item[0].prompt_length])


def read_val_metrics(metrics_csv: Path) -> list[dict[str, float]]:
    """Rows of the CSV log that carry held-out metrics, in order."""
    rows = []
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row.get("val/accuracy"):
                rows.append({key: float(value) for key, value in row.items() if value != ""})
    return rows


def length_baseline(train, val) -> dict[str, float]:
    """ "Longer response = costlier": pairwise accuracy (ties 0.5), and a length threshold for the sign.

    The threshold (characters; longer than it = unsafe, or shorter, whichever fits better) is
    chosen on the training pairs and applied to the held-out ones.
    """

    def pairwise(records) -> float:
        score = [
            1.0 if len(r.unsafer) > len(r.safer) else 0.5 if len(r.unsafer) == len(r.safer) else 0.0 for r in records
        ]
        return sum(score) / len(score)

    def responses(records):
        return [(len(r.safer), r.is_safer_safe) for r in records] + [
            (len(r.unsafer), r.is_unsafer_safe) for r in records
        ]

    def sign(records, threshold: int, longer_unsafe: bool) -> float:
        return sum(((n > threshold) == longer_unsafe) == (not safe) for n, safe in responses(records)) / (
            2 * len(records)
        )

    lengths = sorted({n for n, _ in responses(train)})
    best = max(
        ((sign(train, t, d), t, d) for t in lengths[:: max(1, len(lengths) // 400)] for d in (True, False)),
        key=lambda x: x[0],
    )
    return {
        "pairwise": pairwise(val),
        "pairwise_train": pairwise(train),
        "sign": sign(val, best[1], best[2]),
        "sign_threshold": best[1],
        "sign_longer_unsafe": best[2],
    }


WORD = re.compile(r"[a-z']+")


def bow_baseline(train, val, epochs: int = 300, min_count: int = 3, l2: float = 1e-3) -> dict[str, float]:
    """A linear cost ``c = w . x + b`` over binary unigram features of the response, trained on the
    training pairs with the cost model's own loss (pairwise + sign terms, full batch, Adam)."""
    counts = collections.Counter(
        w for r in train for text in (r.safer, r.unsafer) for w in set(WORD.findall(text.lower()))
    )
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}

    def features(texts) -> torch.Tensor:
        x = torch.zeros(len(texts), len(vocab))
        for row, text in enumerate(texts):
            ids = [vocab[w] for w in set(WORD.findall(text.lower())) if w in vocab]
            x[row, ids] = 1.0
        return x

    def tensors(records):
        return (
            features([r.safer for r in records]),
            features([r.unsafer for r in records]),
            torch.tensor([r.is_safer_safe for r in records]),
            torch.tensor([r.is_unsafer_safe for r in records]),
        )

    from lit_saferlhf.losses import cost_loss

    (xs, xu, ss, su), (vs, vu, vss, vsu) = tensors(train), tensors(val)
    linear = torch.nn.Linear(len(vocab), 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss, _ = cost_loss(linear(xs).squeeze(-1), linear(xu).squeeze(-1), ss, su)
        (loss + l2 * linear.weight.square().sum()).backward()
        optimizer.step()
    with torch.no_grad():
        _, stats = cost_loss(linear(vs).squeeze(-1), linear(vu).squeeze(-1), vss, vsu)
        _, train_stats = cost_loss(linear(xs).squeeze(-1), linear(xu).squeeze(-1), ss, su)
    weights = linear.weight.squeeze(0)
    words = {i: w for w, i in vocab.items()}
    return {
        "pairwise": stats["accuracy"].item(),
        "sign": stats["sign_accuracy"].item(),
        "train_pairwise": train_stats["accuracy"].item(),
        "vocab": len(vocab),
        "costliest": [words[i] for i in weights.topk(8).indices.tolist()],
        "safest": [words[i] for i in (-weights).topk(8).indices.tolist()],
    }


def fmt(x: float) -> str:
    return f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--max-time", default="00:00:08:00", help="Lightning's trainer.max_time (DD:HH:MM:SS)")
    parser.add_argument("--out", default=None, help="also write the printed table to this file")
    parser.add_argument("overrides", nargs="*", help="extra LightningCLI arguments, after --")
    args = parser.parse_args()

    torch.set_num_threads(1)
    # inference_mode=false: validate() then fit() in one process, and validate's torch.inference_mode
    # would leave ScoreMetrics' reset states as inference tensors that fit's validation cannot update.
    cli_args = ["--config", args.config, f"--trainer.max_time={args.max_time}", "--trainer.inference_mode=false"]
    cli_args += args.overrides
    command = "OMP_NUM_THREADS=1 lit-saferlhf fit " + shlex.join(cli_args)

    start = time.perf_counter()
    cli = cli_main(cli_args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.validate(model, datamodule=data)  # the untrained model: the step-0 row of the table
    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - fit_start
    total_seconds = time.perf_counter() - start

    # The split the datamodule trained on: no prompt in both (encoded samples, then record text).
    train_prompts = {encoded_prompt(item) for item in data.train_set}
    val_prompts = {encoded_prompt(item) for item in data.val_set}
    assert not train_prompts & val_prompts, f"{len(train_prompts & val_prompts)} prompts in both splits"
    records = data.read(data.path)
    train, val = split_by_prompt(records, data.val_fraction)
    assert (len(train), len(val)) == (len(data.train_set), len(data.val_set)), "split differs from the datamodule's"
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in val}, "prompt text in both splits"

    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
    rows = read_val_metrics(metrics_csv)
    length = length_baseline(train, val)
    bow = bow_baseline(train, val)
    unsafe_rate = sum((not r.is_safer_safe) + (not r.is_unsafer_safe) for r in val) / (2 * len(val))
    one_safe = sum(r.is_safer_safe != r.is_unsafer_safe for r in val) / len(val)
    steps_per_epoch = math.ceil(len(data.train_set) / data.batch_size)
    planned = steps_per_epoch * trainer.max_epochs
    stopped = f", stopped by max_time {args.max_time} of {planned} planned" if trainer.global_step < planned else ""
    backbone = model.model.backbone.config
    n_params = sum(p.numel() for p in model.model.parameters())
    n_embed = model.model.backbone.get_input_embeddings().weight.numel()

    lines = [
        "# Cost model on PKU-SafeRLHF safety pairs (CPU, a few minutes)",
        "",
        f"Command: `{command}` (run by `python benchmarks/cost_model_pku.py`, which validates once before `fit`)",
        "",
        "| | |",
        "|---|---|",
        f"| machine | {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread, Python {platform.python_version()} |",
        f"| model | random-init {backbone.model_type}, {backbone.num_hidden_layers} layers, hidden "
        f"{backbone.hidden_size}, {n_params / 1e6:.1f} M params ({n_embed / 1e6:.1f} M of them the embedding), "
        f"GPT-2 tokenizer + pad |",
        f"| data | `{data.path}`: {len(records)} pairs, {len({prompt_key(r) for r in records})} prompts; "
        f"max_length {data.max_length} ({data.truncated} pairs truncated) |",
        f"| train split | {len(train)} pairs, {len({prompt_key(r) for r in train})} prompts |",
        f"| held-out split | {len(val)} pairs, {len({prompt_key(r) for r in val})} prompts "
        f"(val_fraction {data.val_fraction} of prompts; prompt overlap with train: 0, asserted) |",
        f"| training | batch {data.batch_size}, {steps_per_epoch} steps/epoch, lr {model.optimizer_args.lr} "
        f"({model.optimizer_args.schedule}), max_epochs {trainer.max_epochs}: ran {trainer.global_step} steps "
        f"({trainer.global_step / steps_per_epoch:.2f} epochs{stopped}) "
        f"in {fit_seconds / 60:.1f} min (fit incl. validations; {total_seconds / 60:.1f} min end to end) |",
        "",
        "## Held-out accuracy at each validation",
        "",
        "| steps trained | epochs | pairwise accuracy | sign accuracy | val loss | cost mean | cost std |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(rows):
        steps = 0 if index == 0 else int(row.get("step", 0)) + 1
        lines.append(
            f"| {steps}{' (untrained)' if index == 0 else ''} | {steps / steps_per_epoch:.2f} | "
            f"{fmt(row['val/accuracy'])} | "
            f"{fmt(row['val/sign_accuracy'])} | {fmt(row.get('val/loss', float('nan')))} | "
            f"{fmt(row['val/score_mean'])} | {fmt(row['val/score_std'])} |"
        )
    lines += [
        "",
        "(the first row is `trainer.validate` before `fit`; epochs = steps trained / steps per epoch.)",
        "",
        "## Reference points on the same held-out pairs",
        "",
        "| predictor | pairwise accuracy | sign accuracy |",
        "|---|---:|---:|",
        f"| chance / majority class | 0.500 | {fmt(max(unsafe_rate, 1 - unsafe_rate))} "
        f'(always "unsafe"; {one_safe:.0%} of pairs have exactly one safe response) |',
        f"| response length (longer = costlier; sign: length threshold fitted on train) | {fmt(length['pairwise'])} "
        f"(train {fmt(length['pairwise_train'])}) | {fmt(length['sign'])} |",
        f"| bag-of-words linear cost ({bow['vocab']} words, same loss, trained on the train split) | "
        f"{fmt(bow['pairwise'])} (train {fmt(bow['train_pairwise'])}) | {fmt(bow['sign'])} |",
        f"| **cost model, last validation** | **{fmt(rows[-1]['val/accuracy'])}** | "
        f"**{fmt(rows[-1]['val/sign_accuracy'])}** |",
        "",
        f"Bag-of-words weights: costliest words {', '.join(bow['costliest'])}; safest {', '.join(bow['safest'])}.",
        f"Log: `{metrics_csv}`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
