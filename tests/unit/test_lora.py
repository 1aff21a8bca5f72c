"""LoRA/QLoRA (``models/lora.py``): shared bases are exact, exports merge right, checkpoints keep the trainable only.

Every test moves the adapters off their zero start first (LoRA's ``B`` starts at 0, so an adapter
that was silently off, or dropped from an export, would otherwise go unnoticed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM

from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.losses import gather_logprobs
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm, export
from lit_saferlhf.models.frozen import FrozenScoreTwin, ReferencePolicy, shared_frozen
from lit_saferlhf.models.logprobs import response_logprobs
from lit_saferlhf.models.peft import LoraArgs, drop_frozen, merged_state_dict, parameter_counts, restore_frozen
from lit_saferlhf.models.score_model import ScoreModel

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
LORA = LoraArgs(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny policy and a random tiny score model (head included), saved as our stages export them."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lora_bases")
    tokenizer = build_tokenizer()
    source = ModelSource(config=TINY, tokenizer="safety-world")
    policy = export(build_causal_lm(source, load_tokenizer(source)), tokenizer, root / "policy")
    score = ScoreModel.from_source(source, load_tokenizer(source))
    nn.init.normal_(score.score_head.weight, std=0.5)
    return {"policy": policy, "score": score.save_pretrained(root / "score", tokenizer)}


def batch() -> tuple[Tensor, Tensor]:
    """Token ids ``(3, 12)`` with some left padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 40, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def move_adapters(model: nn.Module) -> None:
    """Give every adapter (and trainable head) non-zero weights, as training would."""
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if param.requires_grad:
            with torch.no_grad():
                param.add_(torch.randn_like(param) * 0.2)
            assert "lora_" in name or "score_head" in name or "modules_to_save" in name, name


