"""What every sink needs to keep DESIGN invariant 4 (per-key order) and route events.

- ``send_in_key_order``  send requests concurrently, keys in parallel, one key in order,
  as many at once as the sink's ``AdaptiveConcurrency`` allows (``edge.concurrency``)
- ``blocks_key``         whether an outcome holds the later events of its key
- ``event_matches``      the event-type patterns of routes: ``*``, an exact type, ``a.*``
- ``DeliveryMode``       a route's ``delivery``: ``realtime`` or ``{scheduled: {every_s: N}}``;
  ``held_back(mode, event, now)`` is the ``Outcome.deferred`` of an event whose period has
  not ended (the forwarder keeps it queued until then, no attempt counted)

Public through ``edge.plugin``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from edge.components import Outcome, OutcomeKind, StoredEvent
from edge.concurrency import AdaptiveConcurrency, pushes_back
from edge.config import StrictModel
from edge.timefmt import iso_z

__all__ = [
    "DeliveryMode",
    "SchedulePeriod",
    "ScheduledDelivery",
    "SendRequest",
    "blocks_key",
    "event_matches",
    "held_back",
    "send_in_key_order",
]


class SchedulePeriod(StrictModel):
    every_s: float = Field(
        ge=1, le=86_400,
        description="the period: events wait and are sent together at every multiple of "
                    "it since the Unix epoch (UTC), e.g. 900 = :00, :15, :30, :45")


class ScheduledDelivery(StrictModel):
    scheduled: SchedulePeriod

    def due_at(self, received_at: float) -> float:
        """The end of the period ``received_at`` falls in: when the event is sent."""
        every = self.scheduled.every_s
        return (received_at // every + 1) * every


def _parse_mode(v: Any) -> Any:
    if v is None or v == "realtime":
        return "realtime"
    if v == "scheduled":
        raise ValueError("a scheduled route needs its period: "
                         "delivery: {scheduled: {every_s: 900}}")
    if isinstance(v, dict):
        if set(v) != {"scheduled"}:
            raise ValueError(f"must be realtime or {{scheduled: {{every_s: N}}}}, got keys "
                             f"{', '.join(map(str, v))}")
        return ScheduledDelivery.model_validate({"scheduled": v["scheduled"]})
    raise ValueError(f"must be realtime or {{scheduled: {{every_s: N}}}}, got {v!r}")


DeliveryMode = Annotated[Literal["realtime"] | ScheduledDelivery, BeforeValidator(_parse_mode),
                         Field(description="realtime, or {scheduled: {every_s: N}}")]


def held_back(mode: Literal["realtime"] | ScheduledDelivery, ev: StoredEvent, now: float
              ) -> Outcome | None:
    """``Outcome.deferred`` until the end of the period ``ev`` was stored in, when ``mode``
    is scheduled and that period has not ended; None when the event is due. An event
    without a storage time (never stored) is due."""
    if not isinstance(mode, ScheduledDelivery) or not ev.received_at:
        return None
    due = mode.due_at(ev.received_at)
    if due <= now:
        return None
    when = iso_z(datetime.fromtimestamp(due, UTC))  # 2026-11-30T08:15:00Z
    return Outcome.deferred(f"scheduled delivery: sent with the batch at {when}", due - now)


def event_matches(patterns: Iterable[str], event_type: str) -> bool:
    """True when ``event_type`` matches one of ``patterns``: ``*`` (every type), the exact
    type, or a prefix pattern ``inspection.*`` (``inspection.result``, not ``inspection``)."""
    for pattern in patterns:
        if pattern == "*" or pattern == event_type:
            return True
        if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
            return True
    return False


SendRequest = Callable[[list[StoredEvent]], Awaitable[list[Outcome]]]

FAILING_AFTER = 8
"""Requests of one ``send_in_key_order`` call the receiver pushed back on (``pushes_back``)
before any delivery, after which the call starts no more requests: a receiver that is down
or hung is not sent the rest of a lease one request at a time."""


async def send_in_key_order(
    requests: Sequence[list[StoredEvent]],
    send_request: SendRequest,
    concurrency: int | AdaptiveConcurrency,
    stopping: Callable[[], bool] = lambda: False,
    *,
    dead_letter_blocks: bool = True,
) -> dict[int, Outcome]:
    """Send requests (each one event or a batch) concurrently while keeping per-key order.

    ``requests`` come in outbox order (by their first event). A request waits for every
    earlier request that shares an ordering key with it. Once an event of a key was not
    delivered (``blocks_key``: retry, sink fault, unrouted, and a dead letter unless
    ``dead_letter_blocks`` is False, the sink's ``on_dead_letter: continue``), later events
    of that key are not sent (``Outcome.not_attempted``) and are removed from the requests
    they were in. Once ``stopping()`` is true (shutdown) no new request starts: its events
    are not attempted. Once the receiver answered with a ``Retry-After`` (429, 503 …) no
    new request starts either: it asked this client to wait, and the forwarder pauses the
    sink that long; requests already on the wire finish. Once ``FAILING_AFTER`` requests
    were pushed back on (``pushes_back``: retries, Retry-After) before any delivery, no new
    request starts either: the receiver is failing, the forwarder's backoff and circuit
    breaker take over. A request whose ``send_request`` raises (or gives a wrong number
    of outcomes) is a ``retry`` of its events; the other requests go on. Returns the
    outcome of every event by ``seq``.

    ``concurrency`` is the sink's limiter (``AdaptiveConcurrency``, shared by every call
    of the sink: each request holds one of its slots and reports its round trip and
    outcomes to it), or a number: a fixed limit for this call alone. A request does not
    start either while the limiter refuses (``refusal()``: a Retry-After another call was
    given, or the sink's circuit is open); its events are not attempted.
    """
    outcomes: dict[int, Outcome] = {}
    blocked: set[str] = set()
    pushed_back = 0  # requests the receiver pushed back on
    delivered_any = False
    asked_to_wait: list[float] = []  # Retry-After seconds the receiver gave in this call
    last_for_key: dict[str, asyncio.Event] = {}
    limiter = (concurrency if isinstance(concurrency, AdaptiveConcurrency)
               else AdaptiveConcurrency(concurrency, adaptive=False))

    async def run(events: list[StoredEvent], after: list[asyncio.Event],
                  done: asyncio.Event) -> None:
        nonlocal pushed_back, delivered_any
        try:
            for dep in after:
                await dep.wait()
            todo = []
            for ev in events:
                if ev.ordering_key is not None and ev.ordering_key in blocked:
                    outcomes[ev.seq] = Outcome.not_attempted()
                else:
                    todo.append(ev)
            if todo:
                async with limiter.slot() as slot:
                    if stopping():
                        results = [Outcome.not_attempted("gateway stopping")] * len(todo)
                    elif asked_to_wait:
                        results = [Outcome.not_attempted(
                            "the receiver asked to wait (Retry-After)")] * len(todo)
                    elif (refused := limiter.refusal()) is not None:
                        results = [Outcome.not_attempted(refused)] * len(todo)
                    elif pushed_back >= FAILING_AFTER and not delivered_any:
                        results = [Outcome.not_attempted(
                            "the receiver is failing (no delivery, only retries)")] * len(todo)
                    else:
                        results = await _one_request(send_request, todo)
                        if any(o.kind in (OutcomeKind.delivered, OutcomeKind.duplicate)
                               for o in results):
                            delivered_any = True  # the receiver works: send the rest
                        elif pushes_back(results):
                            pushed_back += 1
                    slot.outcomes = results
                for ev, outcome in zip(todo, results, strict=True):
                    outcomes[ev.seq] = outcome
                    if outcome.retry_after_s and outcome.kind is not OutcomeKind.delivered:
                        asked_to_wait.append(outcome.retry_after_s)
                    if ev.ordering_key is not None and blocks_key(outcome, dead_letter_blocks):
                        blocked.add(ev.ordering_key)
        finally:
            done.set()

    async with asyncio.TaskGroup() as tg:
        for events in requests:
            done = asyncio.Event()
            keys = {ev.ordering_key for ev in events if ev.ordering_key is not None}
            after = [last_for_key[k] for k in keys if k in last_for_key]
            for k in keys:
                last_for_key[k] = done
            tg.create_task(run(events, after, done))
    for events in requests:  # a request task cancelled on its own, not with this call
        for ev in events:
            outcomes.setdefault(ev.seq, Outcome.retry("the request ended without an answer"))
    return outcomes


async def _one_request(send_request: SendRequest, events: list[StoredEvent]) -> list[Outcome]:
    """``send_request(events)``; an exception, or a wrong number of outcomes, is a retry
    of these events only: the other requests of the call, some already on the wire, go on."""
    try:
        results = await send_request(events)
    except Exception as err:  # noqa: BLE001 - a failing request must not cancel the others
        return [Outcome.retry(f"request failed: {err!r}")] * len(events)
    if len(results) != len(events):
        return [Outcome.retry(f"request gave {len(results)} outcomes for "
                              f"{len(events)} events")] * len(events)
    return results


def blocks_key(outcome: Outcome, dead_letter_blocks: bool = True) -> bool:
    """True when later events of the same ordering key must wait after ``outcome``
    (DESIGN invariant 4: only a delivered event lets its key move on)."""
    if outcome.kind in (OutcomeKind.delivered, OutcomeKind.duplicate):
        return False
    if outcome.kind is OutcomeKind.dead_letter:
        return dead_letter_blocks
    return True
