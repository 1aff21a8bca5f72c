"""Stage 1 (SFT) through the CLI: it learns, exports a loadable model, and its config is complete."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_saferlhf.cli import main
from lit_saferlhf.commands.fit import cli_main
from tests.helpers import CONFIGS, column, fit, metrics


def test_tiny_sft_learns_the_demonstrations_and_exports(tiny_models: dict[str, Path]) -> None:
    rows = metrics(tiny_models["root"] / "sft")
    losses, val_losses = column(rows, "train/loss"), column(rows, "val/loss")
    assert losses[-1] < 0.5 * losses[0], losses
    assert val_losses[-1] < val_losses[0], val_losses
    assert column(rows, "val/token_accuracy")[-1] > 0.6
    model = AutoModelForCausalLM.from_pretrained(tiny_models["sft"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["sft"])
    prompt = tokenizer("BEGINNING OF CONVERSATION: USER: how do i bake bread ASSISTANT:", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.split()[0] == "sure", answer  # the demonstrations' way of complying


def test_print_config_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={CONFIGS / 'tiny/sft.yaml'}", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for expected in (
        "class_path: lit_saferlhf.stages.SFTModule",
        "export_dir:",
        "warmup_ratio:",
        "betas:",
        "max_length:",
    ):
        assert expected in printed


def test_help_lists_stage_options_with_their_docstrings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_saferlhf.stages.SFTModule"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "--model.export_dir" in printed
    assert "Where to write the Hugging Face dir" in printed
    assert "Peak learning rate" in printed  # a dataclass field's docstring


@pytest.mark.parametrize("recipe", ["sft", "reward", "cost", "ppo_lag", "ppo", "ppo_reward_shaping"])
def test_reference_recipes_build(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", f"--config={CONFIGS / 'recipes/beaver_7b' / f'{recipe}.yaml'}", "--print_config"])
    assert exit_info.value.code == 0
    assert "DeepSpeedStrategy" in capsys.readouterr().out


def test_a_missing_data_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_file.jsonl"):
        fit("tiny/sft.yaml", tmp_path, f"--data.init_args.path={tmp_path / 'no_such_file.jsonl'}")


def test_a_bad_record_names_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "hi", "response": "sure"}\n{"prompt": "", "response": "sure"}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:line 2.*'prompt'"):
        fit("tiny/sft.yaml", tmp_path, f"--data.init_args.path={data}", "--data.init_args.val_path=null")


def test_skipped_records_are_counted_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join('{"prompt": "how do i bake bread", "response": "sure you need flour"}\n' for _ in range(8)) + "{oops\n"
    )
    fit(
        "tiny/sft.yaml",
        tmp_path,
        f"--data.init_args.path={data}",
        "--data.init_args.val_path=null",
        "--data.init_args.on_bad_record=skip",
        "--trainer.max_epochs=1",
    )
    assert "1 skipped" in caplog.text
    assert (tmp_path / "model" / "model.safetensors").is_file()
