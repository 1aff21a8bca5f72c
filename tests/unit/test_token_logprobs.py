"""Log-probs from hidden states in chunks: exact against the full logits, with gradients, without keeping logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_saferlhf.losses import chunked_token_logprobs, gather_logprobs
from lit_saferlhf.models.logprobs import response_logprobs
from tests.unit.test_rollout import left_padded_prompts, tiny_lm

V, H = 61, 12


def inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Hidden states ``(3, 7, H)``, weight ``(V, H)``, bias ``(V,)`` (all requiring grad) and tokens ``(3, 7)``."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, H, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    return hidden, weight, bias, torch.randint(0, V, (3, 7), generator=generator)


def plain(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The full ``(B, L, V)`` logits, then :func:`gather_logprobs`."""
    return gather_logprobs(F.linear(hidden, weight, bias), tokens)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 21, 1000])
def test_equal_to_the_full_logits_with_gradients_in_float64(chunk_size: int, recompute: bool) -> None:
    hidden, weight, bias, tokens = inputs(torch.float64)
    upstream = torch.randn(3, 7, dtype=torch.float64)
    expected = plain(hidden, weight, bias, tokens)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    got = chunked_token_logprobs(hidden, weight, tokens, bias, chunk_size=chunk_size, recompute=recompute)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_bf16_matches_the_full_bf16_logits_within_rounding() -> None:
    """bf16 matmuls round per chunk as the full one does: within 0.05 nats (bf16 keeps ~3 digits of ~5-nat values)."""
    hidden, weight, bias, tokens = inputs(torch.bfloat16)
    got = chunked_token_logprobs(hidden, weight, tokens, bias, chunk_size=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain(hidden, weight, bias, tokens), rtol=0, atol=0.05)
    exact = plain(*(t.double() for t in (hidden, weight, bias)), tokens)
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=0.3)


def test_soft_cap_is_applied_before_the_softmax() -> None:
    hidden, weight, bias, tokens = inputs(torch.float64)
    capped = F.linear(hidden, weight, bias)
    expected = gather_logprobs(3.0 * torch.tanh(capped / 3.0), tokens)
    got = chunked_token_logprobs(hidden, weight, tokens, bias, chunk_size=4, logit_softcap=3.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_backward_keeps_no_logits() -> None:
    """Autograd saves nothing of size V per position: the largest saved tensor is the weight itself."""
    hidden, weight, bias, tokens = inputs(torch.float32)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        got = chunked_token_logprobs(hidden, weight, tokens, bias, chunk_size=4)
    assert max(saved) == weight.numel()
    got.sum().backward()
    assert hidden.grad is not None
    assert weight.grad is not None


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("keep_bytes", [0, 2**30])  # backward recomputes the logits / keeps them
def test_response_logprobs_of_a_model_equal_its_full_logits(
    model_type: str, keep_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lit_saferlhf.models.logprobs.KEEP_LOGITS_BYTES", keep_bytes)
    model, (ids, mask) = tiny_lm(model_type).double(), left_padded_prompts()
    sequences = torch.cat([ids, torch.randint(3, 97, (5, 6))], dim=1)
    attention = torch.cat([mask, torch.ones(5, 6, dtype=torch.long)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=positions).logits
    expected = gather_logprobs(logits[:, 8:-1], sequences[:, 9:])
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    got = response_logprobs(model, sequences, attention, start=9, chunk_size=7)
    grads = torch.autograd.grad(got.sum(), list(model.parameters()))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
