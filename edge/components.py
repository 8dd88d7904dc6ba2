"""Component contracts: sources, sinks and the ingest seam between sources and the outbox.

Built-in components and third-party plugins implement the same Protocols and register the
same way (see ``edge.registry``).

Source lifecycle (Benthos-style ``connect / read → (message, ack) / close``)::

    source = factory(cfg, ctx)          # validate only; no I/O
    await source.run()                  # connect, read, submit, ack; returns on cancel
                                        # raises RetryableStartupError / FatalStartupError

A source acknowledges upstream ONLY after ``await ctx.ingest.submit(...)`` returned: that
call returns after the events are committed to the outbox (invariant 1). If it raises
``OutboxFullError`` the source must not ack and should ``await ctx.ingest.wait_accepting()``
before retrying; ``OutboxClosedError`` means shutdown — do not ack.

Sink lifecycle::

    sink = factory(cfg, ctx)            # validate only
    sink.accepts(event_type) -> bool    # at ingest: queue a delivery row for this sink?
    await sink.start()                  # open long-lived clients
    outcomes = await sink.send(batch)   # batch: StoredEvent list; one Outcome per event
    sink.stop_new_requests()            # optional: shutdown began; finish, start nothing new
    await sink.close()

``send`` receives events sorted by outbox sequence. It may group them into requests as its
routes allow and returns one ``Outcome`` per event, never raising for a per-event failure.
Per-key order is the sink's duty inside one call: an event must not be sent once an earlier
event with the same ``ordering_key`` in the batch was not delivered (retry, sink fault,
unrouted, and a dead letter unless the sink's ``on_dead_letter`` is ``continue``) — return
``Outcome.not_attempted()`` for it (``edge.delivery.send_in_key_order`` does this).
An exception escaping ``send`` is a retryable failure of the whole batch. There is no
separate health probe: while its circuit is open the forwarder probes a sink with a
``send`` of one event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from edge.events import Event, EventClass

if TYPE_CHECKING:
    from edge.quality.state import Change
    from edge.telemetry import Metrics

__all__ = [
    "ComponentContext",
    "Ingest",
    "Outcome",
    "OutcomeKind",
    "Sink",
    "Source",
    "StoredEvent",
    "Submission",
]


@dataclass(slots=True)
class Submission:
    """One event for the outbox plus the source's dedupe key (None: never a duplicate).

    Two kinds of keys (DESIGN invariant 3: only redeliveries are matched):

    - an identity key (``redelivery_only=False``): a station-assigned message id, an OPC UA
      node@timestamp, a file row. Any later copy with the same key within
      ``outbox.dedupe_window_s`` returns the first copy's id and stores nothing.
    - a content hash (``redelivery_only=True``): matched only when this copy is flagged as a
      redelivery (``redelivered``, e.g. MQTT DUP), and only against the newest
      ``redelivery_horizon`` keys of the source (the messages that can be unacknowledged at
      a crash). A device that sends the same payload twice on purpose gets two events.

    ``derived=True`` marks an event a rule derived from the submission right before it in
    the same call (nonconformance, hold): it is stored right after its cause, and not at
    all when its cause turned out to be a redelivery of an event already stored.

    ``quality``: what storing this event changes in its lot's state and the CAPA counts
    (set by the quality rules, ``edge.quality``; sources leave it empty). The outbox
    applies it in the transaction that stores the event, and not at all when the event
    turns out to be a copy of one already stored.
    """

    event: Event
    dedupe_key: str | None = None
    redelivery_only: bool = False
    redelivered: bool = False
    redelivery_horizon: int = 0
    derived: bool = False
    quality: tuple[Change, ...] = ()


class Ingest(Protocol):
    """What a source sees of the pipeline (map → rules → outbox)."""

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        """Commit events durably; return their ids (an earlier id for a duplicate).

        Returns only after COMMIT. Raises OutboxFullError (backpressure), OutboxClosedError
        (shutdown) or another OutboxError (storage fault: do not ack, retry later); nothing
        of the call was stored in any of these cases.

        ``chain`` (e.g. the source id) keeps storage order equal to call order: calls of one
        chain commit in the order they were made, and when one fails, every call of the
        chain made before that failure was reported fails too (``OutboxOrderError``), so
        the source re-submits them in their original order.
        """
        ...

    async def quarantine(
        self, source: str, reason: str, raw: bytes, meta: dict[str, Any] | None = None,
        detail: str = "",
    ) -> None:
        """Commit an unusable inbound record with its reason code (``not_json``,
        ``too_large``, ``invalid_data`` …) and a human ``detail``; returns after COMMIT."""
        ...

    async def wait_accepting(self) -> None:
        """Return once the outbox accepts new events again (after backpressure)."""
        ...

    async def audit(
        self, state: str, *, source: str, reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record a component state change (gap, reconnect, backfill) in the audit trail."""
        ...


