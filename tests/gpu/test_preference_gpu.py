"""The offline preference stage on one GPU in bf16 (written for the GPU machine; never run in CI, not yet run).

python -m pytest -m gpu tests/gpu/test_preference_gpu.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import fit, metrics
from tests.stages.test_preference import overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("config", ["bfpo", "c_dpo", "mocan"])
def test_offline_stage_in_bf16_on_a_gpu(config: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    out = fit(f"tiny/offline/{config}.yaml", tmp_path, *overrides(config, tiny_models), *gpu)
    losses = [float(row["train/loss"]) for row in metrics(tmp_path) if row.get("train/loss")]
    assert len(losses) == 3
    assert all(math.isfinite(loss) for loss in losses)
    assert json.loads((out / "objective.json").read_text())["objective"]
