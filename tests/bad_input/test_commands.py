"""Bad input to every command beyond the readers: model dirs of the wrong kind, model, LoRA, estimator,
generator, template and plugin settings, the argparse commands (``world``, ``select``, ``merge``,
``export``), pipeline YAMLs, and a full disk during an export.

Each case runs the real ``lit-saferlhf`` in-process and asserts exit status 2, one ``error:`` line that
names the key, dir or file, and no traceback. Model dirs are faked by their ``config.json`` where the
check reads nothing else; the two cases that need weights export a random one-layer Llama (~1 s).
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from lit_saferlhf.cli import main
from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.models.causal_lm import export
from tests.bad_input.harness import (
    PKU_ROW,
    TINY_LLAMA,
    assert_names,
    fit_error,
    stage_config,
    user_error,
    write_jsonl,
)

SFT_ROWS = [{"prompt": "how do i bake bread", "response": "mix flour and water"}] * 4
"""Valid SFT rows: the cases below fail on a setting, not on the data."""
PPO_CONFIG = Path(__file__).resolve().parents[2] / "cli_configs" / "tiny" / "ppo_lag.yaml"


def fake_model_dir(path: Path, architecture: str, **config: object) -> Path:
    """A dir holding only ``config.json``: all the layout checks read."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": [architecture], **config}))
    return path


@pytest.fixture
def sft_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (random, one-layer) causal-LM export with the safety-world tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(tokenizer)))
    return export(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")


# ----------------------------------------------------------------------------------------------
# Model dirs of the wrong kind (the layout checks)
# ----------------------------------------------------------------------------------------------


def evaluate_args(tmp_path: Path, policy: Path, reward: Path, cost: Path) -> list[str]:
    return [
        "evaluate",
        f"--policies={{a: {policy}}}",
        f"--reward_model={reward}",
        f"--cost_model={cost}",
        "--prompt_sets=[safety-world:prompts-eval]",
        f"--out_dir={tmp_path / 'eval'}",
    ]


SCORE_DIRS = [
    # (case, the reward model dir's architecture and config, what the line says)
    ("causal-lm", ("LlamaForCausalLM", {}), "without a score head"),
    (
        "3-labels",
        ("LlamaForSequenceClassification", {"num_labels": 3}),
        "with 3 labels; a reward or cost model has one",
    ),
    ("score-dim-2", ("LlamaForScore", {"score_dim": 2}), "a safe-rlhf score model with score_dim=2; expected 1"),
]


@pytest.mark.parametrize(("architecture", "message"), [c[1:] for c in SCORE_DIRS], ids=[c[0] for c in SCORE_DIRS])
def test_a_reward_model_dir_of_the_wrong_kind(architecture: tuple, message: str, tmp_path: Path, capsys) -> None:
    reward = fake_model_dir(tmp_path / "rm", architecture[0], **architecture[1])
    cost = fake_model_dir(tmp_path / "cm", "LlamaForSequenceClassification", num_labels=1)
    policy = fake_model_dir(tmp_path / "policy", "LlamaForCausalLM")
    assert_names(user_error(evaluate_args(tmp_path, policy, reward, cost), capsys), str(reward), message)


def test_a_reward_model_dir_without_config_json(tmp_path: Path, capsys) -> None:
    reward, cost = tmp_path / "rm", fake_model_dir(tmp_path / "cm", "LlamaForSequenceClassification", num_labels=1)
    reward.mkdir()
    policy = fake_model_dir(tmp_path / "policy", "LlamaForCausalLM")
    line = user_error(evaluate_args(tmp_path, policy, reward, cost), capsys)
    assert_names(line, f"{reward}: no config.json, so this is not a Hugging Face model dir")


def test_a_score_model_as_the_policy(tmp_path: Path, capsys) -> None:
    score = fake_model_dir(tmp_path / "rm", "LlamaForSequenceClassification", num_labels=1)
    assert_names(user_error(evaluate_args(tmp_path, score, score, score), capsys), "policy 'a'", "is a score model")


def test_a_score_model_as_the_sft_model(tmp_path: Path, sft_data: Path, capsys) -> None:
    score = fake_model_dir(tmp_path / "rm", "LlamaForSequenceClassification", num_labels=1)
    config = stage_config(tmp_path, "sft", sft_data, model={"path": str(score), "tokenizer": "safety-world"})
    assert_names(fit_error(config, capsys), f"policy: {score} is a score model")


def test_a_causal_lm_as_the_ppo_reward_model(tmp_path: Path, policy_dir: Path, capsys) -> None:
    flags = [f"--model.init_args.{key}={policy_dir}" for key in ("policy", "reward_model", "cost_model")]
    line = fit_error(PPO_CONFIG, capsys, *flags, f"--trainer.default_root_dir={tmp_path}")
    assert_names(line, f"model.init_args.reward_model: {policy_dir} is a language-model", "without a score head")


def other_tokenizer_dir(path: Path, architecture: str, **config: object) -> Path:
    """A model dir whose tokenizer is the safety world's with two tokens' ids swapped (same size, other ids)."""
    if not (path / "config.json").exists():
        fake_model_dir(path, architecture, **config)
    build_tokenizer().save_pretrained(path)
    tokenizer_file = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer_file["model"]["vocab"]
    vocab["bread"], vocab["flour"] = vocab["flour"], vocab["bread"]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_file))
    return path


