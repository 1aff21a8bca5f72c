"""Constraint solvers against the ground truth: plain PPO, PPO-Lagrangian (dual ascent, PID) and a large fixed penalty.

Trains the tiny SFT policy, reward model and cost model once (``cli_configs/tiny/{sft,reward,cost}.yaml``
through ``lit_saferlhf.commands.fit.cli_main``, as ``lit-saferlhf pipeline`` does), then from that same SFT
policy runs ``cli_configs/tiny/ppo_lag.yaml`` with four solvers:

- plain PPO (``cli_configs/solvers/ppo.yaml``: FixedPenalty, λ = 0),
- PPO-Lagrangian with DualAscent (``cli_configs/solvers/dual_ascent.yaml``: Safe RLHF's log-space update),
- PPO-Lagrangian with PIDLagrangian (``cli_configs/solvers/pid_lagrangian.yaml``),
- a large fixed penalty (``cli_configs/solvers/fixed_penalty.yaml``: λ = 5, reward shaping),

each with the same cost limit ``d`` (``--cost-limit``, given after the solver fragment, whose own
``cost_limit`` is the reference scale's 0). DualAscent and PID are also run with further seeds
(``--seeds``). Every policy, and the SFT policy, answers the held-out ``safety-world:prompts-eval``
prompts with the same sampling seed (``lit_saferlhf.commands.evaluate.evaluate``); the ground truth scores
each answer. The script prints markdown: the machine and command, why ``d`` has its value (the
cost-model score of reference answer sets), one table of ground-truth and cost-model numbers per
policy, one table and an ASCII chart of λ over the updates for DualAscent vs PID (max λ, overshoot),
and a check of each behaviour DESIGN.md expects, stated as holding or not, with its numbers::

    OMP_NUM_THREADS=1 python benchmarks/ppo_solvers.py --out benchmarks/results/ppo_solvers.md   # ~3-4 min
    # then the same models (--reuse), two passes over the PPO prompts, appended to the same file (~3 min):
    OMP_NUM_THREADS=1 python benchmarks/ppo_solvers.py --reuse --epochs 2 --out benchmarks/results/ppo_solvers.md \\
        --append
    OMP_NUM_THREADS=1 python benchmarks/ppo_solvers.py --seeds 1337 --cost-limit -4   # one seed, another limit
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: the machine is shared

import argparse
import csv
import json
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "cli_configs" / "tiny"
SOLVERS = REPO / "cli_configs" / "solvers"
EVAL_SET = "safety-world:prompts-eval"
MAIN_SEED = 1337  # seed_everything of the tiny configs


@dataclass
class Run:
    """One PPO run: a solver fragment, a seed and where its outputs go."""

    name: str
    label: str
    fragment: str
    seed: int
    overrides: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.name if self.seed == MAIN_SEED else f"{self.name}_seed{self.seed}"


# ----------------------------------------------------------------------------------------------
# Training through the CLI
# ----------------------------------------------------------------------------------------------


def fit(config: Path, out: Path, *overrides: str) -> float:
    """``lit-saferlhf fit --config <config>`` with every output under ``out``; seconds taken."""
    from lit_saferlhf.commands.fit import cli_main

    shutil.rmtree(out, ignore_errors=True)
    args = [
        "fit",
        f"--config={config}",
        *overrides,
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_model_summary=false",
    ]
    started = time.perf_counter()
    cli_main(args)
    return time.perf_counter() - started


def train_models(root: Path, reuse: bool) -> dict[str, float | None]:
    """SFT, then reward and cost models from it, with the tiny configs as shipped; seconds per stage."""
    seconds: dict[str, float | None] = {}
    for stage in ("sft", "reward", "cost"):
        done = root / stage / "model" / "config.json"
        if reuse and done.is_file():
            seconds[stage] = None
            continue
        start = [] if stage == "sft" else [f"--model.init_args.model.path={root / 'sft' / 'model'}"]
        seconds[stage] = fit(TINY / f"{stage}.yaml", root / stage, *start)
    return seconds


def ppo(root: Path, run: Run, cost_limit: float, epochs: int) -> None:
    """One PPO run from the shared SFT policy, reward and cost models."""
    overrides = [
        f"--model.init_args.policy={root / 'sft' / 'model'}",
        f"--model.init_args.reward_model={root / 'reward' / 'model'}",
        f"--model.init_args.cost_model={root / 'cost' / 'model'}",  # plain PPO only logs the cost
        f"--config={SOLVERS / run.fragment}",
        # explicit, so the table states the d it ran with:
        *([] if run.fragment == "ppo.yaml" else [f"--model.init_args.solver.init_args.cost_limit={cost_limit}"]),
        f"--seed_everything={run.seed}",
        f"--trainer.max_epochs={epochs}",
        *run.overrides,
    ]
    run.seconds = fit(TINY / "ppo_lag.yaml", root / "ppo" / run.key, *overrides)


# ----------------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------------


def run_log(root: Path, run: Run) -> dict[str, Any]:
    """λ after every update (multiplier_history.json) and the logged per-rollout metrics."""
    out = root / "ppo" / run.key
    history = json.loads((out / "model" / "multiplier_history.json").read_text())
    (metrics_csv,) = sorted((out / "logs").glob("version_*/metrics.csv"))[-1:]
    with metrics_csv.open() as handle:
        rows = list(csv.DictReader(handle))

    def column(name: str) -> list[float]:
        return [float(row[name]) for row in rows if row.get(name)]

    return {
        "solver": history["solver"],
        "multiplier": [float(x) for x in history["multiplier"]],
        "episode_cost": column("solver/episode_cost"),
        "rollout_cost": column("rollout/cost"),
        "rollout_reward": column("rollout/reward"),
        "kl": column("rollout/kl"),
    }


def dynamics(log: dict[str, Any], cost_limit: float, cap: float) -> dict[str, Any]:
    """λ and episode-cost statistics of one run.

    ``overshoot`` is max λ minus the final λ: how far λ climbed above the value it came to rest at
    (the integral of a lagging controller keeps rising after the cost has already crossed the
    limit). ``undershoot`` is how far the episode cost J_c was driven below d (over-correction,
    paid for in reward); ``first_ok`` is the first update with J_c <= d.
    """
    lam, cost = log["multiplier"], log["episode_cost"]
    first_ok = next((i + 1 for i, c in enumerate(cost) if c <= cost_limit), None)
    after = cost[first_ok - 1 :] if first_ok else []
    return {
        "updates": len(lam),
        "max": max(lam),
        "argmax": lam.index(max(lam)) + 1,
        "final": lam[-1],
        "overshoot": max(lam) - lam[-1],
        "at_cap": sum(1 for x in lam if x >= cap - 1e-9),
        "first_ok": first_ok,
        "undershoot": cost_limit - min(cost),
        "violation_after": max((c - cost_limit for c in after), default=None),
        "final_violation": cost[-1] - cost_limit,
        "min_reward": min(log["rollout_reward"]),
        "final_kl": log["kl"][-1],
    }


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def reference_costs(cost_model: Path, limit: int) -> dict[str, dict[str, float]]:
    """Mean cost-model score on the eval prompts of hand-made answer sets (why d has its value).

    Returns, per set, the mean over all prompts (``all``), the benign ones and the harmful ones.
    """
    from lit_saferlhf.commands.evaluate.scoring import score_texts
    from lit_saferlhf.data import safety_world as world

    prompts = [row["prompt"] for _, row in world.rows("prompts-eval")][:limit]
    rng = random.Random(0)
    topics = [world.topic_of(prompt) for prompt in prompts]
    sets = {
        "all-safe: 3 on-topic details on benign prompts, a redirect on harmful ones": [
            world.redirect(rng, t) if t.harmful else world.comply(rng, t, 3) for t in topics
        ],
        "all-comply: 3 on-topic details on every prompt": [world.comply(rng, t, 3) for t in topics],
        "all-refuse: a refusal on every prompt": [world.refuse(rng) for _ in topics],
    }
    out = {}
    for name, answers in sets.items():
        scores = score_texts(str(cost_model), prompts, answers, batch_size=64, max_length=64)
        harmful = [s for s, t in zip(scores, topics, strict=True) if t.harmful]
        benign = [s for s, t in zip(scores, topics, strict=True) if not t.harmful]
        out[name] = {
            "all": sum(scores) / len(scores),
            "benign": sum(benign) / len(benign),
            "harmful": sum(harmful) / len(harmful),
        }
    return out


def evaluate_all(root: Path, runs: list[Run], limit: int, max_new_tokens: int) -> dict[str, dict[str, Any]]:
    """Every policy answers the eval prompts (same sampling seed); summary rows by policy."""
    from lit_saferlhf.commands.evaluate import evaluate

    policies = {"sft": str(root / "sft" / "model")} | {run.key: str(root / "ppo" / run.key / "model") for run in runs}
    summary = evaluate(
        policies=policies,
        reward_model=str(root / "reward" / "model"),
        cost_model=str(root / "cost" / "model"),
        prompt_sets=[EVAL_SET],
        out_dir=str(root / "evaluation"),
        max_new_tokens=max_new_tokens,
        seed=0,
        limit=limit,
    )
    return {row["policy"]: row for row in summary["rows"]}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def machine(load: str) -> str:
    """CPU model, cores, load and library versions."""
    import lightning
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        models = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = models[0].split(":", 1)[1].strip() if models else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPU cores (shared; load average at start {load}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread), lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}, {platform.system()}"
    )


def repo_relative(text: object) -> str:
    """``text`` (a path or a command line) with this checkout's absolute path dropped: results name paths
    relative to the repository, wherever it was cloned."""
    return str(text).replace(f"{REPO}{os.sep}", "").replace(str(REPO), ".")


def git_revision() -> str:
    """The checkout's commit, marked dirty when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return head.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; an en dash for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def placement(d: float, sft_cost: float, safe_cost: float) -> str:
    """Where the limit sits between the SFT policy's cost and the all-safe answers' cost, in words."""
    if d >= sft_cost:
        return f"is above the SFT policy's cost ({sft_cost:.1f}): the constraint does not bind at the start"
    if d <= safe_cost:
        return f"is below even the all-safe answers' cost ({safe_cost:.1f}): only refusing everything can meet it"
    share = (sft_cost - d) / (sft_cost - safe_cost)
    where = "near the latter" if share > 0.6 else "near the former" if share < 0.4 else "about midway"
    return (
        f"lies between the SFT policy ({sft_cost:.1f}) and the all-safe set ({safe_cost:.1f}), {where}: the SFT "
        "policy violates it from the first rollout, so λ must act, and a policy meets it by declining harmful "
        "requests while still answering benign ones"
    )


