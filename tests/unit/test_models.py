"""Models: build from a config, pad-token handling, Hugging Face export round trips, score models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from lit_saferlhf.models.score_model import ScoreModel

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
FAMILIES = {
    "llama": {"model_type": "llama", **TINY, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", **TINY, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", **TINY, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2},
}


def tiny_source(family: str = "llama") -> ModelSource:
    return ModelSource(config=FAMILIES[family], tokenizer="safety-world")


def test_model_source_rejects_ambiguous_or_incomplete_settings() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ModelSource()
    with pytest.raises(ValueError, match="model_type"):
        ModelSource(config={"hidden_size": 8}, tokenizer="safety-world")
    with pytest.raises(ValueError, match="tokenizer"):
        ModelSource(config=FAMILIES["llama"])


def test_missing_pad_token_is_added_and_embeddings_grow(shared_data: Path) -> None:
    source = ModelSource(config=FAMILIES["gpt2"], tokenizer=str(shared_data / "tokenizers" / "gpt2"))
    tokenizer = load_tokenizer(source)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id == 50257
    model = build_causal_lm(source, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_causal_lm_export_loads_in_transformers(tmp_path: Path) -> None:
    source = tiny_source()
    tokenizer = load_tokenizer(source)
    model = build_causal_lm(source, tokenizer).eval()
    out = export(model, tokenizer, tmp_path / "policy")
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer("how do i bake bread")["input_ids"]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    # Exporting again replaces the dir atomically and leaves no staging dirs behind.
    export(model, tokenizer, out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["policy"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_model_export_reload_gives_same_scores(family: str, tmp_path: Path) -> None:
    source = tiny_source(family)
    tokenizer = load_tokenizer(source)
    model = ScoreModel.from_source(source, tokenizer).eval()
    assert model.score_head.bias is None  # a new head is bias-free, as transformers' are
    model.normalizer.update(torch.tensor([1.0, 2.0, 3.0]))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    before = model(ids, mask)
    out = model.save_pretrained(tmp_path / "score", tokenizer, score_type="reward")
    reloaded = ScoreModel.from_source(ModelSource(path=str(out)), load_tokenizer(ModelSource(path=str(out)))).eval()
    after = reloaded(ids, mask)
    torch.testing.assert_close(after.scores, before.scores)
    torch.testing.assert_close(after.end_scores, before.end_scores)
    torch.testing.assert_close(reloaded.normalizer.mean, torch.tensor(2.0, dtype=torch.float64))
    assert type(AutoModel.from_pretrained(out)).__name__ == type(model.backbone).__name__


def test_end_score_is_the_score_at_the_last_real_token() -> None:
    source = tiny_source()
    model = ScoreModel.from_source(source, load_tokenizer(source)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    output = model(ids, torch.tensor([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(output.end_scores, output.scores[:, 2])


def test_score_model_starts_from_a_causal_lm_export(tmp_path: Path) -> None:
    source = tiny_source()
    tokenizer = load_tokenizer(source)
    policy = build_causal_lm(source, tokenizer)
    out = export(policy, tokenizer, tmp_path / "sft")
    with pytest.raises(
        ValueError, match=r"reward_model: .*sft is a language-model \(LlamaForCausalLM\) without a score"
    ):
        ScoreModel.from_source(ModelSource(path=str(out)), tokenizer, role="reward_model")
    scorer = ScoreModel.from_source(ModelSource(path=str(out)), tokenizer, new_head_ok=True)
    torch.testing.assert_close(scorer.backbone.get_input_embeddings().weight, policy.get_input_embeddings().weight)


def test_normalizer_running_statistics_match_the_batch_statistics() -> None:
    source = tiny_source()
    model = ScoreModel.from_source(source, load_tokenizer(source))
    scores = torch.randn(64, dtype=torch.float64) * 3 + 1
    for chunk in scores.chunk(4):
        model.normalizer.update(chunk)
    torch.testing.assert_close(model.normalizer.mean, scores.mean())
    torch.testing.assert_close(model.normalizer.var, scores.var(unbiased=False))
    model.normalizer.enabled = True
    normalized = model.normalizer(scores.float())
    assert abs(normalized.mean().item()) < 1e-4
    assert abs(normalized.std(unbiased=False).item() - 1) < 1e-3


def test_ema_normalizer_follows_the_latest_batches() -> None:
    from lit_saferlhf.models.score_model import ScoreNormalizer

    normalizer = ScoreNormalizer(kind="ema", momentum=0.5)
    normalizer.update(torch.tensor([1.0, 3.0]))  # first batch: mean 2, var 1
    normalizer.update(torch.tensor([5.0, 5.0]))  # mean <- 0.5*2 + 0.5*5, var <- 0.5*1 + 0.5*0
    torch.testing.assert_close(normalizer.mean, torch.tensor(3.5, dtype=torch.float64))
    torch.testing.assert_close(normalizer.var, torch.tensor(0.5, dtype=torch.float64))


def test_gradient_checkpointing_and_dtype_options_apply() -> None:
    source = ModelSource(config=FAMILIES["llama"], tokenizer="safety-world", gradient_checkpointing=True)
    model = build_causal_lm(source, load_tokenizer(source))
    assert model.is_gradient_checkpointing
    from lit_saferlhf.models.causal_lm import torch_dtype

    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16"):
        torch_dtype("bfloat17")


def test_hyperparameter_dataclasses_load_with_weights_only(tmp_path: Path) -> None:
    from lit_saferlhf.optim import OptimizerArgs

    hparams = {"model": ModelSource(path="x", dtype="bfloat16"), "optimizer": OptimizerArgs(lr=3e-4)}
    torch.save({"hyper_parameters": hparams}, tmp_path / "hp.ckpt")
    assert torch.load(tmp_path / "hp.ckpt", weights_only=True)["hyper_parameters"] == hparams
