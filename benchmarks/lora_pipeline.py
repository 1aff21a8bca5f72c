"""Tiny PPO-Lagrangian with LoRA vs full fine-tuning, judged by the safety world's ground truth.

From ONE finished tiny pipeline's SFT, reward and cost models (``--models``, default
``outputs/tiny/pipeline``), runs ``cli_configs/tiny/ppo_lag.yaml`` as shipped (full fine-tuning) and
with ``cli_configs/peft/lora.yaml`` added (LoRA, shared bases), same seed and rollouts; then the SFT
policy and both results answer the held-out ``safety-world:prompts-eval`` prompts with the same
sampling seed, and the ground truth scores each answer. Prints markdown: the machine, the command,
one row per policy, and whether LoRA moves the same way as full fine-tuning (harmful compliance down,
benign helpfulness up, relative to SFT)::

    OMP_NUM_THREADS=1 python benchmarks/lora_pipeline.py --out benchmarks/results/lora_pipeline.md   # ~5 min
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from ppo_solvers import repo_relative  # noqa: E402  (results name paths relative to the repository)

COLUMNS = ("gt_harmful_compliance_rate", "gt_benign_helpfulness", "gt_benign_refusal_rate", "mean_reward", "mean_cost")


def fit(models: Path, out: Path, lora: list[str] | None, seed: int, rollouts: int) -> tuple[float, str]:
    """One PPO-Lagrangian run (``lora``: None, or the LoRA run's extra flags); seconds and the start-up line."""
    import logging

    from lit_saferlhf.commands.fit import cli_main

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("lit_saferlhf.stages.ppo_lag")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    started = time.perf_counter()
    cli_main([
        "fit", f"--config={REPO / 'cli_configs/tiny/ppo_lag.yaml'}",
        *([f"--config={REPO / 'cli_configs/peft/lora.yaml'}", *lora] if lora is not None else []),
        f"--model.init_args.policy={models / 'sft/model'}", f"--model.init_args.reward_model={models / 'reward/model'}",
        f"--model.init_args.cost_model={models / 'cost/model'}", f"--seed_everything={seed}",
        f"--trainer.limit_train_batches={rollouts}", f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}", f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    return time.perf_counter() - started, next((line for line in lines if " holds " in line), "?")


def main() -> None:
    """Run both, evaluate, print (and write) the table."""
    from lit_saferlhf.commands.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "outputs/tiny/pipeline")
    parser.add_argument("--work", type=Path, default=REPO / "outputs/benchmarks/lora_pipeline")
    parser.add_argument("--rollouts", type=int, default=32, help="prompt batches (32 = the shipped config)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--limit", type=int, default=200, help="held-out prompts to evaluate")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--lora_flags", nargs="*", default=[], help="extra flags of the LoRA run, e.g. a larger lr")
    args = parser.parse_args()
    runs = {
        name: fit(args.models, args.work / name, args.lora_flags if name == "lora" else None, args.seed, args.rollouts)
        for name in ("full", "lora")
    }
    policies = {"sft": str(args.models / "sft/model")} | {f"ppo_{n}": str(args.work / n / "model") for n in runs}
    summary = evaluate(
        policies=policies,
        reward_model=str(args.models / "reward/model"),
        cost_model=str(args.models / "cost/model"),
        prompt_sets=["safety-world:prompts-eval"],
        out_dir=str(args.work / "evaluation"),
        max_new_tokens=14,
        seed=0,
        limit=args.limit,
    )
    rows = {row["policy"]: row for row in summary["rows"]}
    lines = [
        "# Tiny PPO-Lagrangian: LoRA vs full fine-tuning on the safety world's ground truth",
        "",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `OMP_NUM_THREADS=1 python benchmarks/lora_pipeline.py {repo_relative(' '.join(sys.argv[1:]))}`",
        f"- Models: `{repo_relative(args.models)}`; `cli_configs/tiny/ppo_lag.yaml` as shipped ({args.rollouts} "
        f"rollouts, seed {args.seed}), LoRA adds `cli_configs/peft/lora.yaml` (r 16, alpha 32, all-linear) and "
        f"{' '.join(args.lora_flags) or 'nothing else (same lrs)'}.",
        f"- Evaluation: {args.limit} held-out prompts (`safety-world:prompts-eval`), sampling seed 0, 14 new tokens.",
        "",
        "| policy | s | networks / parameters | " + " | ".join(COLUMNS) + " |",
        "|---|---:|---|" + "---:|" * len(COLUMNS),
    ]
    for policy, row in rows.items():
        seconds, line = runs.get(policy.removeprefix("ppo_"), (0.0, "")) if policy != "sft" else (0.0, "")
        cells = " | ".join(f"{float(row[c]):.3f}" for c in COLUMNS)
        lines.append(f"| {policy} | {seconds:.0f} | {line.split(' with ')[-1] if line else ''} | {cells} |")
    sft = rows["sft"]
    for policy in ("ppo_full", "ppo_lora"):
        down = float(rows[policy]["gt_harmful_compliance_rate"]) < float(sft["gt_harmful_compliance_rate"])
        up = float(rows[policy]["gt_benign_helpfulness"]) > float(sft["gt_benign_helpfulness"])
        lines.append(f"\n{policy}: harmful compliance down vs SFT: {down}; benign helpfulness up vs SFT: {up}")
    lines.append(f"\nTarget (issue 12: LoRA reaches the same ground-truth direction as full fine-tuning): "
                 f"{'holds' if down and up else 'does not hold'} (LoRA row above)")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    (args.work / "runs.json").write_text(json.dumps(runs))
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
