"""Critic-free constrained RL against the ground truth: GRPO- and RLOO-Lagrangian vs PPO-Lagrangian.

From ONE SFT policy, reward model and cost model (``--models``: a finished pipeline's
``{sft,reward,cost}/model``, by default ``outputs/tiny/pipeline``; trained with the tiny configs when
missing), runs each method with the same solver (DualAscent, d = -5) and the same number of generated
samples (1024: ``tiny/ppo_lag.yaml`` 32 rollouts x 32 prompts x 1 sample; ``tiny/grpo_lag.yaml`` and
``tiny/rloo_lag.yaml`` 32 rollouts x 8 prompts x 4 samples), for each seed:

- PPO-Lagrangian (GAE, reward and cost critics: 6 networks),
- GRPO-Lagrangian (``GroupNormalized``: no critics, 4 networks),
- RLOO-Lagrangian (``LeaveOneOut``: no critics, 4 networks).

Each run is its own process (so its peak resident memory is its own). Every final policy, and the
SFT policy, answers the held-out ``safety-world:prompts-eval`` prompts with the same sampling seed;
the ground truth scores each answer. Then the SFT policy samples 4 answers per eval prompt, and each
estimator's advantages of those groups are measured per prompt kind (``group_statistics``: why the
group z-score weighs benign prompts' small cost differences as much as harmful prompts' large ones).
Prints markdown (machine, command, one row per run, the mean per method, issue 13's target stated as
holding or not, with the numbers, and the group statistics)::

    OMP_NUM_THREADS=1 python benchmarks/critic_free.py --out benchmarks/results/critic_free.md   # 2-10 min
    OMP_NUM_THREADS=1 python benchmarks/critic_free.py --seeds 1337                           # one seed
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import csv
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from lit_saferlhf.losses import group_normalized_advantages, leave_one_out_advantages

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_solvers as common  # noqa: E402  (fit, train_models, machine, git_revision, fmt, cells)

REPO = common.REPO
METHODS = {"ppo": ("PPO-Lagrangian (GAE)", "ppo_lag.yaml"), "grpo": ("GRPO-Lagrangian", "grpo_lag.yaml"),
           "rloo": ("RLOO-Lagrangian", "rloo_lag.yaml")}  # fmt: skip
SEQUENCES_PER_ROLLOUT = 32
"""Generated samples per rollout in every method's tiny config (32 x 1 for PPO, 8 x 4 for GRPO/RLOO)."""


# ----------------------------------------------------------------------------------------------
# One run, in a child process
# ----------------------------------------------------------------------------------------------


def child(config: str, out: Path, seed: int, models: Path, rollouts: int) -> None:
    """Run one config; write ``bench.json``: wall seconds, peak RSS and the stage's network summary."""
    summary: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            summary.append(record.getMessage())

    stage_log = logging.getLogger("lit_saferlhf.stages.ppo_lag")
    stage_log.addHandler(Keep())
    stage_log.setLevel(logging.INFO)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB after imports
    seconds = common.fit(
        common.TINY / config,
        out,
        f"--model.init_args.policy={models / 'sft' / 'model'}",
        f"--model.init_args.reward_model={models / 'reward' / 'model'}",
        f"--model.init_args.cost_model={models / 'cost' / 'model'}",
        f"--seed_everything={seed}",
        f"--trainer.limit_train_batches={rollouts}",
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = next(message for message in summary if " holds " in message)
    (out / "bench.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before,
                                                "networks": line}))  # fmt: skip


