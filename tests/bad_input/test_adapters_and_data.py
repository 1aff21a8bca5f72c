"""Rows that do not fit their adapter's schema, and datamodule settings that leave nothing to train on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lit_saferlhf.data.safety_world import build_tokenizer
from tests.bad_input.harness import PKU_ROW, assert_names, fit_error, stage_config, write_jsonl

HH_CHOSEN = "\n\nHuman: how do i bake bread\n\nAssistant: mix flour and water"
HH_REJECTED = "\n\nHuman: how do i bake bread\n\nAssistant: no"


def pku(**change: Any) -> dict[str, Any]:
    return {**PKU_ROW, **change}


def without(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {name: value for name, value in row.items() if name != key}


HH = {"class_path": "lit_saferlhf.data.HHRLHF"}
ALPACA = {"class_path": "lit_saferlhf.data.Alpaca"}
QUESTION_ANSWER = {
    "class_path": "lit_saferlhf.data.PromptResponse",
    "init_args": {"prompt_column": "question", "response_column": "answer"},
}
ALPACA_ROW = {"instruction": "bake bread", "input": "", "output": "mix flour and water"}

# (case id, stage, adapter (None: the stage's default), second row (after a good one), parts of the error line)
CASES = [
    # PKUSafeRLHF: reward (preference) and cost (safety_preference) records
    ("pku-better-id-2", "reward", None, pku(better_response_id=2), ["'better_response_id'", "0 or 1", "found 2"]),
    ("pku-better-id-string", "reward", None, pku(better_response_id="1"), ["'better_response_id'", "found '1'"]),
    ("pku-better-id-bool", "reward", None, pku(better_response_id=True), ["'better_response_id'", "found True"]),
    ("pku-same-responses", "reward", None, pku(response_1=PKU_ROW["response_0"]), ["'response_1'", "different"]),
    ("pku-missing-response", "reward", None, without(PKU_ROW, "response_1"), ["'response_1'", "no such field"]),
    ("pku-empty-prompt", "reward", None, pku(prompt="  "), ["'prompt'", "a non-empty string"]),
    ("pku-surrogate-response", "reward", None, pku(response_0="x\ud800"), ["'response_0'", "lone surrogate"]),
    ("pku-safe-label-string", "cost", None, pku(is_response_0_safe="yes"), ["'is_response_0_safe'", "true or false"]),
    ("pku-safer-id-missing", "cost", None, without(PKU_ROW, "safer_response_id"), ["'safer_response_id'"]),
    (
        "pku-inconsistent-labels",
        "cost",
        None,
        pku(is_response_0_safe=False, safer_response_id=0),
        ["'safer_response_id'", "drop_inconsistent"],
    ),
    # HHRLHF: sft and preference records
    ("hh-not-a-dialogue", "sft", HH, {"chosen": "just text"}, ["'chosen'", "a dialogue of turns"]),
    (
        "hh-ends-with-human",
        "sft",
        HH,
        {"chosen": HH_CHOSEN + "\n\nHuman: and?"},
        ["'chosen'", "ends with an Assistant"],
    ),
    ("hh-empty-reply", "sft", HH, {"chosen": "\n\nHuman: hi\n\nAssistant: "}, ["'chosen'", "non-empty final"]),
    ("hh-empty-human-turn", "sft", HH, {"chosen": "\n\nHuman: \n\nAssistant: hi"}, ["'chosen'", "non-empty Human"]),
    ("hh-chosen-not-a-string", "sft", HH, {"chosen": ["a"]}, ["'chosen'", "a non-empty string"]),
    (
        "hh-other-prompt",
        "reward",
        HH,
        {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        ["'rejected'", "the same conversation", "turn 1 differs"],
    ),
    ("hh-same-reply", "reward", HH, {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, ["'rejected'", "different"]),
    ("hh-missing-rejected", "reward", HH, {"chosen": HH_CHOSEN}, ["'rejected'", "no such field"]),
    # Alpaca
    ("alpaca-input-number", "sft", ALPACA, {**ALPACA_ROW, "input": 3}, ["'input'", "a string (may be empty)"]),
    ("alpaca-missing-output", "sft", ALPACA, without(ALPACA_ROW, "output"), ["'output'", "no such field"]),
    ("alpaca-missing-instruction", "sft", ALPACA, without(ALPACA_ROW, "instruction"), ["'instruction'"]),
    ("alpaca-surrogate-input", "sft", ALPACA, {**ALPACA_ROW, "input": "\udc00"}, ["'input'", "lone surrogate"]),
    # PromptResponse with its own columns
    (
        "prompt-response-columns",
        "sft",
        QUESTION_ANSWER,
        {"question": "hi", "response": "yo"},
        ["'answer'", "no such field (the row has: question, response)"],
    ),
    ("prompt-response-null", "sft", QUESTION_ANSWER, {"question": None, "answer": "yo"}, ["'question'", "None"]),
    # PromptList (PPO prompts)
    (
        "prompt-list-column",
        "prompt",
        {"class_path": "lit_saferlhf.data.PromptList", "init_args": {"column": "goal"}},
        {"prompt": "hi"},
        ["'goal'", "no such field"],
    ),
    ("prompt-list-not-text", "prompt", None, {"prompt": ["a", "b"]}, ["'prompt'", "a non-empty string"]),
]

GOOD_ROWS = {
    "sft": {
        "default": {"prompt": "how do i bake bread", "response": "sure"},
        "HHRLHF": {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        "Alpaca": ALPACA_ROW,
        "PromptResponse": {"question": "hi", "answer": "yo"},
    },
    "reward": {"default": PKU_ROW, "HHRLHF": {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}},
    "cost": {"default": PKU_ROW},
    "prompt": {"default": {"prompt": "hi", "goal": "hi"}},
}


def good_row(stage: str, adapter: dict[str, Any] | None) -> dict[str, Any]:
    name = "default" if adapter is None else adapter["class_path"].rsplit(".", 1)[-1]
    rows = GOOD_ROWS[stage]
    return rows.get(name, rows["default"])


@pytest.mark.parametrize(("stage", "adapter", "row", "parts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_row(stage: str, adapter: dict | None, row: dict, parts: list[str], tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [good_row(stage, adapter), row])
    line = fit_error(stage_config(tmp_path, stage, path, adapter), capsys)
    assert_names(line, "rows.jsonl:line 2", *parts)


def test_every_pair_without_a_label_is_counted_not_trained_on(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [pku(better_response_id=None)] * 3)
    line = fit_error(stage_config(tmp_path, "reward", path), capsys)
    assert_names(line, "rows.jsonl: no records of kind 'preference'", "3 excluded: no helpfulness label")


def test_an_adapter_without_the_stage_kind_names_the_ones_that_have_it(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    line = fit_error(stage_config(tmp_path, "sft", path, {"class_path": "lit_saferlhf.data.PromptList"}), capsys)
    assert_names(line, "adapter: PromptList has no sft records", "PromptResponse")


# ----------------------------------------------------------------------------------------------
# Datamodules: splits and truncation
# ----------------------------------------------------------------------------------------------


def test_a_validation_split_that_holds_out_every_prompt(tmp_path: Path, capsys) -> None:
    rows = [{"prompt": "how do i bake bread", "response": f"answer {i}"} for i in range(4)]  # one prompt
    config = stage_config(tmp_path, "sft", write_jsonl(tmp_path / "rows.jsonl", rows), val_fraction=0.999)
    line = fit_error(config, capsys)
    assert_names(line, "data.init_args.val_fraction", "leaves training data", "all 4 records", "found 0.999")


def test_a_prompt_that_fills_max_length_leaves_no_response_token(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "how do i bake bread", "response": "sure"}])
    line = fit_error(stage_config(tmp_path, "sft", path, max_length=4), capsys)
    assert_names(line, "rows.jsonl:line 1", "'prompt'", "shorter than max_length=4 tokens")


def test_skipping_every_truncated_record_leaves_no_training_data(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "how do i bake bread", "response": "sure"}] * 2)
    line = fit_error(stage_config(tmp_path, "sft", path, max_length=4, on_bad_record="skip"), capsys)
    assert_names(line, "rows.jsonl: no training samples left")


PAIR_TIES = [
    # (case, stage, the two responses, max_length, what the line says): each names the real cause of the tie
    ("prompt-fills-max-length", "reward", ("sure mix flour and water", "no"), 6, ["'prompt'", "max_length=6"]),
    ("prompt-fills-max-length-cost", "cost", ("sure mix flour and water", "no"), 6, ["'prompt'", "max_length=6"]),
    (
        "same-within-max-length",
        "reward",
        ("sure you need flour and water", "sure you need flour and yeast"),
        18,
        ["'(pair)'", "still differ within max_length=18", "first 4 tokens, all that fit, are the same"],
    ),
    (
        "tokenizer-tie",
        "reward",
        ("zzz qqq", "xxx yyy"),  # words outside the safety world's vocabulary: <unk> <unk> both
        64,
        ["'(pair)'", "not truncated: the tokenizer made the tie", "words outside its vocabulary"],
    ),
]


@pytest.mark.parametrize(
    ("stage", "responses", "max_length", "parts"), [c[1:] for c in PAIR_TIES], ids=[c[0] for c in PAIR_TIES]
)
def test_a_pair_without_a_comparison_names_the_cause(
    stage: str, responses: tuple[str, str], max_length: int, parts: list[str], tmp_path: Path, capsys
) -> None:
    row = pku(response_0=responses[0], response_1=responses[1])
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    line = fit_error(stage_config(tmp_path, stage, path, max_length=max_length), capsys)
    assert_names(line, "rows.jsonl:line 1", *parts, "1 of the 1 train records are unusable")


# ----------------------------------------------------------------------------------------------
# The offline preference stage: pairs that carry no training signal
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_only_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy dir with a config and the safety-world tokenizer: all the stage reads before the data fails."""
    path = tmp_path_factory.mktemp("policy")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    build_tokenizer().save_pretrained(path)
    return path


