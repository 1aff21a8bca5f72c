"""Every stage on one GPU under FSDP1, FSDP2 and DeepSpeed ZeRO-2/3: fit, generate, export, consolidate.

Never run in CI (no GPU there); run by hand on a CUDA machine with DeepSpeed installed:

    python -m pytest -m gpu tests/gpu -q

Each case runs the real CLI in a subprocess on the tiny configs with a strategy fragment from
``cli_configs/strategies/`` as a second ``--config``, then checks the end-of-fit export, and
consolidates the run's last checkpoint with ``lit-saferlhf export`` into the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_strategies import QUICK, REPO, clean_environment, stage_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STRATEGIES = ["fsdp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]
STAGES = ["sft", "reward", "cost", "ppo_lag"]


def lit_saferlhf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m lit_saferlhf.cli <args>`` with its output captured."""
    # DeepSpeed's just-in-time ops cannot parse some preset arch lists ('...0a'); Hopper is 9.0.
    env = {**clean_environment(), "TORCH_CUDA_ARCH_LIST": os.environ.get("LIT_SAFERLHF_CUDA_ARCH", "9.0")}
    return subprocess.run(
        [sys.executable, "-m", "lit_saferlhf.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def fit_args(stage: str, strategy: str, out: Path) -> list[str]:
    """One GPU, the strategy fragment, a checkpoint at the end, outputs under ``out``."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True},
    }
    return [
        f"--config={REPO / 'cli_configs/tiny' / f'{stage}.yaml'}",
        f"--config={REPO / 'cli_configs/strategies' / f'{strategy}.yaml'}",
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
        f"--trainer.callbacks+={json.dumps(checkpoint)}",
        *QUICK,
    ]


def weights(export: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export (the backbone and, for score models, the head), in fp32."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(export.glob("*.safetensors")):
        tensors |= {f"{file.stem}/{name}": value.float() for name, value in load_file(file).items()}
    assert tensors, f"no weights in {export}"
    return tensors


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_fits_exports_and_consolidates_on_one_gpu(
    stage: str, strategy: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    args = fit_args(stage, strategy, tmp_path) + stage_overrides(stage, tiny_models)
    run = lit_saferlhf("fit", *args)
    if stage == "ppo_lag" and strategy == "fsdp":  # refused at start-up, before any network is built
        assert run.returncode != 0
        assert "uses manual optimisation" in run.stderr
        assert "fsdp2.yaml" in run.stderr
        assert not (tmp_path / "checkpoints").exists()
        return
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    exported = weights(tmp_path / "model")
    assert all(value.isfinite().all() for value in exported.values())
    if stage == "ppo_lag":  # two rollouts were generated (under ZeRO-3: with synced GPUs) and λ stepped
        history = json.loads((tmp_path / "model" / "multiplier_history.json").read_text())
        assert len(history["multiplier"]) == 2

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    consolidate = lit_saferlhf("export", *args, f"--ckpt_path={checkpoint}", f"--out={tmp_path / 'consolidated'}")
    assert consolidate.returncode == 0, consolidate.stdout[-3000:] + consolidate.stderr[-6000:]
    consolidated = weights(tmp_path / "consolidated")
    assert consolidated.keys() == exported.keys()
    for name, value in exported.items():  # bf16 working weights vs the checkpoint's fp32 master copy
        torch.testing.assert_close(consolidated[name], value, rtol=2e-2, atol=2e-2, msg=name)
