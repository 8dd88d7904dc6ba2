"""Config model of the ``file`` source: the drop folder, completeness, limits and the
``files:`` entries (a name pattern, a format and the mapping of each row)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.plugin import MappingConfig, SourceConfigBase

__all__ = ["FileEntryConfig", "FileSourceConfig", "NamePattern"]

# Names a ``{...}`` template may use besides data fields: see ``Mapper.map``.
_PROVENANCE = {"source_file", "source_row"}
_CAPTURE_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class NamePattern:
    """A file name pattern: ``*`` and ``?`` as in a shell glob, ``{name}`` captures a part
    of the name (non-empty, shortest match) into the row's data, e.g. ``{supplier}_{lot}.csv``.
    The whole name must match; matching is case-sensitive."""

    __slots__ = ("captures", "regex", "text")

    def __init__(self, text: str) -> None:
        if not text or "/" in text or "\\" in text or "\x00" in text:
            raise ValueError(f"must be a file name pattern without a folder, got {text!r}")
        self.text = text
        self.captures: list[str] = []
        out: list[str] = []
        i = 0
        while i < len(text):
            c = text[i]
            if c == "{":
                m = _CAPTURE_RE.match(text, i)
                if m is None:
                    raise ValueError(f"{text!r}: '{{' at {i} must open a capture like {{lot}}")
                name = m.group(1)
                if name in self.captures:
                    raise ValueError(f"{text!r}: capture {{{name}}} appears twice")
                self.captures.append(name)
                out.append(f"(?P<{name}>[^/]+?)")
                i = m.end()
                continue
            if c == "}":
                raise ValueError(f"{text!r}: '}}' at {i} closes no capture")
            out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
            i += 1
        self.regex = re.compile("".join(out), re.S)

    def match(self, name: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(name)
        return m.groupdict() if m is not None else None


class FileEntryConfig(MappingConfig):
    """Which files (a name pattern), how to read them and how each row maps to an event."""

    pattern: str = Field(description="file name pattern: glob (*.csv) with {name} captures")
    format: Literal["auto", "csv", "json", "jsonl"] = Field(
        "auto", description="auto: by extension (.csv, .json, .jsonl/.ndjson)")
    delimiter: str = Field(",", description="CSV field delimiter, one character (\\t for tab)")
    encoding: str = Field("utf-8", description="text encoding; a UTF-8 BOM is skipped")
    provenance: bool = Field(
        False, description="add source_file and source_row (1-based) to every event's data")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        NamePattern(v)
        return v

    @field_validator("delimiter")
    @classmethod
    def _delimiter(cls, v: str) -> str:
        v = {"\\t": "\t", "tab": "\t"}.get(v, v)
        if len(v) != 1 or v in "\r\n\"":
            raise ValueError(f"must be one character other than a quote or newline, got {v!r}")
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError as err:
            raise ValueError(f"unknown encoding {v!r} (e.g. utf-8, cp1252, latin-1)") from err
        return v

    @model_validator(mode="after")
    def _template_names(self) -> FileEntryConfig:
        captures = set(NamePattern(self.pattern).captures)
        self.check_template_names(
            captures | (_PROVENANCE if self.provenance else set()), "file name capture")
        return self


class FileSourceConfig(SourceConfigBase):
    type: Literal["file"]
    path: str = Field(description="the drop folder (must exist; not created)")
    done_dir: str = Field(
        "done", description="where a file moves once all its events are committed "
        "(relative to path, or absolute on the same file system)")
    rejected_dir: str = Field(
        "rejected", description="where an unusable file moves, beside a <name>.reason file")
    watch: Literal["auto", "inotify", "poll"] = Field(
        "auto", description="auto: inotify where the OS has it, else polling")
    poll_interval_s: float = Field(
        2.0, gt=0, le=3600, description="folder rescan interval when polling (and the "
        "safety rescan with inotify is max(30 s, this))")
    complete: Literal["settle", "marker"] = Field(
        "settle", description="settle: size and mtime unchanged for settle_s; "
        "marker: taken once <name><marker_suffix> exists")
    settle_s: float = Field(
        2.0, ge=0, le=3600, description="settle: seconds size and mtime must stay unchanged")
    marker_suffix: str = Field(".done", description="marker: suffix of the marker file")
    max_file_bytes: int = Field(
        16 * 1024 * 1024, ge=1, le=1024**3,
        description="larger files are rejected (a file's text is held in memory)")
    max_rows: int = Field(
        50_000, ge=1, le=10_000_000, description="files with more rows are rejected")
    max_batch: int = Field(500, ge=1, le=10_000, description="rows per outbox commit")
    files: list[FileEntryConfig] = Field(min_length=1)

    @field_validator("marker_suffix")
    @classmethod
    def _suffix(cls, v: str) -> str:
        if not v or "/" in v or "\x00" in v:
            raise ValueError(f"must be a non-empty file name suffix like .done, got {v!r}")
        return v

    @field_validator("path", "done_dir", "rejected_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a folder")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FileSourceConfig:
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.files):
            if entry.pattern in seen:
                raise ValueError(f"files[{i}].pattern {entry.pattern!r} repeats "
                                 f"files[{seen[entry.pattern]}]")
            seen[entry.pattern] = i
        folder = os.path.normpath(self.path)
        done, rejected = (os.path.normpath(os.path.join(self.path, d))
                          for d in (self.done_dir, self.rejected_dir))
        if done == rejected:
            raise ValueError("done_dir and rejected_dir must differ")
        if folder in (done, rejected):
            raise ValueError("done_dir and rejected_dir must not be the drop folder itself "
                             "(a finished file would be taken again)")
        return self
