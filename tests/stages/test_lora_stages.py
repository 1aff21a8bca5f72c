"""LoRA in every stage through the CLI: adapters train, exports merge, checkpoints are small and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import CONFIGS, column, fit, metrics

LORA = f"--config={CONFIGS / 'peft/lora.yaml'}"


def sft_lora(tiny_models: dict[str, Path], out: Path, *overrides: str) -> Path:
    """LoRA SFT from the tiny SFT export (a pretrained base), 3 short epochs."""
    config = yaml.safe_load((CONFIGS / "tiny/sft.yaml").read_text())
    config["model"]["init_args"]["model"] = {"path": str(tiny_models["sft"])}  # a pretrained base, not a config
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft.yaml").write_text(yaml.safe_dump(config))
    return fit(
        str(out / "sft.yaml"),
        out,
        LORA,
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.max_epochs=3",
        *overrides,
    )


def only_checkpoint(stage_dir: Path) -> Path:
    (checkpoint,) = (stage_dir / "logs").glob("version_0/checkpoints/*.ckpt")
    return checkpoint


def test_lora_sft_trains_adapters_only_and_exports_a_merged_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = sft_lora(tiny_models, tmp_path)
    base, merged = load_file(tiny_models["sft"] / "model.safetensors"), load_file(export / "model.safetensors")
    assert merged.keys() == base.keys()  # a plain Hugging Face dir: no adapter or base_layer names
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed  # adapters were on and merged in
    assert all(name.endswith("_proj.weight") for name in changed), changed  # only adapted layers moved
    checkpoint = torch.load(only_checkpoint(tmp_path), weights_only=True)
    assert checkpoint["state_dict"]
    assert all(".lora_A." in key or ".lora_B." in key for key in checkpoint["state_dict"])
    assert any(value.abs().sum() > 0 for key, value in checkpoint["state_dict"].items() if ".lora_B." in key)
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(checkpoint["state_dict"])  # Adam moments of the adapters only


def test_lora_checkpoint_exports_with_the_export_command(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from lit_saferlhf.cli import main

    export = sft_lora(tiny_models, tmp_path / "run", "--trainer.max_epochs=1")
    out = tmp_path / "exported"
    fit_args = ["--config", str(tmp_path / "run" / "sft.yaml"), "--config", str(CONFIGS / "peft/lora.yaml")]
    main(["export", *fit_args, f"--ckpt_path={only_checkpoint(tmp_path / 'run')}", f"--out={out}"])
    expected, found = load_file(export / "model.safetensors"), load_file(out / "model.safetensors")
    assert found.keys() == expected.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


def test_lora_sft_resumes_exactly(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # A constant lr: a cosine schedule would depend on max_epochs, which the first half sets lower.
    flat = ["--model.init_args.optimizer.schedule=constant", "--model.init_args.optimizer.warmup_ratio=0.0"]
    straight = sft_lora(tiny_models, tmp_path / "straight", *flat)
    sft_lora(tiny_models, tmp_path / "first", *flat, "--trainer.max_epochs=2")
    resumed = sft_lora(tiny_models, tmp_path / "first", *flat, f"--ckpt_path={only_checkpoint(tmp_path / 'first')}")
    expected, found = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in expected:
        assert torch.equal(found[name], expected[name]), name


@pytest.mark.parametrize("stage", ["reward", "cost"])
def test_lora_score_models_train_head_and_adapters(stage: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = fit(
        f"tiny/{stage}.yaml",
        tmp_path,
        LORA,
        f"--model.init_args.model.path={tiny_models['sft']}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
    )
    backbone = load_file(export / "model.safetensors")  # a merged export: *ForSequenceClassification weights
    assert backbone["score.weight"].abs().sum() > 0
    checkpoint = torch.load(only_checkpoint(tmp_path), weights_only=True)
    trained = {key for key in checkpoint["state_dict"] if not key.startswith("model.normalizer.")}
    assert "model.score_head.weight" in trained
    assert all(".lora_" in key for key in trained - {"model.score_head.weight"})
    assert not any("lora" in key or "base_layer" in key for key in backbone)
    assert column(metrics(tmp_path), "train_epoch/accuracy")


def ppo_lora(tiny_models: dict[str, Path], out: Path, *overrides: str, rollouts: int = 3) -> Path:
    """A few LoRA PPO-Lagrangian rollouts (8 prompts each) from the session's tiny models."""
    return fit(
        "tiny/ppo_lag.yaml",
        out,
        LORA,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        f"--trainer.limit_train_batches={rollouts}",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
        *overrides,
    )


