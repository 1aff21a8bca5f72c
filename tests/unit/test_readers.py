"""Readers: every format yields (location, row), bad rows come back as errors, bad sources raise."""

from __future__ import annotations

import gzip
import json
import os
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_saferlhf.data.readers import READERS, read_rows
from lit_saferlhf.data.records import BadRecordError

ROWS = [{"prompt": "hi", "n": 1, "ok": True}, {"prompt": "bye", "n": 2, "ok": False}]


def _rows(path: Path | str, **kwargs: str) -> list[tuple[str, object]]:
    return list(read_rows(str(path), **kwargs))


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Every format
# ----------------------------------------------------------------------------------------------


def test_jsonl_rows_and_line_numbers_skip_blank_lines(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "x.jsonl", [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1])])
    assert _rows(path) == [(f"{path}:line 1", ROWS[0]), (f"{path}:line 4", ROWS[1])]


def test_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in ROWS))
    assert _rows(path) == [(f"{path}:line 1", ROWS[0]), (f"{path}:line 2", ROWS[1])]


def test_json_list_and_single_key_wrapper(tmp_path: Path) -> None:
    listed, wrapped = tmp_path / "list.json", tmp_path / "wrapped.json"
    listed.write_text(json.dumps(ROWS))
    wrapped.write_text(json.dumps({"data": ROWS}))
    assert _rows(listed) == [(f"{listed}:item 1", ROWS[0]), (f"{listed}:item 2", ROWS[1])]
    assert [row for _, row in _rows(wrapped)] == ROWS


def test_empty_json_list_is_zero_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert _rows(path) == []


def test_parquet_keeps_types(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([*ROWS, {"prompt": "null", "n": None, "ok": None}]), path)
    rows = _rows(path)
    assert rows[:2] == [(f"{path}:row 1", ROWS[0]), (f"{path}:row 2", ROWS[1])]
    assert rows[2] == (f"{path}:row 3", {"prompt": "null", "n": None, "ok": None})


def test_csv_values_are_strings_with_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text('\ufeffprompt,n\nhi,1\n\n"two\nlines",2\nlast,\n', encoding="utf-8")  # BOM, blank line
    assert _rows(path) == [
        (f"{path}:row 1 (line 2)", {"prompt": "hi", "n": "1"}),
        (f"{path}:row 2 (line 4)", {"prompt": "two\nlines", "n": "2"}),
        (f"{path}:row 3 (line 6)", {"prompt": "last", "n": ""}),
    ]


def test_txt_one_prompt_per_non_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("  first prompt \n\nsecond\r\n")
    assert _rows(path) == [(f"{path}:line 1", {"prompt": "first prompt"}), (f"{path}:line 3", {"prompt": "second"})]


def test_suffix_dispatch_is_case_insensitive_and_covers_every_format() -> None:
    assert set(READERS) == {".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".txt"}


def test_upper_case_suffix(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "X.JSONL", [json.dumps(ROWS[0])])
    assert _rows(path) == [(f"{path}:line 1", ROWS[0])]


# ----------------------------------------------------------------------------------------------
# Bad rows are yielded, not raised
# ----------------------------------------------------------------------------------------------


def test_bad_json_line_names_its_line_and_the_json_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "x.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"prompt": "oops",}'])
    rows = _rows(path)
    assert rows[1] == (f"{path}:line 2", ROWS[1])
    location, error = rows[2]
    assert location == f"{path}:line 3"
    assert isinstance(error, BadRecordError)
    assert str(error).startswith(f"{path}:line 3: ")
    assert "valid JSON" in str(error)
    assert "Expecting property name" in str(error)


def test_invalid_utf8_line_is_a_bad_row_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "after"}\n')
    rows = _rows(path)
    assert rows[0][1] == {"prompt": "ok"}
    assert rows[2][1] == {"prompt": "after"}
    error = rows[1][1]
    assert isinstance(error, BadRecordError)
    assert f"{path}:line 2" in str(error)
    assert "UTF-8" in str(error)
    assert "0xe9" in str(error)


