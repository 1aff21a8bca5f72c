"""Report: reading CSVLogger files (versions of resumed runs joined, NaN cells), the plots, report.md, the summary."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from rich.console import Console

from lit_saferlhf.commands.report import (
    ema,
    join_versions,
    metrics_files,
    print_summary,
    read_metrics,
    read_stage_metrics,
    stage_kind,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def write_metrics(path: Path, rows: list[dict[str, float]]) -> Path:
    """A CSVLogger-like file: one column per metric seen, empty cells where a row lacks it."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return path


def sft_rows() -> list[dict[str, float]]:
    rows = [{"epoch": 0, "step": step, "train/loss": 3.0 / (step + 1)} for step in range(60)]  # long: smoothed
    rows += [{"epoch": 0, "step": 59, "val/loss": 0.9, "val/token_accuracy": 0.625}]
    rows[3]["train/loss"] = NAN  # a NaN cell is skipped, not plotted
    return rows


@pytest.fixture
def stage_logs(tmp_path: Path) -> dict[str, Path]:
    """Synthetic CSVLogger dirs of the four stages (the sft one with an older version too)."""
    logs = tmp_path / "logs"
    write_metrics(logs / "sft" / "version_2" / "metrics.csv", [{"step": 0, "train/loss": 99.0}])  # older
    write_metrics(logs / "sft" / "version_10" / "metrics.csv", sft_rows())  # newest: 10 > 2 numerically
    reward = [{"step": s, "train/loss": 0.7 - 0.05 * s, "val/accuracy": None} for s in range(5)]
    write_metrics(logs / "reward" / "version_0" / "metrics.csv", [*reward, {"step": 4, "val/accuracy": 0.875}])
    cost = [{"step": s, "train/loss": 1.2 - 0.1 * s, "val/accuracy": None, "val/sign_accuracy": None} for s in range(4)]
    cost.append({"step": 3, "val/accuracy": 0.8, "val/sign_accuracy": 0.9})
    write_metrics(logs / "cost" / "version_0" / "metrics.csv", cost)
    ppo = [
        {"step": s, "rollout/reward": 0.1 * s, "rollout/cost": 0.5 - 0.2 * s, "rollout/episode_cost": 0.4 - 0.2 * s,
         "solver/multiplier": 1.0 + 0.1 * s - 0.05 * s * s, "rollout/kl": 0.01 * s, "loss/actor": -0.02 * s}
        for s in range(1, 7)
    ]  # fmt: skip
    write_metrics(logs / "ppo_lag" / "version_0" / "metrics.csv", ppo)
    (logs / "empty").mkdir()
    return {name: logs / name for name in ("sft", "reward", "cost", "ppo_lag", "empty")}


def evaluation() -> dict:
    rows = [
        {"policy": "sft", "set": "prompts-eval", "n": 8, "mean_reward": 0.25, "mean_cost": 0.4, "harmless_rate": 0.375,
         "refusal_rate": 0.125, "mean_response_words": 6.5, "n_harmful": 4, "gt_helpfulness": 1.5, "gt_cost": 0.25,
         "gt_harmful_compliance_rate": 0.75, "gt_benign_helpfulness": 2.25, "gt_benign_refusal_rate": 0.0},
        {"policy": "ppo_lag", "set": "prompts-eval", "n": 8, "mean_reward": 0.5, "mean_cost": -0.6,
         "harmless_rate": 0.875, "refusal_rate": 0.5, "mean_response_words": 7.25, "n_harmful": 4,
         "gt_helpfulness": 1.125, "gt_cost": -0.8125,
         "gt_harmful_compliance_rate": 0.0, "gt_benign_helpfulness": 2.0, "gt_benign_refusal_rate": 0.25},
        {"policy": "sft", "set": "xstest_prompts", "n": 3, "mean_reward": -0.125, "mean_cost": 0.1,
         "harmless_rate": 0.333, "refusal_rate": 0.0, "mean_response_words": 40.0},
    ]  # fmt: skip
    table = {"better_safe": 5.0, "better_unsafe": 1.5, "worse_safe": 2.5, "worse_unsafe": 2.0}
    arena = {"a": "ppo_lag", "b": "sft", "n": 11, "win_rate": 0.591, "safe_rate_a": 0.682, "safe_rate_b": 0.364}
    return {"rows": rows, "arena": {**arena, "table": table}, "out_dir": "outputs/eval"}


