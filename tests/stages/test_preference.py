"""The offline preference stage: a few CLI steps of every shipped config, label handling, start-up errors, merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_saferlhf.cli import main
from lit_saferlhf.data import PKUSafeRLHF, PreferenceData
from lit_saferlhf.data.preference import MissingLabelError, PairRow
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from tests.helpers import CONFIGS, fit, metrics

OFFLINE = sorted((CONFIGS / "tiny" / "offline").glob("*.yaml"))


def overrides(name: str, models: dict[str, Path]) -> list[str]:
    """Point a config at the tiny exports and shrink it to a few steps."""
    sft = str(models["sft"])
    args = [
        f"--model.init_args.policy={sft}",
        "--trainer.max_steps=3",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.limit=96",
        "--data.init_args.batch_size=8",
    ]
    if name in ("c_dpo", "mocan"):
        args += [f"--model.init_args.reward_model.path={models['reward']}",
                 f"--model.init_args.cost_model.path={models['cost']}"]  # fmt: skip
    if name == "pecan":  # the SFT policy as both "aligned" models: implicit scores of 0, still a full pass
        args += [f"--model.init_args.reward_model.path={sft}", f"--model.init_args.cost_model.path={sft}"]
    if name in ("c_dpo", "mocan", "pecan"):
        args += [
            "--model.init_args.objective.init_args.sample_prompts=4",
            "--model.init_args.generation.max_new_tokens=6",
        ]
    if name in ("mocan", "pecan"):
        args.append("--model.init_args.objective.init_args.dual_samples=2")
    if name == "c_dpo":
        args.append("--model.init_args.objective.init_args.update_every=1")
    if name == "adpo":  # AMA's token scorer (issue 15)
        args.append(f"--model.init_args.objective.init_args.ama.path={models['cost']}")
    if name == "sacpo_safe":
        args.append(f"--model.init_args.reference={sft}")
    return args


@pytest.mark.parametrize("config", OFFLINE, ids=lambda p: p.stem)
def test_every_offline_config_trains_a_few_steps(config: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = fit(f"tiny/offline/{config.name}", tmp_path, *overrides(config.stem, tiny_models))
    rows = metrics(tmp_path)
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 3
    assert all(math.isfinite(loss) for loss in losses)
    assert any(row.get("train/helpful/accuracy") for row in rows)
    assert any(row.get("train/safety/margin") for row in rows)
    summary = json.loads((out / "objective.json").read_text())
    assert summary["objective"] in config.read_text()
    if config.stem in ("c_dpo", "mocan", "pecan"):
        assert summary["multiplier"] is not None
        assert any(row.get("train/multiplier") for row in rows)
    before, after = load_file(tiny_models["sft"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before), "the policy did not change"


def test_c_dpo_moves_lambda_with_the_solver(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = fit("tiny/offline/c_dpo.yaml", tmp_path, *overrides("c_dpo", tiny_models))
    summary = json.loads((out / "objective.json").read_text())
    assert summary["solver"]["class"] == "DualAscent"
    assert summary["solver"]["num_updates"] == 3  # one dual step per optimiser step (update_every: 1)
    steps = [float(row["dual/solver/multiplier"]) for row in metrics(tmp_path) if row.get("dual/solver/multiplier")]
    assert steps[-1] == pytest.approx(summary["multiplier"])


def test_bfpo_mixes_the_buffer_into_every_step(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    args = [*overrides("bfpo", tiny_models), "--data.init_args.buffer_path=safety-world:pairs-val"]
    fit("tiny/offline/bfpo.yaml", tmp_path, *args)
    buffer = [
        float(row["train/objective/buffer_loss"]) for row in metrics(tmp_path) if row.get("train/objective/buffer_loss")
    ]
    assert len(buffer) == 3
    assert all(math.isfinite(value) for value in buffer)


def test_an_objective_needing_a_missing_label_stops_at_start_up(
    tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    safety_only = shared_data / "pku_saferlhf" / "safety_pairs_5k.jsonl"
    args = [*overrides("bfpo", tiny_models), f"--data.init_args.path={safety_only}", "--data.init_args.val_path=null"]
    with pytest.raises(MissingLabelError, match="better_response_id") as error:
        fit("tiny/offline/bfpo.yaml", tmp_path, *args)
    assert "BFPO" in str(error.value)
    assert "safety_pairs_5k.jsonl" in str(error.value)
    hh = shared_data / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    args = [*overrides("safe_dpo", tiny_models), f"--data.init_args.path={hh}", "--data.init_args.val_path=null",
            "--data.init_args.adapter=lit_saferlhf.data.HHRLHF", "--data.init_args.limit=40"]  # fmt: skip
    with pytest.raises(MissingLabelError, match="is_response_0_safe"):
        fit("tiny/offline/safe_dpo.yaml", tmp_path, *args)


def test_the_safety_step_runs_on_safety_only_data(
    tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    """SACPO's step 2 needs safer_response_id only, which the 5k safety set has."""
    safety_only = shared_data / "pku_saferlhf" / "safety_pairs_5k.jsonl"
    args = [
        *overrides("sacpo_safe", tiny_models),
        f"--data.init_args.path={safety_only}",
        "--data.init_args.val_path=null",
        "--data.init_args.on_bad_record=skip",  # real pairs: a few are alike, or lose their answer, within max_length
    ]
    fit("tiny/offline/sacpo_safe.yaml", tmp_path, *args)
    rows = metrics(tmp_path)
    assert any(row.get("train/safety/accuracy") for row in rows)
    assert not any(row.get("train/helpful/accuracy") for row in rows)  # no helpfulness label, no such metric


