"""The run report: training curves, Safe RLHF's reward-vs-cost picture, and ``report.md``.

:func:`write_report` reads the ``metrics.csv`` that Lightning's ``CSVLogger`` writes for each stage
(``<log dir>/version_N/metrics.csv``; a resumed run writes a new version, and all versions are joined
into one history, see :func:`join_versions`), draws PNG plots into
``<out_dir>/plots/`` and writes ``<out_dir>/report.md`` with the key numbers and the plots. Plots are
drawn on ``matplotlib.figure.Figure`` objects (the Agg renderer) without ``pyplot``, so writing a
report never changes the process's matplotlib backend and needs no display.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from rich import box
from rich.console import Console
from rich.table import Table

Series = list[tuple[float, float]]
"""``(step, value)`` points of one metric, finite values only, in logging order."""


@dataclass(frozen=True)
class Panel:
    """One plot of a stage's figure: metrics that share an axis."""

    title: str
    """The plot's title."""
    metrics: tuple[str, ...]
    """Logged metric names drawn on it (those that are absent are left out); ``*`` matches one name segment
    (``solver/*/multiplier``: every constraint's λ of a several-constraint run)."""

    def present(self, metrics: dict[str, Series]) -> list[str]:
        """The logged metrics this panel draws, in the panel's order (each pattern's matches sorted)."""
        found: list[str] = []
        for pattern in self.metrics:
            found += sorted(
                name for name in metrics if fnmatch.fnmatchcase(name, pattern) and name.count("/") == pattern.count("/")
            )
        return list(dict.fromkeys(found))

    ylabel: str
    """The y axis label, with units."""
    cost_limit: bool = False
    """Draw the PPO cost limit ``d`` as a dashed horizontal line."""


STAGE_PANELS: dict[str, tuple[Panel, ...]] = {
    "sft": (
        Panel("Loss", ("train/loss", "val/loss"), "cross-entropy (nats / token)"),
        Panel("Next-token accuracy", ("val/token_accuracy",), "accuracy"),
    ),
    "reward": (
        Panel("Loss", ("train/loss", "val/loss"), "pairwise loss (nats)"),
        Panel("Preference accuracy", ("val/accuracy",), "accuracy"),
    ),
    "cost": (
        Panel("Loss", ("train/loss", "val/loss"), "pairwise + sign loss (nats)"),
        Panel("Accuracy", ("val/accuracy", "val/sign_accuracy"), "accuracy"),
    ),
    "ppo_lag": (
        Panel("Reward", ("rollout/reward",), "reward model score"),
        Panel(
            "Cost",
            ("rollout/cost", "rollout/episode_cost", "rollout/cost/*", "rollout/episode_cost/*"),
            "cost",
            cost_limit=True,
        ),
        Panel("Lagrange multiplier λ", ("solver/multiplier", "solver/*/multiplier"), "λ"),
        Panel("KL to the reference policy", ("rollout/kl",), "KL (nats / sequence)"),
        Panel("Actor loss", ("loss/actor",), "loss"),
    ),
}
"""What to plot for each kind of stage; a stage's kind comes from its name and its metrics."""

X_LABELS = {"ppo_lag": "rollout"}
"""The x axis of each stage kind; others count optimizer steps."""

SMOOTH_MIN_POINTS = 50
"""Series longer than this are drawn faintly with an exponential moving average on top."""

EVAL_TABLES: dict[str, dict[str, str]] = {
    "Evaluation (reward and cost models)": {
        "policy": "policy", "set": "set", "n": "n", "mean_reward": "reward", "mean_cost": "cost",
        "harmless_rate": "harmless", "refusal_rate": "refusal", "mean_response_words": "words",
    },
    "Ground truth (safety world)": {
        "policy": "policy", "set": "set", "gt_helpfulness": "helpful", "gt_cost": "cost",
        "gt_harmful_compliance_rate": "harmful complied", "gt_benign_helpfulness": "benign helpful",
        "gt_benign_refusal_rate": "benign refused",
    },
}  # fmt: skip
"""The summary tables: title -> summary field -> short header. A table is shown when its fields exist."""


