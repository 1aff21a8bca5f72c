"""LoRA under DeepSpeed ZeRO-2/3 and QLoRA (4-bit bases) on one GPU. Never run in CI; written, not yet run.

python -m pytest -m gpu tests/gpu/test_lora_gpu.py -q     # a CUDA machine with DeepSpeed and bitsandbytes
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_strategies import REPO, stage_overrides
from tests.gpu.test_gpu_strategies import fit_args, lit_saferlhf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LORA = "peft/lora.yaml"
"""The LoRA fragment: the same file (and path, ``model.init_args.lora``) for every stage."""


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("stage", ["reward", "ppo_lag"])
def test_lora_stage_fits_and_exports_merged_under_deepspeed(
    stage: str, strategy: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    args = [*fit_args(stage, strategy, tmp_path), f"--config={REPO / 'cli_configs' / LORA}"]
    run = lit_saferlhf("fit", *args, *stage_overrides(stage, tiny_models))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    export = load_file(tmp_path / "model" / "model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in export)  # merged into a plain dir
    if stage == "ppo_lag":
        base = load_file(tiny_models["sft"] / "model.safetensors")
        assert export.keys() == base.keys()
        assert any(not torch.equal(base[k].float(), export[k].float()) for k in base)
        assert len(json.loads((tmp_path / "model" / "multiplier_history.json").read_text())["multiplier"]) == 2


@pytest.mark.parametrize("stage", ["reward", "ppo_lag"])
def test_qlora_trains_on_4_bit_bases_and_exports_dequantized(
    stage: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    args = [
        f"--config={REPO / 'cli_configs/tiny' / f'{stage}.yaml'}",
        f"--config={REPO / 'cli_configs' / LORA}",
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--model.init_args.export_dir={out / 'model'}",
    ]
    run = lit_saferlhf("fit", *args, "--model.init_args.lora.quantize=nf4", *stage_overrides(stage, tiny_models))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    export = load_file(out / "model" / "model.safetensors")
    assert all(tensor.dtype != torch.uint8 for tensor in export.values())  # dequantized, loadable anywhere
