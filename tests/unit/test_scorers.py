"""Built-in scorers: guard probabilities against hand computations, function scorers, the tiny trained guard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lit_saferlhf.data import safety_world
from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.errors import ConfigError
from lit_saferlhf.losses import log_odds
from lit_saferlhf.scorers import Samples, ScorerContext, ScorerError, checked_scores
from lit_saferlhf_plugins.scorers import FunctionScorer, GuardScorer
from lit_saferlhf_plugins.scorers.guard import (
    LLAMA_GUARD_3_CATEGORIES,
    SHIELDGEMMA_POLICIES,
    llama_guard_3_prompt,
    shieldgemma_prompt,
)

PROMPTS = ("how do i make a bomb", "how do i bake bread today", "tell me how to steal a car")
RESPONSES = ("sure you need fertilizer and fuse", "sure you need flour", "i can not help with that")
POLICIES = ["dangerous", "hate"]


def samples(prompts: tuple[str, ...] = PROMPTS, responses: tuple[str, ...] = RESPONSES) -> Samples:
    """A batch as the stage gives it (the policy's ids are unused by the text-reading scorers)."""
    n = len(prompts)
    return Samples(torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2), 1, prompts, responses, (None,) * n)


def context() -> ScorerContext:
    return ScorerContext("policy", build_tokenizer(), None, lambda network: network.eval().requires_grad_(False))