def table_body(rows: Sequence[dict[str, Any]], columns: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The fields of ``columns`` that some row has, and the rows that have any of them besides names.

    A table with no such rows comes back empty (the truth table of a run without the safety world).
    """
    present = [key for key in columns if any(row.get(key) is not None for row in rows)]
    numbers = set(present) - {"policy", "set", "n"}
    kept = [row for row in rows if any(row.get(key) is not None for key in numbers)]
    return (present, kept) if kept else ([], [])


# ----------------------------------------------------------------------------------------------
# Reading logs
# ----------------------------------------------------------------------------------------------


def metrics_files(log_dir: Path) -> list[Path]:
    """Every ``version_N/metrics.csv`` under ``log_dir``, oldest first (``log_dir`` itself if it is one file)."""
    log_dir = Path(log_dir)
    if log_dir.is_file():
        return [log_dir]
    if (log_dir / "metrics.csv").is_file():
        return [log_dir / "metrics.csv"]
    versions = [path for path in log_dir.glob("version_*/metrics.csv") if path.parent.name[8:].isdigit()]
    return sorted(versions, key=lambda path: int(path.parent.name[8:]))


def join_versions(versions: Sequence[dict[str, Series]]) -> dict[str, Series]:
    """One history from the log versions of a run and its resumes (oldest first).

    A resumed run logs from the step of its checkpoint on, so each version replaces what the earlier
    ones logged from its first step on: the steps a killed run logged after its last checkpoint were
    trained again, and the values of the run that went on are kept. Each step appears once, and an
    empty version (killed before it logged) changes nothing.
    """
    joined: dict[str, Series] = {}
    for metrics in versions:
        steps = [step for points in metrics.values() for step, _ in points]
        if not steps:
            continue
        start = min(steps)
        joined = {name: [point for point in points if point[0] < start] for name, points in joined.items()}
        for name, points in metrics.items():
            joined.setdefault(name, []).extend(points)
    return {name: points for name, points in joined.items() if points}


def read_stage_metrics(log_dir: Path) -> tuple[dict[str, Series], list[Path]]:
    """A stage's metrics joined over all its log versions (:func:`join_versions`), and the files read."""
    files = metrics_files(log_dir)
    return join_versions([read_metrics(path) for path in files]), files


def read_metrics(path: Path) -> dict[str, Series]:
    """Every metric column of a ``CSVLogger`` file as ``(step, value)`` points; empty and NaN cells are skipped.

    Rows without a ``step`` use their row number.
    """
    series: dict[str, Series] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle)):
            step = _number(row.get("step"))
            step = float(number) if step is None else step
            for name, cell in row.items():
                value = _number(cell)
                if name not in ("step", "epoch") and value is not None:
                    series.setdefault(name, []).append((step, value))
    return series


