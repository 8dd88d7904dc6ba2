"""Governed payload contracts: a route's JSON Schema for the body it sends.

A route's ``schema_file`` names a JSON Schema (draft 2020-12 unless the file's ``$schema``
names another draft) that every body of the route must satisfy: the envelope or the
``data``, whatever the route sends; on a batched route every element. A body that
violates it is dead-lettered before sending with the schema error as its reason, e.g.
``schema erp-lot-status.json: data.status: 'paused' is not one of ['released', 'hold',
'quarantine', 'rejected']`` — it never reaches the receiver.

- ``load_schema(path)`` reads the file and checks it: it exists, is JSON, is a valid JSON
  Schema of its draft, and every ``$ref`` resolves. ``SchemaFileError`` says what is wrong
  and where (a line and column in the file, or the keyword path in the schema). Config
  validation calls it for ``check-config``; the sink calls it again at start.
- ``PayloadSchema.violation(body)``: None, or the reason of the dead letter — the most
  relevant error (``jsonschema.exceptions.best_match``) with its location in the body, and
  how many more errors there are.

A ``$ref`` to another file is looked up by its file name in the schema's own folder;
nothing is ever fetched from the network. ``format`` is asserted for ``date-time`` and
``time`` (RFC 3339, with a time zone), ``date``, ``email``, ``ipv4``, ``ipv6``, ``uuid``,
``regex`` and the ``idn-`` forms; other formats are annotations only.

``jsonschema`` is imported when a schema is loaded, so a config without ``schema_file``
never imports it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MAX_MESSAGE", "PayloadSchema", "SchemaFileError", "body_location", "load_schema"]

MAX_MESSAGE = 300  # characters of one schema error message kept in a reason
_RFC3339_TIME = r"\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})"
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]" + _RFC3339_TIME)
_TIME = re.compile(_RFC3339_TIME)


class SchemaFileError(ValueError):
    """A schema file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class PayloadSchema:
    """A checked schema, ready to validate bodies."""

    name: str  # the file name, as reasons show it
    path: str
    validator: Any  # a jsonschema validator instance

    def violation(self, body: Any) -> str | None:
        """None when ``body`` satisfies the schema, else the dead letter's reason."""
        from jsonschema.exceptions import best_match

        errors = list(self.validator.iter_errors(body))
        if not errors:
            return None
        best = best_match(errors)
        assert best is not None
        reason = f"schema {self.name}: {body_location(best.absolute_path)}: {_cut(best.message)}"
        if len(errors) > 1:
            more = len(errors) - 1
            reason += f" (and {more} more error{'s' if more > 1 else ''})"
        return reason


def body_location(path: Any) -> str:
    """``['data', 'items', 2, 'x']`` → ``data.items[2].x``; the whole body → ``body``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def load_schema(path: str | Path) -> PayloadSchema:
    """Read and check the schema at ``path`` (see the module docstring)."""
    p = Path(path)
    name = p.name
    try:
        import jsonschema
        from jsonschema import Draft202012Validator, validators
        from referencing import Registry, Resource
        from referencing.exceptions import NoSuchResource, Unresolvable
    except ImportError as err:  # pragma: no cover - the dependency is declared
        raise SchemaFileError(f"schema {name}: schema_file needs the Python package "
                              f"jsonschema ({err})") from err
    schema = _read_json(p, name)
    if not isinstance(schema, (dict, bool)):
        raise SchemaFileError(f"schema {name}: a JSON Schema is an object (or true/false), "
                              f"got {type(schema).__name__}")
    declared = schema.get("$schema") if isinstance(schema, dict) else None
    cls = validators.validator_for(schema, default=None) if declared else Draft202012Validator
    if cls is None:
        raise SchemaFileError(f"schema {name}: $schema {declared!r} is not a JSON Schema draft "
                              "this gateway knows (use https://json-schema.org/draft/2020-12/"
                              "schema or leave it out)")
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise SchemaFileError(f"schema {name}: not a valid JSON Schema ({_draft(cls)}): "
                              f"{_schema_location(err.absolute_path)}: {_cut(err.message)}"
                              ) from err
    folder = p.resolve().parent

    def retrieve(uri: str) -> Any:
        """Another schema file, by its file name in this schema's folder only."""
        file_name = PurePosixPath(urlsplit(uri).path).name
        other = folder / file_name
        if not file_name or not other.is_file():
            raise NoSuchResource(ref=uri)  # type: ignore[call-arg]
        return Resource.from_contents(_read_json(other, file_name),
                                      default_specification=_specification(cls))

    resource = Resource.from_contents(schema, default_specification=_specification(cls))
    root = schema.get("$id", "") if isinstance(schema, dict) else ""
    registry: Any = Registry(retrieve=retrieve).with_resource(  # type: ignore[call-arg]
        root, resource)
    resolver = registry.resolver(base_uri=root)
    for ref, where in _refs(schema):
        try:
            resolver.lookup(ref)
        except Unresolvable as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, SchemaFileError):
                cause = cause.__cause__  # Unresolvable ← Unretrievable ← our error
            detail = f" ({cause})" if cause is not None else ""
            if not ref.startswith("#"):
                detail += ("; another file is looked up by its name in this schema's "
                           "folder")
            raise SchemaFileError(f"schema {name}: {_schema_location(where)}: $ref {ref!r} "
                                  f"does not resolve{detail}") from err
    checker = copy.copy(cls.FORMAT_CHECKER)  # the draft's own, plus two: never changed
    checker.checkers = dict(checker.checkers)
    checker.checks("date-time")(_is_date_time)
    checker.checks("time")(_is_time)
    validator = cls(schema, registry=registry, format_checker=checker)
    return PayloadSchema(name, str(p), validator)


def _read_json(p: Path, name: str) -> Any:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise SchemaFileError(f"schema file not found: {p}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise SchemaFileError(f"schema {name}: cannot read {p}: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SchemaFileError(f"schema {name}: not valid JSON: line {err.lineno}, column "
                              f"{err.colno}: {err.msg}") from err


def _refs(node: Any, where: tuple[Any, ...] = (), root: bool = True
          ) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """Every ``$ref`` of the schema with its keyword path; not inside a nested resource
    (a subschema with its own ``$id`` resolves against that, checked when used), and not
    inside ``enum``/``const``/``examples``/``default`` values, which are data."""
    if isinstance(node, dict):
        if not root and "$id" in node:
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref, where
        for key, value in node.items():
            if key not in ("enum", "const", "examples", "default"):
                yield from _refs(value, (*where, key), False)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _refs(value, (*where, i), False)


def _schema_location(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _draft(cls: Any) -> str:
    return str(cls.META_SCHEMA.get("$schema", cls.__name__))


def _specification(cls: Any) -> Any:
    from referencing.jsonschema import specification_with

    return specification_with(cls.META_SCHEMA["$schema"])


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 1] + "…"


def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # format applies to strings only
    if not _DATE_TIME.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _is_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _TIME.fullmatch(value):
        return False
    try:
        datetime.fromisoformat("2000-01-01T" + value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True