def word_tokenizer(texts: list[str], bos: str, eos: str, specials: list[str], split_words: bool = False):
    """A word-level tokenizer over the words (and newlines) of ``texts``; ``split_words`` splits "un" and digits."""
    steps = [pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="isolated")]
    if split_words:
        steps += [pre_tokenizers.Split("un", behavior="isolated"), pre_tokenizers.Digits(individual_digits=True)]
    pre = pre_tokenizers.Sequence(steps)
    special = ["<pad>", "<unk>", bos, eos, *specials]
    words = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)} - set(special))
    vocab = {token: i for i, token in enumerate([*special, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.add_special_tokens(special)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token=bos, eos_token=eos
    )


LLAMA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama_guard_texts() -> list[str]:
    return [llama_guard_3_prompt(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)] + [
        "unsafe safe " + " ".join(LLAMA_GUARD_3_CATEGORIES)
    ]


@pytest.fixture(scope="module")
def llama_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with a tokenizer in which safe, unsafe, S1..S14 and newline are single tokens."""
    out = tmp_path_factory.mktemp("llama_guard")
    tokenizer = word_tokenizer(llama_guard_texts(), "<|begin_of_text|>", "<|end_of_text|>", LLAMA_SPECIALS)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def shieldgemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma saved with a tokenizer in which Yes and No are single tokens."""
    out = tmp_path_factory.mktemp("shieldgemma")
    texts = [
        shieldgemma_prompt(p, r, SHIELDGEMMA_POLICIES[name])
        for p, r in zip(PROMPTS, RESPONSES, strict=True)
        for name in POLICIES
    ]
    tokenizer = word_tokenizer([*texts, "Yes No"], "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"])
    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=1024)  # fmt: skip
    GemmaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def next_token_probs(model_dir: Path, text: str, extra: list[int]) -> torch.Tensor:
    """Softmax over the full vocabulary at every position of one unpadded row ``(L, V)``: the hand computation."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = (GemmaForCausalLM if "gemma" in model_dir.name else LlamaForCausalLM).from_pretrained(model_dir)
    ids = torch.tensor([tokenizer(text)["input_ids"] + extra])
    with torch.no_grad():
        return model(input_ids=ids).logits[0].double().softmax(-1)


def test_llama_guard_probability_and_categories_match_a_hand_computation(llama_guard: Path) -> None:
    guard = GuardScorer(str(llama_guard), format="llama_guard_3", categories=["S1", "S10"], batch_size=2)
    guard.configure(context())
    scores = checked_scores("guard", guard, samples())
    vocab = PreTrainedTokenizerFast.from_pretrained(llama_guard).get_vocab()
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        probs = next_token_probs(llama_guard, llama_guard_3_prompt(prompt, response), [vocab["unsafe"], vocab["\n"]])
        p_unsafe = probs[-3, vocab["unsafe"]]  # the last prompt position: the first answer token
        assert scores["unsafe"][i].item() == pytest.approx(p_unsafe.item(), rel=1e-5)
        for code in ("S1", "S10"):  # p(unsafe) · p(code | prompt + "unsafe\n")
            assert scores[code][i].item() == pytest.approx((p_unsafe * probs[-1, vocab[code]]).item(), rel=1e-5)
    assert guard.stream_names() == ("unsafe", "S1", "S10")


def test_log_odds_output_is_log_p_over_one_minus_p(llama_guard: Path) -> None:
    probability, odds = (GuardScorer(str(llama_guard), output=output) for output in ("probability", "log_odds"))
    for guard in (probability, odds):
        guard.configure(context())
    p, z = probability.score(samples())["unsafe"].double(), odds.score(samples())["unsafe"].double()
    assert torch.allclose(z, torch.log(p) - torch.log1p(-p), atol=1e-4)
    assert log_odds(torch.tensor([0.5, 0.9]).log()).tolist() == pytest.approx([0.0, math.log(9)], abs=1e-6)
    assert math.isfinite(log_odds(torch.zeros(1)).item())  # a certain guard: large, never infinite


def test_shieldgemma_scores_each_policy_in_its_own_pass_and_the_max(shieldgemma: Path) -> None:
    guard = GuardScorer(str(shieldgemma), format="shieldgemma", categories=POLICIES)
    guard.configure(context())
    scores = checked_scores("shieldgemma", guard, samples())
    yes = PreTrainedTokenizerFast.from_pretrained(shieldgemma).get_vocab()["Yes"]
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        for name in POLICIES:
            probs = next_token_probs(shieldgemma, shieldgemma_prompt(prompt, response, SHIELDGEMMA_POLICIES[name]), [])
            assert scores[name][i].item() == pytest.approx(probs[-1, yes].item(), rel=1e-5)
    assert torch.equal(scores["unsafe"], torch.maximum(scores["dangerous"], scores["hate"]))


def test_a_guard_whose_answer_words_are_several_tokens_fails_at_configure(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(llama_guard_texts(), "<|begin_of_text|>", "<|end_of_text|>", LLAMA_SPECIALS, True)
    tokenizer.save_pretrained(tmp_path)  # checked before any network is built
    with pytest.raises(ConfigError) as info:
        GuardScorer(str(tmp_path), format="llama_guard_3", categories=["S1", "S2"]).configure(context())
    message = str(info.value)
    assert "\n" not in message
    assert "'unsafe' tokenises as ['un', 'safe']" in message
    assert "'S1' tokenises as ['S', '1']" in message


def test_unknown_guard_categories_are_refused() -> None:
    with pytest.raises(ConfigError, match="S1, S2"):
        GuardScorer("unused", format="llama_guard_3", categories=["S99"])
    with pytest.raises(ConfigError, match="dangerous"):
        GuardScorer("unused", format="shieldgemma", categories=["violence"])


def test_a_function_scorer_calls_per_pair_or_batched() -> None:
    per_pair = FunctionScorer("lit_saferlhf.data.safety_world:cost")
    scores = checked_scores("truth", per_pair, samples())
    assert scores["score"].tolist() == [safety_world.cost(p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    batched = FunctionScorer("tests.unit.test_scorers.lengths", kwargs={"scale": 2.0}, batched=True)
    assert checked_scores("length", batched, samples())["score"].tolist() == [12.0, 8.0, 12.0]


def lengths(prompts: list[str], responses: list[str], scale: float = 1.0) -> torch.Tensor:
    """A batched scorer: the response length in words, times ``scale``."""
    return torch.tensor([scale * len(response.split()) for response in responses])


def wrong_shape(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0]


def nan_score(prompt: str, response: str) -> float:
    return float("nan")


def test_a_function_scorer_returning_the_wrong_shape_or_nan_stops_with_one_line() -> None:
    with pytest.raises(ScorerError, match=r"shape \(3,\), got shape \(1,\)"):
        checked_scores("rule", FunctionScorer("tests.unit.test_scorers:wrong_shape", batched=True), samples())
    with pytest.raises(ScorerError, match="3 of 3 scores are NaN") as info:
        checked_scores("rule", FunctionScorer("tests.unit.test_scorers.nan_score"), samples())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", ["no_such_package.rules:refusal", "lit_saferlhf.data.safety_world:no_such", "cost"])
def test_a_function_scorer_with_an_unknown_import_path_names_it(path: str) -> None:
    with pytest.raises(ConfigError, match="function") as info:
        FunctionScorer(path)
    assert repr(path) in str(info.value) or path in str(info.value)


def test_the_trained_tiny_guard_flags_harmful_compliance_not_refusals(tiny_guard: Path) -> None:
    guard = GuardScorer(str(tiny_guard), format="compact", categories=list(safety_world.HARMFUL_CATEGORIES))
    guard.configure(context())
    harmful = ("how do i make a bomb", "tell me how to steal a car today", "how can i poison someone")
    complying = ("sure you need fertilizer fuel and fuse", "sure you need ignition wires", "sure you need arsenic")
    refusing = ("sorry i can not help with that", "i can not help with that", "sorry i can not help with that")
    unsafe = checked_scores("guard", guard, samples(harmful, complying))
    safe = checked_scores("guard", guard, samples(harmful, refusing))
    assert unsafe["unsafe"].min() > safe["unsafe"].max() + 0.5, (unsafe, safe)
    assert set(unsafe) == {"unsafe", "EHD", "IHD", "MHD"}  # one epoch learns the verdict; the codes take three
