"""``map``: raw record (decoded JSON + context such as topic captures) → canonical Event.

Used by every source that maps payload fields (MQTT subscriptions, OPC UA triggers, files).
The mapping is validated at config load; at run time a record that cannot be mapped raises
``InputError`` with a bounded reason code (``missing_field``, ``invalid_data``,
``not_an_object``) — the source quarantines it and acks. The data of an event of a
catalogue type (``edge.events.catalogue``, docs/events.md) is checked against its model
here, so every source that maps gets the check: a violation is ``invalid_data`` with a
detail naming the field. Types outside the catalogue are not checked.

Config fragment (``MappingConfig``)::

    event: inspection.result            # event type
    class: high                         # optional; default by type (edge.events)
    ordering_key: "lot:{lot_id}"        # template over data fields, captures and {site}
    fields: {lot_id: lot, serial: sn, measured: "values[0]"}   # event field: payload path
    static: {line: "3"}                 # constant fields
    dedupe_key: "{serial}:{ts}"         # optional; redelivery maps to the same event

Without ``fields`` the whole payload object becomes ``data``. Template captures (e.g. MQTT
topic ``{station}`` levels) are added to ``data`` unless a mapped field has the same name.
"""

from __future__ import annotations

import re
import string
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, field_validator

from edge.config import StrictModel
from edge.errors import InputError
from edge.events import Event, EventClass, make_event
from edge.events.catalogue import validate_data

__all__ = ["Mapper", "MappingConfig", "get_path", "render_template", "template_fields"]

_PATH_RE = re.compile(r"^[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*$|^\.$")
_STEP_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def template_fields(template: str) -> list[str]:
    """Names used in a ``{name}`` template; raises ValueError on a malformed template."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as err:
        raise ValueError(f"malformed template {template!r}: {err}") from err


class Template:
    """A ``{name}`` template parsed once; ``render`` fills it (hot path: no re-parsing)."""

    __slots__ = ("parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts = [(literal, _compile_path(name) if name else None)
                      for literal, name, _, _ in string.Formatter().parse(text)]

    def render(self, values: dict[str, Any], quote: Callable[..., str] | None = None,
               *, path_segment: bool = False) -> str:
        out = []
        for literal, path in self.parts:
            out.append(literal)
            if path is None:
                continue
            value = _walk(values, path)
            if path_segment:
                out.append(_path_segment(value, path))
                continue
            if value is None or value == "":
                name = ".".join(str(p) for p in path)
                raise InputError("missing_field", f"template {self.text!r} needs {name!r}")
            out.append(quote(str(value), safe="") if quote else str(value))
        return "".join(out)


def _path_segment(value: Any, path: tuple[str | int, ...]) -> str:
    """``value`` as exactly one percent-encoded URL path segment, or InputError
    ``unsafe_path_value`` when it would change the path's segments (or name nothing)."""
    name = ".".join(str(p) for p in path)
    if value is None:
        raise InputError("unsafe_path_value", f"{name} is missing")
    if isinstance(value, (dict, list)):
        raise InputError("unsafe_path_value", f"{name} is not a single value")
    text = str(value)
    if text in ("", ".", ".."):
        shown = "empty" if text == "" else f"{text!r}"
        raise InputError("unsafe_path_value", f"{name} is {shown}")
    try:
        return urllib.parse.quote(text, safe="")
    except UnicodeEncodeError as err:
        raise InputError("unsafe_path_value", f"{name} is not valid UTF-8") from err


_templates: dict[str, Template] = {}


def render_template(
    template: str, values: dict[str, Any], *, quote: Callable[..., str] | None = None,
    path_segment: bool = False,
) -> str:
    """Fill ``{name}`` (or ``{data.name}``) from ``values``.

    By default an InputError ``missing_field`` is raised for a missing or empty value;
    ``quote(value, safe="")`` (if given) escapes or checks each value.

    ``path_segment=True`` is for URL paths (DESIGN "Safety at the edges"): every value
    becomes exactly one percent-encoded segment (``/`` → ``%2F``, ``%`` → ``%25``,
    non-ASCII as UTF-8); a value that is missing, empty, ``.``, ``..`` or not a single
    value (an object, a list) raises InputError ``unsafe_path_value`` whose detail names
    the field, e.g. ``data.lot_id is '..'``. ``quote`` is not used then.
    """
    compiled = _templates.get(template)
    if compiled is None:
        if len(_templates) > 4096:  # templates come from config: a handful in practice
            _templates.clear()
        compiled = _templates[template] = Template(template)
    return compiled.render(values, quote, path_segment=path_segment)


def _compile_path(path: str) -> tuple[str | int, ...]:
    if path == ".":
        return ()
    return tuple(key if key else int(index) for key, index in _STEP_RE.findall(path))


def _walk(doc: Any, steps: tuple[str | int, ...]) -> Any:
    node = doc
    for step in steps:
        if isinstance(step, str):
            if not isinstance(node, dict):
                return None
            node = node.get(step)
        else:
            if not isinstance(node, list) or step >= len(node):
                return None
            node = node[step]
        if node is None:
            return None
    return node


def get_path(doc: Any, path: str) -> Any:
    """``a.b[0].c`` into nested dicts/lists; None when any step is missing. ``.`` = doc."""
    return _walk(doc, _compile_path(path))


class MappingConfig(StrictModel):
    event: str = Field(description="event type, e.g. inspection.result")
    event_class: str | None = Field(
        None, alias="class", description="critical | high | normal | low (default by type)"
    )
    ordering_key: str | None = Field(
        None, description="template, e.g. 'lot:{lot_id}'; events of one key stay in order"
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="event field: payload path (a.b[0].c)"
    )
    static: dict[str, Any] = Field(default_factory=dict, description="constant data fields")
    dedupe_key: str | None = Field(
        None, description="template identifying a record across redeliveries"
    )
    source_ts: str | None = Field(
        None, description="payload path of the device timestamp (ISO-8601 or epoch seconds)"
    )

    @field_validator("event")
    @classmethod
    def _event_shape(cls, v: str) -> str:
        if not re.match(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$", v):
            raise ValueError(f"must be a dotted lowercase name like inspection.result, got {v!r}")
        return v

    @field_validator("event_class")
    @classmethod
    def _class_name(cls, v: str | None) -> str | None:
        if v is not None:
            EventClass.parse(v)
        return v

    @field_validator("ordering_key", "dedupe_key")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            template_fields(v)
        return v

    @field_validator("fields")
    @classmethod
    def _paths(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not _PATH_RE.match(path):
                raise ValueError(f"{name}: {path!r} is not a payload path like a.b[0].c")
        return v

    def check_template_names(self, captures: set[str], what: str) -> None:
        """With ``fields``, every name ``ordering_key`` and ``dedupe_key`` use must be a
        mapped field, a static field, ``site``/``source``, ``data.…`` or one of
        ``captures`` (a source's topic or file-name captures, called ``what`` in the
        error). ValueError naming the key otherwise. Without ``fields`` the payload is
        taken whole, so any name may exist: nothing is checked."""
        if not self.fields:
            return
        known = set(self.fields) | set(self.static) | {"site", "source"} | captures
        for key in ("ordering_key", "dedupe_key"):
            template = getattr(self, key)
            for name in template_fields(template) if template else []:
                root = name.split(".")[0].split("[")[0]
                if root not in known and root != "data":
                    allowed = ", ".join(sorted(known))
                    raise ValueError(
                        f"{key} uses {{{name}}}, which is neither a mapped field, a {what} "
                        f"nor a static field (one of {allowed})")


class Mapper:
    """Compiled ``MappingConfig`` for one source: ``map(payload, captures) → Event``."""

    def __init__(self, config: MappingConfig, *, site: str, source: str) -> None:
        self.config = config
        self.site = site
        self.source = source
        self.event_class = EventClass.parse(config.event_class) if config.event_class else None
        self._fields = [(name, _compile_path(path)) for name, path in config.fields.items()]
        self._key = Template(config.ordering_key) if config.ordering_key else None
        self._dedupe = Template(config.dedupe_key) if config.dedupe_key else None
        self._source_ts = _compile_path(config.source_ts) if config.source_ts else None

    def map(
        self,
        payload: Any,
        captures: dict[str, Any] | None = None,
        *,
        source_ts: datetime | None = None,
        correlation_id: str | None = None,
        backfilled: bool = False,
    ) -> tuple[Event, str | None]:
        """Return the event and its rendered dedupe key (None if not configured)."""
        cfg = self.config
        captures = captures or {}
        if self._fields:
            data: dict[str, Any] = {}
            for name, steps in self._fields:
                value = _walk(payload, steps)
                if value is not None:
                    data[name] = value
        elif isinstance(payload, dict):
            data = dict(payload)
        else:
            data = {"value": payload}
        for k, v in captures.items():
            data.setdefault(k, v)
        for k, v in cfg.static.items():
            data.setdefault(k, v)
        data = validate_data(cfg.event, data)
        values = {**data, "site": self.site, "data": data, "source": self.source}
        key = self._key.render(values) if self._key else None
        dedupe = self._dedupe.render(values) if self._dedupe else None
        if self._source_ts is not None and source_ts is None:
            source_ts = parse_timestamp(_walk(payload, self._source_ts))
        event = make_event(
            type=cfg.event,
            site=self.site,
            source=self.source,
            data=data,
            ordering_key=key,
            event_class=self.event_class,
            source_ts=source_ts,
            correlation_id=correlation_id,
            backfilled=backfilled,
        )
        return event, dedupe


def parse_timestamp(value: Any) -> datetime | None:
    """ISO-8601 string or epoch seconds/milliseconds → aware UTC datetime; None if absent."""
    if value is None:
        return None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = value / 1000 if value > 1e11 else value
            return datetime.fromtimestamp(seconds, UTC)
        if isinstance(value, str):
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError) as err:
        raise InputError("invalid_timestamp", f"{value!r}: {err}") from err
    raise InputError("invalid_timestamp", f"unsupported timestamp {value!r}")
