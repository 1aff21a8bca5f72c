"""The static-cache generator against Hugging Face ``generate``: greedy tokens, sampling distribution, EOS, n > 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lit_saferlhf.generators import GenerationArgs, HFGenerate
from lit_saferlhf_plugins.generators import static_cache as rollout
from lit_saferlhf_plugins.generators.static_cache import OutputLayer, StaticCacheGenerate, sample_next_token

VOCAB, PAD, EOS = 97, 0, 1


def tiny_lm(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random two-layer causal LM of ``model_type`` with a 97-token vocabulary."""
    torch.manual_seed(seed)
    config = {"vocab_size": VOCAB, "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": 2}
    if model_type == "gpt2":
        config |= {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}
    else:
        config |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 128, "head_dim": 8}  # fmt: skip
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


def left_padded_prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Five prompts of 2 to 9 tokens, left-padded to 9 columns: ``(ids, mask)``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (5, 9), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((9, 2, 5, 7, 3)):
        mask[row, : 9 - length] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, eos: int) -> torch.Tensor:
    """Hugging Face ``generate``, greedy, dynamic cache."""
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                          eos_token_id=eos, pad_token_id=PAD)  # fmt: skip


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "mistral"])
@pytest.mark.parametrize(("check_every", "prompt_bucket"), [(1, 1), (4, 16)])
def test_greedy_tokens_match_hf_generate(model_type: str, check_every: int, prompt_bucket: int) -> None:
    model, (ids, mask) = tiny_lm(model_type), left_padded_prompts()
    expected = hf_greedy(model, ids, mask, steps=20, eos=EOS)
    generator = StaticCacheGenerate(check_every=check_every, prompt_bucket=prompt_bucket)
    got = generator.generate(model, ids, mask, GenerationArgs(max_new_tokens=20, temperature=0), EOS, PAD)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("check_every", [1, 3, 64])
def test_rows_are_padded_after_eos_and_cut_where_generate_stops(check_every: int) -> None:
    model, (ids, mask) = tiny_lm("llama"), left_padded_prompts()
    free = hf_greedy(model, ids, mask, steps=16, eos=EOS)[:, 9:]
    eos = int(free[0, 4])  # a token that row 0 emits at step 4 acts as EOS: rows end at different steps
    expected = hf_greedy(model, ids, mask, steps=16, eos=eos)
    args = GenerationArgs(max_new_tokens=16, temperature=0)
    got = StaticCacheGenerate(check_every=check_every).generate(model, ids, mask, args, eos, PAD)
    assert torch.equal(got, expected)
    assert (got[:, 9:] == eos).any(dim=1).any()  # some row did stop


def test_every_row_finishing_early_stops_generation() -> None:
    model, (ids, mask) = tiny_lm("qwen2"), left_padded_prompts()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    model.lm_head.bias.data[5] = 1e4  # token 5 always wins: every row stops at once when 5 is the EOS
    args = GenerationArgs(max_new_tokens=30, temperature=0)
    got = StaticCacheGenerate(check_every=8).generate(model, ids, mask, args, 5, PAD)
    assert got.shape == (5, 10)
    assert (got[:, -1] == 5).all()


def test_num_return_sequences_repeats_each_prompt_in_order() -> None:
    model, (ids, mask) = tiny_lm("llama"), left_padded_prompts()
    single = StaticCacheGenerate().generate(model, ids, mask, GenerationArgs(max_new_tokens=8, temperature=0), EOS, PAD)
    args = GenerationArgs(max_new_tokens=8, temperature=0, num_return_sequences=3)
    triple = StaticCacheGenerate().generate(model, ids, mask, args, EOS, PAD)
    assert torch.equal(triple, single.repeat_interleave(3, dim=0))
    sampled = StaticCacheGenerate().generate(model, ids, mask, GenerationArgs(max_new_tokens=8, num_return_sequences=3),
                                             EOS, PAD)  # fmt: skip
    assert sampled.shape[0] == 15
    assert torch.equal(sampled[:, :9], ids.repeat_interleave(3, dim=0))


