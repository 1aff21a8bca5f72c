"""Test helpers: run a stage through the CLI, read its CSV metrics."""

from __future__ import annotations

from pathlib import Path

from lit_saferlhf.commands.fit import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "cli_configs"


def fit(config: str, out: Path, *overrides: str) -> Path:
    """Run ``lit-saferlhf fit --config cli_configs/<config>`` with outputs under ``out``; the export dir."""
    args = [
        "fit",
        f"--config={CONFIGS / config}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    cli_main(args)
    return out / "model"


def metrics(stage_dir: Path) -> list[dict[str, str]]:
    """Rows of the newest CSVLogger ``metrics.csv`` under ``stage_dir``."""
    import csv

    (path,) = sorted((stage_dir / "logs").glob("version_*/metrics.csv"))[-1:]
    with path.open() as file:
        return list(csv.DictReader(file))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """The logged values of one metric, in order."""
    return [float(row[name]) for row in rows if row.get(name)]