@dataclass
class ComponentContext:
    """Everything a component factory may use; injected so tests can pass fakes."""

    site: str
    state_dir: str
    metrics: Metrics
    ingest: Ingest | None = None
    set_connected: Callable[[bool], None] = field(default=lambda up: None)
    # Name a lasting condition of the component for /status, the page and `edge status`
    # (``severity`` "warning" or "critical"); ``message=None`` clears it. Call it on
    # changes only: it is cheap but each call may log.
    set_condition: Callable[[str, str | None, str], None] = field(
        default=lambda code, message, severity="warning": None)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
    id: str

    async def run(self) -> None: ...


class OutcomeKind(enum.Enum):
    delivered = "delivered"
    duplicate = "duplicate"  # receiver said "already exists" (409 ...): delivered, noted
    retry = "retry"  # the event may succeed later (5xx, 429, timeout): retry with backoff
    dead_letter = "dead_letter"  # the receiver judged the event (400, 422 ...): operator
    unrouted = "unrouted"  # no current route matches: keep the row, show it in /status
    # The sink, not the event, is at fault (3xx, 401/403 after a credential refresh, an
    # unlisted status): keep the row, retry with backoff without counting an attempt
    # against ``retry.max_attempts``, count a failure for the circuit breaker, alarm.
    sink_fault = "sink_fault"


@dataclass(slots=True)
class Outcome:
    kind: OutcomeKind
    status: int | None = None
    reason: str = ""
    body: str | None = None
    retry_after_s: float | None = None

    attempted: bool = True
    # Not attempted, and not to be offered again for this many seconds (scheduled
    # delivery): the forwarder records it as the row's next send time, counts no attempt,
    # and the row's key waits behind it like behind any unsent event.
    defer_s: float | None = None

    @classmethod
    def delivered(cls, status: int | None = None) -> Outcome:
        return cls(OutcomeKind.delivered, status)

    @classmethod
    def duplicate(cls, status: int | None = None, reason: str = "already exists") -> Outcome:
        return cls(OutcomeKind.duplicate, status, reason)

    @classmethod
    def retry(
        cls,
        reason: str,
        status: int | None = None,
        *,
        body: str | None = None,
        retry_after_s: float | None = None,
    ) -> Outcome:
        return cls(OutcomeKind.retry, status, reason, body, retry_after_s)

    @classmethod
    def dead_letter(cls, reason: str, status: int | None = None, body: str | None = None
                    ) -> Outcome:
        return cls(OutcomeKind.dead_letter, status, reason, body)

    @classmethod
    def sink_fault(cls, reason: str, status: int | None = None, body: str | None = None,
                   *, retry_after_s: float | None = None) -> Outcome:
        return cls(OutcomeKind.sink_fault, status, reason, body, retry_after_s)

    @classmethod
    def not_attempted(cls, reason: str = "an earlier event of its key was not delivered"
                      ) -> Outcome:
        """Skipped to keep per-key order: back to the queue, attempts unchanged."""
        return cls(OutcomeKind.retry, None, reason, attempted=False)

    @classmethod
    def deferred(cls, reason: str, defer_s: float) -> Outcome:
        """Held back on purpose (e.g. a route that sends once per period): back to the
        queue until ``defer_s`` seconds from now, attempts unchanged, no alarm, no audit."""
        return cls(OutcomeKind.retry, None, reason, attempted=False,
                   defer_s=max(0.0, defer_s))

    @classmethod
    def unrouted(cls, reason: str) -> Outcome:
        return cls(OutcomeKind.unrouted, None, reason, attempted=False)


@dataclass(slots=True)
class StoredEvent:
    """An event as the forwarder hands it to a sink: the stored JSON plus its row data.

    ``body`` is the canonical envelope exactly as stored (send it as is; a batch is
    ``b"[" + b",".join(bodies) + b"]"``); ``doc`` parses it once on first use.
    """

    seq: int
    id: str
    type: str
    event_class: EventClass
    ordering_key: str | None
    attempts: int
    body: bytes
    sha256: str = ""  # SHA-256 of ``body`` taken at ingest (checked before every send)
    received_at: float = 0.0  # epoch seconds when stored
    _doc: dict[str, Any] | None = None

    @property
    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = orjson.loads(self.body)
        return self._doc

    @property
    def correlation_id(self) -> str:
        return str(self.doc.get("correlation_id") or self.id)

    @property
    def data(self) -> dict[str, Any]:
        data = self.doc.get("data")
        return data if isinstance(data, dict) else {}


@runtime_checkable
class Sink(Protocol):
    id: str

    def accepts(self, event_type: str) -> bool: ...

    async def start(self) -> None: ...

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]: ...

    async def close(self) -> None: ...
