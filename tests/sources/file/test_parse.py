"""Parsing of dropped files (``edge.sources.file.parse``), the file name patterns and the
config checks, without a gateway."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from edge.sources.file.config import FileSourceConfig, NamePattern
from edge.sources.file.parse import FileRejected, decode, format_for, iter_rows
from edge.sources.file.source import _place


def rows(text: str, fmt: str, **kw: object) -> list[tuple[int, int | None, object, object]]:
    return [(r.index, r.line, r.value, r.error and r.error[0])
            for r in iter_rows(text, fmt, **kw)]  # type: ignore[arg-type]


def rejected(text: str, fmt: str, **kw: object) -> FileRejected:
    with pytest.raises(FileRejected) as info:
        list(iter_rows(text, fmt, **kw))  # type: ignore[arg-type]
    return info.value


# ----------------------------------------------------------------------------- CSV


def test_csv_header_rows_blank_lines_and_empty_cells() -> None:
    text = "\n lot ,sn,note,\nL1,a,,\n\nL1,b,x y,\n"
    assert rows(text, "csv") == [
        (0, 3, {"lot": "L1", "sn": "a"}, None),      # empty cells are absent values
        (1, 5, {"lot": "L1", "sn": "b", "note": "x y"}, None),
    ]


def test_csv_quoted_fields_across_lines_keep_the_line_where_the_row_starts() -> None:
    text = 'lot;sn;note\nL1;a;"two\nlines; here"\nL1;b;plain\n'
    got = rows(text, "csv", delimiter=";")
    assert got[0] == (0, 2, {"lot": "L1", "sn": "a", "note": "two\nlines; here"}, None)
    assert got[1] == (1, 4, {"lot": "L1", "sn": "b", "note": "plain"}, None)


def test_a_csv_row_with_the_wrong_number_of_cells_is_a_bad_row_not_a_bad_file() -> None:
    got = rows("a,b\n1,2\n1\n1,2,3\n4,5\n", "csv")
    assert [g[3] for g in got] == [None, "bad_row", "bad_row", None]
    assert [g[0] for g in got] == [0, 1, 2, 3]


@pytest.mark.parametrize(("text", "reason", "line"), [
    ("", "no_header", 1),
    ("\n\n", "no_header", 1),
    ("a,b,a\n1,2,3\n", "bad_header", 1),
    ("a,b\n" + "1,2\n" * 5, "too_many_rows", 6),
])
def test_csv_problems_of_the_whole_file(text: str, reason: str, line: int) -> None:
    err = rejected(text, "csv", max_rows=4)
    assert (err.reason, err.line) == (reason, line)


def test_a_utf8_bom_is_skipped_and_a_wrong_encoding_names_its_line() -> None:
    assert decode("\ufeffa,b\n".encode(), "utf-8") == "a,b\n"
    assert decode("\ufeffa,b\n".encode(), "UTF8") == "a,b\n"
    assert decode("caf\xe9".encode("cp1252"), "cp1252") == "caf\xe9"
    with pytest.raises(FileRejected) as info:
        decode(b"a,b\n1,2\n3,\xff\n", "utf-8")
    assert (info.value.reason, info.value.line) == ("bad_encoding", 3)


# ----------------------------------------------------------------------------- JSON


def test_json_object_array_and_lines() -> None:
    assert rows('{"a": 1}', "json") == [(0, 1, {"a": 1}, None)]
    assert rows('[{"a": 1}, 2, {"a": 3}]', "json") == [
        (0, None, {"a": 1}, None), (1, None, None, "not_an_object"), (2, None, {"a": 3}, None)]
    lines = '{"a": 1}\n\n{"a": 2\n[1]\n{"a": 4}\n'
    assert rows(lines, "jsonl") == [(0, 1, {"a": 1}, None), (1, 3, None, "not_json"),
                                    (2, 4, None, "not_an_object"), (3, 5, {"a": 4}, None)]
    # JSON lines in a .json file are read as lines
    assert rows('{"a": 1}\n{"a": 2}\n', "json") == [(0, 1, {"a": 1}, None),
                                                     (1, 2, {"a": 2}, None)]


@pytest.mark.parametrize(("text", "reason", "line"), [
    ("", "no_rows", 1),
    ('{"a": 1,\n "b": tru}', "not_json", 2),
    ("42", "not_an_object", 1),
    ('[{"a": 1}, {"a": 2}, {"a": 3}]', "too_many_rows", None),
])
def test_json_problems_of_the_whole_file(text: str, reason: str, line: int | None) -> None:
    err = rejected(text, "json", max_rows=2)
    assert (err.reason, err.line) == (reason, line)


def test_every_row_keeps_its_raw_text_for_the_quarantine() -> None:
    [row] = iter_rows("a,b\n1,\"x,y\"\n", "csv")
    assert row.raw == b'1,"x,y"\n'
    [row] = iter_rows('[{"a": [1, 2]}]', "json")
    assert orjson.loads(row.raw) == {"a": [1, 2]}


def test_format_by_extension_unless_configured() -> None:
    assert format_for("X.CSV", "auto") == "csv"
    assert format_for("a.ndjson", "auto") == "jsonl"
    assert format_for("a.txt", "auto") is None
    assert format_for("a.txt", "csv") == "csv"


# ----------------------------------------------------------------------------- names


def test_name_patterns_capture_parts_of_the_name() -> None:
    p = NamePattern("{supplier}_{lot}.csv")
    assert p.match("acme_L-7_b.csv") == {"supplier": "acme", "lot": "L-7_b"}
    assert p.match("acme_L7.csv.tmp") is None and p.match("_L7.csv") is None
    assert NamePattern("cmm-*.json").match("cmm-st7-0001.json") == {}
    assert NamePattern("r?.csv").match("r12.csv") is None
    assert NamePattern("a+b.csv").match("aab.csv") is None  # regex characters are literal


@pytest.mark.parametrize("bad", ["dir/x.csv", "{lot.csv", "x}.csv", "{a}{a}.csv", ""])
def test_bad_name_patterns_are_config_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        NamePattern(bad)


def test_config_errors_name_the_field() -> None:
    base = {"id": "lims", "type": "file", "path": "/srv/drop"}
    entry = {"pattern": "*.csv", "event": "inspection.result"}
    with pytest.raises(ValidationError, match="ordering_key uses {lots}"):
        FileSourceConfig.model_validate({**base, "files": [
            {**entry, "fields": {"lot_id": "lot"}, "ordering_key": "lot:{lots}"}]})
    with pytest.raises(ValidationError, match="repeats files"):
        FileSourceConfig.model_validate({**base, "files": [entry, entry]})
    with pytest.raises(ValidationError, match="unknown encoding"):
        FileSourceConfig.model_validate({**base, "files": [{**entry, "encoding": "utf-9"}]})
    with pytest.raises(ValidationError, match="must not be the drop folder"):
        FileSourceConfig.model_validate({**base, "files": [entry], "done_dir": "./"})
    with pytest.raises(ValidationError, match="must differ"):
        FileSourceConfig.model_validate({**base, "files": [entry], "done_dir": "/srv/drop/x",
                                         "rejected_dir": "x"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        FileSourceConfig.model_validate({**base, "files": [entry], "settle": 3})
    ok = FileSourceConfig.model_validate({**base, "files": [
        {**entry, "pattern": "{supplier}_{lot}.csv", "fields": {"lot_id": "lot"},
         "delimiter": "\\t", "ordering_key": "{supplier}:{lot}:{source_row}",
         "provenance": True}]})
    assert ok.files[0].delimiter == "\t"


# ----------------------------------------------------------------------------- moves


def test_a_move_never_replaces_a_file_of_the_same_name(tmp_path: Path) -> None:
    target = tmp_path / "done"
    target.mkdir()
    names = []
    for n in range(3):
        src = tmp_path / "r.csv"
        src.write_text(str(n))
        names.append(_place(src, target, "r.csv"))
        assert not src.exists()
    assert names == ["r.csv", "r-1.csv", "r-2.csv"]
    assert [(target / n).read_text() for n in names] == ["0", "1", "2"]
    src = tmp_path / "README"
    src.write_text("x")
    (target / "README").write_text("old")
    assert _place(src, target, "README") == "README-1"