def test_versions_in_numeric_order_and_nan_cells_are_handled(stage_logs: dict[str, Path]) -> None:
    files = metrics_files(stage_logs["sft"])
    assert [path.parent.name for path in files] == ["version_2", "version_10"]  # 10 > 2 numerically
    metrics = read_metrics(files[-1])
    assert len(metrics["train/loss"]) == 59  # 60 rows, one NaN
    assert all(math.isfinite(value) for _, value in metrics["train/loss"])
    assert metrics["val/token_accuracy"] == [(59.0, 0.625)]
    assert "epoch" not in metrics
    assert metrics_files(stage_logs["empty"]) == []
    joined, _ = read_stage_metrics(stage_logs["sft"])
    assert joined == metrics  # version_10 starts at step 0 again: a new run, it replaces version_2 entirely


def test_the_versions_of_a_killed_and_resumed_run_join_into_one_history(tmp_path: Path) -> None:
    # version_0: killed after logging steps 0-6; its last checkpoint was at step 5, so steps 5 and 6 were trained again.
    # version_1: resumed at step 5, killed after logging 5-8 (checkpoint at 8). version_2: killed before logging.
    # version_3: resumed at step 8 and ran to the end (step 11).
    runs = {0: (0, 7, 1.0), 1: (5, 9, 2.0), 2: (0, 0, 0.0), 3: (8, 12, 3.0)}
    for version, (first, end, run) in runs.items():
        rows = [{"step": step, "train/loss": run * 100 + step} for step in range(first, end)]
        if version == 1:
            rows.append({"step": 6, "val/loss": 26.0})
        path = tmp_path / "logs" / f"version_{version}" / "metrics.csv"
        write_metrics(path, rows) if rows else path.parent.mkdir(parents=True)
    (tmp_path / "logs" / "version_2" / "metrics.csv").write_text("step,train/loss\n")  # header only

    metrics, files = read_stage_metrics(tmp_path / "logs")
    assert [path.parent.name for path in files] == ["version_0", "version_1", "version_2", "version_3"]
    expected = (
        [(s, 100 + s) for s in range(5)] + [(s, 200 + s) for s in range(5, 8)] + [(s, 300 + s) for s in range(8, 12)]
    )
    assert metrics["train/loss"] == [(float(s), float(v)) for s, v in expected]  # every step once, no gap
    assert metrics["val/loss"] == [(6.0, 26.0)]


def test_join_versions_keeps_metrics_logged_only_before_a_resume() -> None:
    first = {"a": [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)], "b": [(2.0, 5.0)]}
    second = {"a": [(2.0, 30.0), (3.0, 40.0)]}
    assert join_versions([first, second]) == {"a": [(0.0, 1.0), (1.0, 2.0), (2.0, 30.0), (3.0, 40.0)]}
    assert join_versions([first, {}]) == first
    assert join_versions([]) == {}


def test_stage_kind_from_name_then_metrics() -> None:
    assert stage_kind("reward", {}) == "reward"
    assert stage_kind("plain_ppo", {"rollout/reward": [(1.0, 0.0)], "solver/multiplier": [(1.0, 1.0)]}) == "ppo_lag"
    assert stage_kind("mystery", {"something/else": [(0.0, 1.0)]}) is None