@pytest.mark.parametrize("bias", [False, True])
def test_packed_output_layer_equals_linear_up_to_float32_rounding(bias: bool) -> None:
    torch.manual_seed(0)
    layer, hidden = torch.nn.Linear(64, 3001, bias=bias), torch.randn(7, 64)
    model = torch.nn.Module()
    model.config = AutoConfig.for_model("llama")
    assert OutputLayer.applies(layer, model)
    assert not OutputLayer.applies(layer.to(torch.bfloat16), model)  # float32 only
    layer.float()
    torch.testing.assert_close(OutputLayer(layer, rows=7)(hidden), layer(hidden), rtol=1e-5, atol=1e-5)
    model.config.final_logit_softcapping = 30.0  # a model that transforms its logits keeps its own forward
    assert not OutputLayer.applies(layer, model)


def test_packed_and_plain_output_layers_decode_the_same_greedy_tokens() -> None:
    model, (ids, mask) = tiny_lm("qwen2"), left_padded_prompts()
    args = GenerationArgs(max_new_tokens=24, temperature=0)
    packed = StaticCacheGenerate().generate(model, ids, mask, args, EOS, PAD)
    plain = StaticCacheGenerate(pack_output_layer=False).generate(model, ids, mask, args, EOS, PAD)
    assert torch.equal(packed, plain)
    assert torch.equal(packed, hf_greedy(model, ids, mask, steps=24, eos=EOS))


def hf_warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The next-token distribution of Hugging Face sampling: its warpers in ``generate``'s order, then softmax."""
    scores = logits.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


SAMPLING = [(1.0, 50, 1.0), (0.7, 10, 0.9), (1.3, 0, 0.8), (1.0, 5, 1.0), (0.5, 0, 1.0)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SAMPLING)
def test_draws_follow_the_warped_softmax(temperature: float, top_k: int, top_p: float) -> None:
    """Total-variation distance of 40,000 draws from HF's warped distribution < 0.02 (sampling error ~0.005-0.01)."""
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 2
    draws = sample_next_token(logits.expand(40_000, -1), temperature, top_k, top_p)
    empirical = torch.bincount(draws, minlength=VOCAB).float() / len(draws)
    expected = hf_warped_probs(logits, temperature, top_k, top_p)[0]
    assert (empirical[expected == 0] == 0).all(), "drew a token the warpers remove"
    assert 0.5 * (empirical - expected).abs().sum() < 0.02


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_top_k_keeps_every_token_tied_with_the_kth_score_as_hf_does(top_p: float) -> None:
    """k = 5: three high scores, then four tokens tied at the 5th score; HF's TopKLogitsWarper keeps all seven."""
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB).clamp(max=1.0)
    logits[0, [10, 11, 12]] = torch.tensor([3.0, 2.7, 2.4])
    logits[0, [20, 30, 40, 50]] = 2.0
    expected = hf_warped_probs(logits, 1.0, 5, top_p)[0]
    assert int((expected > 0).sum()) == (7 if top_p == 1.0 else 6)  # top-p 0.9 drops one of the tied tokens
    draws = sample_next_token(logits.expand(40_000, -1), 1.0, 5, top_p)
    empirical = torch.bincount(draws, minlength=VOCAB).float() / len(draws)
    assert (empirical[expected == 0] == 0).all()
    assert 0.5 * (empirical - expected).abs().sum() < 0.02


def test_first_sampled_token_of_a_model_follows_its_warped_softmax() -> None:
    """4,000 samples of the first response token (n = 4000 of one prompt) vs HF's warped next-token softmax."""
    model, (ids, mask) = tiny_lm("llama"), left_padded_prompts()
    with torch.no_grad():
        positions = (mask[1:2].cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids[1:2], attention_mask=mask[1:2], position_ids=positions).logits[:, -1]
    expected = hf_warped_probs(logits, 0.8, 20, 0.95)[0]
    args = GenerationArgs(max_new_tokens=1, temperature=0.8, top_k=20, top_p=0.95, num_return_sequences=4000)
    torch.manual_seed(0)
    first = StaticCacheGenerate().generate(model, ids[1:2], mask[1:2], args, EOS, PAD)[:, -1]
    empirical = torch.bincount(first, minlength=VOCAB).float() / len(first)
    assert (empirical[expected == 0] == 0).all()
    assert 0.5 * (empirical - expected).abs().sum() < 0.05