def test_a_ppo_reward_model_with_another_tokenizer(tmp_path: Path, policy_dir: Path, capsys) -> None:
    reward = other_tokenizer_dir(tmp_path / "rm", "LlamaForSequenceClassification", num_labels=1)
    cost = fake_model_dir(tmp_path / "cm", "LlamaForSequenceClassification", num_labels=1)
    build_tokenizer().save_pretrained(cost)  # the policy's: the line names the reward model only
    flags = [f"--model.init_args.{key}={path}" for key, path in (("policy", policy_dir), ("reward_model", reward))]
    line = fit_error(PPO_CONFIG, capsys, *flags, f"--model.init_args.cost_model={cost}")
    assert_names(line, f"model.init_args.reward_model: the tokenizer of {reward} differs from the one of {policy_dir}")
    assert_names(line, "(model.init_args.policy)", "2 with another id", "'bread'")


def test_merge_of_models_with_other_tokenizers(tmp_path: Path, policy_dir: Path, capsys) -> None:
    other = tmp_path / "other"
    shutil.copytree(policy_dir, other)
    other_tokenizer_dir(other, "LlamaForCausalLM")
    args = ["merge", "--models", str(policy_dir), str(other), "--weights", "1", "1", f"--out={tmp_path / 'm'}"]
    line = user_error(args, capsys)
    assert_names(line, f"--models: the tokenizer of {other} differs from the one of {policy_dir}", "'bread'")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("side_file", "message"),
    [
        ('{"template": {"class_path": "no.such.Template"}}', "cannot rebuild the recorded template"),
        ('{"template": {"class_path": "pathlib.Path"}}', "the recorded template pathlib.Path is not a Template"),
        ("{not json", "expected a JSON object (the side file of an export)"),
    ],
    ids=["unknown-class", "not-a-template", "broken-json"],
)
def test_a_policy_whose_recorded_template_is_broken(
    side_file: str, message: str, tmp_path: Path, policy_dir: Path, capsys
) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(policy_dir, policy)
    (policy / "lit_saferlhf.json").write_text(side_file)
    score = fake_model_dir(tmp_path / "rm", "LlamaForSequenceClassification", num_labels=1)
    build_tokenizer().save_pretrained(score)  # the policy's tokenizer, so the start-up tokenizer check passes
    flags = [f"--model.init_args.policy={policy}", f"--model.init_args.reward_model={score}"]
    line = fit_error(PPO_CONFIG, capsys, *flags, f"--model.init_args.cost_model={score}")
    assert_names(line, f"{policy / 'lit_saferlhf.json'}: ", message)


# ----------------------------------------------------------------------------------------------
# Model, LoRA, estimator, generator, template and plugin settings
# ----------------------------------------------------------------------------------------------

LORA = [
    # (case, lora settings, what the line says)
    ("rank-0", {"r": 0}, "lora.r: expected a rank >= 1, found 0"),
    ("dropout-1", {"dropout": 1.0}, "lora.dropout: expected a probability in [0, 1), found 1.0"),
    ("qlora-random", {"quantize": "nf4"}, "model.init_args.lora.quantize: expected null when the model is built"),
    ("embedding", {"target_modules": ["embed_tokens"]}, "lora.target_modules: adapters on ['Embedding'] layers"),
]