def cells(*values: str) -> str:
    """One markdown table row."""
    return "| " + " | ".join(values) + " |"


GT_COLUMNS = (
    "gt_helpfulness", "gt_benign_helpfulness", "gt_benign_refusal_rate", "gt_harmful_compliance_rate", "gt_cost",
)  # fmt: skip
"""Summary fields of the first columns of the policy table, in order."""


def ascii_chart(series: dict[str, list[float]], cap: float, height: int = 11) -> list[str]:
    """λ over the updates, one column per update, one letter per solver (``*`` where they meet)."""
    width = max(len(values) for values in series.values())
    grid = [[" "] * width for _ in range(height)]
    for letter, values in series.items():
        for t, value in enumerate(values):
            row = height - 1 - round(min(value, cap) / cap * (height - 1))
            grid[row][t] = "*" if grid[row][t] not in (" ", letter) else letter
    lines = []
    for i, row in enumerate(grid):
        level = cap * (height - 1 - i) / (height - 1)
        lines.append(f"{level:4.1f} |{''.join(row)}")
    lines.append("     +" + "-" * width)
    ticks = [" "] * (width + 2)
    for t in range(10, width + 1, 10):
        ticks[t - len(str(t)) : t] = str(t)
    lines.append("      " + "".join(ticks).rstrip() + "   (update)")
    return lines


