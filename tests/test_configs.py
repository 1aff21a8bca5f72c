"""Every shipped YAML parses and builds its config (litgpt's tests/test_config_hub.py idea)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, Strategy

from lit_saferlhf.commands.fit import cli_main
from lit_saferlhf.models.causal_lm import ModelSource
from lit_saferlhf.models.peft import LoraArgs

CONFIGS = Path(__file__).resolve().parents[1] / "cli_configs"
STAGE_CONFIGS = sorted(
    p for p in CONFIGS.rglob("*.yaml") if "class_path" in yaml.safe_load(p.read_text()).get("model", {})
)
FRAGMENTS = sorted(
    p for folder in ("solvers", "strategies", "slurm", "trackers") for p in (CONFIGS / folder).glob("*.yaml")
)
TINY_STAGES = sorted(
    [
        CONFIGS / "tiny" / f"{name}.yaml"
        for name in ("sft", "reward", "cost", "ppo_lag", "grpo_lag", "rloo_lag", "appo_lag")
    ]
    + list((CONFIGS / "tiny" / "offline").glob("*.yaml"))
)
"""Every tiny stage config: each takes the shared fragments (LoRA, dtype, gradient checkpointing, template)."""


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


@pytest.fixture(scope="module")
def random_tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dir holding random-weight stand-ins for every ``outputs/tiny/...`` model dir the tiny configs name."""
    from lit_saferlhf.data.tokenizers import load_tokenizer
    from lit_saferlhf.models.causal_lm import build_causal_lm, export
    from lit_saferlhf.models.score_model import ScoreModel

    root = tmp_path_factory.mktemp("random_tiny")
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
    source = ModelSource(config=config, tokenizer="safety-world")
    tokenizer = load_tokenizer(source)
    policy = export(build_causal_lm(source, tokenizer), tokenizer, root / "outputs/tiny/sft/model")
    for name in ("offline/dpo", "offline/dpo_safety", "offline/sacpo_helpful"):
        (root / "outputs/tiny" / name).mkdir(parents=True)
        (root / "outputs/tiny" / name / "model").symlink_to(policy, target_is_directory=True)
    for name in ("reward", "cost"):
        ScoreModel.from_source(source, tokenizer).save_pretrained(root / f"outputs/tiny/{name}/model", tokenizer)
    return root


ONE_LINE_FRAGMENTS = {
    "dtype": "model: {init_args: {dtype: bfloat16}}",
    "gradient_checkpointing": "model: {init_args: {gradient_checkpointing: true}}",
    "template": "data: {init_args: {template: {class_path: lit_saferlhf.data.templates.SafeRLHFTemplate, "
    "init_args: {system_prefix: 'SYSTEM:'}}}}",
}
"""One-line fragments of settings that have one path in every stage (LoRA's is the shipped ``peft/lora.yaml``)."""
BUILD_DEFAULTS = {"lora": None, "dtype": None, "gradient_checkpointing": False}
"""The stage arguments that say how its networks are built, unset."""
BUILD_SET = {
    "lora": LoraArgs(r=16, alpha=32.0, target_modules="all-linear"),
    "dtype": "bfloat16",
    "gradient_checkpointing": True,
}


def build_settings(stage: L.LightningModule) -> dict[str, Any]:
    """What a stage builds its trained networks with: its ``ModelSource`` (SFT, reward, cost) or its own attributes."""
    if isinstance(getattr(stage, "source", None), ModelSource):
        return {key: getattr(stage.source, key) for key in BUILD_DEFAULTS}
    return {"lora": stage.lora, "dtype": stage.dtype_name, "gradient_checkpointing": stage.gradient_checkpointing}


@pytest.mark.parametrize("setting", ["lora", *ONE_LINE_FRAGMENTS])
@pytest.mark.parametrize("config", TINY_STAGES, ids=lambda p: str(p.relative_to(CONFIGS / "tiny")))
def test_one_fragment_sets_a_shared_setting_in_every_stage(
    config: Path, setting: str, random_tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fragment = CONFIGS / "peft" / "lora.yaml"
    if setting != "lora":
        fragment = tmp_path / f"{setting}.yaml"
        fragment.write_text(ONE_LINE_FRAGMENTS[setting] + "\n")
    monkeypatch.chdir(random_tiny_models)  # the tiny configs' relative outputs/tiny/... dirs
    cli = cli_main([f"--config={config}", f"--config={fragment}", "--trainer.logger=false"], run=False)
    expected = BUILD_DEFAULTS | ({setting: BUILD_SET[setting]} if setting in BUILD_SET else {})
    assert build_settings(cli.model) == expected
    given = setting == "template"
    assert cli.datamodule.template_given == given
    assert cli.datamodule.template.system_prefix == ("SYSTEM:" if given else "BEGINNING OF CONVERSATION:")