def preference_config(tmp_path: Path, policy: Path, rows: Path, **data: Any) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path / "run")},
        "model": {
            "class_path": "lit_saferlhf.stages.PreferenceOptimization",
            "init_args": {"policy": str(policy), "objective": {"class_path": "lit_saferlhf_plugins.objectives.DPO"}},
        },
        "data": {"class_path": "lit_saferlhf.data.PreferenceData", "init_args": {"path": str(rows), **data}},
    }
    out = tmp_path / "offline.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def test_an_offline_run_whose_every_prompt_fills_max_length(
    tmp_path: Path, tokenizer_only_policy: Path, capsys
) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [PKU_ROW] * 3)
    line = fit_error(preference_config(tmp_path, tokenizer_only_policy, path, max_length=8), capsys)
    assert_names(line, "rows.jsonl:line 1", "'prompt'", "3 of the 3 train records are unusable")
    assert_names(line, "3 no response token within max_length=8", "on_bad_record: skip drops them")


def test_an_offline_run_left_without_pairs_says_how_many_were_usable(
    tmp_path: Path, tokenizer_only_policy: Path, capsys
) -> None:
    long_prompt = pku(prompt="how do i bake bread today and tonight")  # 14 + 3 prompt tokens
    rows = [pku(response_0="zzz", response_1="qqq"), long_prompt]  # a tokenizer tie, then no room for a response
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = preference_config(tmp_path, tokenizer_only_policy, path, max_length=16, on_bad_record="skip")
    line = fit_error(config, capsys)
    assert_names(line, "rows.jsonl: no training samples left: none of the 2 records is usable")
    assert_names(line, "1 responses the tokenizer encodes alike", "1 no response token within max_length=16")


def test_a_ptx_demonstration_without_room_for_its_response(tmp_path: Path, capsys) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "how do i bake bread", "response": "sure"}])
    config = stage_config(tmp_path, "prompt", prompts, ptx_path=str(demos), ptx_max_length=3)
    assert_names(fit_error(config, capsys), "demos.jsonl:line 1", "'prompt'", "max_length=3")


def test_skipping_every_ptx_demonstration_leaves_none(tmp_path: Path, capsys) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "how do i bake bread", "response": "sure"}])
    config = stage_config(tmp_path, "prompt", prompts, ptx_path=str(demos), ptx_max_length=3, on_bad_record="skip")
    assert_names(fit_error(config, capsys), "demos.jsonl: no PTX demonstration keeps a response token")
