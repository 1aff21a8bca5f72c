"""Equilibrate RLHF through the CLI: ADPO, FDC-ADPO and APPO configs run a few steps from the tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_saferlhf.cli import main
from lit_saferlhf.errors import ConfigError
from lit_saferlhf.stages.ppo_lag import APPOArgs, PPOArgs
from lit_saferlhf_plugins.objectives.ama import AMA
from tests.helpers import CONFIGS, column, fit, metrics


def test_appo_needs_the_per_sequence_mean() -> None:
    with pytest.raises(ConfigError, match="loss_aggregation: expected sequence_mean with appo"):
        PPOArgs(appo=APPOArgs(), loss_aggregation="token_mean")


def test_appo_refuses_a_critic_free_estimator(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([
            "fit", f"--config={CONFIGS / 'tiny' / 'grpo_lag.yaml'}",
            f"--model.init_args.policy={tiny_models['sft']}", f"--model.init_args.reward_model={tiny_models['reward']}",
            f"--model.init_args.cost_model={tiny_models['cost']}", "--model.init_args.ppo.appo.baseline=0.0",
            "--model.init_args.ppo.loss_aggregation=sequence_mean", f"--trainer.default_root_dir={tmp_path}",
        ])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.ppo.appo: APPO masks tokens by critic values; GroupNormalized has no critic" in err


@pytest.mark.slow
def test_appo_lag_config_runs_and_masks_some_tokens(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    export = fit(
        "tiny/appo_lag.yaml",
        tmp_path,
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.reward_model={tiny_models['reward']}",
        f"--model.init_args.cost_model={tiny_models['cost']}",
        "--trainer.limit_train_batches=2",
        "--data.init_args.batch_size=8",
        "--model.init_args.ppo.minibatch_size=4",
    )
    kept = column(metrics(tmp_path), "policy/ama_kept_fraction")
    assert kept
    assert all(0 < value < 1 for value in kept)
    assert all(math.isfinite(value) for value in column(metrics(tmp_path), "loss/actor"))
    assert (export / "model.safetensors").is_file()


def test_adpo_scores_every_token_of_a_real_cost_model(tiny_models: dict[str, Path]) -> None:
    from lit_saferlhf.data.safety_world import build_tokenizer
    from lit_saferlhf.stages.preference import PreferenceOptimization
    from lit_saferlhf_plugins.objectives import DPO

    tokenizer = build_tokenizer()
    texts = ["how do i make a bomb sure you need fuse and pipe", "how do i make a bomb sorry i can not help with that"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    ama = AMA(str(tiny_models["cost"]), negate=True)
    stage = PreferenceOptimization(policy=str(tiny_models["sft"]), objective=DPO(pairs="safety", ama=ama))
    stage.configure_model()  # the stage builds the scorer through the objective's frozen_networks hook
    assert not any(parameter.requires_grad for parameter in stage.objective_networks["ama"].parameters())  # frozen
    scores = ama.token_scores(stage.objective_networks["ama"], encoded["input_ids"], encoded["attention_mask"])
    assert scores.shape == encoded["input_ids"].shape
    assert torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny/offline/adpo.yaml", "examples/fdc_adpo.yaml"])
def test_adpo_configs_run_and_train_the_policy(
    config: str, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # fdc_adpo.yaml reads outputs/fdc/pairs.jsonl, which select writes first
    main(["select", "--data", "safety-world:pairs-risk", "--total", "56", "--out", "outputs/fdc/pairs.jsonl"])
    export = fit(
        config,
        tmp_path / "run",
        f"--model.init_args.policy={tiny_models['sft']}",
        f"--model.init_args.objective.init_args.ama.path={tiny_models['cost']}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=8",
    )
    before, after = load_file(tiny_models["sft"] / "model.safetensors"), load_file(export / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(math.isfinite(value) for value in column(metrics(tmp_path / "run"), "val/loss"))


def test_the_stage_sums_policy_and_reference_over_the_same_adpo_masks(tiny_models: dict[str, Path]) -> None:
    from lit_saferlhf.data.safety_world import build_tokenizer
    from lit_saferlhf.stages.preference import PreferenceOptimization, summed_logprobs
    from lit_saferlhf_plugins.objectives import DPO

    ama = AMA(str(tiny_models["cost"]), negate=True)
    stage = PreferenceOptimization(policy=str(tiny_models["sft"]), objective=DPO(pairs="safety", ama=ama))
    stage.configure_model()
    tokenizer = build_tokenizer()
    prompt = "BEGINNING OF CONVERSATION: USER: how do i make a bomb ASSISTANT:"
    responses = ["sorry i can not help with that but please ask a sheriff", "sure you need fuse pipe and fuel"]
    ids = [tokenizer(f"{prompt} {r}</s>")["input_ids"] for r in responses]
    start = len(tokenizer(prompt)["input_ids"])
    length = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([row + [0] * (length - len(row)) for row in ids]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids]),
        "response_mask": torch.tensor([[i >= start and i < len(row) for i in range(length)] for row in ids]),
        "safer": torch.tensor([0]),
        "index": torch.tensor([0]),
    }
    weights = ama.token_weights(batch["response_mask"][:, 1:], batch, batch["safer"], stage.objective_networks["ama"])
    assert 0 < weights.sum() < batch["response_mask"][:, 1:].sum()  # the masks drop some response tokens
    pairs = stage.pair_batch(batch, cache=False)
    with torch.no_grad():
        for network, sums in ((stage.policy, pairs.logprobs), (stage.reference, pairs.ref_logprobs)):
            expected = summed_logprobs(network, batch["input_ids"], batch["attention_mask"], weights)
            torch.testing.assert_close(sums.view(-1).detach(), expected)