def test_rows_join_helpfulness_and_safety_labels_for_all_four_combinations(tmp_path: Path) -> None:
    combos = [(True, False), (True, True), (False, False), (False, True)]  # (s_better, s_worse)
    rows = []
    for number, (safe_better, safe_worse) in enumerate(combos):
        better = number % 2  # the better response is response_1 in odd rows
        safe = [None, None]
        safe[better], safe[1 - better] = safe_better, safe_worse
        safer = better if safe_better or not safe_worse else 1 - better
        rows.append({"prompt": f"p{number}", "response_0": f"a{number}", "response_1": f"b{number}",
                     "is_response_0_safe": safe[0], "is_response_1_safe": safe[1],
                     "better_response_id": better, "safer_response_id": safer})  # fmt: skip
    rows.append({**rows[0], "prompt": "safety only", "better_response_id": None})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = PreferenceData(str(path), PKUSafeRLHF()).read_rows(str(path))
    by_prompt = {row.prompt[0].content: row for row in read}
    for number, (safe_better, safe_worse) in enumerate(combos):
        row: PairRow = by_prompt[f"p{number}"]
        better_text = f"b{number}" if number % 2 else f"a{number}"
        assert row.responses[row.better] == better_text
        assert (row.is_safe[row.better], row.is_safe[1 - row.better]) == (safe_better, safe_worse)
        assert row.responses[row.safer] == rows[number][f"response_{rows[number]['safer_response_id']}"]
    only = by_prompt["safety only"]
    assert only.better is None
    assert only.safer is not None
    assert only.is_safe is not None
    data = PreferenceData(str(path), PKUSafeRLHF())
    data.loaded = {}
    with pytest.raises(MissingLabelError, match="better_response_id"):
        data.with_labels([only], str(path), ["better"])


def test_merge_is_the_weighted_average(tmp_path: Path) -> None:
    source = ModelSource(config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
                         tokenizer="safety-world")  # fmt: skip
    tokenizer = load_tokenizer(source)
    states = []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        model = build_causal_lm(source, tokenizer)
        export(model, tokenizer, tmp_path / name)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    main(["merge", "--models", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "3", "1",
          "--out", str(tmp_path / "merged")])  # fmt: skip
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for name, tensor in merged.items():
        assert torch.allclose(tensor, 0.75 * states[0][name] + 0.25 * states[1][name], atol=1e-6), name
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["weights"] == [0.75, 0.25]


