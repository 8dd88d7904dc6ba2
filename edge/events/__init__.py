"""The canonical manufacturing event and its identity.

Contract:
- ``Event.id`` is a UUIDv7 (time-ordered) string assigned once at ingest; it is the
  ``Idempotency-Key`` of every delivery attempt.
- ``payload_sha256`` is the SHA-256 of ``canonical_json(data)`` computed at ingest and
  recorded in the audit trail. The outbox also keeps the SHA-256 of the whole stored
  envelope (which carries ``payload_sha256``); the forwarder checks it before every send
  and dead-letters on a mismatch.
- ``event_class`` orders delivery: critical > high > normal > low. ``low`` is the only class
  the outbox may expire under disk pressure.
- ``schema_version`` is the version of the type's data model in the catalogue
  (``edge.events.catalogue``) when the event was made; 1 for types outside it.

The catalogue of event types (data models, default class and ordering key per type) is
``edge.events.catalogue``; ``docs/events.md`` documents it.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.events import catalogue
from edge.timefmt import iso_z

__all__ = [
    "DEFAULT_CLASS_BY_TYPE",
    "Event",
    "EventClass",
    "canonical_json",
    "default_class",
    "default_ordering_key",
    "make_event",
    "payload_sha256",
    "uuid7",
]


class EventClass(IntEnum):
    """Delivery priority; the int value is the sort order in the outbox (lower first)."""

    critical = 0
    high = 1
    normal = 2
    low = 3

    @classmethod
    def parse(cls, value: str | int | EventClass) -> EventClass:
        if isinstance(value, EventClass):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[value]
        except KeyError:
            allowed = ", ".join(c.name for c in cls)
            raise ValueError(f"must be one of {allowed}, got {value!r}") from None


_CLASS_NAMES = tuple(c.name for c in sorted(EventClass))  # by value, for to_wire

# Default class of the catalogue's types (plus machine.state, a telemetry type without a
# data model); anything else is `normal` unless configured.
DEFAULT_CLASS_BY_TYPE: dict[str, EventClass] = {
    **{t: EventClass[s.event_class] for t, s in catalogue.CATALOGUE.items()},
    "machine.state": EventClass.low,
}


def default_class(event_type: str) -> EventClass:
    """The class an event of ``event_type`` gets when its source configures none."""
    return DEFAULT_CLASS_BY_TYPE.get(event_type, EventClass.normal)


# Not a security token: uniqueness comes from time + counter + 62 random bits. The module
# PRNG is seeded from os.urandom and reseeded after fork by CPython.
_rng = random.Random()
_uuid7_lock = threading.Lock()
_uuid7_last_ms = 0
_uuid7_counter = 0


def uuid7() -> str:
    """A UUIDv7 string (RFC 9562): 48-bit ms timestamp, 12-bit counter, 62 random bits.

    Monotonic within a process: ids generated in the same millisecond keep their order.
    """
    global _uuid7_last_ms, _uuid7_counter
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _uuid7_last_ms:
            _uuid7_counter += 1
            if _uuid7_counter > 0xFFF:  # counter overflow: borrow the next millisecond
                _uuid7_last_ms += 1
                _uuid7_counter = 0
            ms = _uuid7_last_ms
        else:
            _uuid7_last_ms = ms
            _uuid7_counter = _rng.getrandbits(10)
        counter = _uuid7_counter
    rand = _rng.getrandbits(62)
    value = (
        ((ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    )
    b = value.to_bytes(16, "big")
    return f"{b[:4].hex()}-{b[4:6].hex()}-{b[6:8].hex()}-{b[8:10].hex()}-{b[10:].hex()}"


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys) — the input of ``payload_sha256``."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def payload_sha256(data: Any) -> str:
    return hashlib.sha256(canonical_json(data)).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The canonical envelope every source produces and every sink receives."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    id: str = Field(description="UUIDv7, assigned at ingest; the Idempotency-Key")
    type: str = Field(description="event type, e.g. inspection.result")
    schema_version: int = 1
    site: str
    source: str = Field(description="id of the source component that produced it")
    source_ts: datetime | None = Field(
        default=None, description="when the data was produced (device/server clock)"
    )
    received_ts: datetime = Field(description="when the gateway received it (UTC)")
    ordering_key: str | None = Field(
        default=None, description="events with the same key are delivered in order"
    )
    event_class: EventClass = Field(alias="class")
    correlation_id: str
    data: dict[str, Any]
    payload_sha256: str
    backfilled: bool = Field(
        default=False, description="recovered after a gap (e.g. OPC UA HistoryRead)"
    )

    @field_validator("event_class", mode="before")
    @classmethod
    def _class_by_name(cls, v: Any) -> Any:
        return EventClass.parse(v) if isinstance(v, str) else v

    def to_json(self) -> bytes:
        """The wire/storage form: JSON with ``class`` as its name (``high``), not its number."""
        return orjson.dumps(self.to_wire())

    def to_wire(self) -> dict[str, Any]:
        # Built by hand: this runs once per event on the ingest hot path.
        return {
            "id": self.id,
            "type": self.type,
            "schema_version": self.schema_version,
            "site": self.site,
            "source": self.source,
            "source_ts": _iso(self.source_ts),
            "received_ts": _iso(self.received_ts),
            "ordering_key": self.ordering_key,
            "class": _CLASS_NAMES[self.event_class],
            "correlation_id": self.correlation_id,
            "data": self.data,
            "payload_sha256": self.payload_sha256,
            "backfilled": self.backfilled,
        }

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        return cls.model_validate(orjson.loads(raw))

    def integrity_ok(self) -> bool:
        """True when ``data`` still hashes to the ``payload_sha256`` computed at ingest."""
        return payload_sha256(self.data) == self.payload_sha256


_ALL_FIELDS = frozenset(Event.model_fields)


def _construct(**values: Any) -> Event:
    """``Event.model_construct`` without its per-call bookkeeping (hot path, ~4x faster).

    Only for values make_event already guarantees; a test checks it equals
    ``Event.model_validate`` of the same values.
    """
    obj = Event.__new__(Event)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(_ALL_FIELDS))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


def _iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    if ts.tzinfo is UTC:  # make_event's received_ts: no conversion needed
        return ts.isoformat()[:-6] + "Z"  # "+00:00" → "Z", as iso_z writes it
    return iso_z(ts)


def default_ordering_key(data: dict[str, Any], type: str | None = None) -> str | None:
    """The ordering key of an event whose source configures none: the catalogue's key of
    ``type`` (``lot:{lot_id}`` for the lot-scoped types, ``supplier:{supplier}`` for a CAPA
    request, none for machine readings); for a type outside the catalogue (or no type)
    ``lot:{lot_id}`` when ``data`` has a lot, else None (no ordering constraint)."""
    return catalogue.default_ordering_key(type, data)


def make_event(
    *,
    type: str,
    site: str,
    source: str,
    data: dict[str, Any],
    ordering_key: str | None = None,
    event_class: EventClass | str | None = None,
    source_ts: datetime | None = None,
    correlation_id: str | None = None,
    backfilled: bool = False,
) -> Event:
    """Build an event at ingest: new UUIDv7 id, received timestamp, payload hash.

    ``correlation_id`` defaults to the event id (the start of a new chain).
    ``ordering_key`` defaults to the catalogue's key of the type (``default_ordering_key``:
    ``lot:{lot_id}`` for an event about a lot, DESIGN invariant 4): a lot's events stay in
    order per sink whatever the source configured, and it is the key the rules give the
    events they derive for the lot. ``event_class`` defaults to the type's (``default_class``).

    ``data`` is not checked here: sources that map payloads check it against the catalogue
    in ``edge.transforms.map.Mapper`` (``edge.events.catalogue.validate_data``), and a
    source that builds events itself calls ``validate_data`` first.
    """
    spec = catalogue.CATALOGUE.get(type)
    if ordering_key is None:
        ordering_key = (spec.ordering_key_for(data) if spec is not None
                        else catalogue.default_ordering_key(None, data))
    event_id = uuid7()
    cls = (
        EventClass.parse(event_class)
        if event_class is not None
        else DEFAULT_CLASS_BY_TYPE.get(type, EventClass.normal)
    )
    return _construct(
        id=event_id,
        type=type,
        schema_version=spec.schema_version if spec is not None else 1,
        site=site,
        source=source,
        source_ts=source_ts,
        received_ts=utcnow(),
        ordering_key=ordering_key,
        event_class=cls,
        correlation_id=correlation_id or event_id,
        data=data,
        payload_sha256=payload_sha256(data),
        backfilled=backfilled,
    )
