"""Templates, tokenisation, collation and the optimiser helpers, with known values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_saferlhf.data.collate import IGNORE_INDEX, Encoder, collate_pairs, collate_prompts, collate_sft
from lit_saferlhf.data.datamodules import split_by_prompt
from lit_saferlhf.data.records import Message, SFTRecord, user_prompt
from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.data.templates import ChatTemplate, SafeRLHFTemplate
from lit_saferlhf.optim import OptimizerArgs, build_optimizer, lr_factor, parameter_groups


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_safe_rlhf_template_single_and_multi_turn(tokenizer) -> None:
    template = SafeRLHFTemplate()
    assert template.format_prompt(user_prompt("hi"), tokenizer) == "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:"
    dialogue = (Message("user", "a"), Message("assistant", "b"), Message("user", "c"))
    assert template.format_prompt(dialogue, tokenizer) == (
        "BEGINNING OF CONVERSATION: USER: a ASSISTANT: b</s> USER: c ASSISTANT:"
    )


def test_chat_template_uses_the_tokenizer_template_and_refuses_without_one(tokenizer) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        ChatTemplate().format_prompt(user_prompt("hi"), tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    try:
        assert ChatTemplate().format_prompt(user_prompt("hi"), tokenizer) == "<user>hi<assistant>"
    finally:
        tokenizer.chat_template = None


def test_sft_labels_mask_the_prompt_and_keep_response_and_eos(tokenizer) -> None:
    encoder = Encoder(tokenizer, SafeRLHFTemplate(), max_length=64)
    encoded = encoder.encode(user_prompt("how do i bake bread"), "sure you need flour")
    prompt_ids = encoder.prompt_ids(user_prompt("how do i bake bread"))
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    batch = collate_sft([encoded], tokenizer.pad_token_id)
    labels = batch["labels"][0].tolist()
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tokenizer.decode(labels[len(prompt_ids) : -1]) == "sure you need flour"
    assert not encoded.truncated


def test_truncation_is_flagged_and_right_padding_masks_labels(tokenizer) -> None:
    encoder = Encoder(tokenizer, SafeRLHFTemplate(), max_length=10)
    long = encoder.encode(user_prompt("how do i bake bread"), "sure you need flour yeast and oven")
    assert long.truncated
    assert len(long.input_ids) == 10
    short = Encoder(tokenizer, SafeRLHFTemplate(), max_length=64).encode(user_prompt("hi"), "sure")
    batch = collate_sft([long, short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(10, len(short.input_ids)))
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [0] * (batch["input_ids"].shape[1] - 10)
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all()


def test_prompts_are_left_padded_for_generation() -> None:
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_pairs_share_one_width(tokenizer) -> None:
    encoder = Encoder(tokenizer, SafeRLHFTemplate(), max_length=64)
    pair = (encoder.encode(user_prompt("hi"), "sure you need flour"), encoder.encode(user_prompt("hi"), "no"))
    batch = collate_pairs([pair], tokenizer.pad_token_id, ("better", "worse"))
    assert batch["better_input_ids"].shape == batch["worse_input_ids"].shape
    assert batch["worse_attention_mask"].sum() == len(pair[1].input_ids)


def test_split_by_prompt_keeps_every_prompt_on_one_side() -> None:
    records = [SFTRecord(user_prompt(f"p{i % 50}"), f"r{i}", "x") for i in range(500)]
    train, val = split_by_prompt(records, 0.2)
    assert len(train) + len(val) == 500
    assert {r.prompt for r in train}.isdisjoint({r.prompt for r in val})
    assert 0.05 < len(val) / 500 < 0.4
    assert split_by_prompt(records, 0.2) == (train, val)  # stable across runs


def test_lr_schedule_warms_up_then_decays() -> None:
    args = OptimizerArgs(lr=1.0, warmup_ratio=0.1, schedule="cosine")
    assert lr_factor(0, 100, args) == pytest.approx(0.1)
    assert lr_factor(9, 100, args) == pytest.approx(1.0)
    assert lr_factor(10, 100, args) == pytest.approx(1.0)
    assert lr_factor(55, 100, args) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, args) == pytest.approx(0.0)
    assert lr_factor(55, 100, OptimizerArgs(warmup_ratio=0.1, schedule="linear")) == pytest.approx(0.5)
    assert lr_factor(90, 100, OptimizerArgs(warmup_ratio=0.0, schedule="constant")) == 1.0
    assert lr_factor(100, 100, OptimizerArgs(warmup_ratio=0.0, min_lr_ratio=0.1)) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_norms_and_one_schedule_per_network() -> None:
    actor, critic = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), nn.Linear(4, 1)
    groups = parameter_groups(actor, OptimizerArgs(weight_decay=0.1))
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    networks = [(actor, OptimizerArgs(lr=1.0, warmup_ratio=0.5)), (critic, OptimizerArgs(lr=0.5, warmup_ratio=0.5))]
    optimizer, scheduler = build_optimizer(networks, 10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2, 0.1, 0.1])  # step 0 of 5 warm-up steps
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * optimizer.param_groups[2]["lr"])
    assert isinstance(optimizer, torch.optim.AdamW)
