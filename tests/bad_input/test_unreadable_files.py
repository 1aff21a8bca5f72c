"""Files that exist but cannot be read as what they are named for (issue 24, item 8).

A model dir without tokenizer files, a weights file or checkpoint cut short, a directory or named pipe given
as a data file, a typo'd local path that looks like a hub dataset name, and a config that is not valid YAML:
each is one ``error:`` line naming the file (and the line, for YAML), exit status 2, no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.bad_input.harness import TINY_LLAMA, assert_names, fit_error, stage_config, write_jsonl

SFT_ROWS = [{"prompt": "how do i bake bread", "response": "mix flour and water"}] * 4


def config_only_dir(path: Path) -> Path:
    """A model dir with a valid ``config.json`` and nothing else."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**TINY_LLAMA, "architectures": ["LlamaForCausalLM"]}))
    return path


def test_a_model_dir_without_tokenizer_files(tmp_path: Path, capsys) -> None:
    model = config_only_dir(tmp_path / "model")
    config = stage_config(tmp_path, "sft", write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), model={"path": str(model)})
    line = fit_error(config, capsys)
    assert_names(line, "model.init_args.model.path", f"no tokenizer files in the model dir: {model}", "tokenizer.json")
    assert "sentencepiece" not in line


def cut_short(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_weights_file_cut_short(name: str, tmp_path: Path, capsys) -> None:
    from safetensors.torch import save

    model = config_only_dir(tmp_path / "model")
    weights = {"model.embed_tokens.weight": torch.zeros(64, 16)}
    if name.endswith(".safetensors"):
        (model / name).write_bytes(cut_short(save(weights)))
    else:
        torch.save(weights, model / name)
        (model / name).write_bytes(cut_short((model / name).read_bytes()))
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    config = stage_config(tmp_path, "sft", data, model={"path": str(model), "tokenizer": "safety-world"})
    assert_names(fit_error(config, capsys), f"{model / name}: a weights file that is cut short or corrupt")


def test_a_checkpoint_cut_short(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(256)}, "global_step": 3}, checkpoint)
    checkpoint.write_bytes(cut_short(checkpoint.read_bytes()))
    config = stage_config(tmp_path, "sft", write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS))
    line = fit_error(config, capsys, f"--ckpt_path={checkpoint}")
    assert_names(line, f"--ckpt_path {checkpoint}: a checkpoint that is cut short or corrupt")


def test_a_directory_as_the_data_file(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    line = fit_error(stage_config(tmp_path, "sft", folder), capsys)
    assert_names(line, f"{folder}: a directory, not a data file")


def test_a_named_pipe_as_the_data_file(tmp_path: Path, capsys) -> None:
    pipe = tmp_path / "train.jsonl"
    os.mkfifo(pipe)
    line = fit_error(stage_config(tmp_path, "sft", pipe), capsys)
    assert_names(line, f"{pipe}: a named pipe (FIFO), not a data file")


def test_a_typo_in_a_local_path_is_not_read_as_a_hub_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "prompts.jsonl", SFT_ROWS)
    line = fit_error(stage_config(tmp_path, "sft", "data/promts"), capsys)
    assert_names(line, "data/promts: no such file", "not read as a hub dataset name since data/ is a local dir")


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("seed_everything: 0\ntrainer: {accelerator: cpu\nmodel: {}\n", ":line 3, column 6", "a flow mapping"),
        ("model:\n  class_path: x\n   init_args: {}\n", ":line 3, column 13", "mapping values are not allowed"),
        ("model:\n\tclass_path: x\n", ":line 2, column 1", "found character '\\t'"),
    ],
    ids=["unclosed-brace", "bad-indent", "tab"],
)
def test_a_config_that_is_not_valid_yaml_names_the_file_and_line(
    text: str, where: str, problem: str, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    assert_names(fit_error(config, capsys), f"{config}{where}: not valid YAML", problem)


def test_a_second_config_that_is_not_valid_yaml(tmp_path: Path, capsys) -> None:
    good = stage_config(tmp_path, "sft", write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS))
    broken = tmp_path / "lora.yaml"
    broken.write_text("model:\n  init_args:\n    lora: {r: 8\n")
    assert_names(fit_error(good, capsys, f"--config={broken}"), f"{broken}:line 4", "not valid YAML")