def test_ema_is_bias_corrected() -> None:
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_report_plots_every_stage_and_the_tradeoffs(stage_logs: dict[str, Path], tmp_path: Path) -> None:
    extra = {"stages": [{"name": "sft", "seconds": 12.5}, {"name": "ppo_lag", "seconds": 30.0}], "seed": 7}
    report = write_report(tmp_path / "out", stage_logs, evaluation(), cost_limit=0.0, extra=extra)
    assert report == tmp_path / "out" / "report.md"
    plots = sorted((tmp_path / "out" / "plots").glob("*.png"))
    expected = {"sft", "reward", "cost", "ppo_lag", "reward_vs_cost", "truth_helpfulness_vs_cost"}
    assert {path.stem for path in plots} == expected
    text = report.read_text()
    for path in plots:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 10_000  # a real picture, not an empty canvas
        assert f"](plots/{path.name})" in text
    for number in ("0.625", "0.875", "0.900", "-0.600", "0.750", "0.591", "1.500", "12.500", "40.000"):
        assert number in text  # final metrics, summary rows, arena, run details
    assert "99.000" not in text  # the older log version is ignored
    assert "### empty" in text
    assert "No known metrics" in text
    assert "How to read this" in text
    assert "| ppo_lag better | 5 | 1.500 |" in text


def test_report_without_evaluation_or_ground_truth(stage_logs: dict[str, Path], tmp_path: Path) -> None:
    report = write_report(tmp_path / "a", {"reward": stage_logs["reward"]}, None)
    assert sorted(path.name for path in (tmp_path / "a" / "plots").iterdir()) == ["reward.png"]
    assert "## Evaluation" not in report.read_text()
    no_truth = {"rows": [row for row in evaluation()["rows"] if "gt_cost" not in row], "arena": None}
    write_report(tmp_path / "b", {}, no_truth)
    assert sorted(path.name for path in (tmp_path / "b" / "plots").iterdir()) == ["reward_vs_cost.png"]


def test_print_summary_names_the_report(tmp_path: Path) -> None:
    console = Console(record=True, width=100)
    print_summary(tmp_path / "report.md", evaluation(), console=console)
    printed = console.export_text()
    assert str(tmp_path / "report.md") in printed
    assert "Ground truth" in printed
    assert "xstest_prompts" in printed
    assert "win rate 0.591" in printed


def test_the_report_command_rewrites_a_run_dirs_report(stage_logs: dict[str, Path], tmp_path: Path) -> None:
    from lit_saferlhf.cli import main

    run = tmp_path / "run"
    for name, logs in stage_logs.items():
        (run / name).mkdir(parents=True)
        logs.rename(run / name / "logs")  # the pipeline's layout: <run>/<stage>/logs/version_N/metrics.csv
    (run / "evaluation").mkdir()
    (run / "evaluation" / "summary.json").write_text(json.dumps(evaluation()["rows"]))
    (run / "evaluation" / "arena.json").write_text(json.dumps(evaluation()["arena"]))
    main(["report", "--run", str(run), "--cost_limit", "0.0"])
    report = (run / "report.md").read_text()
    assert "| ppo_lag |" in report  # the training table of the stage logs read from the run dir
    assert "prompts-eval" in report  # the evaluation summary read from evaluation/summary.json
    assert "### Arena: ppo_lag vs sft" in report  # and the arena from evaluation/arena.json
    assert all((run / "plots" / name).read_bytes().startswith(PNG_MAGIC) for name in os.listdir(run / "plots"))


def test_the_report_command_refuses_a_dir_without_stage_logs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lit_saferlhf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--run", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds no <stage>/logs folder" in capsys.readouterr().err


def test_the_multiplier_panel_draws_every_constraints_lambda() -> None:
    """A several-constraint run logs ``solver/<name>/multiplier``: the λ panel draws each, not their parent names."""
    from lit_saferlhf.commands.report import STAGE_PANELS

    (panel,) = [panel for panel in STAGE_PANELS["ppo_lag"] if panel.title.startswith("Lagrange")]
    logged = {name: [(0.0, 1.0)] for name in ("solver/mhd/multiplier", "solver/ehd/multiplier", "solver/ehd/violation")}
    assert panel.present(logged) == ["solver/ehd/multiplier", "solver/mhd/multiplier"]
    assert panel.present({"solver/multiplier": [(0.0, 1.0)]}) == ["solver/multiplier"]
