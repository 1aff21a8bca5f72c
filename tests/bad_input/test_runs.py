"""What a run owns: its checkpoints (another run's, another stage's), its run dir (a lock), its outputs.

One tiny SFT run is trained once for the module (one step, ~2 s): ``trained`` is its run dir, with
``checkpoints/last.ckpt`` and the export ``model/``. Cases copy it where they need a run's checkpoints.
The refusals come at ``setup``, before any network is built; the few cases that must train (a resume,
a run that replaces another run's checkpoints, a lock taken over) train one step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lit_saferlhf.callbacks.runs import LOCK_NAME, RUN_KEY, RunDirLock
from lit_saferlhf.cli import main
from tests.bad_input.harness import PKU_ROW, assert_names, fit_error, stage_config, user_error, write_jsonl

ROWS = [{"prompt": "how do i bake bread", "response": "mix flour and water"}] * 4
"""Four demonstrations: two steps an epoch, in batches of 2."""


def run_flags(run: Path, *more: str) -> list[str]:
    """One step, with outputs under ``run``: ``checkpoints/`` (with ``last.ckpt``) and the export ``model/``."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "every_n_train_steps": 1},
    }
    return [
        f"--trainer.default_root_dir={run}",
        f"--trainer.callbacks+={json.dumps(checkpoint)}",
        f"--model.init_args.export_dir={run / 'model'}",
        "--trainer.max_steps=1",
        *more,
    ]


def run_id(checkpoint: Path) -> str:
    return torch.load(checkpoint, weights_only=True)[RUN_KEY]["run_id"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir of a finished one-step SFT run."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", f"--config={sft_config(root)}", *run_flags(root / "run")])
    return root / "run"


def sft_config(folder: Path, stage: str = "sft") -> Path:
    return stage_config(folder, stage, write_jsonl(folder / "rows.jsonl", ROWS), batch_size=2)


def copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to)
    return to


# ----------------------------------------------------------------------------------------------
# Checkpoints of another run (issue 24, item 3)
# ----------------------------------------------------------------------------------------------


def test_a_fresh_run_in_a_dir_that_holds_another_runs_checkpoints(trained: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    before = sorted(path.name for path in (run / "checkpoints").iterdir())
    line = fit_error(sft_config(tmp_path), capsys, *run_flags(run))
    assert_names(
        line,
        f"error: {run / 'checkpoints'} holds checkpoints of another run (",
        "last.ckpt",
        f"resume that run with --ckpt_path {run / 'checkpoints'}",
        "--replace_checkpoints=true to delete them",
    )
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == before  # no last-v1.ckpt
    assert not (run / LOCK_NAME).exists()  # released on the way out


def test_a_resume_into_a_dir_that_holds_another_runs_checkpoints(trained: Path, tmp_path: Path, capsys) -> None:
    other = copy_run(trained, tmp_path / "other")
    for path in (other / "checkpoints").glob("*.ckpt"):  # as another run would have written them
        checkpoint = torch.load(path, weights_only=True)
        checkpoint[RUN_KEY]["run_id"] = "another-run"
        torch.save(checkpoint, path)
    resumed = trained / "checkpoints" / "last.ckpt"
    line = fit_error(sft_config(tmp_path), capsys, *run_flags(other, f"--ckpt_path={resumed}"))
    assert_names(line, f"{other / 'checkpoints'} holds checkpoints of another run than the one {resumed} belongs to")


def test_replace_checkpoints_deletes_another_runs_and_starts_a_new_one(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path / "run")
    main(["fit", f"--config={sft_config(tmp_path)}", *run_flags(run), "--replace_checkpoints=true"])
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert run_id(run / "checkpoints" / "last.ckpt") != run_id(trained / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("how", ["path", "last"])
def test_a_run_resumes_from_its_own_dir_and_stays_the_same_run(how: str, tmp_path: Path) -> None:
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    main(["fit", f"--config={sft_config(tmp_path)}", *run_flags(run)])  # in place: a moved run dir is another case
    started = run_id(last)
    flags = run_flags(run, f"--ckpt_path={last if how == 'path' else 'last'}", "--trainer.max_steps=2")
    main(["fit", f"--config={sft_config(tmp_path)}", *flags])
    saved = torch.load(last, weights_only=True)
    assert (saved["global_step"], saved[RUN_KEY]["run_id"]) == (2, started)
    assert sorted(path.name for path in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_a_checkpoint_resumed_in_a_fresh_dir_continues_its_run_there(trained: Path, tmp_path: Path) -> None:
    fresh, resumed = tmp_path / "fresh", trained / "checkpoints" / "last.ckpt"
    exported = (trained / "model" / "model.safetensors").read_bytes()
    main(
        [
            "fit",
            f"--config={sft_config(tmp_path)}",
            *run_flags(fresh, f"--ckpt_path={resumed}", "--trainer.max_steps=2"),
        ]
    )
    assert run_id(fresh / "checkpoints" / "last.ckpt") == run_id(resumed)
    assert (fresh / "model" / "model.safetensors").read_bytes() != exported  # the export this command line names
    assert (trained / "model" / "model.safetensors").read_bytes() == exported  # not the checkpoint's own export_dir


# ----------------------------------------------------------------------------------------------
# The run dir's lock (item 4)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path / "run"``, locked by this process as a running fit locks it."""
    (tmp_path / "run").mkdir()
    lock = RunDirLock(tmp_path / "run")
    lock.acquire()
    yield tmp_path / "run"
    lock.release()


def test_a_run_dir_that_another_running_fit_holds(held: Path, tmp_path: Path, capsys) -> None:
    line = fit_error(sft_config(tmp_path), capsys, *run_flags(held))
    assert_names(
        line,
        f"error: {held} is the run dir of a run that is still going (pid {os.getpid()} on host {socket.gethostname()}",
        f"lock file {held / LOCK_NAME}",
        "another trainer.default_root_dir",
    )
    assert not (held / "checkpoints" / "last.ckpt").exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run").mkdir()
    dead = {"host": socket.gethostname(), "pid": int(ended.stdout), "since": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(dead))  # what a kill -9 leaves: a file nobody locks
    main(["fit", f"--config={sft_config(tmp_path)}", *run_flags(tmp_path / "run")])
    assert f"Taking over the lock of pid {dead['pid']} on host {dead['host']}" in caplog.text
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------
# Outputs: an export dir that is a file (item 5), exports' modes (item 6), writability (item 9)
# ----------------------------------------------------------------------------------------------


def test_an_export_dir_that_is_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "model").write_text("notes")
    flags = [f"--model.init_args.export_dir={tmp_path / 'model'}"]
    line = fit_error(sft_config(tmp_path), capsys, *flags)
    assert_names(line, "error: model.init_args.export_dir: expected a dir", "not a file", str(tmp_path / "model"))
    assert (tmp_path / "model").read_text() == "notes"
    assert not list(tmp_path.glob(".model.*"))


def test_export_out_that_is_a_file(trained: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "model").write_text("notes")
    last = trained / "checkpoints" / "last.ckpt"
    args = ["export", f"--config={sft_config(tmp_path)}", f"--ckpt_path={last}", f"--out={tmp_path / 'model'}"]
    assert_names(user_error(args, capsys), "error: --out: expected a dir or a path not there yet", "model")
    assert (tmp_path / "model").read_text() == "notes"


@pytest.fixture
def umask_027() -> Iterator[None]:
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_exports_get_the_modes_of_the_users_umask(trained: Path, tmp_path: Path, umask_027: None) -> None:
    last, out = trained / "checkpoints" / "last.ckpt", tmp_path / "model"
    main(["export", f"--config={sft_config(tmp_path)}", f"--ckpt_path={last}", f"--out={out}"])
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [out, *out.iterdir()]}
    assert modes.pop("model") == 0o750
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o640}, modes  # safetensors alone would be 0600, the dir 0700


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A dir this process cannot write in: mode 0555, or (for root, whom modes do not stop) ``/sys``."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        folder = Path("/sys")
    try:
        (folder / "probe").touch()
    except OSError:
        yield folder
    else:
        (folder / "probe").unlink()
        pytest.skip(f"{folder} is writable here")
    finally:
        (tmp_path / "read-only").chmod(0o755)


