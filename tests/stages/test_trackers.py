"""Experiment trackers as ``trainer.logger`` (cli_configs/trackers/): TensorBoard, MLflow (a local file store) and
W&B (offline). Each test runs 2 rollouts of the tiny PPO-Lagrangian stage with the tracker's fragment, reads the
metrics back with the tracker's own reader, and finds every λ (``solver/``), rollout and timing metric the CSV
logs beside it hold, with the same values. Skipped only when the tracker's extra is not installed.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from lit_saferlhf.commands.fit import cli_main
from tests.helpers import CONFIGS

PREFIXES = ("solver/", "rollout/", "time/")


def run_ppo(tiny_models: dict[str, Path], out: Path, tracker: str, *overrides: str) -> dict[str, list[float]]:
    """2 rollouts of the tiny PPO stage with ``cli_configs/trackers/<tracker>.yaml``; the CSV's tracked series."""
    cli_main([
        "fit",
        f"--config={CONFIGS / 'tiny/ppo_lag.yaml'}",
        f"--config={CONFIGS / 'trackers' / f'{tracker}.yaml'}",
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=8",
        "--model.init_args.generation.max_new_tokens=8",
        f"--trainer.default_root_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ])  # fmt: skip
    (path,) = (out / "logs").glob("version_*/metrics.csv")  # written beside the tracker, where the report looks
    series: dict[str, list[float]] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                if value and name.startswith(PREFIXES):
                    series.setdefault(name, []).append(float(value))
    assert {prefix for prefix in PREFIXES if any(name.startswith(prefix) for name in series)} == set(PREFIXES)
    assert all(len(values) == 2 for values in series.values()), series
    return series


def test_tensorboard_holds_the_ppo_metrics(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = run_ppo(tiny_models, tmp_path, "tensorboard", f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}")
    (version,) = (tmp_path / "tb" / "lit-saferlhf").iterdir()
    events = EventAccumulator(str(version))
    events.Reload()
    tracked = {name: [event.value for event in events.Scalars(name)] for name in logged}
    assert tracked == {name: pytest.approx(values, rel=1e-6) for name, values in logged.items()}  # float32 there


def test_mlflow_holds_the_ppo_metrics(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra: pip install -e '.[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    store = f"file:{tmp_path / 'mlruns'}"
    logged = run_ppo(tiny_models, tmp_path, "mlflow", f"--trainer.logger.init_args.tracking_uri={store}")
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("lit-saferlhf")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    tracked = {name: [metric.value for metric in client.get_metric_history(run.info.run_id, name)] for name in logged}
    assert tracked == logged


def test_wandb_offline_holds_the_ppo_metrics(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    wandb = pytest.importorskip("wandb", reason="the wandb extra: pip install -e '.[wandb]'")

    logged = run_ppo(tiny_models, tmp_path, "wandb", f"--trainer.logger.init_args.save_dir={tmp_path}")
    wandb.finish()  # a process's exit finishes its run (an atexit hook); in-process, finish it to flush the file
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    tracked: dict[str, list[float]] = {}
    for row in wandb_history(run_file):
        for name, value in row.items():
            tracked.setdefault(name, []).append(value)
    assert {name: tracked.get(name) for name in logged} == logged


def wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run file.

    The file is a LevelDB log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with a 7-byte
    header: checksum, length, type; a record split across blocks comes as FIRST, MIDDLE..., LAST) of
    protobuf ``Record`` messages; the history ones hold the logged metrics as JSON values.
    """
    from wandb.proto import wandb_internal_pb2

    data, block, full, last = path.read_bytes(), 32768, 1, 4
    assert data[:4] == b":W&B"
    position, pending, rows = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left for a header: the block is padded
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (full, last):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows
