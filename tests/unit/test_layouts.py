"""Score-model layouts: transformers' and safe-rlhf's checkpoints load with their end scores; ours round-trip.

Every checkpoint here is a tiny random model saved by the library that defines its layout
(transformers), or written with the documented key names and config fields (safe-rlhf). End scores
are compared on left-padded batches, where end-token rules and position ids matter most.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from lit_saferlhf.models.layouts import detect_layout
from lit_saferlhf.models.score_model import ScoreModel
from tests.helpers import fit

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
FAMILIES = {
    "llama": {"model_type": "llama", **TINY, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", **TINY, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", **TINY, "num_key_value_heads": 2},
    "gemma": {"model_type": "gemma", **TINY, "num_key_value_heads": 2, "head_dim": 16},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2},
}
ABSOLUTE_POSITIONS = {"gpt2"}
"""Families whose position embeddings are absolute: see ``library_end_scores``."""


def tiny_config(family: str, **extra: object) -> object:
    """A tiny transformers config over the safety-world vocabulary, pad id from its tokenizer."""
    tokenizer = build_tokenizer()
    settings = {key: value for key, value in FAMILIES[family].items() if key != "model_type"}
    return AutoConfig.for_model(
        FAMILIES[family]["model_type"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **settings,
        **extra,
    )


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(3, 7)`` of different lengths, left-padded with the safety-world pad id 0."""
    rows = [[5, 6, 7, 8, 9, 10, 3], [11, 12, 13, 3], [14, 15, 16, 17, 3]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    return ids, (ids != 0).long()


def ours(path: Path, **kwargs: object) -> ScoreModel:
    source = ModelSource(path=str(path))
    return ScoreModel.from_source(source, load_tokenizer(source), **kwargs).eval()


@torch.no_grad()
def library_end_scores(model: torch.nn.Module, family: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' own ``logits`` ``(B,)``. With absolute positions (GPT-2) transformers would number the
    left padding too, so a left-padded row scores differently from the same row unpadded; there it is given
    the positions generation uses (the library's forward accepts them), which ours always uses."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0) if family in ABSOLUTE_POSITIONS else None
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.squeeze(-1)


# ----------------------------------------------------------------------------------------------
# transformers *ForSequenceClassification
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sequence_classifier_loads_with_the_librarys_end_scores(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    library = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=1)).eval()
    torch.nn.init.normal_(library.score.weight, std=1.0)
    library.save_pretrained(tmp_path / "rm")
    build_tokenizer().save_pretrained(tmp_path / "rm")
    assert detect_layout(tmp_path / "rm").kind == "sequence-classification"

    ids, mask = left_padded_batch()
    with torch.no_grad():
        scores = ours(tmp_path / "rm")(ids, mask).end_scores
    torch.testing.assert_close(scores, library_end_scores(library, family, ids, mask), atol=1e-5, rtol=1e-5)
    assert scores.std() > 0.1  # the head was loaded, not initialised afresh


def test_sequence_classifier_end_token_is_the_last_non_padding_token(tmp_path: Path) -> None:
    # A TRL-style tokenizer pads with EOS (pad id == eos id): transformers then scores the last token
    # before the EOS padding, whatever the attention mask says; so do we for this layout.
    torch.manual_seed(1)
    config = tiny_config("llama", num_labels=1)
    config.pad_token_id = 3  # the safety-world EOS
    library = AutoModelForSequenceClassification.from_config(config).eval()
    library.save_pretrained(tmp_path / "rm")
    build_tokenizer().save_pretrained(tmp_path / "rm")
    ids = torch.tensor([[5, 6, 7, 3, 3], [8, 9, 10, 11, 3]])
    mask = torch.ones_like(ids)  # the EOS is attended
    model = ours(tmp_path / "rm")
    assert model.end_token == "last_non_pad"
    with torch.no_grad():
        output = model(ids, mask)
    torch.testing.assert_close(output.end_scores, library(input_ids=ids, attention_mask=mask).logits.squeeze(-1))
    torch.testing.assert_close(output.end_scores, output.scores[[0, 1], [2, 3]])
    # Trained on (a reward stage continuing it) and saved in our format, it keeps transformers' end token.
    again = ours(model.save_pretrained(tmp_path / "again", load_tokenizer(ModelSource(path=str(tmp_path / "rm")))))
    assert again.end_token == "last_non_pad"
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask).end_scores, output.end_scores)


def test_sequence_classifier_head_bias_is_loaded_when_the_checkpoint_has_one(tmp_path: Path) -> None:
    torch.manual_seed(2)
    library = AutoModelForSequenceClassification.from_config(tiny_config("gpt2", num_labels=1)).eval()
    weight = torch.randn(1, 32)
    state = {f"transformer.{k}": v.contiguous() for k, v in library.transformer.state_dict().items()}
    (tmp_path / "rm").mkdir()
    save_file(
        {**state, "score.weight": weight, "score.bias": torch.tensor([0.75])}, tmp_path / "rm" / "model.safetensors"
    )
    library.config.architectures = ["GPT2ForSequenceClassification"]
    library.config.save_pretrained(tmp_path / "rm")
    build_tokenizer().save_pretrained(tmp_path / "rm")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        scores = ours(tmp_path / "rm")(ids, mask).end_scores
        library.score.weight.copy_(weight)
    # transformers' GPT2ForSequenceClassification has no head bias: the reference is its score plus the bias
    torch.testing.assert_close(scores, library_end_scores(library, "gpt2", ids, mask) + 0.75, atol=1e-5, rtol=1e-5)