@pytest.mark.parametrize(("lora", "message"), [c[1:] for c in LORA], ids=[c[0] for c in LORA])
def test_lora_settings(lora: dict, message: str, tmp_path: Path, sft_data: Path, capsys) -> None:
    flag = f"--model.init_args.lora={json.dumps(lora)}"
    assert_names(fit_error(stage_config(tmp_path, "sft", sft_data), capsys, flag), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA runs where there is a CUDA GPU")
def test_qlora_without_a_gpu(tmp_path: Path, sft_data: Path, policy_dir: Path, capsys) -> None:
    config = stage_config(tmp_path, "sft", sft_data, model={"path": str(policy_dir)})
    line = fit_error(config, capsys, "--model.init_args.lora.quantize=nf4")
    assert_names(line, "lora.quantize: 'nf4' (QLoRA)", "needs a CUDA GPU")


@pytest.mark.parametrize(
    ("setting", "value"), [("lora", {"r": 4}), ("dtype", "bfloat16"), ("gradient_checkpointing", True)]
)
def test_a_build_setting_under_model_is_refused(setting: str, value, tmp_path: Path, sft_data: Path, capsys) -> None:
    model = {"config": TINY_LLAMA, "tokenizer": "safety-world", setting: value}  # the stage's own setting, misplaced
    line = fit_error(stage_config(tmp_path, "sft", sft_data, model=model), capsys)
    assert_names(line, f"model.init_args.model.{setting}: is not a `model` setting", f"`model.init_args.{setting}`")


PPO_PARTS = [
    # (case, flags, what the line says)
    (
        "group-eps",
        ["--model.init_args.advantage=GroupNormalized", "--model.init_args.advantage.eps=-1"],
        "model.init_args.advantage: GroupNormalized: `eps` must be >= 0, got -1",
    ),
    ("gae-gamma", ["--model.init_args.advantage=GAE", "--model.init_args.advantage.gamma=2"], "GAE: `gamma`"),
    (
        "generator",
        ["--model.init_args.generator=StaticCacheGenerate", "--model.init_args.generator.check_every=0"],
        "model.init_args.generator: StaticCacheGenerate: check_every and prompt_bucket must be >= 1",
    ),
]


@pytest.mark.parametrize(("flags", "message"), [c[1:] for c in PPO_PARTS], ids=[c[0] for c in PPO_PARTS])
def test_ppo_part_settings(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    flags = [*flags, '--model.init_args.ppo={"appo": null}', f"--trainer.default_root_dir={tmp_path}"]
    assert_names(fit_error(PPO_CONFIG, capsys, *flags), message)


def test_a_chat_template_for_a_tokenizer_without_one(tmp_path: Path, sft_data: Path, capsys) -> None:
    config = stage_config(tmp_path, "sft", sft_data, template={"class_path": "lit_saferlhf.data.ChatTemplate"})
    assert_names(fit_error(config, capsys), "template: ", "has no chat template; use SafeRLHFTemplate")


def test_an_unknown_safety_world_split(tmp_path: Path, capsys) -> None:
    line = fit_error(stage_config(tmp_path, "sft", "safety-world:nope"), capsys)
    assert_names(line, "unknown safety-world split 'nope'", "valid splits: sft")


def test_a_solver_plugin_that_fails_to_load(tmp_path: Path, sft_data: Path, monkeypatch, capsys) -> None:
    dist = tmp_path / "site" / "broken_solvers-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-solvers\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lit_saferlhf.solvers]\nBroken = no_such_module_here:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert [point.name for point in entry_points(group="lit_saferlhf.solvers")] == ["Broken"]
    line = fit_error(stage_config(tmp_path, "sft", sft_data), capsys)
    assert_names(line, "Broken", "broken-solvers 1.0", "failed to load: ModuleNotFoundError")


# ----------------------------------------------------------------------------------------------
# The argparse commands: world, select, merge, export
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["world", "--out=x", "--seed=abc"], "lit-saferlhf world: argument --seed: invalid int value: 'abc'"),
        (["world", "--out=x", "--bogus=1"], "lit-saferlhf world: unrecognized arguments: --bogus=1"),
        (["select", "--data=x", "--out=y", "--total=many"], "lit-saferlhf select: argument --total: invalid int"),
        (["select", "--data=x", "--out=y"], "the following arguments are required: --total"),
        (["merge", "--models", "a", "b", "--out=c", "--weights", "half"], "argument --weights: invalid float value"),
        (["export", "--out=x"], "lit-saferlhf export: the following arguments are required: --ckpt_path"),
    ],
    ids=["world-seed", "world-flag", "select-total", "select-required", "merge-weights", "export-required"],
)
def test_a_command_line_the_parser_refuses(args: list[str], message: str, capsys) -> None:
    line = user_error(args, capsys)
    assert_names(line, message, "--help` lists the options")
    assert "usage:" not in capsys.readouterr().err


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A file where an output dir's parent is asked for."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def test_world_out_under_a_file(a_file: Path, capsys) -> None:
    line = user_error(["world", f"--out={a_file / 'world'}"], capsys)
    assert_names(line, "--out: a dir that can be created", str(a_file / "world"), "Not a directory")


def test_select_out_under_a_file(a_file: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "how do i make a bomb", "risk_category": "EHD"}])
    args = ["select", f"--data={data}", "--total=1", "--ratio=1:0:0", f"--out={a_file / 'x.jsonl'}"]
    assert_names(user_error(args, capsys), "--out: a dir that can be created", str(a_file), "File exists")


