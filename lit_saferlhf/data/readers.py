"""Readers: turn a path into ``(location, row)`` pairs, whatever the file format.

A reader only decodes; it does not know any schema (that is the adapters' job). Each row comes
with its location so that a later error can point at the input; for the 3rd row of each source:

- ``x.jsonl``, ``x.jsonl.gz``: ``x.jsonl:line 3``, the physical line (blank lines are skipped but
  counted);
- ``x.json``: ``x.json:item 3``, the 3rd element of the top-level list;
- ``x.csv``: ``x.csv:row 3 (line 4)``, data rows counted from 1 without the header, and the line
  where the row starts in the file (a quoted cell may span lines);
- ``x.parquet``: ``x.parquet:row 3``;
- ``x.txt``: ``x.txt:line 3``, one prompt per non-empty line, read as ``{"prompt": line}``;
- ``org/name`` (a Hugging Face hub dataset, when no such local path exists and ``org/`` is not a
  local dir, where a typo'd path would otherwise be read as a hub name): ``hub:org/name[train]:row 3``;
- ``safety-world:<split>``: whatever :func:`lit_saferlhf.data.safety_world.rows` says.

All numbers are 1-based. A row that cannot be decoded (invalid JSON, invalid UTF-8, not an object)
is *yielded* as a :class:`BadRecordError` instead of a dict, so the caller decides whether to stop
or to skip and count it. Problems with the whole source (missing file, unknown suffix, a ``.json``
file that is not a JSON list) raise at once.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lit_saferlhf.data.records import BadRecordError, Described
from lit_saferlhf.errors import DataError, HubError, InputNotFoundError, MissingExtraError

Row = dict[str, Any]
RowOrError = tuple[str, Row | BadRecordError]

SAFETY_WORLD_PREFIX = "safety-world:"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of invalid UTF-8 bytes


def read_rows(path: str, *, split: str = "train") -> Iterator[RowOrError]:
    """Iterate over the rows of a file, a hub dataset or a safety-world split.

    Args:
        path: A local file (see the module docstring for the formats), ``safety-world:<split>``, or
            a Hugging Face hub dataset name (``org/name``) when no such local file exists and ``org`` is not
            a local dir.
        split: Split of a hub dataset (ignored for files).

    Returns:
        ``(location, row)`` pairs, where ``row`` is a dict or the :class:`BadRecordError` of a row
        that could not be decoded.

    Raises:
        FileNotFoundError: A local file with a known suffix (or a path that is not a hub name) does not exist.
        ValueError: The path is a directory, a named pipe or another file that is not a regular one, or has a
            suffix that is not supported.
        ImportError: A hub dataset was asked for but ``datasets`` is not installed.
        RuntimeError: A hub dataset could not be loaded (for example on an offline machine).
    """
    if path.startswith(SAFETY_WORLD_PREFIX):
        safety_world = importlib.import_module("lit_saferlhf.data.safety_world")
        return safety_world.rows(path[len(SAFETY_WORLD_PREFIX) :])
    reader, local = _reader_for(path), Path(path)
    if reader is not None and local.is_file():
        return reader(path)
    if local.exists() and not local.is_file():
        raise DataError(f"{path}: {_file_kind(local)}, not a data file; supported: {_supported()}")
    if reader is None and (local.exists() or local.suffix):
        raise DataError(f"{path}: not a supported data file; supported: {_supported()}, or a hub dataset name")
    hub_name, top = reader is None and _HUB_NAME.fullmatch(path) is not None, path.split("/")[0]
    if hub_name and not ("/" in path and Path(top).is_dir()):  # a local dir as the organisation: a typo'd path
        return _read_hub(path, split)
    hub = f", and not read as a hub dataset name since {top}/ is a local dir" if hub_name else ""
    raise InputNotFoundError(f"{path}: no such file (relative paths start at {os.getcwd()}){hub}")


def _file_kind(path: Path) -> str:
    """What a path that exists but is not a regular file is, in words ("a directory", "a named pipe (FIFO)")."""
    mode = path.stat().st_mode
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a device file")


def _reader_for(path: str) -> Callable[[str], Iterator[RowOrError]] | None:
    """The reader of the longest known suffix that ``path`` ends with (case-insensitive), or None."""
    for suffix in sorted(READERS, key=len, reverse=True):
        if path.lower().endswith(suffix):
            return READERS[suffix]
    return None


def _supported() -> str:
    return ", ".join(READERS) + f", {SAFETY_WORLD_PREFIX}<split>"


@contextmanager
def _open_text(path: str) -> Iterator[IO[str]]:
    """The file as text; a ``.gz`` file that is not gzip, or is cut short, raises a DataError naming it."""
    # surrogateescape keeps invalid bytes as lone surrogates, so one bad line does not end the file.
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        try:
            yield handle
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise DataError(f"{path}: not a readable gzip file ({err})") from None


def _invalid_utf8(location: str, text: str) -> BadRecordError | None:
    """A BadRecordError when ``text`` holds bytes that were not valid UTF-8, else None."""
    match = _UNDECODABLE.search(text)
    if match is None:
        return None
    byte = ord(match.group()) - 0xDC00
    return BadRecordError(location, "(encoding)", "UTF-8 text", f"byte 0x{byte:02x} at character {match.start() + 1}")


def _not_an_object(location: str, value: object) -> BadRecordError:
    return BadRecordError(location, "(row)", "a JSON object", value)


def read_jsonl(path: str) -> Iterator[RowOrError]:
    """One JSON object per line (``.jsonl``, or gzip-compressed ``.jsonl.gz``); blank lines are skipped."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            location = f"{path}:line {number}"
            if not line.strip():
                continue
            bad = _invalid_utf8(location, line)
            if bad is not None:
                yield location, bad
                continue
            try:
                row = json.loads(line, object_pairs_hook=_KeyedObject)
            except json.JSONDecodeError as err:
                yield location, BadRecordError(location, "(line)", "valid JSON", f"{err.msg} at column {err.colno}")
                continue
            yield location, _checked(location, row)


