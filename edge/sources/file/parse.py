"""File content → rows: CSV with a header row, a JSON document (one object or an array of
objects) or JSON lines. Pure functions, no I/O; the source runs them off the event loop.

``iter_rows`` yields one ``Row`` per record in file order. A problem of one record (a CSV
row with the wrong number of cells, a JSON line that does not parse or is not an object)
is a ``Row`` with ``error`` set: the source quarantines it and stores the rest. A problem
of the whole file (wrong encoding, no header, a JSON document that does not parse, more
than ``max_rows`` records) raises ``FileRejected`` naming the line where it is known.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["FileRejected", "Row", "decode", "format_for", "iter_rows"]

_BY_EXTENSION = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "jsonl",
                 ".ndjson": "jsonl"}


class FileRejected(Exception):
    """The whole file is unusable: ``reason`` (a bounded code), ``detail`` for people, and
    the 1-based ``line`` / ``row`` where the problem is when known."""

    def __init__(self, reason: str, detail: str, *, line: int | None = None,
                 row: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.line = line
        self.row = row


@dataclass(slots=True)
class Row:
    """One record: ``index`` 0-based in the file (the dedupe identity), ``line`` 1-based
    where it starts (None inside a JSON array), ``value`` the parsed object, ``raw`` the
    record's text for a quarantine record, ``error`` (reason, detail) when unusable."""

    index: int
    line: int | None
    value: Any
    raw: bytes
    error: tuple[str, str] | None = None


def format_for(name: str, configured: str) -> str | None:
    """The format of file ``name``: ``configured`` unless ``auto``, else by extension."""
    if configured != "auto":
        return configured
    dot = name.rfind(".")
    return _BY_EXTENSION.get(name[dot:].lower()) if dot >= 0 else None


def decode(data: bytes, encoding: str) -> str:
    """Bytes → text; a UTF-8 byte order mark is skipped. FileRejected ``bad_encoding``."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FileRejected("bad_encoding", f"not {encoding} at byte {err.start}: {err.reason}",
                           line=line) from err


def iter_rows(text: str, fmt: str, *, delimiter: str = ",", max_rows: int | None = None
              ) -> Iterator[Row]:
    """The records of ``text`` in file order; see the module docstring."""
    if fmt == "csv":
        rows = _csv_rows(text, delimiter)
    elif fmt == "jsonl":
        rows = _jsonl_rows(text)
    elif fmt == "json":
        rows = _json_rows(text)
    else:
        raise FileRejected("unknown_format", f"format {fmt!r}")
    for row in rows:
        if max_rows is not None and row.index >= max_rows:
            raise FileRejected("too_many_rows", f"more than max_rows {max_rows} records",
                               line=row.line, row=row.index + 1)
        yield row


def _csv_rows(text: str, delimiter: str) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            raise FileRejected("no_header", "empty file: a CSV file needs a header row",
                               line=1)
        header_line = reader.line_num
        names = [c.strip() for c in header]
        seen: set[str] = set()
        for col, name in enumerate(names, 1):
            if name and name in seen:
                raise FileRejected("bad_header", f"column {col} repeats the name {name!r}",
                                   line=header_line)
            seen.add(name)
        index = 0
        start = reader.line_num + 1
        for cells in reader:
            line = start
            start = reader.line_num + 1
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # a blank line
            raw = _csv_raw(cells, delimiter)
            if len(cells) != len(names):
                yield Row(index, line, None, raw, (
                    "bad_row", f"{len(cells)} cells, the header has {len(names)} columns"))
            else:
                # An empty cell is an absent value (a CSV has no null); columns without
                # a name (a trailing delimiter in the header) are ignored.
                value = {n: c for n, c in zip(names, cells, strict=True) if n and c.strip()}
                yield Row(index, line, value, raw)
            index += 1
    except csv.Error as err:
        raise FileRejected("bad_csv", str(err), line=reader.line_num) from err


def _csv_raw(cells: list[str], delimiter: str) -> bytes:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\n").writerow(cells)
    return out.getvalue().encode()


def _jsonl_rows(text: str, first_line: int = 1) -> Iterator[Row]:
    index = 0
    for n, line in enumerate(text.splitlines(), first_line):
        if not line.strip():
            continue
        raw = line.encode()
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            yield Row(index, n, None, raw, ("not_json", str(err)))
        else:
            if isinstance(value, dict):
                yield Row(index, n, value, raw)
            else:
                yield Row(index, n, None, raw, (
                    "not_an_object", f"a JSON {type(value).__name__}, not an object"))
        index += 1


def _json_rows(text: str) -> Iterator[Row]:
    if not text.strip():
        raise FileRejected("no_rows", "empty file", line=1)
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as err:
        # Many exporters write JSON lines into a .json file: accept them when the first
        # record is a whole object on its own line.
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        try:
            head = orjson.loads(first)
        except orjson.JSONDecodeError:
            head = None
        if isinstance(head, dict) and first.strip() != text.strip():
            yield from _jsonl_rows(text)
            return
        raise FileRejected("not_json", str(err), line=err.lineno) from err
    if isinstance(doc, dict):
        yield Row(0, 1, doc, orjson.dumps(doc))
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            raw = orjson.dumps(item)
            if isinstance(item, dict):
                yield Row(i, None, item, raw)
            else:
                yield Row(i, None, None, raw, (
                    "not_an_object", f"element {i} is a JSON {type(item).__name__}, "
                    "not an object"))
    else:
        raise FileRejected("not_an_object",
                           f"the document is a JSON {type(doc).__name__}: expected an "
                           "object or an array of objects", line=1)
