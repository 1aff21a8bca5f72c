"""Ctrl-C (SIGINT), issue 24 item 10: training saves at the step boundary and exits 130 saying where to resume;
``evaluate`` stops with one line and keeps the answers of the policies that had finished."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

import lit_saferlhf.commands.evaluate as evaluate_command
from lit_saferlhf.cli import main
from tests.distributed.test_reliability import (
    TOTAL_STEPS,
    finish,
    global_step,
    sft_args,
    start,
    train_steps,
    wait_until,
)


@pytest.mark.slow
def test_ctrl_c_during_training_saves_at_the_step_boundary_and_exits_130(tmp_path: Path) -> None:
    last, log = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "run.log"
    run = start(sft_args(tmp_path, every=100), log)  # no periodic save before the interrupt
    wait_until(lambda: len(train_steps(tmp_path, 0)) >= 2, run, log)
    run.send_signal(signal.SIGINT)
    finish(run, log, 128 + signal.SIGINT)
    interrupted_at = global_step(last)
    assert 2 <= interrupted_at < TOTAL_STEPS
    output = log.read_text()
    assert f"SIGINT: saved the run at step {interrupted_at} to {last}; resume with --ckpt_path {last}" in output
    assert "Traceback" not in output
    assert "KeyboardInterrupt" not in output


def fake_model_dir(path: Path, architecture: str, **config: object) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": [architecture], **config}))
    return str(path)


def test_ctrl_c_during_evaluate_keeps_the_finished_policies_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def generate_all(policies: dict[str, str], sets: dict, **options: Any) -> list[dict[str, Any]]:
        (name,) = policies
        if name == "b":  # Ctrl-C while the second policy answers
            raise KeyboardInterrupt
        return [{"policy": name, "set": "s", "source": "s:line 1", "prompt": "hi", "response": "hello"}]

    monkeypatch.setattr(evaluate_command, "generate_all", generate_all)
    a, b = (fake_model_dir(tmp_path / name, "LlamaForCausalLM") for name in ("a", "b"))
    score = fake_model_dir(tmp_path / "score", "LlamaForSequenceClassification", num_labels=1)
    out = tmp_path / "eval"
    args = [f"--policies={{a: {a}, b: {b}}}", f"--reward_model={score}", f"--cost_model={score}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *args, "--prompt_sets=[safety-world:prompts-eval]", "--limit=2", f"--out_dir={out}"])
    assert exit_info.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    kept = out / "generations.partial.jsonl"
    assert err.strip().splitlines() == [f"interrupted: the answers of a (1, unscored) kept in {kept}"]
    assert [json.loads(line)["policy"] for line in kept.read_text().splitlines()] == ["a"]
    assert not (out / "generations.jsonl").exists()