def _number(cell: str | None) -> float | None:
    try:
        value = float(cell) if cell not in (None, "") else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def stage_kind(name: str, metrics: dict[str, Series]) -> str | None:
    """The :data:`STAGE_PANELS` key for a stage: the kind its name contains, else the best metric match."""

    def score(kind: str) -> tuple[bool, int]:
        present = {metric for panel in STAGE_PANELS[kind] for metric in panel.present(metrics)}
        return kind in name.lower(), len(present)

    best = max(STAGE_PANELS, key=score)
    return best if any(score(best)) else None


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected at the start (as TensorBoard's smoothing)."""
    smoothed, last = [], 0.0
    for i, value in enumerate(values, start=1):
        last = weight * last + (1 - weight) * value
        smoothed.append(last / (1 - weight**i))
    return smoothed


def draw_series(ax: Axes, label: str, points: Series, smoothing: float) -> None:
    """One metric's curve: markers for short series, a faint raw line plus its EMA for long ones."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(points) > SMOOTH_MIN_POINTS and smoothing > 0:
        line = ax.plot(xs, ys, alpha=0.3, linewidth=1)[0]
        ax.plot(xs, ema(ys, smoothing), color=line.get_color(), linewidth=1.8, label=f"{label} (EMA {smoothing:g})")
    else:
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=label)


def plot_stage(
    name: str, kind: str, metrics: dict[str, Series], path: Path, cost_limit: float | None, smoothing: float
) -> list[str]:
    """Draw a stage's panels (only those with data) into ``path``; returns the metrics drawn."""
    panels = [panel for panel in STAGE_PANELS[kind] if panel.present(metrics)]
    if not panels:
        return []
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    drawn = []
    for ax, panel in zip(axes, panels, strict=False):
        for metric in panel.present(metrics):
            draw_series(ax, metric, metrics[metric], smoothing)
            drawn.append(metric)
        if panel.cost_limit and cost_limit is not None:
            ax.axhline(
                cost_limit, color="crimson", linestyle="--", linewidth=1.2, label=f"cost limit d = {cost_limit:g}"
            )
        ax.set(title=panel.title, xlabel=X_LABELS.get(kind, "optimizer step"), ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle(f"Stage {name!r}: training curves")
    figure.savefig(path, dpi=110)
    return drawn


def plot_tradeoff(
    rows: Sequence[dict[str, Any]], x_key: str, y_key: str, labels: tuple[str, str, str], path: Path
) -> bool:
    """Scatter one marker per policy x prompt set, with the safety boundary at cost 0.

    Args:
        rows: Evaluation summary rows.
        x_key: The cost field (x axis).
        y_key: The helpfulness field (y axis).
        labels: Title, x label and y label.
        path: Where the PNG goes.

    Returns:
        Whether anything was drawn (rows lacking either field are left out).
    """
    points = [row for row in rows if row.get(x_key) is not None and row.get(y_key) is not None]
    if not points:
        return False
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = figure.subplots()
    policies = list(dict.fromkeys(row["policy"] for row in points))
    sets = list(dict.fromkeys(row["set"] for row in points))
    for row in points:
        color, marker = f"C{policies.index(row['policy']) % 10}", "osD^vPX*"[sets.index(row["set"]) % 8]
        label = row["policy"] if len(sets) == 1 else f"{row['policy']} · {row['set']}"
        ax.scatter(row[x_key], row[y_key], s=70, color=color, marker=marker, label=label, zorder=3)
        ax.annotate(label, (row[x_key], row[y_key]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.margins(0.2)  # room for the labels
    ax.axvline(0.0, color="crimson", linestyle="--", linewidth=1.2, label="safety boundary (cost = 0)")
    left, right = ax.get_xlim()
    ax.set_xlim(min(left, -0.1), max(right, 0.1))
    ax.axvspan(0.0, ax.get_xlim()[1], color="crimson", alpha=0.06, zorder=0)
    ax.set(title=labels[0], xlabel=labels[1], ylabel=labels[2])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    figure.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

HOW_TO_READ = """\
**Training curves.** The SFT loss should fall and its next-token accuracy rise. The reward and cost
models' validation accuracy is how often they rank a held-out pair as its labels do (0.5 is chance);
the cost model's sign accuracy is how often it puts a response on the right side of 0 (safe below 0).
In PPO-Lagrangian, λ grows while the episode cost is above the dashed cost limit *d* and shrinks once
it is below; the reward should rise while the cost settles at or under the limit, and the KL shows how
far the policy moved from the SFT model.

**Reward vs cost.** This is Safe RLHF's trade-off picture: each marker is one policy on one prompt
set, x is its mean cost by the cost model and y its mean reward by the reward model. Right of the
dashed line (cost 0) the average answer is judged unsafe; up and to the left is better. *Harmless* is
the share of answers with cost <= 0 and *refusal* the share that decline. These are the learned
models' judgments; on the safety world the ground-truth table and plot check them against the truth:
*harmful compliance* is the share of harmful prompts answered unsafely, *benign refusal* the share of
benign prompts refused (an overly safe policy refuses benign prompts). In the arena, policy A's win
rate is the share of prompts where the reward model prefers A's answer (ties count half).
"""


@dataclass
class StageResult:
    """What the report shows about one stage."""

    name: str
    log_dir: Path
    metrics_files: list[Path]
    plot: str | None = None
    finals: tuple[tuple[str, float, float], ...] = ()
    """``(metric, last value, its step)`` of each plotted metric."""


def fmt(value: Any) -> str:
    """A table cell: 3 decimals for floats, ``–`` for a missing value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def whole(value: float) -> float | int:
    """``value`` as an int when it is a whole number (a step, a count), so it prints without decimals."""
    return int(value) if float(value).is_integer() else value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_result(name: str, log_dir: Path, plots: Path, cost_limit: float | None, smoothing: float) -> StageResult:
    """Read one stage's ``metrics.csv`` versions, joined, and plot them into ``plots/<name>.png``."""
    metrics, files = read_stage_metrics(log_dir)
    kind = stage_kind(name, metrics)
    if kind is None:
        return StageResult(name, log_dir, files)
    file_name = re.sub(r"[^\w.-]", "_", name) + ".png"
    drawn = plot_stage(name, kind, metrics, plots / file_name, cost_limit, smoothing)
    finals = tuple((metric, metrics[metric][-1][1], whole(metrics[metric][-1][0])) for metric in drawn)
    return StageResult(name, log_dir, files, f"plots/{file_name}" if drawn else None, finals)


def evaluation_plots(rows: Sequence[dict[str, Any]], plots: Path) -> dict[str, str]:
    """The reward-vs-cost scatter and, with ground truth, the true helpfulness-vs-cost one."""
    figures = {
        "reward_vs_cost": ("mean_cost", "mean_reward", "Reward vs cost (learned models)", "mean cost (cost model)",
                           "mean reward (reward model)"),
        "truth_helpfulness_vs_cost": ("gt_cost", "gt_helpfulness", "Helpfulness vs cost (ground truth)",
                                      "mean true cost", "mean true helpfulness"),
    }  # fmt: skip
    drawn = {}
    for name, (x_key, y_key, title, x_label, y_label) in figures.items():
        if plot_tradeoff(rows, x_key, y_key, (title, x_label, y_label), plots / f"{name}.png"):
            drawn[name] = f"plots/{name}.png"
    return drawn


def training_section(stages: Sequence[StageResult]) -> list[str]:
    """Markdown of the final metrics and the curves of every stage."""
    finals = [(stage.name, metric, value, step) for stage in stages for metric, value, step in stage.finals]
    lines = ["## Training", "", markdown_table(("stage", "metric", "final value", "at step"), finals), ""]
    for stage in stages:
        lines.append(f"### {stage.name}")
        logged = ", ".join(f"`{path}`" for path in stage.metrics_files)
        if stage.plot is None:
            lines.append(f"No known metrics were logged ({logged or f'no metrics.csv under {stage.log_dir}'}).")
        else:
            lines += [f"![{stage.name} training curves]({stage.plot})", "", f"Logged in {logged}."]
        lines.append("")
    return lines


def evaluation_section(evaluation: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Markdown of the evaluation summary, the trade-off plots and the arena."""
    rows, lines = evaluation.get("rows", []), ["## Evaluation", ""]
    for title, names in EVAL_TABLES.items():
        columns, kept = table_body(rows, names)
        if columns:
            body = [[row.get(key) for key in columns] for row in kept]
            lines += [f"**{title}**", "", markdown_table([names[key] for key in columns], body), ""]
    if evaluation.get("out_dir"):
        lines += [f"Generations and the full summary are in `{evaluation['out_dir']}`.", ""]
    lines += [f"![{name.replace('_', ' ')}]({path})\n" for name, path in figures.items()]
    if evaluation.get("arena"):
        lines += arena_section(evaluation["arena"])
    return lines


def arena_section(arena: dict[str, Any]) -> list[str]:
    """Markdown of the arena: the win rate, the safe rates and the better/worse x safe/unsafe counts."""
    a, b, table = arena.get("a", "A"), arena.get("b", "B"), arena["table"]
    counts = [
        [f"{a} better", whole(table["better_safe"]), whole(table["better_unsafe"])],
        [f"{a} worse", whole(table["worse_safe"]), whole(table["worse_unsafe"])],
    ]
    return [
        f"### Arena: {a} vs {b}",
        "",
        f"On {arena['n']} prompts the reward model prefers {a}'s answer in {fmt(arena['win_rate'])} of them "
        f"(ties count half); by the cost model {fmt(arena['safe_rate_a'])} of {a}'s answers are safe, "
        f"{fmt(arena['safe_rate_b'])} of {b}'s.",
        "",
        markdown_table(("", f"{a} safe", f"{a} unsafe"), counts),
        "",
    ]


def extra_section(extra: dict[str, Any]) -> list[str]:
    """Markdown of free-form run details: lists of records as tables, the rest as a list."""
    lines = ["## Run details", ""]
    for key, value in extra.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            header = list(dict.fromkeys(field for item in value for field in item))
            lines += [f"**{key}**", "", markdown_table(header, [[item.get(f) for f in header] for item in value]), ""]
        else:
            shown = json.dumps(value) if isinstance(value, dict | list) else fmt(value)
            lines.append(f"- **{key}**: {shown}")
    return [*lines, ""]


def write_report(
    out_dir: str | Path,
    stage_logs: dict[str, Path],
    evaluation: dict[str, Any] | None = None,
    cost_limit: float | None = None,
    extra: dict[str, Any] | None = None,
    *,
    smoothing: float = 0.9,
) -> Path:
    """Plot every stage's training curves and the evaluation, and write ``out_dir/report.md``.

    Args:
        out_dir: Where ``report.md`` and ``plots/`` go.
        stage_logs: Stage name -> its ``CSVLogger`` dir (holding ``version_N/metrics.csv``). A name that
            contains ``sft``, ``reward``, ``cost`` or ``ppo`` picks that stage's plots; otherwise the
            logged metrics do.
        evaluation: What :func:`lit_saferlhf.commands.evaluate.evaluate` returned (``rows``, ``arena``), or None.
        cost_limit: The PPO cost limit ``d``, drawn on the cost curves.
        extra: Run details for the end of the report (e.g. ``{"stages": [per-stage records]}``).
        smoothing: EMA weight for series longer than :data:`SMOOTH_MIN_POINTS` points; 0 turns it off.

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    stages = [stage_result(name, Path(log_dir), plots, cost_limit, smoothing) for name, log_dir in stage_logs.items()]
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Safe RLHF run report", "", f"Written {written} by lit-saferlhf.", ""]
    lines += training_section(stages) if stages else []
    if evaluation:
        lines += evaluation_section(evaluation, evaluation_plots(evaluation.get("rows", []), plots))
    lines += extra_section(extra) if extra else []
    lines += ["## How to read this", "", HOW_TO_READ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def summary_tables(evaluation: dict[str, Any]) -> list[Table]:
    """Rich tables of the evaluation summary: model-judged numbers, then the truth where it exists."""
    rows, tables = evaluation.get("rows", []), []
    for title, names in EVAL_TABLES.items():
        columns, kept = table_body(rows, names)
        if not columns:
            continue
        table = Table(title=title, box=box.SIMPLE_HEAD)
        for key in columns:
            text = key in ("policy", "set")
            table.add_column(names[key], justify="left" if text else "right", no_wrap=text)
        for row in kept:
            table.add_row(*(fmt(row.get(key)) for key in columns))
        tables.append(table)
    return tables


def print_summary(report_path: str | Path, evaluation: dict[str, Any] | None, console: Console | None = None) -> None:
    """Print the evaluation's key numbers, the arena, and where the report is."""
    console = console or Console()
    if evaluation:
        for table in summary_tables(evaluation):
            console.print(table)
        arena = evaluation.get("arena")
        if arena:
            console.print(
                f"Arena {arena['a']} vs {arena['b']}: win rate {fmt(arena['win_rate'])}, "
                f"safe {fmt(arena['safe_rate_a'])} vs {fmt(arena['safe_rate_b'])} (n = {arena['n']})"
            )
    console.print(f"Report: [bold]{report_path}[/] (plots in {Path(report_path).parent / 'plots'})")


def report_command(argv: Sequence[str]) -> Path:
    """``lit-saferlhf report``: write ``report.md`` and its plots again from a finished (or interrupted) run dir.

    Reads every ``<run>/<stage>/logs`` the pipeline wrote and, where it exists, ``<run>/evaluation``
    (``summary.json``, ``arena.json``); the report goes to ``--out`` (default: the run dir).
    """
    from lit_saferlhf.errors import CommandParser, ConfigError, output_dir

    parser = CommandParser(prog="lit-saferlhf report", description=report_command.__doc__)
    parser.add_argument("--run", required=True, help="a pipeline's out_dir (holding <stage>/logs/ folders)")
    parser.add_argument("--out", default=None, help="where report.md and plots/ go (default: --run)")
    parser.add_argument("--cost_limit", type=float, default=None, help="the cost limit d drawn on the cost curves")
    args = parser.parse_args(argv)
    run = Path(args.run)
    stage_logs = {path.parent.name: path for path in sorted(run.glob("*/logs")) if path.is_dir()}
    if not stage_logs:
        raise ConfigError("--run", f"{args.run} holds no <stage>/logs folder (expected a pipeline's out_dir)")
    evaluation = None
    if (run / "evaluation" / "summary.json").is_file():
        arena = run / "evaluation" / "arena.json"
        evaluation = {
            "rows": json.loads((run / "evaluation" / "summary.json").read_text()),
            "arena": json.loads(arena.read_text()) if arena.is_file() else None,
        }
    out = output_dir(args.out, "--out") if args.out else run
    path = write_report(out, stage_logs, evaluation, cost_limit=args.cost_limit)
    print(f"report: {path}")
    return path
