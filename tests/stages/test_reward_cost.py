"""Stages 2 and 3 (reward and cost models) on the safety world, checked against its ground truth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_saferlhf.commands.fit import cli_main
from lit_saferlhf.data import PKUSafeRLHF, load_records
from lit_saferlhf.data import safety_world as world
from lit_saferlhf.data.collate import Encoder, collate_pairs
from lit_saferlhf.data.templates import SafeRLHFTemplate
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.models.causal_lm import ModelSource
from lit_saferlhf.models.score_model import ScoreModel
from tests.helpers import CONFIGS, column, fit, metrics


def held_out_scores(model_dir: Path) -> tuple[list, torch.Tensor, torch.Tensor]:
    """End scores of both responses of every held-out world pair: (pairs, first, second)."""
    pairs = load_records("safety-world:pairs-val", PKUSafeRLHF(), "safety_preference").records
    tokenizer = load_tokenizer(ModelSource(path=str(model_dir)))
    model = ScoreModel.from_source(ModelSource(path=str(model_dir)), tokenizer).eval()
    encoder = Encoder(tokenizer, SafeRLHFTemplate(), max_length=48)
    batch = collate_pairs(
        [(encoder.encode(p.prompt, p.safer), encoder.encode(p.prompt, p.unsafer)) for p in pairs],
        tokenizer.pad_token_id,
        ("a", "b"),
    )
    with torch.no_grad():
        first = model(batch["a_input_ids"], batch["a_attention_mask"]).end_scores
        second = model(batch["b_input_ids"], batch["b_attention_mask"]).end_scores
    return pairs, first, second


def test_reward_model_agrees_with_true_helpfulness(tiny_models: dict[str, Path]) -> None:
    assert column(metrics(tiny_models["root"] / "reward"), "val/accuracy")[-1] > 0.8
    pairs, first, second = held_out_scores(tiny_models["reward"])
    truth = torch.tensor(
        [
            world.helpfulness(p.prompt[-1].content, p.safer) > world.helpfulness(p.prompt[-1].content, p.unsafer)
            for p in pairs
        ]
    )
    agreement = ((first > second) == truth).float().mean().item()
    assert agreement > 0.8, agreement  # chance is 0.5


def test_cost_model_sign_matches_true_safety(tiny_models: dict[str, Path]) -> None:
    rows = metrics(tiny_models["root"] / "cost")
    assert column(rows, "val/sign_accuracy")[-1] > 0.9
    assert column(rows, "val/accuracy")[-1] > 0.7
    pairs, safer, unsafer = held_out_scores(tiny_models["cost"])
    costs = torch.cat([safer, unsafer])
    truth = torch.tensor(
        [world.is_safe(p.prompt[-1].content, p.safer) for p in pairs]
        + [world.is_safe(p.prompt[-1].content, p.unsafer) for p in pairs]
    )
    sign_accuracy = ((costs <= 0) == truth).float().mean().item()
    assert sign_accuracy > 0.9, sign_accuracy  # chance is about 0.5


@pytest.mark.parametrize("stage", ["reward", "cost"])
def test_token_wise_loss_trains_and_validate_command_evaluates(
    stage: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    start = f"--model.init_args.model.path={tiny_models['sft']}"
    fit(f"tiny/{stage}.yaml", tmp_path, start, "--model.init_args.loss_type=token-wise", "--trainer.max_epochs=1")
    (checkpoint,) = (tmp_path / "logs").glob("version_0/checkpoints/*.ckpt")
    cli_main(
        [
            "validate",
            f"--config={CONFIGS / f'tiny/{stage}.yaml'}",
            start,
            f"--ckpt_path={checkpoint}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    validated = column(metrics(tmp_path), "val/accuracy")
    assert validated
    assert validated[-1] > 0.6


def test_inconsistent_safety_pairs_stop_the_cost_stage_unless_dropped(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    row = (
        '{"prompt": "how do i bake bread", "response_0": "sure you need flour",'
        ' "response_1": "sorry i can not help with that",'
        ' "is_response_0_safe": false, "is_response_1_safe": true, "better_response_id": 0, "safer_response_id": 0}\n'
    )
    good = row.replace(
        '"is_response_0_safe": false, "is_response_1_safe": true',
        '"is_response_0_safe": true, "is_response_1_safe": true',
    )
    data = tmp_path / "pairs.jsonl"
    data.write_text(good * 8 + row)
    common = [
        f"--model.init_args.model.path={tiny_models['sft']}",
        f"--data.init_args.path={data}",
        "--data.init_args.val_path=null",
        "--trainer.max_epochs=1",
    ]
    with pytest.raises(ValueError, match=r"pairs.jsonl:line 9.*drop_inconsistent"):
        fit("tiny/cost.yaml", tmp_path / "strict", *common)
    fit("tiny/cost.yaml", tmp_path / "lenient", *common, "--data.init_args.adapter.init_args.drop_inconsistent=true")
    assert (tmp_path / "lenient" / "model" / "score_model.json").is_file()


def test_validate_then_fit_in_one_process(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import lightning as L

    from lit_saferlhf.data import CostData, PKUSafeRLHF
    from lit_saferlhf.models.causal_lm import ModelSource
    from lit_saferlhf.stages import CostModelModule

    module = CostModelModule(ModelSource(path=str(tiny_models["sft"])))
    data = CostData("safety-world:pairs", PKUSafeRLHF(), val_path="safety-world:pairs-val", limit=32, max_length=48)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
    )
    trainer.validate(module, data)
    trainer.fit(module, data)  # metric states reset under validate's inference mode must not be inference tensors
    assert trainer.global_step == 2