@pytest.mark.parametrize(("cost_limit", "direction"), [(-100.0, 1), (100.0, -1)])
def test_lora_ppo_lag_moves_the_multiplier_as_full_fine_tuning_does(
    cost_limit: float, direction: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    export = ppo_lora(
        tiny_models,
        tmp_path,
        f"--model.init_args.solver.init_args.cost_limit={cost_limit}",
        "--model.init_args.solver.init_args.linear=true",
    )
    history = json.loads((export / "multiplier_history.json").read_text())["multiplier"]
    assert len(history) == 3
    steps = [later - earlier for earlier, later in zip([1.0, *history[:-1]], history, strict=True)]
    assert all(step * direction > 0 or value in (0.0, 5.0) for step, value in zip(steps, history, strict=True)), history
    assert history[-1] != 1.0
    rows = metrics(tmp_path)
    for name in ("rollout/kl", "loss/actor", "loss/reward_critic", "loss/cost_critic"):
        assert all(torch.isfinite(torch.tensor(column(rows, name)))), name
    assert column(rows, "rollout/kl")[0] == pytest.approx(0.0, abs=1e-6)  # B = 0 at start: actor == reference
    base, merged = load_file(tiny_models["sft"] / "model.safetensors"), load_file(export / "model.safetensors")
    assert merged.keys() == base.keys()
    assert any(not torch.equal(base[name], merged[name]) for name in base)


def test_lora_ppo_checkpoint_holds_the_trainable_tensors_and_resumes(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    common = ["--model.init_args.solver.init_args.cost_limit=-100.0"]
    straight = ppo_lora(tiny_models, tmp_path / "straight", *common, "--trainer.max_epochs=2", rollouts=2)
    ppo_lora(tiny_models, tmp_path / "first", *common, rollouts=2)
    checkpoint_path = only_checkpoint(tmp_path / "first")
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    trained = {key for key in state if ".normalizer." not in key}
    heads = {key for key in trained if key.startswith(("reward_critic.score_head.", "cost_critic.score_head."))}
    assert {"reward_critic.score_head.weight", "cost_critic.score_head.weight"} <= heads  # (a bias only if saved)
    assert all(".lora_" in key for key in trained - heads), trained - heads
    assert not any(key.startswith(("reference.", "reward_model.score_head", "cost_model.score_head")) for key in state)
    resumed = ppo_lora(
        tiny_models, tmp_path / "first", *common, "--trainer.max_epochs=2", f"--ckpt_path={checkpoint_path}", rollouts=2
    )
    history = json.loads((resumed / "multiplier_history.json").read_text())["multiplier"]
    expected = json.loads((straight / "multiplier_history.json").read_text())["multiplier"]
    torch.testing.assert_close(torch.tensor(history), torch.tensor(expected))
    expected_weights, found = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in expected_weights:
        torch.testing.assert_close(found[name], expected_weights[name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "fsdp2"])
def test_lora_ppo_lag_runs_on_two_processes(strategy: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.distributed.test_strategies import QUICK, STRATEGIES, fit_on_two_processes, stage_overrides

    checks = tmp_path / "checks"
    checks.mkdir()
    setup = [f"--config={CONFIGS / 'tiny/ppo_lag.yaml'}", *STRATEGIES[strategy], LORA]
    overrides = ["--trainer.callbacks+=rank_checks.RecordRanks", *QUICK, *stage_overrides("ppo_lag", tiny_models)]
    run = fit_on_two_processes(setup, tmp_path, *overrides, env={"RANK_CHECKS_DIR": str(checks)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    records = [json.loads((checks / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["world_size"] for record in records] == [2, 2]
    assert len(records[0]["multipliers"]) == 2
    assert all(gathered[0] == gathered[1] for gathered in records[0]["multipliers"])  # one λ on both ranks
    if strategy == "fsdp2":
        assert all(record["sharded_params"] > 0 for record in records)
    base, merged = load_file(tiny_models["sft"] / "model.safetensors"), load_file(tmp_path / "model/model.safetensors")
    assert merged.keys() == base.keys()  # gathered and merged into one plain Hugging Face dir
    assert any(not torch.equal(base[name], merged[name]) for name in base)


@pytest.mark.slow
def test_lora_sft_resumes_exactly_under_fsdp2(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.distributed.test_strategies import STRATEGIES, fit_on_two_processes

    config = yaml.safe_load((CONFIGS / "tiny/sft.yaml").read_text())
    config["model"]["init_args"]["model"] = {"path": str(tiny_models["sft"])}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    setup = [f"--config={tmp_path / 'sft.yaml'}", *STRATEGIES["fsdp2"], LORA]
    quick = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
             "--model.init_args.optimizer.schedule=constant",
             "--model.init_args.optimizer.warmup_ratio=0.0"]  # fmt: skip

    def run(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
        done = fit_on_two_processes(setup, out, *quick, *overrides)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return load_file(out / "model" / "model.safetensors")

    straight = run(tmp_path / "straight", "--trainer.max_epochs=2")
    run(tmp_path / "first", "--trainer.max_epochs=1")
    (checkpoint,) = (tmp_path / "first" / "logs").glob("version_0/checkpoints/*.ckpt")  # a distributed folder
    resumed = run(tmp_path / "first", "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_lora_offline_reference_is_the_policy_with_its_adapters_off(tiny_models: dict[str, Path]) -> None:
    from lit_saferlhf.data.tokenizers import load_tokenizer
    from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm
    from lit_saferlhf.models.frozen import ReferencePolicy
    from lit_saferlhf.models.peft import LoraArgs
    from lit_saferlhf.stages import PreferenceOptimization
    from lit_saferlhf.stages.preference import summed_logprobs
    from lit_saferlhf_plugins.objectives import DPO

    stage = PreferenceOptimization(policy=str(tiny_models["sft"]), objective=DPO(), lora=LoraArgs(r=4))
    stage.configure_model()
    assert isinstance(stage.reference, ReferencePolicy)  # no second copy of the policy
    with torch.no_grad():
        for name, param in stage.policy.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)  # trained adapters: the policy now differs from its base
    tokenizer = load_tokenizer(ModelSource(path=str(tiny_models["sft"])))
    sft = build_causal_lm(ModelSource(path=str(tiny_models["sft"])), tokenizer).eval()
    ids = torch.randint(5, 100, (2, 12))
    attention, weights = torch.ones_like(ids), torch.ones(2, 11)
    with torch.no_grad():
        expected = summed_logprobs(sft, ids, attention, weights)
        assert torch.equal(summed_logprobs(stage.reference, ids, attention, weights), expected)
        assert not torch.allclose(summed_logprobs(stage.policy, ids, attention, weights), expected)


def test_lora_offline_stage_trains_adapters_and_exports_merged(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    sft = tiny_models["sft"]
    export = fit(
        "tiny/offline/dpo.yaml", tmp_path, LORA, f"--model.init_args.policy={sft}", "--trainer.max_steps=3",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=1", "--data.init_args.limit=96",
        "--data.init_args.batch_size=8",
    )  # fmt: skip
    base, merged = load_file(sft / "model.safetensors"), load_file(export / "model.safetensors")
    assert merged.keys() == base.keys()  # a plain Hugging Face dir with the adapters folded in
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed
    assert all(name.endswith("_proj.weight") for name in changed), changed
    assert (export / "objective.json").is_file()
    checkpoint = torch.load(only_checkpoint(tmp_path), weights_only=True)
    assert checkpoint["state_dict"]
    assert all(".lora_A." in key or ".lora_B." in key for key in checkpoint["state_dict"])  # no frozen base