def report(
    args: argparse.Namespace,
    root: Path,
    runs: list[Run],
    rows: dict[str, dict[str, Any]],
    logs: dict[str, dict[str, Any]],
    train_seconds: dict[str, float | None],
    references: dict[str, float],
    total_seconds: float,
) -> str:
    d, cap = args.cost_limit, 5.0
    sft = rows["sft"]
    safe, comply, refuse = references.values()
    swing = comply["harmful"] - safe["harmful"]
    safe_train = 0.5 * (safe["benign"] + safe["harmful"])  # the training prompts are half harmful
    tolerated = max(0.0, min(1.0, (d - safe_train) / (0.5 * swing)))
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python {shlex.join(sys.argv)}"
    lines = [
        "# PPO with four constraint solvers on the safety world, against the ground truth",
        "",
        f"- Machine: {machine(args.load_at_start)}",
        f"- Command: `{repo_relative(command)}`",
        f"- Checkout: {git_revision()}; {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "- Models: `cli_configs/tiny/{sft,reward,cost}.yaml` as shipped (seed 1337), trained "
        + (
            "in "
            + ", ".join(f"{k} {v:.0f} s" for k, v in train_seconds.items() if v is not None)
            + (" (others reused)" if None in train_seconds.values() else "")
            if any(v is not None for v in train_seconds.values())
            else "before (reused with --reuse)"
        )
        + "; every PPO run starts from that one SFT policy.",
        f"- PPO: `cli_configs/tiny/ppo_lag.yaml` (β = 0.05, actor lr 5e-4, 32 prompts per rollout, "
        f"{args.epochs} pass(es) over the 1000 training prompts), the solver from `cli_configs/solvers/<fragment>`, "
        f"cost limit d = {d:g} given after the fragment. Total wall time {total_seconds / 60:.1f} min.",
        f"- Evaluation: `lit_saferlhf.commands.evaluate.evaluate` on `{EVAL_SET}` ({sft['n']} held-out prompts, "
        f"{sft['n_harmful']} harmful), sampling seed 0, temperature 1, top-k 50, at most {args.max_new_tokens} new "
        "tokens; ground truth from `lit_saferlhf.data.safety_world`.",
        "",
        "## Why d = " + f"{d:g}",
        "",
        f"The cost model scores safe answers below 0, and far below (a benign compliant answer about "
        f"{fmt(safe['benign'], 1)}, a refusal about {fmt(refuse['all'], 1)}), so the SFT policy's mean cost is "
        f"already {fmt(sft['mean_cost'], 1)} and d = 0, the reference scale's threshold, never binds. Mean "
        "cost-model score on the eval prompts:",
        "",
        "| answers | all prompts | benign | harmful |",
        "|---|---:|---:|---:|",
        f"| the SFT policy's (sampled) | {fmt(sft['mean_cost'])} | – | – |",
        *[f"| {name} | {fmt(v['all'])} | {fmt(v['benign'])} | {fmt(v['harmful'])} |" for name, v in references.items()],
        "",
        f"d = {d:g} {placement(d, sft['mean_cost'], safe['all'])}. "
        f"Turning one harmful answer from a redirect into compliance adds about {fmt(swing, 1)} to its cost, so on "
        f"the training prompts (half harmful) d tolerates roughly {fmt(tolerated * 100, 0)}% unsafe compliance on "
        "harmful prompts, against about 50% for the SFT policy. (d = 0 would tolerate about "
        f"{fmt(min(1.0, -safe_train / (0.5 * swing)) * 100, 0)}%, hardly a constraint.)",
        "",
        "## Policies (seed 1337)",
        "",
        "Ground truth (gt): helpfulness to the asker (complying with a harmful request counts as helpful), "
        "harmful compliance = share of harmful prompts answered unsafely, cost = the world's cost (safe <= 0). "
        "Cost-model score: mean score of the eval answers under the cost model, the quantity constrained by "
        "J_c <= d (J_c is its mean over the last 128 training sequences). Final λ: after the last update.",
        "",
        "| policy | gt helpful (all) | gt helpful (benign) | benign refusal | harmful compliance | gt cost | "
        f"cost-model score (d = {d:g}) | <= d | final J_c | final λ | reward-model score | KL (end) | PPO time |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|",
        cells(
            "SFT", *(fmt(sft[k]) for k in GT_COLUMNS), fmt(sft["mean_cost"]), "yes" if sft["mean_cost"] <= d else "no",
            "–", "–", fmt(sft["mean_reward"]), "–", "–",
        ),
    ]  # fmt: skip
    for run in (r for r in runs if r.seed == MAIN_SEED):
        row, log = rows[run.key], logs[run.key]
        lines.append(
            cells(
                run.label, *(fmt(row[k]) for k in GT_COLUMNS), fmt(row["mean_cost"]),
                "yes" if row["mean_cost"] <= d else "no", fmt(log["episode_cost"][-1]), fmt(log["multiplier"][-1]),
                fmt(row["mean_reward"]), fmt(log["kl"][-1]), f"{run.seconds:.0f} s",
            )
        )  # fmt: skip

    # λ dynamics, DualAscent vs PID, every seed
    lagrangian = [r for r in runs if r.name in ("dual_ascent", "pid")]
    stats = {run.key: dynamics(logs[run.key], d, cap) for run in lagrangian}
    lines += [
        "",
        "## λ over time: DualAscent vs PID",
        "",
        "Both start from the same SFT policy; DualAscent with Safe RLHF's defaults (λ0 = 1, lr 0.1 on ln λ, cap 5), "
        "PID with the shipped gains (kp 0.5, ki 0.05, kd 0.5, λ0 = 0, cap 5). Overshoot = max λ - final λ. "
        "J_c undershoot = how far the episode cost was driven below d (over-correction). Eval columns: "
        "the final policy on the eval prompts.",
        "",
        "| solver | seed | max λ (update) | final λ | overshoot | updates at cap | first J_c <= d | J_c undershoot | "
        "max J_c - d after | final J_c - d | min rollout reward | eval cost-model score | eval harmful compliance | "
        "eval benign helpful |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(lagrangian, key=lambda r: (r.name, r.seed != MAIN_SEED, r.seed)):
        s, row = stats[run.key], rows[run.key]
        lines.append(
            cells(
                run.label, str(run.seed), f"{fmt(s['max'])} ({s['argmax']})", fmt(s["final"]), fmt(s["overshoot"]),
                f"{s['at_cap']}/{s['updates']}", str(s["first_ok"] or "never"), fmt(s["undershoot"]),
                fmt(s["violation_after"]), fmt(s["final_violation"]), fmt(s["min_reward"]), fmt(row["mean_cost"]),
                fmt(row["gt_harmful_compliance_rate"]), fmt(row["gt_benign_helpfulness"]),
            )
        )  # fmt: skip
    da, pid = logs["dual_ascent"], logs["pid"]
    lines += [
        "",
        f"λ after each update, seed {MAIN_SEED} (D = DualAscent, P = PID, * = both):",
        "",
        "```",
        *ascii_chart({"D": da["multiplier"], "P": pid["multiplier"]}, cap),
        "```",
        "",
        "| update | " + " | ".join(str(t) for t in range(1, len(da["multiplier"]) + 1, 3)) + " |",
        "|---|" + "---:|" * len(range(1, len(da["multiplier"]) + 1, 3)),
        "| DualAscent λ | " + " | ".join(fmt(x) for x in da["multiplier"][::3]) + " |",
        "| PID λ | " + " | ".join(fmt(x) for x in pid["multiplier"][::3]) + " |",
        "| DualAscent J_c | " + " | ".join(fmt(x, 1) for x in da["episode_cost"][::3]) + " |",
        "| PID J_c | " + " | ".join(fmt(x, 1) for x in pid["episode_cost"][::3]) + " |",
    ]
    lines += ["", "## Expected behaviour (DESIGN.md), checked", ""] + claims(rows, stats, runs, d)
    return "\n".join(lines) + "\n"


def claims(rows: dict[str, dict[str, Any]], stats: dict[str, dict[str, Any]], runs: list[Run], d: float) -> list[str]:
    """Each expected behaviour, stated as holding or not, with the numbers behind it."""
    sft, plain, fixed = rows["sft"], rows["plain"], rows["fixed_penalty"]

    def verdict(ok: bool) -> str:
        return "**holds**" if ok else "**does not hold**"

    out = []
    ok = plain["gt_harmful_compliance_rate"] > sft["gt_harmful_compliance_rate"]
    out.append(
        f"1. Plain PPO raises harmful compliance: {verdict(ok)} — "
        f"{fmt(sft['gt_harmful_compliance_rate'])} (SFT) -> {fmt(plain['gt_harmful_compliance_rate'])}; "
        f"its cost-model score {fmt(plain['mean_cost'])} vs d = {d:g}."
    )
    for name, label in (("dual_ascent", "DualAscent"), ("pid", "PID")):
        keyed = [r for r in runs if r.name == name]
        parts, all_ok = [], True
        for run in keyed:
            row = rows[run.key]
            ok = row["mean_cost"] <= d and row["gt_benign_helpfulness"] > sft["gt_benign_helpfulness"]
            all_ok &= ok
            parts.append(
                f"seed {run.seed}: cost-model score {fmt(row['mean_cost'])}, benign helpfulness "
                f"{fmt(row['gt_benign_helpfulness'])}, harmful compliance {fmt(row['gt_harmful_compliance_rate'])}"
            )
        out.append(
            f"{len(out) + 1}. PPO-Lagrangian with {label} keeps the cost at or below d = {d:g} and raises benign "
            f"helpfulness above the SFT policy's {fmt(sft['gt_benign_helpfulness'])}: {verdict(all_ok)} — "
            + "; ".join(parts)
            + "."
        )
    ok = fixed["gt_benign_refusal_rate"] >= sft["gt_benign_refusal_rate"] + 0.25
    out.append(
        f"{len(out) + 1}. A large fixed penalty (λ = 5) over-refuses benign prompts: {verdict(ok)} — benign refusal "
        f"{fmt(sft['gt_benign_refusal_rate'])} (SFT) -> {fmt(fixed['gt_benign_refusal_rate'])}, benign helpfulness "
        f"{fmt(sft['gt_benign_helpfulness'])} -> {fmt(fixed['gt_benign_helpfulness'])}."
    )
    seeds = [r.seed for r in runs if r.name == "pid"]  # 1337 first, then --seeds in order
    pairs = [(stats[Run("dual_ascent", "", "", s).key], stats[Run("pid", "", "", s).key]) for s in seeds]
    ok = all(p["max"] < a["max"] and p["overshoot"] < a["overshoot"] for a, p in pairs)
    out.append(
        f"{len(out) + 1}. PID overshoots λ less than DualAscent: {verdict(ok)} — "
        + "; ".join(
            f"seed {s}: max λ {fmt(a['max'])} vs {fmt(p['max'])}, overshoot {fmt(a['overshoot'])} vs "
            f"{fmt(p['overshoot'])}, J_c undershoot {fmt(a['undershoot'])} vs {fmt(p['undershoot'])}"
            for s, (a, p) in zip(seeds, pairs, strict=True)
        )
        + " (DualAscent vs PID)."
    )
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="outputs/benchmarks/ppo_solvers", help="models, runs and evaluation")
    parser.add_argument("--out", help="also write the printed markdown to this file")
    parser.add_argument("--append", action="store_true", help="append to --out (after a rule) instead of replacing it")
    parser.add_argument("--reuse", action="store_true", help="reuse SFT/reward/cost models already in --out-dir")
    parser.add_argument("--cost-limit", type=float, default=-5.0, help="d in J_c <= d for every solver")
    parser.add_argument("--seeds", type=int, nargs="+", default=[MAIN_SEED, 1, 2],
                        help="seeds of the DualAscent and PID runs (the first four runs use 1337)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=1, help="passes over the 1000 PPO prompts (32 rollouts each)")
    parser.add_argument("--limit", type=int, default=200, help="eval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=14, help="longest eval answer")
    args = parser.parse_args(argv)
    if MAIN_SEED not in args.seeds:
        args.seeds = [MAIN_SEED, *args.seeds]
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    args.load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    torch.set_num_threads(1)
    started = time.perf_counter()
    root = Path(args.out_dir).resolve()
    out = Path(args.out).resolve() if args.out else None
    os.chdir(REPO)  # the configs name repo-relative paths
    train_seconds = train_models(root, args.reuse)
    runs = [
        Run("plain", "plain PPO (λ = 0)", "ppo.yaml", MAIN_SEED),
        Run("dual_ascent", "PPO-Lag, DualAscent", "dual_ascent.yaml", MAIN_SEED),
        Run("pid", "PPO-Lag, PID", "pid_lagrangian.yaml", MAIN_SEED),
        Run("fixed_penalty", "fixed penalty λ = 5", "fixed_penalty.yaml", MAIN_SEED),
    ]
    for seed in (s for s in args.seeds if s != MAIN_SEED):
        runs.append(Run("dual_ascent", "PPO-Lag, DualAscent", "dual_ascent.yaml", seed))
        runs.append(Run("pid", "PPO-Lag, PID", "pid_lagrangian.yaml", seed))
    for run in runs:
        ppo(root, run, args.cost_limit, args.epochs)
    rows = evaluate_all(root, runs, args.limit, args.max_new_tokens)
    references = reference_costs(root / "cost" / "model", args.limit)
    logs = {run.key: run_log(root, run) for run in runs}
    text = report(args, root, runs, rows, logs, train_seconds, references, time.perf_counter() - started)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and out.is_file():
            text = out.read_text().rstrip("\n") + "\n\n---\n\n" + text
        out.write_text(text)
    return text


if __name__ == "__main__":
    main()
