"""Templates, tokenisation, collation and the optimiser helpers, with known values."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_saferlhf.data.collate import IGNORE_INDEX, Encoder, collate_pairs, collate_prompts, collate_sft
from lit_saferlhf.data.datamodules import SFTData, split_by_prompt
from lit_saferlhf.data.records import Message, SFTRecord, user_prompt
from lit_saferlhf.data.safety_world import build_tokenizer
from lit_saferlhf.data.templates import ChatTemplate, PlainTemplate, SafeRLHFTemplate
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


def test_plain_template_passes_a_raw_prompt_unchanged(tokenizer) -> None:
    assert PlainTemplate().format_prompt(user_prompt("  Q: 2+2?\nA:"), tokenizer) == "  Q: 2+2?\nA:"
    dialogue = (Message("user", "a"), Message("assistant", "b"), Message("user", "c"))
    assert PlainTemplate(separator="|").format_prompt(dialogue, tokenizer) == "a|b|c"
    encoded = Encoder(tokenizer, PlainTemplate(), max_length=64).encode(user_prompt("bake bread"), "sure")
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == ["<s>", "bake", "bread", "sure", "</s>"]


def sft_data(tmp_path: Path, rows: list[dict], tokenizer, caplog, **settings) -> SFTData:
    """``SFTData`` of ``rows`` set up for a stage that owns ``tokenizer`` (no trainer, no network)."""
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = SFTData(path=str(tmp_path / "rows.jsonl"), **settings)
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    lightning_log = logging.getLogger("lightning.pytorch")  # rank_zero_info's; it does not propagate to the root
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            data.setup("fit")
    finally:
        lightning_log.removeHandler(caplog.handler)
    return data


@pytest.mark.parametrize(
    ("template", "line"),
    [
        (None, "renders prompts with SafeRLHFTemplate, the default: no template set (data.init_args.template)"),
        (PlainTemplate(), "renders prompts with PlainTemplate, as data.init_args.template sets"),
    ],
)
def test_the_start_up_line_says_which_template_renders_prompts(template, line, tokenizer, tmp_path, caplog) -> None:
    sft_data(tmp_path, [{"prompt": "hi", "response": "sure"}], tokenizer, caplog, template=template)
    assert f"template: SimpleNamespace {line}" in caplog.text


def test_the_start_up_line_says_the_share_of_usable_records(tokenizer, tmp_path, caplog) -> None:
    rows = [{"prompt": "hi", "response": "sure"}, {"prompt": "how do i bake bread today", "response": "sure"}] * 2
    data = sft_data(tmp_path, rows, tokenizer, caplog, max_length=14, on_bad_record="skip")
    assert len(data.train_set) == 2
    assert "train: 2 of 4 records usable (50%)" in caplog.text
    assert "2 dropped: 2 no response token within max_length=14" in caplog.text


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


def test_tokenizer_difference_names_vocabulary_special_tokens_and_encoding() -> None:
    from tokenizers import processors

    from lit_saferlhf.data.tokenizers import tokenizer_difference

    assert tokenizer_difference(build_tokenizer(), build_tokenizer()) is None
    other_eos = build_tokenizer()
    other_eos.eos_token = "<s>"
    assert tokenizer_difference(build_tokenizer(), other_eos) == "eos_token '</s>' vs '<s>'"
    without_bos = build_tokenizer()
    without_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert "encodes as" in (tokenizer_difference(build_tokenizer(), without_bos) or "")  # same vocabulary
    grown = build_tokenizer()
    grown.add_tokens(["<extra>"])
    assert "vocabularies of 233 and 234 tokens, 0 with another id and 1 in only one" in (
        tokenizer_difference(build_tokenizer(), grown) or ""
    )
