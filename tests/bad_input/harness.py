"""The bad-input suite's harness: the real ``lit-saferlhf`` in-process, on a tiny stage built in ``tmp_path``.

Every case must fail as an error of the input: exit status 2, exactly one ``error: ...`` line on stderr
naming the place (file and line or row, or the config key), and no traceback. Data errors are raised in
the datamodule's ``setup``, which Lightning runs before it builds any network, and settings are checked
when the config is instantiated, so no case trains (the whole suite takes seconds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lit_saferlhf.cli import main

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
"""A random one-layer Llama: never built by a failing case, but a valid setting."""

STAGES = {
    "sft": ("lit_saferlhf.stages.SFTModule", "lit_saferlhf.data.SFTData", "lit_saferlhf.data.PromptResponse"),
    "reward": (
        "lit_saferlhf.stages.RewardModelModule",
        "lit_saferlhf.data.RewardData",
        "lit_saferlhf.data.PKUSafeRLHF",
    ),
    "cost": ("lit_saferlhf.stages.CostModelModule", "lit_saferlhf.data.CostData", "lit_saferlhf.data.PKUSafeRLHF"),
    # PromptData's own checks run in setup, before the stage uses a batch: the SFT stage serves to reach them.
    "prompt": ("lit_saferlhf.stages.SFTModule", "lit_saferlhf.data.PromptData", "lit_saferlhf.data.PromptList"),
}
"""Stage -> (module class, datamodule class, default adapter)."""

PKU_ROW = {
    "prompt": "how do i bake bread",
    "response_0": "sure mix flour and water",
    "response_1": "no",
    "is_response_0_safe": True,
    "is_response_1_safe": True,
    "better_response_id": 0,
    "safer_response_id": 0,
}
"""A valid PKU-SafeRLHF row, the base of the bad ones."""


def stage_config(
    tmp_path: Path,
    stage: str,
    path: str | Path,
    adapter: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **data: Any,
) -> Path:
    """A ``fit`` YAML of ``stage`` reading ``path``, written to ``tmp_path``.

    ``model`` replaces the stage's ``model`` setting (a random tiny Llama); ``data`` overrides datamodule settings.
    """
    module, datamodule, default_adapter = STAGES[stage]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            "class_path": module,
            "init_args": {"model": model or {"config": TINY_LLAMA, "tokenizer": "safety-world"}},
        },
        "data": {
            "class_path": datamodule,
            "init_args": {"path": str(path), "adapter": adapter or {"class_path": default_adapter}, **data},
        },
    }
    out = tmp_path / f"{stage}.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def user_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``lit-saferlhf ARGS``; it must exit with status 2, one ``error:`` line and no traceback. That line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def fit_error(config: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """``user_error`` of ``lit-saferlhf fit --config CONFIG FLAGS``."""
    return user_error(["fit", f"--config={config}", *flags], capsys)


def assert_names(line: str, *parts: str) -> None:
    """Every part (location, field, key, expectation) is in the error line."""
    missing = [part for part in parts if part not in line]
    assert not missing, f"{missing} not in {line!r}"