@pytest.mark.parametrize("line", ["[1, 2]", "3", '"text"', "null"])
def test_jsonl_row_that_is_not_an_object(tmp_path: Path, line: str) -> None:
    path = _write_jsonl(tmp_path / "x.jsonl", [line])
    ((location, error),) = _rows(path)
    assert isinstance(error, BadRecordError)
    assert location == f"{path}:line 1"
    assert "a JSON object" in str(error)


def test_json_item_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps([ROWS[0], ["not", "an", "object"]]))
    rows = _rows(path)
    assert rows[0][1] == ROWS[0]
    assert isinstance(rows[1][1], BadRecordError)
    assert f"{path}:item 2" in str(rows[1][1])


def test_csv_row_with_wrong_cell_count_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"prompt,n\na,1,extra\nb\xff,2\nc,3\n")
    rows = _rows(path)
    assert all(isinstance(row, BadRecordError) for _, row in rows[:2])
    assert "2 cells" in str(rows[0][1])
    assert f"{path}:row 1 (line 2)" in str(rows[0][1])
    assert "UTF-8" in str(rows[1][1])
    assert f"{path}:row 2 (line 3)" in str(rows[1][1])
    assert rows[2][1] == {"prompt": "c", "n": "3"}


def test_txt_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"fine\nbad \xc3\x28\n")
    rows = _rows(path)
    assert rows[0][1] == {"prompt": "fine"}
    assert isinstance(rows[1][1], BadRecordError)
    assert f"{path}:line 2" in str(rows[1][1])


# ----------------------------------------------------------------------------------------------
# Whole-source problems raise
# ----------------------------------------------------------------------------------------------


def test_invalid_json_file_raises_with_line_and_hint_for_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(BadRecordError, match=r"x\.json:line 2: .*name the file \.jsonl.*Extra data"):
        _rows(path)


def test_json_file_that_is_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": 1, "b": 2}')
    with pytest.raises(BadRecordError, match="a JSON list of objects"):
        _rows(path)


def test_json_file_with_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(BadRecordError, match=r"x\.json:line 3: .*UTF-8"):
        _rows(path)


def test_missing_file_names_path_and_current_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError) as excinfo:
        read_rows(missing)  # raises at the call, not on first iteration
    assert missing in str(excinfo.value)
    assert os.getcwd() in str(excinfo.value)


def test_missing_path_that_is_not_a_hub_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_rows(str(tmp_path / "data" / "prompts"))


@pytest.mark.parametrize("name", ["x.yaml", "x.gz"])
def test_unknown_suffix_lists_supported_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("a: 1\n")
    with pytest.raises(ValueError, match=r"not a supported data file.*\.jsonl, \.jsonl\.gz, \.json, \.parquet"):
        read_rows(str(path))


def test_directory_and_suffixless_local_file_are_not_hub_names(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("hello\n")
    with pytest.raises(ValueError, match="a directory, not a data file"):
        read_rows(str(tmp_path))
    with pytest.raises(ValueError, match="not a supported data file"):
        read_rows(str(tmp_path / "plain"))


# ----------------------------------------------------------------------------------------------
# Hub and safety world (lazily imported modules, faked here)
# ----------------------------------------------------------------------------------------------


def test_hub_name_without_datasets_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'lit-saferlhf\[hub\]'"):
        read_rows("PKU-Alignment/PKU-SafeRLHF")


def test_hub_load_failure_says_offline_and_local_files_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(name: str, split: str) -> None:
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RuntimeError) as excinfo:
        read_rows("org/name")
    message = str(excinfo.value)
    assert "could not be loaded from the Hugging Face hub" in message
    assert "offline" in message
    assert "local file" in message
    assert "Couldn't reach the hub" in message


def test_hub_rows_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return list(ROWS)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = _rows("org/name", split="test")
    assert calls == [("org/name", "test")]
    assert rows == [("hub:org/name[test]:row 1", ROWS[0]), ("hub:org/name[test]:row 2", ROWS[1])]


def test_safety_world_delegates_to_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("lit_saferlhf.data.safety_world")
    fake.rows = lambda split: iter([(f"safety-world:{split}:row 0", {"prompt": "how do i bake bread"})])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lit_saferlhf.data.safety_world", fake)
    assert _rows("safety-world:sft") == [("safety-world:sft:row 0", {"prompt": "how do i bake bread"})]
