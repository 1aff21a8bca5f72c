"""FDC selection: exact quotas per risk category, label names, every record counted, the command."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from lit_saferlhf.cli import main
from lit_saferlhf.commands import select
from lit_saferlhf.data import safety_world as world
from lit_saferlhf.errors import ConfigError, DataError

PAIRS = "safety-world:pairs-risk"


def pairs() -> list[tuple[str, dict]]:
    return list(world.rows("pairs-risk"))


@pytest.mark.parametrize(
    ("total", "ratio", "wanted"),
    [(14, (10, 3, 1), (10, 3, 1)), (10, (10, 3, 1), (7, 2, 1)), (1400, (10, 3, 1), (1000, 300, 100)),
     (5, (1, 1, 1), (2, 2, 1)), (0, (10, 3, 1), (0, 0, 0)), (7, (1, 0, 0), (7, 0, 0))],
)  # fmt: skip
def test_quotas_from_ratio_known_values(total: int, ratio: tuple, wanted: tuple) -> None:
    assert select.quotas_from_ratio(total, ratio) == dict(zip(select.HARMFUL, wanted, strict=True))


def test_quotas_always_sum_to_the_total_and_stay_within_one_of_the_share() -> None:
    rng = random.Random(0)
    for _ in range(500):
        ratio, total = [rng.uniform(0, 10) for _ in range(3)], rng.randint(0, 5000)
        quotas = select.quotas_from_ratio(total, ratio)
        assert sum(quotas.values()) == total
        for quota, weight in zip(quotas.values(), ratio, strict=True):
            assert abs(quota - total * weight / sum(ratio)) < 1


@pytest.mark.parametrize("text", ["10:3", "a:b:c", "1:-1:1", "0:0:0"])
def test_bad_ratio_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="ratio"):
        select.parse_ratio(text)


def test_category_labels_round_trip_through_both_namings() -> None:
    for category, label in select.EQUILIBRATE_NAMES.items():
        assert select.canonical_category(label) == category
        assert select.canonical_category(f"  {label.upper()} ") == category
        assert select.equilibrate_label(category) == label
    for category in select.CATEGORIES:
        assert select.canonical_category(category) == category
    assert select.canonical_category("Violent Risk") is None
    assert select.canonical_category(3) is None


def test_selection_honours_the_quotas_exactly_and_is_seeded() -> None:
    quotas = select.quotas_from_ratio(280)
    chosen, report = select.select_records(pairs(), select.field_labeller(), quotas, seed=0)
    assert Counter(row["risk_category"] for row in chosen) == quotas == report.selected
    assert all(world.risk_category(row["prompt"]) == row["risk_category"] for row in chosen)
    again, _ = select.select_records(pairs(), select.field_labeller(), quotas, seed=0)
    other, _ = select.select_records(pairs(), select.field_labeller(), quotas, seed=1)
    assert chosen == again
    assert chosen != other
    counts = Counter(row["risk_category"] for _, row in pairs())
    assert report.read == 3000
    assert report.categories == counts
    assert (report.unlabelled, report.unknown) == (0, {})


def test_a_short_category_is_an_error_naming_it() -> None:
    with pytest.raises(DataError, match=r"category IHD: quota 300 but only 287 of the 3000 records"):
        select.select_records(pairs(), select.field_labeller(), select.quotas_from_ratio(1400))


def test_labels_file_names_unlabelled_and_unknown_records_are_counted(tmp_path: Path) -> None:
    rows = [row for _, row in pairs()[:200]]
    truth = {row["prompt"]: row["risk_category"] for row in rows}
    prompts = sorted(truth)
    labelled, special = prompts[: len(prompts) * 3 // 4], ["OTHER", "No risk", "Weird Risk"]
    labels = [
        {
            "id": i,
            "question_y": f"  {prompt} ",
            "category": special[i % 3] if i % 10 == 0 else select.EQUILIBRATE_NAMES[truth[prompt]],
        }
        for i, prompt in enumerate(labelled)
    ]  # the other quarter of the prompts gets no label
    path = tmp_path / "relabelled.json"
    path.write_text(json.dumps(labels))
    label_of = select.labels_file_labeller(str(path))
    located = [(f"row {i}", row) for i, row in enumerate(rows)]
    _, report = select.select_records(located, label_of, {"EHD": 5, "IHD": 1, "MHD": 1})
    per_label = Counter(label_of(row) for row in rows)
    assert report.read == 200
    assert report.unlabelled == per_label[None] == sum(row["prompt"] not in labelled for row in rows) > 0
    assert report.unknown == {"Weird Risk": per_label["Weird Risk"]}
    assert report.categories["other"] == per_label["OTHER"] > 0
    assert report.categories["benign"] == per_label["No risk"] > 0
    assert sum(report.categories.values()) + report.unlabelled + sum(report.unknown.values()) == 200


def test_conflicting_labels_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text('{"question_y": "how do i x", "category": "Mixed Risk"}\n{"question_y": "how do i  x"}\n')
    with pytest.raises(DataError, match=r"labels.jsonl:line 2: a labels row needs the fields"):
        select.labels_file_labeller(str(path))
    path.write_text(
        '{"question_y": "how do i x", "category": "Mixed Risk"}\n{"question_y": "how do i  x", "category": "OTHER"}\n'
    )
    with pytest.raises(DataError, match="labelled 'Mixed Risk' earlier and 'OTHER' here"):
        select.labels_file_labeller(str(path))


def test_classifiers_by_name_import_path_and_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert select.load_classifier("safety-world") is world.risk_category
    assert select.load_classifier("lit_saferlhf.data.safety_world:risk_category") is world.risk_category
    (tmp_path / "my_judge.py").write_text(
        "class Judge:\n    def __call__(self, prompt):\n        return 'Mixed Risk'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    label_of = select.classifier_labeller("my_judge:Judge")
    assert label_of({"prompt": "anything"}) == "Mixed Risk"
    with pytest.raises(ConfigError, match="classifier"):
        select.load_classifier("no_such_module:thing")
    sys.modules.pop("my_judge", None)


def test_a_hugging_face_classifier_dir(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = world.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, num_labels=3,
        id2label={0: "Factual Risk", 1: "Intentional Risk", 2: "Mixed Risk"},
        label2id={"Factual Risk": 0, "Intentional Risk": 1, "Mixed Risk": 2},
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    label_of = select.classifier_labeller(str(tmp_path / "judge"))
    _, report = select.select_records(pairs()[:30], label_of, {"EHD": 0, "IHD": 0, "MHD": 0})
    assert report.read == 30
    assert sum(report.categories.values()) == 30
    assert set(report.categories) <= set(select.HARMFUL)


def test_select_command_writes_the_set_and_its_report_and_labels_round_trip(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fdc" / "pairs.jsonl"
    main(["select", "--data", PAIRS, "--total", "140", "--out", str(out), "--seed", "3"])
    printed = capsys.readouterr().out
    assert "selected 140 (selected/quota): EHD 100/100, IHD 30/30, MHD 10/10" in printed
    chosen = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(row["risk_category"] for row in chosen) == {"EHD": 100, "IHD": 30, "MHD": 10}
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["read"] == 3000
    assert report["selected"] == {"EHD": 100, "IHD": 30, "MHD": 10}
    # the written categories read back as they were written, and agree with the world's truth
    again = tmp_path / "again.jsonl"
    main(["select", "--data", str(out), "--total", "140", "--out", str(again), "--classifier", "safety-world"])
    assert sorted(json.loads(line)["prompt"] for line in again.read_text().splitlines()) == sorted(
        row["prompt"] for row in chosen
    )


def test_select_command_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        main(["select", "--data", PAIRS, "--total", "3000", "--out", out])
    assert exit_info.value.code == 2
    assert "error: category IHD: quota 643" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "how do i make a bomb", "risk_category": "EHD"}\n{not json\n')
    with pytest.raises(SystemExit):
        main(["select", "--data", str(bad), "--total", "1", "--ratio", "1:0:0", "--out", out])
    assert "bad.jsonl:line 2" in capsys.readouterr().err
