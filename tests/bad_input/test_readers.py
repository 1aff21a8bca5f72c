"""Malformed files of every format through ``lit-saferlhf fit``: one error line naming the file and line, exit 2."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.bad_input.harness import assert_names, fit_error, stage_config

GOOD = '{"prompt": "how do i bake bread", "response": "sure mix flour and water"}\n'


def text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content, encoding="utf-8")


def raw(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def gz(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(gzip.compress(content))


def parquet(rows: list[dict], schema: pa.Schema | None = None) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# (case id, file name, writer, parts the error line must hold)
CASES = [
    # .jsonl
    ("jsonl-invalid-json", "d.jsonl", text(GOOD + '{"prompt": "a", "response": }\n'), ["d.jsonl:line 2", "valid JSON"]),
    ("jsonl-not-an-object", "d.jsonl", text(GOOD + '["a", "b"]\n'), ["d.jsonl:line 2", "a JSON object"]),
    (
        "jsonl-invalid-utf8",
        "d.jsonl",
        raw(GOOD.encode() + b'{"prompt": "caf\xe9", "response": "x"}\n'),
        ["d.jsonl:line 2", "UTF-8", "0xe9"],
    ),
    (
        "jsonl-duplicate-key",
        "d.jsonl",
        text(GOOD + '{"prompt": "a", "prompt": "b", "response": "c"}\n'),
        ["d.jsonl:line 2", "'prompt'", "each key once"],
    ),
    (
        "jsonl-nested-duplicate-key",
        "d.jsonl",
        text(GOOD + '{"prompt": "a", "response": "c", "m": {"k": 1, "k": 2}}\n'),
        ["d.jsonl:line 2", "'k'", "each key once"],
    ),
    (
        "jsonl-lone-surrogate",
        "d.jsonl",
        text(GOOD + '{"prompt": "bad \\ud800 text", "response": "c"}\n'),
        ["d.jsonl:line 2", "'prompt'", "lone surrogate \\ud800"],
    ),
    ("jsonl-cut-short", "d.jsonl", text(GOOD + '{"prompt": "a", "resp'), ["d.jsonl:line 2", "valid JSON"]),
    (
        "jsonl-blank-lines-counted",
        "d.jsonl",
        text(GOOD + "\n\n" + '{"prompt": 7, "response": "c"}\n'),
        ["d.jsonl:line 4", "'prompt'"],
    ),
    ("jsonl-empty", "d.jsonl", text(""), ["d.jsonl", "no records of kind 'sft'"]),
    # .jsonl.gz
    ("gz-invalid-json", "d.jsonl.gz", gz((GOOD + "{oops}\n").encode()), ["d.jsonl.gz:line 2", "valid JSON"]),
    (
        "gz-duplicate-key",
        "d.jsonl.gz",
        gz((GOOD + '{"prompt": "a", "response": "b", "response": "c"}\n').encode()),
        ["d.jsonl.gz:line 2", "'response'", "each key once"],
    ),
    ("gz-not-gzip", "d.jsonl.gz", raw(GOOD.encode()), ["d.jsonl.gz", "not a readable gzip file"]),
    (
        "gz-cut-short",
        "d.jsonl.gz",
        lambda path: path.write_bytes(gzip.compress(GOOD.encode() * 50)[:40]),
        ["d.jsonl.gz", "not a readable gzip file"],
    ),
    # .json
    (
        "json-invalid",
        "d.json",
        text('[{"prompt": "a",\n "response": "b"},\n {"prompt": }]'),
        ["d.json:line 3", "valid JSON"],
    ),
    ("json-lines-in-a-json-file", "d.json", text(GOOD * 2), ["d.json:line 2", "name the file .jsonl"]),
    ("json-not-a-list", "d.json", text('{"a": 1, "b": 2}'), ["d.json", "a JSON list of objects"]),
    ("json-item-not-an-object", "d.json", text(f"[{GOOD.strip()}, 3]"), ["d.json:item 2", "a JSON object"]),
    (
        "json-duplicate-key",
        "d.json",
        text(f'[{GOOD.strip()}, {{"prompt": "a", "prompt": "b", "response": "c"}}]'),
        ["d.json:item 2", "'prompt'", "each key once"],
    ),
    (
        "json-duplicate-wrapper-key",
        "d.json",
        text(f'{{"data": [{GOOD.strip()}], "data": []}}'),
        ["d.json", "'data'", "each key once"],
    ),
    (
        "json-lone-surrogate",
        "d.json",
        text('[{"prompt": "x\\udfff", "response": "c"}]'),
        ["d.json:item 1", "'prompt'", "lone surrogate \\udfff"],
    ),
    ("json-invalid-utf8", "d.json", raw(b'[{"prompt": "x",\n "response": "\xff"}]'), ["d.json:line 2", "UTF-8"]),
    # .csv
    (
        "csv-unterminated-quote",
        "d.csv",
        text('prompt,response\nhi,yo\n"bake bread,sure\nmore,rows\nand,more\n'),
        ["d.csv:line 3", "every quote closed"],
    ),
    ("csv-text-after-quote", "d.csv", text('prompt,response\n"hi"x,yo\n'), ["d.csv:line 2", "every quote closed"]),
    (
        "csv-cell-count",
        "d.csv",
        text("prompt,response\nhi,yo\nbake,bread,now\n"),
        ["d.csv:row 2 (line 3)", "2 cells as in the header"],
    ),
    ("csv-invalid-utf8", "d.csv", raw(b"prompt,response\nhi,\xfe\n"), ["d.csv:row 1 (line 2)", "UTF-8"]),
    ("csv-invalid-utf8-header", "d.csv", raw(b"pr\xffompt,response\nhi,yo\n"), ["d.csv:line 1 (header)", "UTF-8"]),
    (
        "csv-missing-column",
        "d.csv",
        text("prompt,answer\nhi,yo\n"),
        ["d.csv:row 1 (line 2)", "'response'", "no such field (the row has: prompt, answer)"],
    ),
    ("csv-empty-cell", "d.csv", text("prompt,response\nhi,yo\nbake,\n"), ["d.csv:row 2 (line 3)", "'response'"]),
    ("csv-header-only", "d.csv", text("prompt,response\n"), ["d.csv", "no records of kind 'sft'"]),
    # .parquet
    (
        "parquet-missing-column",
        "d.parquet",
        parquet([{"prompt": "hi", "answer": "yo"}]),
        ["d.parquet:row 1", "'response'", "no such field"],
    ),
    (
        "parquet-wrong-type",
        "d.parquet",
        parquet([{"prompt": "hi", "response": "yo"}, {"prompt": "a", "response": None}]),
        ["d.parquet:row 2", "'response'", "a non-empty string"],
    ),
    (
        "parquet-int-prompt",
        "d.parquet",
        parquet([{"prompt": 5, "response": "yo"}]),
        ["d.parquet:row 1", "'prompt'", "found 5"],
    ),
    ("parquet-not-parquet", "d.parquet", raw(b"PAR1 not really"), ["d.parquet", "not a readable Parquet file"]),
    (
        "parquet-no-rows",
        "d.parquet",
        parquet([], pa.schema([("prompt", pa.string()), ("response", pa.string())])),
        ["d.parquet", "no records"],
    ),
    # .txt (prompts only: read as PromptData)
]

TXT_CASES = [
    ("txt-invalid-utf8", "p.txt", raw(b"how do i bake bread\nbad \xc3\x28 byte\n"), ["p.txt:line 2", "UTF-8"]),
    ("txt-blank-only", "p.txt", text("\n   \n\n"), ["p.txt", "no records of kind 'prompt'"]),
    ("txt-empty", "p.txt", text(""), ["p.txt", "no records of kind 'prompt'"]),
]


@pytest.mark.parametrize(("name", "writer", "parts"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_file(name: str, writer: Callable[[Path], None], parts: list[str], tmp_path: Path, capsys) -> None:
    path = tmp_path / name
    writer(path)
    assert_names(fit_error(stage_config(tmp_path, "sft", path), capsys), *parts)


@pytest.mark.parametrize(("name", "writer", "parts"), [case[1:] for case in TXT_CASES], ids=[c[0] for c in TXT_CASES])
def test_bad_prompt_file(name: str, writer: Callable[[Path], None], parts: list[str], tmp_path: Path, capsys) -> None:
    path = tmp_path / name
    writer(path)
    assert_names(fit_error(stage_config(tmp_path, "prompt", path), capsys), *parts)


def test_missing_file(tmp_path: Path, capsys) -> None:
    line = fit_error(stage_config(tmp_path, "sft", tmp_path / "nowhere.jsonl"), capsys)
    assert_names(line, "nowhere.jsonl: no such file")


def test_unsupported_suffix(tmp_path: Path, capsys) -> None:
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    line = fit_error(stage_config(tmp_path, "sft", tmp_path / "d.xlsx"), capsys)
    assert_names(line, "d.xlsx: not a supported data file", ".jsonl")


def test_bad_validation_file_is_named(tmp_path: Path, capsys) -> None:
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(GOOD)
    val.write_text(GOOD + json.dumps({"prompt": "", "response": "x"}) + "\n")
    line = fit_error(stage_config(tmp_path, "sft", train, val_path=str(val)), capsys)
    assert_names(line, "val.jsonl:line 2", "'prompt'", "a non-empty string")
