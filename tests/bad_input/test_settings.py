"""Settings out of their domain, missing model dirs, parse errors, every command, a full disk, the traceback switch."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_saferlhf import cli
from lit_saferlhf.callbacks.checkpoints import AtomicCheckpointIO
from lit_saferlhf.errors import DiskFullError, expected_error, writing
from tests.bad_input.harness import (
    PKU_ROW,
    TINY_LLAMA,
    assert_names,
    fit_error,
    stage_config,
    user_error,
    write_jsonl,
)

CONFIGS = Path(__file__).resolve().parents[2] / "cli_configs"
ROW = {"prompt": "how do i bake bread", "response": "sure"}


@pytest.fixture
def sft_config(tmp_path: Path) -> Path:
    return stage_config(tmp_path, "sft", write_jsonl(tmp_path / "rows.jsonl", [ROW]))


# (flag, the full key the error names, the value found)
SFT_SETTINGS = [
    ("--model.init_args.optimizer.lr=-1e-3", "model.init_args.optimizer.lr", "-0.001"),
    ("--model.init_args.optimizer.lr=0", "model.init_args.optimizer.lr", "found 0"),
    ("--model.init_args.optimizer.weight_decay=-0.1", "model.init_args.optimizer.weight_decay", "-0.1"),
    ("--model.init_args.optimizer.warmup_ratio=1.5", "model.init_args.optimizer.warmup_ratio", "1.5"),
    ("--model.init_args.optimizer.betas=[1.0, 0.9]", "model.init_args.optimizer.betas", "(1.0, 0.9)"),
    ("--model.init_args.optimizer.eps=0", "model.init_args.optimizer.eps", "found 0"),
    ("--model.init_args.optimizer.min_lr_ratio=2", "model.init_args.optimizer.min_lr_ratio", "found 2"),
    ("--data.init_args.max_length=0", "data.init_args.max_length", "found 0"),
    ("--data.init_args.batch_size=0", "data.init_args.batch_size", "found 0"),
    ("--data.init_args.num_workers=-1", "data.init_args.num_workers", "found -1"),
    ("--data.init_args.limit=0", "data.init_args.limit", "found 0"),
    ("--data.init_args.val_fraction=1.5", "data.init_args.val_fraction", "1.5"),
    ("--data.init_args.val_fraction=-0.1", "data.init_args.val_fraction", "-0.1"),
]


@pytest.mark.parametrize(("flag", "key", "found"), SFT_SETTINGS, ids=[case[0][2:] for case in SFT_SETTINGS])
def test_a_setting_out_of_its_domain_names_its_full_key(flag: str, key: str, found: str, sft_config, capsys) -> None:
    line = fit_error(sft_config, capsys, flag)
    assert_names(line, f"error: {key}: expected", found)
    assert "Union" not in line  # our message wins over jsonargparse's wrapper


PPO_SETTINGS = [
    ("--model.init_args.ppo.minibatch_size=0", "model.init_args.ppo.minibatch_size"),
    ("--model.init_args.ppo.epochs=0", "model.init_args.ppo.epochs"),
    ("--model.init_args.ppo.clip_eps=0", "model.init_args.ppo.clip_eps"),
    ("--model.init_args.ppo.value_clip=-1", "model.init_args.ppo.value_clip"),
    ("--model.init_args.ppo.kl_coeff=-0.1", "model.init_args.ppo.kl_coeff"),
    ("--model.init_args.ppo.max_grad_norm=0", "model.init_args.ppo.max_grad_norm"),
    ("--model.init_args.generation.max_new_tokens=0", "model.init_args.generation.max_new_tokens"),
    ("--model.init_args.generation.temperature=-1", "model.init_args.generation.temperature"),
    ("--model.init_args.generation.top_p=0", "model.init_args.generation.top_p"),
    ("--model.init_args.generation.top_p=1.5", "model.init_args.generation.top_p"),
    ("--model.init_args.generation.top_k=-1", "model.init_args.generation.top_k"),
    ("--model.init_args.generation.num_return_sequences=0", "model.init_args.generation.num_return_sequences"),
    ("--model.init_args.actor_optimizer.lr=-1e-5", "model.init_args.actor_optimizer.lr"),
    ("--model.init_args.critic_optimizer.lr=0", "model.init_args.critic_optimizer.lr"),
]


@pytest.mark.parametrize(("flag", "key"), PPO_SETTINGS, ids=[case[0][2:] for case in PPO_SETTINGS])
def test_a_ppo_setting_out_of_its_domain(flag: str, key: str, capsys) -> None:
    # Checked when the settings are built, before the stage looks at its model dirs (absent in CI).
    line = fit_error(CONFIGS / "tiny" / "ppo_lag.yaml", capsys, flag)
    assert_names(line, f"error: {key}: expected")


# (solver, settings, the field named, what it must be, the value found)
SOLVERS = [
    ("DualAscent", {"cost_limit": 0.0, "lr": -1.0}, "lr", "a number > 0", "-1.0"),
    ("DualAscent", {"init_multiplier": -1.0, "linear": True}, "init_multiplier", "a number >= 0", "-1.0"),
    ("PIDLagrangian", {"cost_limit": 0.0, "kp": -1.0}, "kp", "a number >= 0", "-1.0"),
    ("PIDLagrangian", {"cost_limit": 0.0, "derivative_delay": 0}, "derivative_delay", "an integer >= 1", "found 0"),
    ("FixedPenalty", {"multiplier": -1.0}, "multiplier", "a number >= 0", "-1.0"),
]


@pytest.mark.parametrize(("solver", "settings", "field", "expected", "found"), SOLVERS, ids=[c[2] for c in SOLVERS])
def test_a_solver_setting_out_of_its_domain(
    solver: str, settings: dict, field: str, expected: str, found: str, capsys
) -> None:
    value = json.dumps({"class_path": f"lit_saferlhf_plugins.solvers.{solver}", "init_args": settings})
    line = fit_error(CONFIGS / "tiny" / "ppo_lag.yaml", capsys, f"--model.init_args.solver={value}")
    assert_names(line, f"error: model.init_args.solver.init_args.{field}: expected {expected}", solver, found)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("tiny/ppo_lag.yaml", "model.init_args.solver"),  # PPO-Lagrangian's own solver
        ("tiny/offline/c_dpo.yaml", "model.init_args.objective.init_args.solver"),  # nested in C-DPO's objective
    ],
)
def test_a_solver_error_names_the_key_where_the_solver_sits(config: str, key: str, capsys) -> None:
    value = json.dumps({"class_path": "lit_saferlhf_plugins.solvers.FixedPenalty", "init_args": {"multiplier": -1}})
    line = fit_error(CONFIGS / config, capsys, f"--{key}={value}")
    assert line.startswith(f"error: {key}.init_args.multiplier: expected a number >= 0"), line
    assert_names(line, "FixedPenalty", "found -1.0")


PPO_DIRS = ["policy", "reward_model", "cost_model", "reward_critic", "cost_critic"]


@pytest.mark.parametrize("key", PPO_DIRS)
def test_a_missing_ppo_model_dir(key: str, tmp_path: Path, capsys) -> None:
    present = [f"--model.init_args.{name}={tmp_path}" for name in PPO_DIRS if name != key]
    missing = f"--model.init_args.{key}={tmp_path / 'gone'}"
    line = fit_error(CONFIGS / "tiny" / "ppo_lag.yaml", capsys, *present, missing)
    assert line.startswith(f"error: model.init_args.{key}: model dir not found: {tmp_path / 'gone'}"), line


MODELS = [
    ("missing-dir", {"path": "{tmp}/no_model"}, "model.init_args.model.path: model dir not found: {tmp}/no_model"),
    ("relative-missing-dir", {"path": "outputs/none/sft/model"}, "model dir not found: outputs/none/sft/model"),
    ("a-file", {"path": "{tmp}/model.bin"}, "model.init_args.model.path: not a model dir (a file, expected a dir)"),
    ("missing-tokenizer", {"config": TINY_LLAMA, "tokenizer": "{tmp}/tok"}, "model.tokenizer: model dir not found"),
    ("path-and-config", {"path": "{tmp}", "config": TINY_LLAMA}, "model: set exactly one of `path`"),
    ("config-without-type", {"config": {"hidden_size": 8}, "tokenizer": "safety-world"}, "needs a `model_type` key"),
    ("config-without-tokenizer", {"config": TINY_LLAMA}, "model.tokenizer: a model built from `config` needs"),
]


@pytest.mark.parametrize(("model", "message"), [c[1:] for c in MODELS], ids=[c[0] for c in MODELS])
def test_model_settings(model: dict, message: str, tmp_path: Path, capsys) -> None:
    filled = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in model.items()}
    data = write_jsonl(tmp_path / "rows.jsonl", [ROW])
    (tmp_path / "model.bin").write_bytes(b"weights")
    line = fit_error(stage_config(tmp_path, "sft", data, model=filled), capsys)
    assert_names(line, message.format(tmp=tmp_path))
    assert "Repo id" not in line


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_an_unknown_dtype(stage: str, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "rows.jsonl", [ROW])
    line = fit_error(stage_config(tmp_path, stage, data), capsys, "--model.init_args.dtype=float8")
    assert_names(line, "model.init_args.dtype: expected one of bfloat16, float16, float32, found 'float8'")


def test_a_name_that_is_neither_a_dir_nor_a_hub_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait in the test
    data = write_jsonl(tmp_path / "rows.jsonl", [ROW])
    line = fit_error(stage_config(tmp_path, "sft", data, model={"path": "no-such-dir-xq7"}), capsys)
    assert_names(line, "model.init_args.model.path: model dir not found, nor a model on the hub: no-such-dir-xq7 (")


PARSE_ERRORS = [
    ("--trainer.max_epochs=abc", "trainer.max_epochs: expected int"),
    ("--data.init_args.on_bad_record=maybe", "on_bad_record"),
    ("--data.init_args.batch_size=many", "batch_size"),
    ("--no_such_option=1", "unrecognized arguments: --no_such_option=1"),
    ("--config=/no/such/config.yaml", "/no/such/config.yaml"),
]


@pytest.mark.parametrize(("flag", "part"), PARSE_ERRORS, ids=[case[0][2:] for case in PARSE_ERRORS])
def test_parse_errors_are_one_line(flag: str, part: str, sft_config: Path, capsys) -> None:
    assert_names(fit_error(sft_config, capsys, flag), part, "--help")


def test_lightning_settings_that_do_not_go_together(sft_config: Path, capsys) -> None:
    flags = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.enable_checkpointing=false"]
    assert_names(fit_error(sft_config, capsys, *flags), "enable_checkpointing=False", "ModelCheckpoint")


# ----------------------------------------------------------------------------------------------
# Every command
# ----------------------------------------------------------------------------------------------


def test_validate(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [ROW, {"prompt": "x"}])
    line = user_error(["validate", f"--config={stage_config(tmp_path, 'sft', path)}"], capsys)
    assert_names(line, "rows.jsonl:line 2", "'response'")


def test_export_of_a_missing_checkpoint(tmp_path: Path, sft_config: Path, capsys) -> None:
    args = ["export", f"--config={sft_config}", f"--ckpt_path={tmp_path / 'none.ckpt'}", f"--out={tmp_path / 'out'}"]
    assert_names(user_error(args, capsys), f"--ckpt_path {tmp_path / 'none.ckpt'}: no such file or folder")


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path: Path, sft_config: Path, capsys) -> None:
    (tmp_path / "x.ckpt").write_text("not a checkpoint")
    args = ["export", f"--config={sft_config}", f"--ckpt_path={tmp_path / 'x.ckpt'}", f"--out={tmp_path / 'out'}"]
    assert_names(user_error(args, capsys), "x.ckpt: not a checkpoint that torch.load reads safely")


def test_pipeline_stage_with_bad_data(tmp_path: Path, capsys) -> None:
    config = stage_config(
        tmp_path, "reward", write_jsonl(tmp_path / "pairs.jsonl", [PKU_ROW, {**PKU_ROW, "prompt": 1}])
    )
    pipeline = {"out_dir": str(tmp_path / "out"), "stages": [{"name": "reward", "config": str(config)}]}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    line = user_error(["pipeline", f"--config={tmp_path / 'pipeline.yaml'}"], capsys)
    assert_names(line, "pairs.jsonl:line 2", "'prompt'")


@pytest.mark.parametrize("command", ["pipeline", "evaluate"])
def test_a_command_option_of_the_wrong_type(command: str, tmp_path: Path, capsys) -> None:
    option = {"pipeline": "--checkpoint_every=often", "evaluate": "--max_new_tokens=many"}[command]
    line = user_error([command, f"--out_dir={tmp_path}", option], capsys)
    assert_names(line, option.split("=")[0].strip("-"), "expected int", "--help")


def test_evaluate_with_a_missing_policy_dir(tmp_path: Path, capsys) -> None:
    args = [
        "evaluate",
        f"--policies={{sft: {tmp_path / 'gone'}}}",
        f"--reward_model={tmp_path}",
        f"--cost_model={tmp_path}",
        "--prompt_sets=[safety-world:prompts-eval]",
        f"--out_dir={tmp_path / 'eval'}",
    ]
    assert_names(user_error(args, capsys), f"policies.sft: model dir not found: {tmp_path / 'gone'}")


def test_world_without_its_folder_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["world"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    assert "--out" in err


# ----------------------------------------------------------------------------------------------
# A full disk, the traceback switch, unexpected errors, the console script
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full")
def test_a_full_disk_anywhere_in_a_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    def write_world(*args: object, **kwargs: object) -> dict:
        with open("/dev/full", "w") as handle:  # a real ENOSPC from the kernel (open and write only)
            handle.write("x" * 65536)
            handle.flush()
        return {}

    monkeypatch.setattr("lit_saferlhf.commands.world.write_world", write_world)
    assert_names(user_error(["world", f"--out={tmp_path}"], capsys), "error: disk full while writing")


def test_torch_save_on_a_full_disk_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def short_write(obj: object, path: object) -> None:  # what torch.save says when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", short_write)
    expected = r"disk full while writing model\.ckpt \(.*unexpected pos"
    with pytest.raises(DiskFullError, match=expected), writing("model.ckpt"):
        torch.save({"weights": torch.zeros(4)}, "model.ckpt")


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def full(obj: object, path: object) -> None:
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=f"disk full while writing {target}"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is gone


def test_enospc_in_the_cause_chain_is_a_full_disk() -> None:
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/data/x.bin")
    assert str(expected_error(wrapped)) == "disk full while writing /data/x.bin (No space left on device)"


def test_a_library_error_around_enospc_is_a_full_disk() -> None:
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')
    assert str(expected_error(wrapped)).startswith("disk full while writing")


@pytest.mark.parametrize("switch", ["flag", "environment"])
def test_the_traceback_switch(switch: str, sft_config: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    args = ["fit", f"--config={sft_config}", "--data.init_args.batch_size=0"]
    if switch == "flag":
        args.insert(0, "--traceback")
    else:
        monkeypatch.setenv("LIT_SAFERLHF_TRACEBACK", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" in err
    assert err.strip().endswith("found 0")


def test_an_unexpected_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(argv: list[str]) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr("lit_saferlhf.commands.world.world_command", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["world"])


def console_script(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lit-saferlhf")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lit_saferlhf.cli"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([*command, *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning (~5 s, more on a busy machine)
def test_the_console_script_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    config = stage_config(tmp_path, "sft", write_jsonl(tmp_path / "rows.jsonl", [ROW, {"prompt": "", "response": "x"}]))
    result = console_script(["fit", f"--config={config}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'rows.jsonl'}:line 2: field 'prompt': expected a non-empty string, found ''"
    )


def test_the_traceback_is_shown_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LIT_SAFERLHF_TRACEBACK=1``: the traceback, then the same one line (in-process: the console script's own
    process is tested above)."""
    config = stage_config(tmp_path, "sft", write_jsonl(tmp_path / "rows.jsonl", [ROW]))
    monkeypatch.setenv("LIT_SAFERLHF_TRACEBACK", "1")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["fit", f"--config={config}", "--model.init_args.optimizer.lr=-1"])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: model.init_args.optimizer.lr: expected")