def logprobs(model: object, ids: Tensor, mask: Tensor) -> Tensor:
    """Next-token log-probs of ``ids`` under ``model``."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return gather_logprobs(logits[:, :-1], ids[:, 1:])


def policy(path: Path, lora: LoraArgs | None = LORA) -> nn.Module:
    source = ModelSource(path=str(path), lora=lora)
    return build_causal_lm(source, load_tokenizer(source)).eval()


def score_model(path: Path, lora: LoraArgs | None = LORA) -> ScoreModel:
    source = ModelSource(path=str(path), lora=lora)
    return ScoreModel.from_source(source, load_tokenizer(source)).eval()


def test_only_adapters_train_and_the_score_head_always_does(base_dirs: dict[str, Path]) -> None:
    actor = policy(base_dirs["policy"])
    trained = [name for name, param in actor.named_parameters() if param.requires_grad]
    assert trained
    assert all(".lora_A." in name or ".lora_B." in name for name in trained)
    critic = score_model(base_dirs["score"])
    trained = {name for name, param in critic.named_parameters() if param.requires_grad}
    assert "score_head.weight" in trained
    assert all(".lora_" in name for name in trained - {"score_head.weight", "score_head.bias"})
    held, train = parameter_counts(actor)
    assert 0 < train < held / 5


def test_reference_is_the_actor_with_adapters_off_and_gives_the_sft_log_probs_exactly(
    base_dirs: dict[str, Path],
) -> None:
    ids, mask = batch()
    actor = policy(base_dirs["policy"])
    move_adapters(actor)
    actor.train()
    reference = shared_frozen(actor)
    assert isinstance(reference, ReferencePolicy)
    sft = AutoModelForCausalLM.from_pretrained(base_dirs["policy"]).eval()
    with torch.no_grad():
        assert torch.equal(logprobs(reference, ids, mask), logprobs(sft, ids, mask))
        assert not torch.allclose(logprobs(actor, ids, mask), logprobs(sft, ids, mask), atol=1e-3)  # adapters on
        chunked = response_logprobs(reference, ids, mask, start=4)  # the stage's path: decoder + output layer
        assert torch.equal(chunked, response_logprobs(sft, ids, mask, start=4))
        assert not torch.allclose(response_logprobs(actor, ids, mask, start=4), chunked, atol=1e-3)
    assert actor.training  # the reference call left the actor's mode alone
    assert all(p.requires_grad for n, p in actor.named_parameters() if ".lora_" in n)  # and its trainable flags


def test_merged_export_gives_the_live_logits_and_differs_from_the_base(
    base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    ids, mask = batch()
    actor = policy(base_dirs["policy"])
    move_adapters(actor)
    out = export(actor, load_tokenizer(ModelSource(path=str(base_dirs["policy"]))), tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # nothing but transformers
    base = AutoModelForCausalLM.from_pretrained(base_dirs["policy"]).eval()
    with torch.no_grad():
        live = actor(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, live, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(input_ids=ids, attention_mask=mask).logits, live, atol=1e-3)
    assert len(loaded.state_dict()) == len(base.state_dict())


def test_merging_uses_the_scale_and_the_given_state(base_dirs: dict[str, Path]) -> None:
    actor = policy(base_dirs["policy"])
    move_adapters(actor)
    state = {name: tensor.clone() for name, tensor in actor.state_dict().items()}
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    base, down, up = (state[f"{layer}.{key}"] for key in ("base_layer.weight", "lora_A.default.weight",
                                                             "lora_B.default.weight"))  # fmt: skip
    merged = merged_state_dict(actor, state)
    torch.testing.assert_close(
        merged["model.layers.0.self_attn.q_proj.weight"], base + (LORA.alpha / LORA.r) * up @ down
    )
    assert not any("lora" in key or "base_layer" in key for key in merged)
    state[f"{layer}.lora_B.default.weight"].zero_()  # a gathered (sharded) state is used, not the live weights
    torch.testing.assert_close(merged_state_dict(actor, state)["model.layers.0.self_attn.q_proj.weight"], base)


def test_modules_to_save_are_exported_trained(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    ids, mask = batch()
    actor = policy(base_dirs["policy"], LoraArgs(r=2, target_modules=("q_proj",), modules_to_save=("lm_head",)))
    assert any("modules_to_save" in n for n, p in actor.named_parameters() if p.requires_grad)
    move_adapters(actor)
    out = export(actor, load_tokenizer(ModelSource(path=str(base_dirs["policy"]))), tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        live = actor(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, live, atol=1e-5, rtol=1e-5)


def test_adapter_export_loads_with_peft_on_the_base(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    ids, mask = batch()
    actor = policy(base_dirs["policy"], LoraArgs(r=4, alpha=8.0, target_modules=("q_proj",), export="adapter"))
    move_adapters(actor)
    out = export(actor, load_tokenizer(ModelSource(path=str(base_dirs["policy"]))), tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter alone
    base = AutoModelForCausalLM.from_pretrained(base_dirs["policy"])
    loaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits, actor(input_ids=ids, attention_mask=mask).logits
        )


def test_score_model_exports_merged_and_reloads_with_the_score_model_loader(
    base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    ids, mask = batch()
    critic = score_model(base_dirs["score"])
    move_adapters(critic)
    tokenizer = load_tokenizer(ModelSource(path=str(base_dirs["score"])))
    out = critic.save_pretrained(tmp_path / "critic", tokenizer)
    loaded = score_model(out, lora=None)
    AutoModel.from_pretrained(out)  # the backbone alone is a plain Hugging Face model
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask).scores, critic(ids, mask).scores, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(score_model(base_dirs["score"], None)(ids, mask).scores, critic(ids, mask).scores)


def test_the_critics_frozen_twin_gives_the_reward_models_scores(base_dirs: dict[str, Path]) -> None:
    ids, mask = batch()
    critic = score_model(base_dirs["score"])
    twin = shared_frozen(critic)
    assert isinstance(twin, FrozenScoreTwin)
    move_adapters(critic)  # the critic trains (adapter and head); the twin must still be the reward model
    critic.train()
    reward_model = score_model(base_dirs["score"], lora=None)
    with torch.no_grad():
        expected = reward_model(ids, mask)
        twin_out = twin(ids, mask)
        assert torch.equal(twin_out.scores, expected.scores)
        assert torch.equal(twin_out.end_scores, expected.end_scores)
        assert not torch.allclose(critic(ids, mask).scores, expected.scores, atol=1e-3)
    assert critic.training
    assert not any(p.requires_grad for p in twin.parameters())
    assert not any(p is q for p in twin.parameters() for q in critic.backbone.parameters())  # the base is not re-held
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in critic.score_head.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_the_twin_keeps_a_bias_free_head_bias_free(bias: bool, base_dirs: dict[str, Path]) -> None:
    ids, mask = batch()
    critic = score_model(base_dirs["score"])
    critic.score_head = type(critic.score_head)(critic.score_head.in_features, 1, bias=bias)
    twin = shared_frozen(critic)
    assert (twin.score_head.bias is not None) == bias
    with torch.no_grad():
        torch.testing.assert_close(twin(ids, mask).scores, critic(ids, mask).scores)  # adapters still at B = 0


def test_checkpoints_keep_the_trainable_tensors_and_restore_the_frozen_ones(base_dirs: dict[str, Path]) -> None:
    holder = nn.Module()
    holder.actor = policy(base_dirs["policy"])
    move_adapters(holder.actor)
    full = {name: tensor.clone() for name, tensor in holder.state_dict().items()}
    checkpoint = {"state_dict": dict(full)}
    drop_frozen(checkpoint, holder)
    kept = set(checkpoint["state_dict"])
    assert kept == {name for name, param in holder.named_parameters() if param.requires_grad}
    assert sum(full[name].numel() for name in kept) < sum(t.numel() for t in full.values()) / 5
    restore_frozen(checkpoint, holder)
    assert checkpoint["state_dict"].keys() == full.keys()
    holder.load_state_dict(checkpoint["state_dict"])  # strict
    plain = nn.Module()
    plain.actor = policy(base_dirs["policy"], lora=None)
    untouched = {"state_dict": plain.state_dict()}
    drop_frozen(untouched, plain)  # full fine-tuning: the checkpoint is left whole
    assert untouched["state_dict"].keys() == plain.state_dict().keys()


def test_qlora_says_it_needs_cuda(base_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"lora.quantize: 'nf4' \(QLoRA\).*needs a CUDA GPU"):
        policy(base_dirs["policy"], LoraArgs(quantize="nf4"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        score_model(base_dirs["score"], LoraArgs(quantize="nf4"))
    with pytest.raises(ValueError, match="QLoRA quantizes pretrained weights"):
        ModelSource(config=TINY, tokenizer="safety-world", lora=LoraArgs(quantize="nf4"))


def test_bad_lora_settings_are_refused(base_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"lora.r: expected a rank >= 1, found 0"):
        LoraArgs(r=0)
    with pytest.raises(ValueError, match=r"lora.dropout"):
        LoraArgs(dropout=1.0)
    with pytest.raises(ValueError, match=r"cannot be merged for export; target linear layers only"):
        policy(base_dirs["policy"], LoraArgs(target_modules=("embed_tokens",)))


def test_the_rollout_copy_of_a_sharded_lora_actor_has_the_adapters_merged(base_dirs: dict[str, Path]) -> None:
    from lit_saferlhf_plugins.generators.static_cache import LocalCopy

    ids, mask = batch()
    actor = policy(base_dirs["policy"])
    move_adapters(actor)
    copy = LocalCopy(actor).refresh(actor)  # what StaticCacheGenerate decodes with under FSDP2 / ZeRO-3
    with torch.no_grad():
        torch.testing.assert_close(
            copy(input_ids=ids, attention_mask=mask).logits, actor(input_ids=ids, attention_mask=mask).logits
        )
