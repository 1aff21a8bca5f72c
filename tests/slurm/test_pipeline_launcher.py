"""``lit-saferlhf pipeline --launcher``: each stage in processes of its own (a SLURM job step), resumed by stage.

The launcher here is a stand-in for ``bash cli_configs/slurm/run.sbatch`` that records its arguments and
writes the stage's export, so no cluster is needed; the real script is exercised in test_sbatch.py.
"""

from __future__ import annotations

import pytest

from lit_saferlhf.commands.pipeline import StageSpec, pipeline
from lit_saferlhf.errors import StageError
from tests.helpers import CONFIGS

pytestmark = pytest.mark.slurm

FAKE_STEP = """
printf '%s\\n' "$*" >> "$CALLS"
for arg in "$@"; do case "$arg" in --model.init_args.export_dir=*) mkdir -p "${arg#*=}" ;; esac; done
exit "${FAIL:-0}"
"""


def test_each_stage_is_a_launched_step_and_a_rerun_skips_the_finished_ones(tmp_path, monkeypatch) -> None:
    step = tmp_path / "step.sh"
    step.write_text(FAKE_STEP)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    stages = [
        StageSpec("sft", str(CONFIGS / "tiny/sft.yaml")),
        StageSpec("reward", str(CONFIGS / "tiny/reward.yaml"), {"model.init_args.model.path": "sft"}),
    ]
    pipeline(str(tmp_path / "out"), stages, launcher=["bash", str(step)])
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["--config", "--config"]  # `fit` is the launcher's own
    assert f"--model.init_args.model.path={tmp_path / 'out' / 'sft' / 'model'}" in calls[1]

    (tmp_path / "out" / "reward" / "stage.json").unlink()  # as if the job ended during the reward stage
    pipeline(str(tmp_path / "out"), stages, launcher=["bash", str(step)])
    assert len((tmp_path / "calls").read_text().splitlines()) == 3  # the reward stage only


def test_a_failed_step_stops_the_pipeline_naming_the_stage(tmp_path, monkeypatch) -> None:
    step = tmp_path / "step.sh"
    step.write_text(FAKE_STEP)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("FAIL", "143")
    with pytest.raises(StageError, match="stage 'sft'.*exited with status 143"):
        pipeline(
            str(tmp_path / "out"), [StageSpec("sft", str(CONFIGS / "tiny/sft.yaml"))], launcher=["bash", str(step)]
        )
    assert not (tmp_path / "out" / "sft" / "stage.json").exists()