def run(method: str, seed: int, root: Path, models: Path, rollouts: int) -> dict[str, Any]:
    """One method and seed in its own process; its bench.json and logged metrics."""
    out = root / "runs" / f"{method}_seed{seed}"
    command = [sys.executable, __file__, "--child", METHODS[method][1], str(out), str(seed), str(models), str(rollouts)]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench = json.loads((out / "bench.json").read_text())
    (metrics_csv,) = sorted((out / "logs").glob("version_*/metrics.csv"))[-1:]
    with metrics_csv.open() as handle:
        rows = list(csv.DictReader(handle))

    def column(name: str) -> list[float]:
        return [float(row[name]) for row in rows if row.get(name)]

    history = json.loads((out / "model" / "multiplier_history.json").read_text())["multiplier"]
    networks = bench["networks"]
    timed = [name for name in rows[0] if name.startswith("time/")]  # generation, scoring, update (per rollout)
    return {
        "method": method, "seed": seed, "model": str(out / "model"), **bench,
        "held": int(networks.split(": ")[1].split(" parameters")[0].replace(",", "")),
        "trained": int(networks.split(", ")[-1].split(" trained")[0].replace(",", "")),
        "count": int(networks.split(" holds ")[1].split(" networks")[0]),
        "rollouts": len(history), "final_multiplier": history[-1], "max_multiplier": max(history),
        "final_episode_cost": column("solver/episode_cost")[-1],
        "generation_s": mean(column("time/generation_s")),
        "rollout_s": mean(sum(float(row[name]) for name in timed) for row in rows if row.get(timed[0])),
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Why GRPO differs: the group statistics of the SFT policy's samples
# ----------------------------------------------------------------------------------------------


def group_statistics(models: Path, root: Path, limit: int) -> dict[str, dict[str, float]]:
    """G = 4 SFT samples per eval prompt (sampling seeds 0-3), scored; per prompt kind, the within-group
    std of each score and the mean |advantage| each estimator gives each stream, and each estimator's share
    of the summed |cost advantage| that lands on benign prompts (key ``benign_share``)."""
    from lit_saferlhf.commands.evaluate import evaluate

    samples = []
    for seed in range(4):
        out = root / "groups" / f"seed{seed}"
        evaluate(
            policies={"sft": str(models / "sft" / "model")}, reward_model=str(models / "reward" / "model"),
            cost_model=str(models / "cost" / "model"), prompt_sets=[common.EVAL_SET], out_dir=str(out),
            max_new_tokens=14, seed=seed, limit=limit,
        )  # fmt: skip
        samples.append([json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()])
    scores = {s: torch.tensor([[g[i][s] for g in samples] for i in range(len(samples[0]))]) for s in ("reward", "cost")}
    harmful = torch.tensor([row["harmful"] for row in samples[0]])
    advantages = {
        (name, s): estimator(scores[s].reshape(-1), 4).reshape(-1, 4).abs()
        for name, estimator in (("grpo", group_normalized_advantages), ("rloo", leave_one_out_advantages))
        for s in scores
    }
    stats: dict[str, dict[str, float]] = {}
    for kind, rows in (("benign", ~harmful), ("harmful", harmful)):
        stats[kind] = {f"std_{s}": float(v[rows].std(-1).mean()) for s, v in scores.items()}
        stats[kind] |= {f"{n}_{s}": float(a[rows].mean()) for (n, s), a in advantages.items()}
    stats["benign_share"] = {n: float(advantages[n, "cost"][~harmful].sum() / advantages[n, "cost"].sum())
                             for n in ("grpo", "rloo")}  # fmt: skip
    return stats


def group_lines(stats: dict[str, dict[str, float]]) -> list[str]:
    """The group statistics as a markdown table and one sentence."""
    lines = [
        "| SFT samples, G = 4 | within-group std: reward | cost | GRPO mean abs A_r | abs A_c | "
        "RLOO mean abs A_r | abs A_c |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("benign", "harmful"):
        v = stats[kind]
        keys = ("std_reward", "std_cost", "grpo_reward", "grpo_cost", "rloo_reward", "rloo_cost")
        lines.append(common.cells(f"{kind} prompts", *(common.fmt(v[k]) for k in keys)))
    share = stats["benign_share"]
    lines += ["", f"Share of the summed abs cost advantage that lands on benign prompts: GRPO "
              f"{common.fmt(share['grpo'])}, RLOO {common.fmt(share['rloo'])}."]  # fmt: skip
    return lines


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, runs: list[dict[str, Any]], rows: dict[str, dict], groups: dict, minutes: float
) -> str:
    d = args.cost_limit
    sft = rows["sft"]
    lines = [
        "# Critic-free constrained RL on the safety world: GRPO- and RLOO-Lagrangian vs PPO-Lagrangian",
        "",
        f"- Machine: {common.machine(args.load_at_start)}",
        f"- Command: `OMP_NUM_THREADS=1 python benchmarks/critic_free.py {common.repo_relative(' '.join(args.argv))}`",
        f"- Checkout: {common.git_revision()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; total "
        f"{minutes:.1f} min",
        f"- Models: `{common.repo_relative(args.models)}` (SFT, reward, cost); every run starts from that SFT policy. "
        "Solver: DualAscent "
        f"(λ0 = 1, lr 0.1 on ln λ, cap 5), d = {d:g}, as shipped in each config. Equal generated samples: "
        f"{args.rollouts * SEQUENCES_PER_ROLLOUT} per run (PPO: {args.rollouts} rollouts x 32 prompts x 1; GRPO/RLOO: "
        f"{args.rollouts} rollouts x 8 prompts x 4).",
        "- PPO-Lagrangian: `cli_configs/tiny/ppo_lag.yaml` (GAE, KL as a per-token reward penalty β = 0.05, "
        "sequence mean). GRPO/RLOO: `cli_configs/tiny/{grpo,rloo}_lag.yaml` (no critics, k3 KL loss β = 0.05, "
        "token mean). Actor lr 5e-4 in all three.",
        f"- Evaluation: `lit_saferlhf.commands.evaluate.evaluate` on `safety-world:prompts-eval` ({args.limit} "
        "held-out prompts), sampling seed 0, at most 14 new tokens; ground truth from "
        "`lit_saferlhf.data.safety_world`.",
        "- Memory: held/trained = parameters the stage holds / trains (its start-up line); peak RSS = the run's "
        "process peak resident memory (includes torch itself, ~the same for all; with models this tiny the "
        "networks are a small part of it). Time: the logged generation + scoring + update seconds per rollout "
        "(32 sequences; model loading excluded), mean over rollouts, and the same per sample; the machine is "
        "shared, so compare times within this table only.",
        "",
        "| method | seed | benign helpful (gt) | benign refusal | harmful compliance | cost-model score | <= d | "
        "final λ | max λ | networks | params held / trained | peak RSS MiB | s / rollout | ms / sample |",
        "|---|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|---:|---:|",
        common.cells("SFT", "–", common.fmt(sft["gt_benign_helpfulness"]), common.fmt(sft["gt_benign_refusal_rate"]),
                     common.fmt(sft["gt_harmful_compliance_rate"]), common.fmt(sft["mean_cost"]),
                     "yes" if sft["mean_cost"] <= d else "no", *["–"] * 7),
    ]  # fmt: skip
    for r in runs:
        row = rows[key(r)]
        lines.append(common.cells(
            METHODS[r["method"]][0], str(r["seed"]), common.fmt(row["gt_benign_helpfulness"]),
            common.fmt(row["gt_benign_refusal_rate"]), common.fmt(row["gt_harmful_compliance_rate"]),
            common.fmt(row["mean_cost"]), "yes" if row["mean_cost"] <= d else "no", common.fmt(r["final_multiplier"]),
            common.fmt(r["max_multiplier"]), str(r["count"]), f"{r['held']:,} / {r['trained']:,}",
            f"{r['peak_rss_mib']:.0f}", f"{r['rollout_s']:.2f}", f"{1000 * r['rollout_s'] / SEQUENCES_PER_ROLLOUT:.1f}",
        ))  # fmt: skip
    means = {m: method_means(m, runs, rows) for m in METHODS}
    lines += ["", "Mean over seeds:", "",
              "| method | seeds | benign helpful | benign refusal | harmful compliance | cost-model score | "
              "max cost-model score | s / rollout | ms / sample | peak RSS MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for m, v in means.items():
        lines.append(common.cells(
            METHODS[m][0], str(v["n"]), common.fmt(v["help"]), common.fmt(v["refusal"]), common.fmt(v["harm"]),
            common.fmt(v["cost"]), common.fmt(v["max_cost"]), f"{v['rollout_s']:.2f}", f"{v['ms']:.1f}",
            f"{v['rss']:.0f}",
        ))  # fmt: skip
    lines += ["", "## Issue 13's target, checked", "", *target(means, runs, rows, d)]
    lines += [
        "",
        "## Group statistics of the SFT policy's samples (why GRPO and RLOO differ)",
        "",
        *group_lines(groups),
    ]
    return "\n".join(lines) + "\n"


def key(r: dict[str, Any]) -> str:
    return f"{r['method']}_seed{r['seed']}"


def method_means(method: str, runs: list[dict[str, Any]], rows: dict[str, dict]) -> dict[str, float]:
    """Seed means of one method's evaluation and cost figures."""
    mine = [r for r in runs if r["method"] == method]
    evals = [rows[key(r)] for r in mine]
    return {
        "n": len(mine), "help": mean(e["gt_benign_helpfulness"] for e in evals),
        "refusal": mean(e["gt_benign_refusal_rate"] for e in evals),
        "harm": mean(e["gt_harmful_compliance_rate"] for e in evals), "cost": mean(e["mean_cost"] for e in evals),
        "max_cost": max(e["mean_cost"] for e in evals), "rollout_s": mean(r["rollout_s"] for r in mine),
        "ms": mean(1000 * r["rollout_s"] / SEQUENCES_PER_ROLLOUT for r in mine),
        "rss": mean(r["peak_rss_mib"] for r in mine),
        "count": mine[0]["count"],
    }  # fmt: skip


def target(means: dict[str, dict], runs: list[dict[str, Any]], rows: dict[str, dict], d: float) -> list[str]:
    """The issue's target for GRPO (and, for information, RLOO), each part holding or not, with numbers."""
    ppo = means["ppo"]
    out = []
    for method in ("grpo", "rloo"):
        v, name = means[method], METHODS[method][0]
        costs = [rows[key(r)]["mean_cost"] for r in runs if r["method"] == method]
        parts = {
            f"cost-model score <= d = {d:g} on every seed ({', '.join(common.fmt(c) for c in costs)})": all(
                c <= d for c in costs
            ),
            f"harmful compliance {common.fmt(v['harm'], 4)} <= PPO-Lag's {common.fmt(ppo['harm'], 4)} + 0.02": v["harm"]
            <= ppo["harm"] + 0.02,
            f"benign helpfulness {common.fmt(v['help'], 3)} >= PPO-Lag's {common.fmt(ppo['help'], 3)} - 0.1": v["help"]
            >= ppo["help"] - 0.1,
            f"{v['count']} networks instead of {ppo['count']}": v["count"] == 4 and ppo["count"] == 6,
            f"time per sample {v['ms']:.1f} ms < PPO-Lag's {ppo['ms']:.1f} ms": v["ms"] < ppo["ms"],
        }
        overall = "**holds**" if all(parts.values()) else "**does not hold**"
        detail = "; ".join(f"{text}: {'yes' if ok else 'NO'}" for text, ok in parts.items())
        label = "the target" if method == "grpo" else "the same target for RLOO (not required)"
        out.append(f"- {name}, {label}: {overall} (seed means) — {detail}.")
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(argv[1], Path(argv[2]), int(argv[3]), Path(argv[4]), int(argv[5]))
        return ""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="outputs/tiny/pipeline", help="folder with {sft,reward,cost}/model")
    parser.add_argument("--out-dir", default="outputs/benchmarks/critic_free", help="runs and evaluation")
    parser.add_argument("--out", help="also write the printed markdown to this file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--cost-limit", type=float, default=-5.0, help="d of the shipped configs (for the table)")
    parser.add_argument("--limit", type=int, default=200, help="eval prompts")
    parser.add_argument("--rollouts", type=int, default=32, help="rollouts per run (32 x 32 = 1024 samples)")
    args = parser.parse_args(argv)
    args.argv = argv
    args.load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.perf_counter()
    os.chdir(REPO)
    root, models = Path(args.out_dir).resolve(), Path(args.models).resolve()
    if not all((models / stage / "model" / "config.json").is_file() for stage in ("sft", "reward", "cost")):
        common.train_models(models, reuse=True)
    runs = [run(method, seed, root, models, args.rollouts) for seed in args.seeds for method in METHODS]
    from lit_saferlhf.commands.evaluate import evaluate

    summary = evaluate(
        policies={"sft": str(models / "sft" / "model")} | {key(r): r["model"] for r in runs},
        reward_model=str(models / "reward" / "model"), cost_model=str(models / "cost" / "model"),
        prompt_sets=[common.EVAL_SET], out_dir=str(root / "evaluation"), max_new_tokens=14, seed=0, limit=args.limit,
    )  # fmt: skip
    rows = {row["policy"]: row for row in summary["rows"]}
    groups = group_statistics(models, root, args.limit)
    text = report(args, runs, rows, groups, (time.perf_counter() - started) / 60)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