def test_greedy_is_temperature_zero_and_top_k_one_is_greedy_too() -> None:
    logits = torch.randn(6, VOCAB)
    assert torch.equal(sample_next_token(logits, 0.0, 50, 1.0), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, 1.0, 1, 1.0), logits.argmax(-1))


def test_sampling_matches_hf_generate_contract() -> None:
    """Same shape rule and padding as ``HFGenerate``: prompt kept, pad only after an EOS."""
    model, (ids, mask) = tiny_lm("gpt2"), left_padded_prompts()
    args = GenerationArgs(max_new_tokens=12)
    torch.manual_seed(3)
    ours = StaticCacheGenerate(check_every=5).generate(model, ids, mask, args, EOS, PAD)
    torch.manual_seed(3)
    theirs = HFGenerate(synced_gpus=False).generate(model, ids, mask, args, EOS, PAD)
    assert torch.equal(ours[:, :9], ids)
    assert ours.shape[1] <= 9 + 12
    assert theirs.shape[1] <= 9 + 12
    responses = ours[:, 9:]
    after_eos = (responses == EOS).long().cumsum(-1) - (responses == EOS).long() > 0
    assert (responses[after_eos] == PAD).all()


def test_unsupported_model_type_names_the_type_and_the_fallback() -> None:
    config = AutoConfig.for_model("gpt_neox", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=r"'gpt_neox' is not supported.*HFGenerate"):
        StaticCacheGenerate().generate(model, ids, mask, GenerationArgs(max_new_tokens=2), EOS, PAD)


def test_an_unsupported_actor_is_refused_when_the_stage_sets_up(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``configure_model`` refuses it (naming the type and the fallback) before any rollout."""
    from lit_saferlhf.stages import PPOLagrangian
    from lit_saferlhf_plugins.solvers import DualAscent

    monkeypatch.setattr(rollout, "SUPPORTED_MODEL_TYPES", ("gpt2",))  # the tiny actor, a Llama, is then unsupported
    module = PPOLagrangian(policy=str(tiny_models["sft"]), reward_model=str(tiny_models["reward"]),
                           cost_model=str(tiny_models["cost"]), solver=DualAscent(),
                           generator=StaticCacheGenerate())  # fmt: skip
    with pytest.raises(ValueError, match=r"model type 'llama' is not supported.*lit_saferlhf.generators.HFGenerate"):
        module.configure_model()
    HFGenerate().check_model(module.actor)  # the fallback takes any model


def test_generation_config_processors_it_would_ignore_are_refused() -> None:
    model, (ids, mask) = tiny_lm("llama"), left_padded_prompts()
    model.generation_config.repetition_penalty = 1.2
    with pytest.raises(ValueError, match=r"repetition_penalty.*HFGenerate"):
        StaticCacheGenerate().generate(model, ids, mask, GenerationArgs(max_new_tokens=2), EOS, PAD)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="check_every"):
        StaticCacheGenerate(check_every=0)


@pytest.mark.slow
def test_compiled_step_gives_the_same_tokens_and_compiles_once() -> None:
    """torch.compile of the decode step on CPU (~30 s): same greedy tokens, reused across prompt widths."""
    model, (ids, mask) = tiny_lm("llama"), left_padded_prompts()
    expected = hf_greedy(model, ids, mask, steps=10, eos=EOS)
    generator = StaticCacheGenerate(compile=True, prompt_bucket=16)
    args = GenerationArgs(max_new_tokens=10, temperature=0)
    assert torch.equal(generator.generate(model, ids, mask, args, EOS, PAD), expected)
    narrower = generator.generate(model, ids[:, 2:], mask[:, 2:], args, EOS, PAD)  # 7 columns: same bucket of 16
    assert torch.equal(narrower, hf_greedy(model, ids[:, 2:], mask[:, 2:], steps=10, eos=EOS))