OUTPUTS = [
    # (the setting under the unwritable dir, the key the line names)
    ("--model.init_args.export_dir={}/model", "model.init_args.export_dir's parent"),
    ("--trainer.default_root_dir={}/run", "trainer.default_root_dir"),
    (
        '--trainer.logger={{"class_path": "lightning.pytorch.loggers.CSVLogger", '
        '"init_args": {{"save_dir": "{}/logs"}}}}',
        "trainer.logger's save_dir",
    ),
    (
        '--trainer.callbacks+={{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        '"init_args": {{"dirpath": "{}/checkpoints"}}}}',
        "the ModelCheckpoint's dirpath",
    ),
]


@pytest.mark.parametrize(("flag", "key"), OUTPUTS, ids=["export_dir", "default_root_dir", "logger", "checkpoints"])
def test_an_output_that_cannot_be_written(flag: str, key: str, unwritable: Path, tmp_path: Path, capsys) -> None:
    line = fit_error(sft_config(tmp_path), capsys, flag.format(unwritable))
    assert_names(line, key, "a dir that can be created and written to", str(unwritable))


def test_lora_target_modules_the_model_does_not_have(tmp_path: Path, capsys) -> None:
    line = fit_error(sft_config(tmp_path), capsys, '--model.init_args.lora={"target_modules": ["q_proj", "vproj"]}')
    assert_names(
        line,
        "lora.target_modules: ['vproj'] match no module of LlamaForCausalLM (asked for ['q_proj', 'vproj'])",
        "its linear layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj',",
    )


# ----------------------------------------------------------------------------------------------
# A checkpoint of another stage or datamodule (item 7)
# ----------------------------------------------------------------------------------------------

OTHER_STAGES = [
    # (the configs' stage, what the line says this run is)
    ("reward", "this run is RewardModelModule on RewardData"),
    ("prompt", "this run is SFTModule on PromptData"),  # the SFT stage fed by another datamodule
]


@pytest.mark.parametrize(("stage", "run_is"), OTHER_STAGES, ids=[case[0] for case in OTHER_STAGES])
def test_a_checkpoint_of_another_stage(stage: str, run_is: str, trained: Path, tmp_path: Path, capsys) -> None:
    last = trained / "checkpoints" / "last.ckpt"
    config = stage_config(
        tmp_path, stage, write_jsonl(tmp_path / "rows.jsonl", [PKU_ROW] if stage == "reward" else ROWS)
    )
    line = fit_error(config, capsys, f"--ckpt_path={last}")
    assert_names(line, f"error: checkpoint {last} was written by SFTModule on SFTData, but {run_is}")


def test_a_checkpoint_of_another_stage_found_as_last(trained: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(trained, tmp_path / "run")
    config = stage_config(tmp_path, "prompt", write_jsonl(tmp_path / "rows.jsonl", ROWS))
    line = fit_error(config, capsys, *run_flags(run, "--ckpt_path=last"))
    last = run / "checkpoints" / "last.ckpt"
    assert_names(line, f"error: checkpoint {last} was written by SFTModule on SFTData, but this run is SFTModule")