class _KeyedObject(dict[str, Any]):
    """A decoded JSON object that remembers the keys it had more than once (``json`` keeps the last value)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen:
                self.duplicates.append(key)
            else:
                seen.add(key)


def _checked(location: str, row: object) -> Row | BadRecordError:
    """``row`` as a plain dict, or the BadRecordError of a row that is not an object or repeats a key."""
    if not isinstance(row, dict):
        return _not_an_object(location, row)
    repeated = _repeated_key(row)
    if repeated is not None:
        return BadRecordError(location, repeated, "each key once in an object", Described("it twice"))
    return row


def _repeated_key(value: object) -> str | None:
    """The first key that some object in ``value`` had twice, or None."""
    if isinstance(value, _KeyedObject) and value.duplicates:
        return value.duplicates[0]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((key for child in children if (key := _repeated_key(child)) is not None), None)


def read_json(path: str) -> Iterator[RowOrError]:
    """A JSON list of objects, or an object whose single value is that list (``{"data": [...]}``)."""
    data = _load_json_file(path)
    # Every object json.loads decodes here is a _KeyedObject (the object_pairs_hook).
    if isinstance(data, _KeyedObject) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        if data.duplicates:
            raise BadRecordError(path, data.duplicates[0], "each key once in an object", Described("it twice"))
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise BadRecordError(path, "(file)", "a JSON list of objects", type(data).__name__)
    for number, row in enumerate(data, start=1):
        location = f"{path}:item {number}"
        yield location, _checked(location, row)


def _load_json_file(path: str) -> Any:
    """The decoded file; the whole file is one value, so a decoding error concerns the whole source."""
    with _open_text(path) as handle:
        text = handle.read()
    for number, line in enumerate(text.splitlines() if _UNDECODABLE.search(text) else [], start=1):
        bad = _invalid_utf8(f"{path}:line {number}", line)
        if bad is not None:
            raise bad
    try:
        return json.loads(text, object_pairs_hook=_KeyedObject)
    except json.JSONDecodeError as err:
        hint = " (for one JSON object per line, name the file .jsonl)" if err.msg == "Extra data" else ""
        location = f"{path}:line {err.lineno}"
        raise BadRecordError(location, "(file)", "valid JSON" + hint, f"{err.msg} at column {err.colno}") from None


def read_csv(path: str) -> Iterator[RowOrError]:
    """Comma-separated values with a header row; every value is a string. Blank lines are skipped.

    A row with more or fewer cells than the header is a bad row (an empty cell must still be written).
    The file is parsed strictly: a quote that is never closed (or text right after a closing quote)
    raises, naming the line where its row starts, instead of swallowing the rest of the file.
    """
    with _open_text(path) as handle:
        rows = _csv_rows(csv.reader(handle, strict=True), path)
        header = next(rows, (1, []))[1]
        bad_header = _invalid_utf8(f"{path}:line 1 (header)", ",".join(header))
        if bad_header is not None:
            raise bad_header
        number = 0
        for line, values in rows:
            if not values:
                continue
            number += 1
            location = f"{path}:row {number} (line {line})"
            if len(values) != len(header):
                yield location, BadRecordError(location, "(row)", f"{len(header)} cells as in the header", values)
            else:
                yield location, _invalid_utf8(location, ",".join(values)) or dict(zip(header, values, strict=True))


def _csv_rows(reader: Any, path: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line, cells)`` of each CSV row; a malformed row raises a BadRecordError at its first line."""
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            expected = 'CSV with every quote closed (a quote inside a quoted cell is written "")'
            found = Described(f"{err} (read up to line {reader.line_num})")
            raise BadRecordError(f"{path}:line {start}", "(row)", expected, found) from None
        yield start, values
        start = reader.line_num + 1


def read_parquet(path: str) -> Iterator[RowOrError]:
    """An Apache Parquet table, read in batches; values keep their Parquet types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row


def read_txt(path: str) -> Iterator[RowOrError]:
    """One prompt per non-empty line, as ``{"prompt": line}`` (surrounding whitespace removed)."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            location = f"{path}:line {number}"
            if not line.strip():
                continue
            yield location, _invalid_utf8(location, line) or {"prompt": line.strip()}


READERS: dict[str, Callable[[str], Iterator[RowOrError]]] = {
    ".jsonl": read_jsonl,
    ".jsonl.gz": read_jsonl,
    ".json": read_json,
    ".parquet": read_parquet,
    ".csv": read_csv,
    ".txt": read_txt,
}
"""File suffix -> reader. Add an entry here to support a new format."""


def _read_hub(name: str, split: str) -> Iterator[RowOrError]:
    """Load ``name`` from the Hugging Face hub with ``datasets`` (an optional dependency)."""
    try:
        import datasets
    except ImportError as err:
        raise MissingExtraError(
            f"{name!r} is not a local file, so it was read as a hub dataset name, which needs the "
            "`datasets` package: pip install 'lit-saferlhf[hub]'"
        ) from err
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise HubError(
            f"{name!r} is not a local file and could not be loaded from the Hugging Face hub "
            f"(split {split!r}): {type(err).__name__}: {err}. This machine may be offline; a local "
            f"file path works too ({_supported()})."
        ) from err
    return ((f"hub:{name}[{split}]:row {number}", row) for number, row in enumerate(dataset, start=1))