def test_a_classifier_with_several_labels_is_refused(tmp_path: Path) -> None:
    AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=3)).save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="3 labels; a reward or cost model has one"):
        detect_layout(tmp_path / "c")


# ----------------------------------------------------------------------------------------------
# safe-rlhf score models (LlamaForScore)
# ----------------------------------------------------------------------------------------------


def safe_rlhf_checkpoint(path: Path, score_type: str, do_normalize: bool, bias: bool) -> dict[str, torch.Tensor]:
    """A tiny ``LlamaForScore`` as safe-rlhf saves it: backbone under ``model.``, ``score_head.*``,
    ``normalizer.{mean,var,count}`` buffers, and its config fields. Returns the tensors written."""
    torch.manual_seed(3)
    config = tiny_config("llama")
    backbone = AutoModel.from_config(config)
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state["score_head.weight"] = torch.randn(1, 32)
    if bias:
        state["score_head.bias"] = torch.tensor([0.3])
    state |= {"normalizer.mean": torch.tensor([1.5]), "normalizer.var": torch.tensor([4.0])}
    state["normalizer.count"] = torch.tensor([1000], dtype=torch.long)
    path.mkdir()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    fields = {"score_dim": 1, "bias": bias, "score_type": score_type, "do_normalize": do_normalize}
    fields |= {"normalizer_type": "ExponentialMovingAverage", "momentum": 0.9}
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["LlamaForScore"], **fields}))
    build_tokenizer().save_pretrained(path)
    return state


@torch.no_grad()
def safe_rlhf_reference(path: Path, state: dict, score_type: str, do_normalize: bool, ids, mask) -> torch.Tensor:
    """safe-rlhf's ``ScoreModelMixin.get_scores``: head on the backbone's last hidden state, the score at the
    last attended position, then (``do_normalize``) ``normalize``: affine ``(x - mean) / (std + 1e-8)`` for
    rewards, scale ``x / (std + 1e-8)`` for costs, identity for critics."""
    backbone = AutoModel.from_pretrained(path).eval()
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    scores = hidden @ state["score_head.weight"].T + state.get("score_head.bias", 0.0)  # (B, L, 1)
    end = torch.stack([row.nonzero()[-1, 0] for row in mask])
    ends = scores[torch.arange(len(ids)), end, 0]
    if not do_normalize or score_type == "critic":
        return ends
    std = state["normalizer.var"].sqrt() + 1e-8
    return (ends - state["normalizer.mean"]) / std if score_type == "reward" else ends / std


@pytest.mark.parametrize(
    ("score_type", "do_normalize", "bias"),
    [("reward", True, True), ("cost", True, False), ("critic", True, True), ("reward", False, False)],
)
def test_safe_rlhf_score_model_loads_with_its_normaliser(
    score_type: str, do_normalize: bool, bias: bool, tmp_path: Path
) -> None:
    state = safe_rlhf_checkpoint(tmp_path / "beaver", score_type, do_normalize, bias)
    layout = detect_layout(tmp_path / "beaver")
    assert layout.kind == "safe-rlhf"
    ids, mask = left_padded_batch()
    model = ours(tmp_path / "beaver")
    assert (model.score_head.bias is not None) == bias
    assert model.normalizer.kind == "ema"
    assert model.normalizer.count == 1000
    with torch.no_grad():
        scores = model(ids, mask).end_scores
    expected = safe_rlhf_reference(tmp_path / "beaver", state, score_type, do_normalize, ids, mask)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Ours: exports load in transformers; version 1 keeps loading
# ----------------------------------------------------------------------------------------------


