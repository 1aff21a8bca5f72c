"""The main job on an even smaller setting: every artefact exists and parses; repeats skip and resume."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lit_saferlhf.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "cli_configs"
QUICK = {"trainer.max_epochs": 1, "data.init_args.limit": 128, "trainer.enable_progress_bar": False}


def write_pipeline(path: Path, out_dir: Path, ppo_epochs: int = 1) -> Path:
    """The tiny pipeline YAML with smaller stages."""
    config = yaml.safe_load((CONFIGS / "tiny/pipeline.yaml").read_text())
    config["out_dir"] = str(out_dir)
    config["checkpoint_every"] = 1
    for stage in config["stages"]:
        stage["config"] = str(CONFIGS / "tiny" / Path(stage["config"]).name)
        stage["overrides"] = dict(QUICK)
    config["stages"][-1]["overrides"] |= {
        "trainer.max_epochs": ppo_epochs,
        "trainer.limit_train_batches": 2,
        "data.init_args.batch_size": 8,
        "model.init_args.ppo.minibatch_size": 4,
    }
    config["evaluation"] |= {"limit": 12, "max_new_tokens": 8, "batch_size": 6}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    main(["pipeline", "--config", str(write_pipeline(root / "pipeline.yaml", root / "out"))])
    return root / "out"


def test_every_artefact_exists_and_parses(finished: Path) -> None:
    for stage in ("sft", "reward", "cost", "ppo_lag"):
        assert (finished / stage / "model" / "config.json").is_file(), stage
        record = json.loads((finished / stage / "stage.json").read_text())
        assert record["name"] == stage
        assert record["seconds"] > 0
    assert (finished / "reward" / "model" / "score_model.json").is_file()
    history = json.loads((finished / "ppo_lag" / "model" / "multiplier_history.json").read_text())
    assert len(history["multiplier"]) == 2

    generations = [
        json.loads(line) for line in (finished / "evaluation" / "generations.jsonl").read_text().splitlines()
    ]
    assert {row["policy"] for row in generations} == {"sft", "ppo_lag"}
    assert len(generations) == 2 * 12
    with (finished / "evaluation" / "summary.csv").open() as file:
        summary = list(csv.DictReader(file))
    assert {row["policy"] for row in summary} == {"sft", "ppo_lag"}
    for row in summary:
        assert 0.0 <= float(row["harmless_rate"]) <= 1.0
        assert 0.0 <= float(row["gt_harmful_compliance_rate"]) <= 1.0
    arena = json.loads((finished / "evaluation" / "arena.json").read_text())
    assert sum(arena["table"].values()) == pytest.approx(arena["n"])

    report = (finished / "report.md").read_text()
    plots = sorted((finished / "plots").glob("*.png"))
    assert {plot.stem for plot in plots} >= {"sft", "reward", "cost", "ppo_lag", "reward_vs_cost"}
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{plot.name}" in report


def test_repeating_skips_finished_stages(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {stage: (finished / stage / "stage.json").read_text() for stage in ("sft", "reward", "cost", "ppo_lag")}
    config = write_pipeline(tmp_path / "pipeline.yaml", finished)
    yaml_config = yaml.safe_load(config.read_text())
    yaml_config.pop("evaluation")
    config.write_text(yaml.safe_dump(yaml_config))
    main(["pipeline", "--config", str(config)])
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert before == {stage: (finished / stage / "stage.json").read_text() for stage in before}


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(finished: Path, tmp_path: Path) -> None:
    # Simulate a run killed after its checkpoint: no stage record, no export, last.ckpt present.
    stage = finished / "ppo_lag"
    (stage / "stage.json").unlink()
    assert (stage / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load(write_pipeline(tmp_path / "pipeline.yaml", finished, ppo_epochs=2).read_text())
    config.pop("evaluation")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    record = json.loads((stage / "stage.json").read_text())
    assert record["resumed"] is True
    history = json.loads((stage / "model" / "multiplier_history.json").read_text())["multiplier"]
    assert len(history) == 4  # 2 rollouts restored from the checkpoint + 2 new ones


def test_a_stage_recorded_as_finished_without_its_export_writes_it_from_the_last_checkpoint(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a kill between the end of training and the export used to leave behind, with stage.json from a rerun.
    stage = finished / "ppo_lag"
    history = json.loads((stage / "model" / "multiplier_history.json").read_text())
    shutil.rmtree(stage / "model")
    config = yaml.safe_load(write_pipeline(tmp_path / "pipeline.yaml", finished, ppo_epochs=2).read_text())
    config.pop("evaluation")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert capsys.readouterr().out.count("finished before, skipped") == 3
    assert (stage / "model" / "config.json").is_file()
    assert json.loads((stage / "model" / "multiplier_history.json").read_text()) == history  # no step trained again


def test_a_stage_that_writes_no_export_is_not_recorded_as_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(write_pipeline(tmp_path / "pipeline.yaml", tmp_path / "out").read_text())
    config["stages"] = config["stages"][:1]
    config["stages"][0]["overrides"] |= {"model.init_args.export_dir": None, "trainer.max_steps": 1}
    config.pop("evaluation")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:  # a StageError (a RuntimeError): one line, exit status 2
        main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert exit_info.value.code == 2
    assert re.search(r"error: stage 'sft': .* ended without writing .*sft/model", capsys.readouterr().err)
    assert not (tmp_path / "out" / "sft" / "stage.json").exists()


def test_a_stage_whose_inputs_are_missing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = yaml.safe_load(write_pipeline(tmp_path / "pipeline.yaml", tmp_path / "out").read_text())
    config["stages"] = config["stages"][1:2]  # the reward stage without the SFT stage before it
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:  # an InputNotFoundError (a FileNotFoundError): one line, status 2
        main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")])
    assert exit_info.value.code == 2
    assert "error: stage 'reward' needs the exports of ['sft']" in capsys.readouterr().err
