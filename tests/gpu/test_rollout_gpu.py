"""StaticCacheGenerate on a GPU: the compiled CUDA-graph step, and gather-once decoding under DeepSpeed ZeRO-3.

Never run in CI (no GPU there); on a CUDA machine (DeepSpeed installed for the ZeRO-3 case):

    python -m pytest -m gpu tests/gpu/test_rollout_gpu.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from lit_saferlhf.generators import GenerationArgs
from lit_saferlhf_plugins.generators.static_cache import StaticCacheGenerate
from tests.unit.test_rollout import EOS, PAD, hf_greedy, left_padded_prompts, tiny_lm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_compiled_cuda_graph_step_gives_hf_greedy_tokens_across_rollouts() -> None:
    """mode reduce-overhead (CUDA graphs): same tokens as HF generate, compiled once for two prompt widths."""
    model = tiny_lm("llama").cuda()
    ids, mask = (tensor.cuda() for tensor in left_padded_prompts())
    generator = StaticCacheGenerate(prompt_bucket=16)  # compile=None: on, because the model is on CUDA
    args = GenerationArgs(max_new_tokens=12, temperature=0)
    for columns in (9, 7):  # the same bucket of 16: no recompilation
        prompt, prompt_mask = ids[:, -columns:], mask[:, -columns:]
        expected = hf_greedy(model, prompt, prompt_mask, steps=12, eos=EOS)
        assert torch.equal(generator.generate(model, prompt, prompt_mask, args, EOS, PAD), expected)
    sampled = generator.generate(model, ids, mask, GenerationArgs(max_new_tokens=12, num_return_sequences=3), EOS, PAD)
    assert sampled.shape[0] == 15


def test_zero3_gathered_copy_decodes_the_unsharded_actors_tokens() -> None:
    """A ZeRO-3 partitioned actor, gathered once into a local copy, samples exactly the twin's tokens."""
    deepspeed = pytest.importorskip("deepspeed")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29573", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})  # fmt: skip
    deepspeed.init_distributed()
    twin = tiny_lm("llama").cuda()
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    with deepspeed.zero.Init(config_dict_or_path=config):
        actor = tiny_lm("llama")
    params = list(actor.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for param, source in zip(params, twin.parameters(), strict=True):
            param.copy_(source)
    ids, mask = (tensor.cuda() for tensor in left_padded_prompts())
    args = GenerationArgs(max_new_tokens=12, temperature=0.9, top_k=20)
    generator = StaticCacheGenerate(gather=True, compile=False)
    torch.manual_seed(0)
    gathered = generator.generate(actor, ids, mask, args, EOS, PAD)
    torch.manual_seed(0)
    assert torch.equal(gathered, StaticCacheGenerate(compile=False).generate(twin, ids, mask, args, EOS, PAD))