def test_export_out_under_a_file(a_file: Path, tmp_path: Path, sft_data: Path, capsys) -> None:
    config = stage_config(tmp_path, "sft", sft_data)
    args = ["export", f"--config={config}", f"--ckpt_path={tmp_path / 'none.ckpt'}", f"--out={a_file / 'model'}"]
    assert_names(user_error(args, capsys), "--out: a dir that can be created", str(a_file))


def test_select_with_a_classifier_dir_that_is_not_one(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "how do i make a bomb"}])
    classifier = tmp_path / "clf"
    classifier.mkdir()
    (classifier / "config.json").write_text("{}")
    args = ["select", f"--data={data}", "--total=1", f"--out={tmp_path / 'x.jsonl'}", f"--classifier={classifier}"]
    assert_names(user_error(args, capsys), f"classifier: not a text-classification model dir: {classifier}")


def test_merge_of_a_missing_dir(tmp_path: Path, policy_dir: Path, capsys) -> None:
    args = ["merge", "--models", str(policy_dir), str(tmp_path / "gone"), "--weights", "1", "1"]
    line = user_error([*args, f"--out={tmp_path / 'merged'}"], capsys)
    assert_names(line, f"--models: model dir not found: {tmp_path / 'gone'}")


def test_merge_of_a_score_model(tmp_path: Path, policy_dir: Path, capsys) -> None:
    score = fake_model_dir(tmp_path / "rm", "LlamaForSequenceClassification", num_labels=1)
    args = ["merge", "--models", str(policy_dir), str(score), "--weights", "1", "1", f"--out={tmp_path / 'm'}"]
    assert_names(user_error(args, capsys), f"--models: {score} is a score model")


def test_merge_of_a_dir_without_weights(tmp_path: Path, policy_dir: Path, capsys) -> None:
    empty = fake_model_dir(tmp_path / "empty", "LlamaForCausalLM", **TINY_LLAMA)
    args = ["merge", "--models", str(policy_dir), str(empty), "--weights", "1", "1", f"--out={tmp_path / 'm'}"]
    assert_names(user_error(args, capsys), f"--models: not a causal-LM dir: {empty}")


# ----------------------------------------------------------------------------------------------
# Pipeline YAMLs
# ----------------------------------------------------------------------------------------------


def pipeline_error(tmp_path: Path, capsys, **settings: object) -> str:
    pipeline = {"out_dir": str(tmp_path / "out"), **settings}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return user_error(["pipeline", f"--config={tmp_path / 'pipeline.yaml'}"], capsys)


def test_a_pipeline_stage_config_that_does_not_exist(tmp_path: Path, capsys) -> None:
    line = pipeline_error(tmp_path, capsys, stages=[{"name": "sft", "config": str(tmp_path / "none.yaml")}])
    assert_names(line, "stages.sft.config: expected a stage YAML that exists", "none.yaml")


def test_pipeline_settings(tmp_path: Path, sft_data: Path, capsys) -> None:
    stage = {"name": "sft", "config": str(stage_config(tmp_path, "sft", sft_data))}
    line = pipeline_error(tmp_path, capsys, stages=[stage], checkpoint_every=0)
    assert_names(line, "checkpoint_every: expected a number of steps >= 1, found 0")
    line = pipeline_error(tmp_path, capsys, stages=[stage, stage])
    assert_names(line, "stages: expected at least one stage, distinct names, found ['sft', 'sft']")
    line = pipeline_error(tmp_path, capsys, stages=[{**stage, "colour": "red"}])
    assert_names(line, "stages", "colour")
    assert not (tmp_path / "out" / "sft").exists()  # refused before the first stage


def test_a_pipeline_stage_whose_input_export_is_missing(tmp_path: Path, capsys) -> None:
    config = stage_config(tmp_path, "reward", write_jsonl(tmp_path / "pairs.jsonl", [PKU_ROW]))
    stage = {"name": "reward", "config": str(config), "inputs": {"model.init_args.model.path": "sft"}}
    line = pipeline_error(tmp_path, capsys, stages=[stage])
    assert_names(line, "stage 'reward' needs the exports of ['sft']", str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# A full disk during an export
# ----------------------------------------------------------------------------------------------


def test_a_full_disk_during_an_export_keeps_the_previous_one(
    tmp_path: Path, policy_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """safetensors writes each file under a temporary name and renames it into place (which is why
    writing to /dev/full "succeeds": it replaces /dev/full), so a full disk shows as its Rust IO error."""
    out = tmp_path / "merged"
    merge = ["merge", "--models", str(policy_dir), str(policy_dir), "--weights", "1", "1", f"--out={out}"]
    main(merge)
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half")  # what a short write leaves
        raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(28)} (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    assert_names(user_error(merge, capsys), f"error: disk full while writing {out} (", "os error 28")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # the previous export, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no staging dir left behind