def random_score_model(family: str = "llama") -> tuple[ScoreModel, object]:
    source = ModelSource(config=FAMILIES[family], tokenizer="safety-world")
    tokenizer = load_tokenizer(source)
    torch.manual_seed(4)
    model = ScoreModel.from_source(source, tokenizer).eval()
    torch.nn.init.normal_(model.score_head.weight, std=1.0)
    return model, tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_our_export_loads_in_transformers_with_our_end_scores(family: str, padding: str, tmp_path: Path) -> None:
    model, tokenizer = random_score_model(family)
    model.normalizer.update(torch.tensor([1.0, 5.0, 9.0]))  # statistics tracked, not applied
    out = model.save_pretrained(tmp_path / "reward", tokenizer, score_type="reward")
    side = json.loads((out / "score_model.json").read_text())
    assert side["version"] == 2
    assert side["score_type"] == "reward"
    assert side["head"]["bias"] is None

    ids, mask = left_padded_batch()
    if padding == "right":
        order = torch.argsort(mask, dim=1, descending=True, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    library = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        expected = ours(out)(ids, mask).end_scores
        torch.testing.assert_close(model(ids, mask).end_scores, expected)
    torch.testing.assert_close(library_end_scores(library, family, ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_an_enabled_scale_normaliser_is_folded_into_the_exported_head(tmp_path: Path) -> None:
    model, tokenizer = random_score_model()
    model.normalizer.update(torch.tensor([-3.0, 1.0, 8.0]))
    model.normalizer.enabled, model.normalizer.function = True, "scale"  # x / std: exact without a bias
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model(ids, mask).end_scores
    out = model.save_pretrained(tmp_path / "cost", tokenizer, score_type="cost")
    side = json.loads((out / "score_model.json").read_text())
    assert side["head"]["normalizer_folded"] is True
    assert side["normalizer"]["enabled"] is False
    assert "cost <= 0" in side["cost_sign"]
    library = AutoModelForSequenceClassification.from_pretrained(out).eval()
    reloaded = ours(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask).end_scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(library_end_scores(library, "llama", ids, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reloaded.normalizer.var, model.normalizer.var)  # statistics kept


def test_an_affine_normaliser_offset_stays_in_the_side_file_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = random_score_model()
    model.normalizer.update(torch.tensor([1.0, 3.0]))  # mean 2, std 1
    model.normalizer.enabled = True
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model(ids, mask).end_scores
    with caplog.at_level(logging.WARNING):
        out = model.save_pretrained(tmp_path / "reward", tokenizer)
    assert "ours minus -2" in caplog.text
    library = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(out)(ids, mask).end_scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(library_end_scores(library, "llama", ids, mask) - 2.0, expected, atol=1e-5, rtol=1e-5)


def test_version_1_dirs_keep_loading(tmp_path: Path) -> None:
    model, tokenizer = random_score_model()
    out = tmp_path / "v1"
    model.backbone.save_pretrained(out)
    tokenizer.save_pretrained(out)
    head = {"weight": model.score_head.weight.detach(), "bias": torch.tensor([0.5])}
    stats = {
        "normalizer.mean": torch.tensor(2.0, dtype=torch.float64),
        "normalizer.var": torch.tensor(4.0, dtype=torch.float64),
    }
    save_file(
        {**head, **stats, "normalizer.count": torch.tensor(10.0, dtype=torch.float64)}, out / "score_head.safetensors"
    )
    meta = {
        "format": "lit-saferlhf score model",
        "version": 1,
        "normalizer": {"kind": "ema", "momentum": 0.5, "enabled": True},
    }
    (out / "score_model.json").write_text(json.dumps(meta))
    ids, mask = left_padded_batch()
    reloaded = ours(out)
    with torch.no_grad():
        raw = model(ids, mask).end_scores
        torch.testing.assert_close(reloaded(ids, mask).end_scores, (raw + 0.5 - 2.0) / 2.0)
    assert reloaded.normalizer.kind == "ema"


# ----------------------------------------------------------------------------------------------
# Roles: no silent random heads
# ----------------------------------------------------------------------------------------------


def test_a_score_model_is_refused_as_a_policy_and_a_policy_as_a_score_model(tmp_path: Path) -> None:
    model, tokenizer = random_score_model()
    reward = model.save_pretrained(tmp_path / "reward", tokenizer)
    source = ModelSource(config=FAMILIES["llama"], tokenizer="safety-world")
    policy = export(build_causal_lm(source, tokenizer), tokenizer, tmp_path / "sft")
    with pytest.raises(
        ValueError, match=r"policy: .*reward is a score model \(lit-saferlhf \(LlamaForSequenceClassification\)\)"
    ):
        build_causal_lm(ModelSource(path=str(reward)), tokenizer)
    with pytest.raises(
        ValueError, match=r"cost_critic: .*sft is a language-model \(LlamaForCausalLM\) without a score head"
    ):
        ours(policy, role="cost_critic")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        detect_layout(tmp_path)


def test_our_trained_reward_export_round_trips_through_transformers(tiny_models: dict[str, Path]) -> None:
    ids, mask = left_padded_batch()
    for name in ("reward", "cost"):
        library = AutoModelForSequenceClassification.from_pretrained(tiny_models[name]).eval()
        with torch.no_grad():
            expected = ours(tiny_models[name])(ids, mask).end_scores
        torch.testing.assert_close(library_end_scores(library, "llama", ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_ppo_lagrangian_with_a_causal_lm_as_reward_model_stops_before_training(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"is a language-model \(LlamaForCausalLM\) without a score head"):
        fit(
            "tiny/ppo_lag.yaml",
            tmp_path,
            f"--model.init_args.policy={tiny_models['sft']}",
            f"--model.init_args.reward_model={tiny_models['sft']}",
            f"--model.init_args.cost_model={tiny_models['cost']}",
            "--trainer.limit_train_batches=1",
        )
    assert not list(tmp_path.rglob("*.ckpt"))