def test_merge_worked_example_and_mismatch() -> None:
    from lit_saferlhf.commands.merge import linear_merge

    merged = linear_merge([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}], [0.75, 0.25])
    assert merged["w"].tolist() == [1.5, 1.0]  # θ_r = (1, 2), θ* = (3, −2), q = 0.25
    with pytest.raises(ValueError, match="shape"):
        linear_merge([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [0.5, 0.5])


def test_the_offline_pipeline_links_existing_configs_and_exports() -> None:
    import yaml

    pipeline = yaml.safe_load((CONFIGS / "tiny" / "pipeline_offline.yaml").read_text())
    names = [stage["name"] for stage in pipeline["stages"]]
    for index, stage in enumerate(pipeline["stages"]):
        assert (CONFIGS.parent / stage["config"]).is_file(), stage["config"]
        assert set(stage.get("inputs", {}).values()) <= set(names[:index]), stage["name"]  # earlier stages only
    assert set(pipeline["evaluation"]["policies"]) <= set(names)
    assert {"ppo_lag", "bfpo"} <= set(pipeline["evaluation"]["policies"])


@pytest.mark.parametrize(
    ("config", "objective"),
    [("sacpo_safe", "KTO"), ("dpo", "IPO")],
)
def test_objectives_swap_from_the_command_line(
    config: str, objective: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    swap = [f"--model.init_args.objective={objective}", "--model.init_args.objective.init_args.beta=0.025"]
    if objective == "IPO":
        swap[1] = "--model.init_args.objective.init_args.tau=0.1"
    out = fit(f"tiny/offline/{config}.yaml", tmp_path, *overrides(config, tiny_models), *swap)
    assert json.loads((out / "objective.json").read_text())["objective"] == objective
    losses = [float(row["train/loss"]) for row in metrics(tmp_path) if row.get("train/loss")]
    assert len(losses) == 3
    assert all(math.isfinite(loss) for loss in losses)


def test_bfpo_trains_on_real_pku_saferlhf_pairs(
    tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    """Both labels of real PKU-SafeRLHF rows reach the objective (the tokenizer is the safety world's: a smoke run)."""
    sample = shared_data / "pku_saferlhf" / "sample32.json"
    args = [*overrides("bfpo", tiny_models), f"--data.init_args.path={sample}", "--data.init_args.val_path=null"]
    args.append("--data.init_args.on_bad_record=skip")  # real pairs: 2 of 32 are alike or lose their answer at 48
    fit("tiny/offline/bfpo.yaml", tmp_path, *args)
    rows = metrics(tmp_path)
    targets = [float(row["train/objective/target"]) for row in rows if row.get("train/objective/target")]
    assert len(targets) == 3
    assert all(-1.0 <= target <= 1.0 for target in targets)


def test_cached_reference_log_probs_match_a_fresh_forward(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from lit_saferlhf.commands.fit import cli_main
    from lit_saferlhf.stages.preference import summed_logprobs

    args = [a for a in overrides("dpo", tiny_models) if "max_steps" not in a and "limit=" not in a]
    cli = cli_main(["fit", f"--config={CONFIGS / 'tiny/offline/dpo.yaml'}", *args, "--data.init_args.limit=16",
                    "--trainer.max_epochs=2", "--model.init_args.cache_reference=true",
                    f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                    f"--model.init_args.export_dir={tmp_path / 'model'}",
                    "--trainer.enable_progress_bar=false"])  # fmt: skip
    module, data = cli.model, cli.datamodule
    assert sorted(module.reference_cache) == list(range(len(data.train_set)))
    batch = data.collate(data.train_set[:4])
    fresh = summed_logprobs(
        module.reference, batch["input_ids"], batch["attention_mask"], batch["response_mask"][:, 1:]
    )
    cached = torch.cat([module.reference_cache[i] for i in range(4)])
    assert torch.allclose(fresh, cached, atol=1e-5)


def test_the_objective_state_round_trips_through_a_checkpoint(tiny_models: dict[str, Path]) -> None:
    from lit_saferlhf.stages import PreferenceOptimization, ScoreSource
    from lit_saferlhf_plugins.objectives import CDPO
    from lit_saferlhf_plugins.solvers import DualAscent

    def stage() -> PreferenceOptimization:
        objective = CDPO(DualAscent(cost_limit=-5.0, lr=0.5, init_multiplier=1.0, linear=True))
        sources = {"reward_model": ScoreSource(str(tiny_models["reward"])),
                   "cost_model": ScoreSource(str(tiny_models["cost"]))}  # fmt: skip
        return PreferenceOptimization(str(tiny_models["sft"]), objective, **sources)

    trained = stage()
    trained.objective.solver.update(-3.0)  # λ = 1 + 0.5 · 2 = 2
    checkpoint: dict = {}
    trained.on_save_checkpoint(checkpoint)
    resumed = stage()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.objective.multiplier == pytest.approx(2.0)
    assert resumed.objective.solver.num_updates == 1


def test_objectives_needing_scores_stop_without_a_score_source(tiny_models: dict[str, Path]) -> None:
    from lit_saferlhf.errors import ConfigError
    from lit_saferlhf.stages import PreferenceOptimization
    from lit_saferlhf_plugins.objectives import MoCAN

    with pytest.raises(ConfigError, match="reward_model"):
        PreferenceOptimization(str(tiny_models["sft"]), MoCAN())


def test_implicit_scores_are_beta_times_the_log_ratio_and_negate_makes_a_cost(tiny_models: dict[str, Path]) -> None:
    """PeCAN's sign convention: the safety DPO policy's implicit reward ĝ = β(ℓ_π − ℓ_ref) is a utility; as the
    stage's cost (``negate: true``) it is −ĝ, so a response the safety policy favours gets a lower cost."""
    from lit_saferlhf.stages import PreferenceOptimization, ScoreSource
    from lit_saferlhf.stages.preference import summed_logprobs
    from lit_saferlhf_plugins.objectives import PeCAN

    sft = str(tiny_models["sft"])
    stage = PreferenceOptimization(sft, PeCAN(dual_samples=2), reward_model=ScoreSource(sft, implicit_beta=0.5),
                                   cost_model=ScoreSource(sft, implicit_beta=0.5, negate=True))  # fmt: skip
    stage.configure_model()
    with torch.no_grad():  # make both "aligned" policies differ from the reference
        for name in ("rewards", "costs"):
            stage.scorers[name].get_output_embeddings().weight.mul_(1.5)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 9, 8, 7]])
    attention = torch.ones_like(ids)
    responses = torch.tensor([[0, 0, 1, 1, 1]] * 2, dtype=torch.bool)
    mask = responses[:, 1:].float()
    with torch.no_grad():
        log_ratio = summed_logprobs(stage.scorers["rewards"], ids, attention, mask) - summed_logprobs(
            stage.reference, ids, attention, mask
        )
        rewards = stage.score("rewards", ids, attention, responses)
        costs = stage.score("costs", ids, attention, responses)
    assert not torch.allclose(log_ratio, torch.zeros(2))
    assert torch.allclose(rewards, 0.5 * log_ratio, atol=1e-5)
    assert torch.allclose(costs, -0.5 * log_ratio, atol=1e-5)


def test_pairs_follow_the_policys_template_and_the_export_records_it(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from lit_saferlhf.data.templates import POLICY_FILE, SafeRLHFTemplate, policy_files, recorded_template

    policy = tmp_path / "policy"
    shutil.copytree(tiny_models["sft"], policy)
    (policy / POLICY_FILE).write_text(policy_files(SafeRLHFTemplate("USER: USER:"))[POLICY_FILE])
    args = overrides("dpo", tiny_models)
    args[0] = f"--model.init_args.policy={policy}"
    out = fit("tiny/offline/dpo.yaml", tmp_path / "run", *args, "--trainer.max_steps=1")
    template = recorded_template(out)
    assert isinstance(template, SafeRLHFTemplate)
    assert template.system_prefix == "USER: USER:"  # the pairs were rendered with the policy's template
