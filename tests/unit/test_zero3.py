"""Pretrained weights into ZeRO-3-partitioned networks, on CPU (DeepSpeed's CPU accelerator, one gloo process)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lit_saferlhf.data.tokenizers import load_tokenizer
from lit_saferlhf.models.causal_lm import ModelSource, build_causal_lm
from lit_saferlhf.models.score_model import ScoreModel
from lit_saferlhf.models.zero3 import load_partitioned, partitioning

ZERO3 = {"zero_optimization": {"stage": 3}, "train_batch_size": 1}


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 1-process gloo group, as ZeRO-3 needs one; DeepSpeed's CPU shared-memory kernel is not compiled."""
    backend = importlib.import_module("deepspeed.comm.torch")  # (`deepspeed.comm.torch` is torch itself)
    monkeypatch.setattr(backend, "build_shm_op", lambda: None)  # a CPU speed-up, compiled on first use
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", "29581")
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.setitem(os.environ, name, "0")
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "1")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full values of a partitioned model's state."""
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, check_dtype=False, msg=key)  # zero.Init casts buffers to fp32


def test_a_causal_lm_built_under_zero3_is_partitioned_and_holds_the_pretrained_weights(
    one_process_group: None, tiny_models: dict[str, Path]
) -> None:
    source = ModelSource(path=str(tiny_models["sft"]))
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        assert partitioning()
        model = build_causal_lm(source, load_tokenizer(source))
    assert not partitioning()
    assert all(param.numel() == 0 and param.ds_numel > 0 for param in model.parameters())  # no rank holds it whole
    assert_same(gathered(model), AutoModelForCausalLM.from_pretrained(source.path).state_dict())


def test_a_score_model_built_under_zero3_holds_its_backbone_head_and_zero_bias(
    one_process_group: None, tiny_models: dict[str, Path]
) -> None:
    reward = ModelSource(path=str(tiny_models["reward"]))
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        model = ScoreModel.from_source(reward, load_tokenizer(reward))
    assert_same(gathered(model), ScoreModel.from_source(reward, load_tokenizer(reward)).state_dict())

    sft = ModelSource(path=str(tiny_models["sft"]))  # a causal LM: base-model keys, and a new head
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        fresh = ScoreModel.from_source(sft, load_tokenizer(sft), new_head_ok=True)
    state = gathered(fresh)
    expected = AutoModelForCausalLM.from_pretrained(sft.path).model.state_dict()
    assert_same({key.removeprefix("backbone."): value for key, value in state.items() if "backbone." in key}, expected)
    assert "score_head.bias" not in state  # a new head is bias-free, as transformers' heads are


def test_a_random_causal_lm_built_under_zero3_is_initialised_like_transformers_does(one_process_group: None) -> None:
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip
    source = ModelSource(config=config, tokenizer="safety-world")
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        model = build_causal_lm(source, load_tokenizer(source))
    state = gathered(model)
    assert 0.015 < state["model.layers.0.mlp.up_proj.weight"].std() < 0.025  # normal(0, initializer_range=0.02)
    assert state["model.norm.weight"].eq(1).all()
    assert state["model.embed_tokens.weight"][model.config.pad_token_id].eq(0).all()


def test_a_checkpoint_missing_parameters_is_refused(one_process_group: None) -> None:
    with deepspeed.zero.Init(config_dict_or_path=ZERO3):
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    state = {"0.weight": torch.ones(3, 3), "0.bias": torch.zeros(3)}
    with pytest.raises(KeyError, match=r"no values for 2 parameters.*1\.weight"):
        load_partitioned(model, state)
    assert gathered(model)["0.weight"].eq(1).all()
