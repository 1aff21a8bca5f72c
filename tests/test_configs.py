"""Every shipped YAML parses and builds its config (litgpt's tests/test_config_hub.py idea)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, Strategy

from lit_saferlhf.commands.fit import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "cli_configs"
STAGE_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if "class_path" in yaml.safe_load(p.read_text()).get("model", {})
)
FRAGMENTS = sorted(p for folder in ("solvers", "strategies", "slurm") for p in (CONFIGS / folder).glob("*.yaml"))


def test_configs_are_found() -> None:
    assert len(STAGE_CONFIGS) >= 10
    assert len(FRAGMENTS) >= 8


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_stage_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = config.read_text()
    assert text.startswith("#"), "each shipped file starts with a header: command, hardware, runtime"
    assert "lit-saferlhf" in text.split("\n\n")[0]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lit_saferlhf" in capsys.readouterr().out


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.name)
def test_fragment_composes_with_the_tiny_ppo_config(fragment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={CONFIGS / 'tiny/ppo_lag.yaml'}", f"--config={fragment}", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for key, value in yaml.safe_load(fragment.read_text()).get("model", {}).get("init_args", {}).items():
        assert value["class_path"] in printed, key


def test_the_fsdp_fragment_computes_in_bf16_and_reduces_gradients_in_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # parses with the CLI's settings; the Trainer itself needs a GPU
        cli_main(["fit", f"--config={CONFIGS / 'tiny/sft.yaml'}", f"--config={CONFIGS / 'strategies/fsdp.yaml'}",
                  "--print_config"])  # fmt: skip
    assert "lit_saferlhf.strategies.BF16MixedPrecision" in capsys.readouterr().out
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    fragment = yaml.safe_load((CONFIGS / "strategies/fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate(parser.parse_object({"strategy": fragment})).strategy
    assert isinstance(strategy, FSDPStrategy)
    precision = strategy.mixed_precision
    assert (precision.param_dtype, precision.reduce_dtype) == (torch.bfloat16, torch.float32)
