"""The relay's delivery queue: JetStream partitions behind the forwarder's ``DeliveryQueue``.

The relay runs the gateway's own ``Forwarder`` (lanes, rate limit, breaker, storm guard,
retries with backoff and ``Retry-After``) on this queue instead of the SQLite outbox, so a
relay applies the same sinks, response policy, per-key order and dead-letter rules.

Contract:
- One ``Feed`` per (sink, owned partition): a durable pull consumer, a pump task that
  fetches while fewer than ``max_pending`` events are held, and the held rows in stream
  order. An event is acknowledged to JetStream only when its outcome is final: delivered
  (or duplicate), or stored in the dead-letter stream. Retries keep the row (and its
  key's later rows) here; nothing is acknowledged early.
- ``lease`` gives a sink due rows of its active feeds, per key in stream order: never a row
  while an earlier row of its key is leased, waiting or parked (all events of one key are
  in one partition, so this is the key's whole order). A feed whose partition lease has
  lapsed (``holds`` false) gives nothing: a paused or cut-off relay stops sending before a
  new owner starts.
- Parked keys (``on_dead_letter: park``): a later row of a parked key goes to the
  dead-letter stream (``Edge-Kind: parked``) and is acknowledged; a key an operator set to
  ``replay`` gets its dead-letter entries injected before its live rows and sent in order;
  once all were delivered the entry is removed (``edge.relay.deadletters``).
- A redelivered message (same stream sequence) replaces the held one; a message whose
  sequence was delivered already is acknowledged again, not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from edge.components import OutcomeKind, StoredEvent
from edge.events import EventClass
from edge.nats.subjects import partition_of
from edge.outbox.queries import Resolution
from edge.relay.deadletters import DeadLetterEntry, DeadLetters, ParkState
from edge.retry import steady_time
from edge.telemetry import event_ids, log_event
from edge.timefmt import parse_iso

__all__ = ["Feed", "RelayQueue", "Row"]

log = logging.getLogger(__name__)

INJECTED_BASE = -(2**62)  # replayed dead letters sort before every stream sequence
DONE_MEMORY = 100_000  # delivered sequences remembered to ack a redelivery without sending
_FINAL = frozenset({OutcomeKind.delivered, OutcomeKind.duplicate})


@dataclass(slots=True)
class Row:
    event: StoredEvent
    msg: Any  # the JetStream message (None for an injected dead letter)
    subject: str
    state: str = "queued"  # queued | leased | waiting
    next_at: float = 0.0
    dlq_seq: int | None = None  # an injected dead letter: its sequence in the DLQ stream
    recheck: bool = False  # handled by the previous owner maybe: is it dead-lettered?


@dataclass(eq=False)
class Feed:
    sink: str
    partition: int
    sub: Any
    rows: OrderedDict[int, Row] = field(default_factory=OrderedDict)
    active: bool = True
    misrouted: int = 0  # events whose key hashes to another partition (config mismatch)
    # the previous owner's consumer had delivered up to here: such an event may have been
    # dead-lettered (and acknowledged above the ack floor) before the takeover
    recheck_until: int = 0
    pump: asyncio.Task[None] | None = None
    room: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Replay:
    park: ParkState
    partition: int
    waiting: set[int]  # injected row seqs not yet delivered


def stored_event(seq: int, body: bytes, attempts: int = 0, headers: dict[str, str] | None = None
                 ) -> StoredEvent:
    """A consumed envelope as the sinks expect it; ValueError when it is not one."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict) or not doc.get("id") or not doc.get("type"):
        raise ValueError("not an event envelope (no id or type)")
    sha = (headers or {}).get("Edge-Body-Sha256", "")
    return StoredEvent(
        seq=seq, id=str(doc["id"]), type=str(doc["type"]),
        event_class=EventClass.parse(doc.get("class", "normal")),
        ordering_key=doc.get("ordering_key"), attempts=attempts, body=body, sha256=sha,
        received_at=parse_iso(doc.get("received_ts")) or 0.0, _doc=doc)


def _replay_key(ev: StoredEvent) -> str:
    """What a replay is named by: the ordering key, or the event id of a keyless event
    (its dead-letter subject is hashed from the same)."""
    return ev.ordering_key if ev.ordering_key is not None else ev.id


class RelayQueue:
    def __init__(self, dead: DeadLetters, *, fetch_batch: int, max_pending: int,
                 partitions: int | None = None,
                 holds: Callable[[int], bool] = lambda p: True,
                 clock: Callable[[], float] = steady_time) -> None:
        self.dead = dead
        self.fetch_batch = fetch_batch
        self.partitions = partitions
        self.max_pending = max_pending
        self.holds = holds
        self.clock = clock
        self.stored_pauses: dict[str, dict[str, Any]] = {}  # relay pauses end with the process
        self.feeds: dict[str, dict[int, Feed]] = {}
        self._new: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._park: dict[str, bool] = {}
        self._parked: dict[str, set[str]] = {}  # per sink: keys known parked (checked on use)
        self._replays: dict[tuple[str, str], Replay] = {}
        self._operating: set[tuple[str, str]] = set()
        self._done: dict[str, tuple[set[int], deque[int]]] = {}
        self._where: dict[str, dict[int, Feed]] = {}  # per sink: seq → the feed holding it
        self._injected = 0
        self.fetched = 0
        self.acked = 0

    # ------------------------------------------------------------------ feeds

    def attach(self, sink: str, partition: int, sub: Any, *, recheck_until: int = 0) -> Feed:
        """Start feeding ``sink`` from ``partition`` (its consumer just (re)created);
        events up to ``recheck_until`` are looked up in the dead-letter store before
        they are sent (the previous owner may have stored them there)."""
        feed = Feed(sink, partition, sub, recheck_until=recheck_until)
        self.feeds.setdefault(sink, {})[partition] = feed
        feed.pump = asyncio.create_task(self._pump(feed), name=f"relay-{sink}-p{partition}")
        return feed

    async def detach(self, sink: str, partition: int, *, drain_s: float = 0.0) -> None:
        """Stop feeding ``partition``: no new leases; wait up to ``drain_s`` for leased rows
        to be recorded; forget the rest without acknowledging (the next owner sends them)."""
        feed = self.feeds.get(sink, {}).get(partition)
        if feed is None:
            return
        feed.active = False
        deadline = self.clock() + drain_s
        # outcomes of leased rows arrive from the forwarder's lanes
        while any(r.state == "leased" for r in feed.rows.values()):  # noqa: ASYNC110
            if self.clock() >= deadline:
                break
            await asyncio.sleep(0.05)
        self.feeds[sink].pop(partition, None)
        where = self._where.get(sink, {})
        for seq in feed.rows:
            where.pop(seq, None)
        feed.rows.clear()
        for (s, key), replay in list(self._replays.items()):
            if s == sink and replay.partition == partition:
                self._replays.pop((s, key), None)  # the next owner replays it
        if feed.pump is not None:
            feed.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed.pump
        with contextlib.suppress(Exception):
            await feed.sub.unsubscribe()

    async def _pump(self, feed: Feed) -> None:
        import nats.errors

        while feed.active:
            if not self.holds(feed.partition):  # a lapsed lease: fetch nothing more
                await asyncio.sleep(0.2)
                continue
            room = self.max_pending - len(feed.rows)
            if room <= 0:
                feed.room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await feed.room.wait()
                continue
            try:
                msgs = await feed.sub.fetch(min(self.fetch_batch, room), timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a lost connection: nats-py reconnects
                log_event(log, logging.WARNING, "fetch failed; retrying", sink=feed.sink,
                          partition=feed.partition, error=repr(err))
                await asyncio.sleep(1.0)
                continue
            if not feed.active:
                return
            await self._add(feed, msgs)

    async def _add(self, feed: Feed, msgs: list[Any]) -> None:
        done, _ = self._done_set(feed.sink)
        where = self._where.setdefault(feed.sink, {})
        for msg in msgs:
            seq = int(msg.metadata.sequence.stream)
            self.fetched += 1
            if seq in done:  # delivered before; its ack was lost
                with contextlib.suppress(Exception):
                    await msg.ack()
                continue
            held = feed.rows.get(seq)
            if held is not None:  # redelivered while held: keep the newer handle
                held.msg = msg
                continue
            headers = {k: str(v) for k, v in (msg.headers or {}).items()}
            try:
                ev = stored_event(seq, msg.data, headers=headers)
            except ValueError as err:
                await self._unreadable(feed, msg, seq, str(err))
                continue
            if self.partitions is not None:
                self._check_partition(feed, ev)
            feed.rows[seq] = Row(ev, msg, msg.subject, recheck=seq <= feed.recheck_until)
            where[seq] = feed
        self.new_rows(feed.sink).set()

    def _check_partition(self, feed: Feed, ev: StoredEvent) -> None:
        """An event whose key hashes to another partition was published with another
        ``partitions`` or ``subject`` than this relay's: it is delivered, but its key's
        order is only kept within one partition. Logged (first and every 1000th)."""
        assert self.partitions is not None
        if partition_of(ev.ordering_key, ev.id, self.partitions) == feed.partition:
            return
        feed.misrouted += 1
        if feed.misrouted % 1000 == 1:
            log_event(log, logging.ERROR, "event in the wrong partition: the gateways' nats "
                      "sink `partitions`/`subject` differ from this relay's; per-key order "
                      "is not guaranteed until they agree", sink=feed.sink,
                      partition=feed.partition, **event_ids(ev),
                      ordering_key=ev.ordering_key, relay_partitions=self.partitions,
                      misrouted=feed.misrouted)

    async def _unreadable(self, feed: Feed, msg: Any, seq: int, why: str) -> None:
        """A message that is no event envelope is dead-lettered as it is, never sent."""
        try:
            await self.dead.put(feed.sink, event_id=f"seq-{seq}", key=None, body=msg.data,
                                source_subject=msg.subject, source_seq=seq,
                                kind="dead_letter", reason=f"unreadable: {why}")
            await msg.ack()
        except Exception as err:  # noqa: BLE001 - not acked: it comes again
            log_event(log, logging.ERROR, "could not dead-letter an unreadable message",
                      sink=feed.sink, seq=seq, error=repr(err))

    def _done_set(self, sink: str) -> tuple[set[int], deque[int]]:
        if sink not in self._done:
            self._done[sink] = (set(), deque())
        return self._done[sink]

    def _remember_done(self, sink: str, seq: int) -> None:
        done, order = self._done_set(sink)
        done.add(seq)
        order.append(seq)
        if len(order) > DONE_MEMORY:
            done.discard(order.popleft())

    def held(self, sink: str) -> int:
        return sum(len(f.rows) for f in self.feeds.get(sink, {}).values())

    # ------------------------------------------------------------------ DeliveryQueue

    def new_rows(self, sink: str) -> asyncio.Event:
        return self._new.setdefault(sink, asyncio.Event())

    def note_parked(self, sink: str, keys: Sequence[str]) -> None:
        """Keys the parked bucket lists for ``sink`` (read when a partition is taken)."""
        self._parked.setdefault(sink, set()).update(keys)

    async def lease(self, sink: str, limit: int, *, live_limit: int = 0, park: bool = True
                    ) -> list[StoredEvent]:
        self._park[sink] = park
        lock = self._locks.setdefault(sink, asyncio.Lock())
        async with lock:
            return await self._lease(sink, limit, park)

    async def _lease(self, sink: str, limit: int, park: bool) -> list[StoredEvent]:
        out: list[StoredEvent] = []
        now = self.clock()
        parked = self._parked.setdefault(sink, set())
        for feed in list(self.feeds.get(sink, {}).values()):
            if not feed.active or not self.holds(feed.partition):
                continue
            blocked: set[str] = set()
            for row in list(feed.rows.values()):
                ev = row.event
                key = ev.ordering_key
                if key is not None and key in blocked:
                    continue
                if row.state == "leased" or (row.state == "waiting" and row.next_at > now):
                    if key is not None:
                        blocked.add(key)
                    continue
                if (key is not None and park and row.dlq_seq is None and key in parked
                        and (sink, key) not in self._replays):
                    moved = await self._parked_row(feed, row, key)
                    if not moved:
                        blocked.add(key)
                    continue
                if row.recheck and row.dlq_seq is None:
                    row.recheck = False
                    if await self._stored_copy(feed, row):
                        continue
                if ev.seq not in feed.rows:  # recorded while we awaited
                    continue
                if row.dlq_seq is not None and (sink, _replay_key(ev)) not in self._replays:
                    self._drop(feed, ev.seq, delivered=False)  # its replay was aborted
                    continue
                row.state = "leased"
                out.append(ev)
                if len(out) >= limit:
                    return out
        return out

    async def _parked_row(self, feed: Feed, row: Row, key: str) -> bool:
        """A row of a key in the parked set: park it behind the dead letter, start the
        operator's replay or discard, or find the key unparked. True when the row left."""
        sink = feed.sink
        state = await self.dead.state(sink, key)
        if state is None:
            self._parked[sink].discard(key)
            return False
        if state.state in ("replay", "discard"):
            await self.operate(feed, state)
            return False
        try:
            if await self._stored_already(sink, key, row.event.id):
                await row.msg.ack()  # a takeover brought it back: it is in the store
                self._drop(feed, row.event.seq, delivered=True)
                return True
            await self.dead.put(sink, event_id=row.event.id, key=key, body=row.event.body,
                                source_subject=row.subject, source_seq=row.event.seq,
                                kind="parked", reason=f"parked: key {key} has a dead letter "
                                f"({state.doc.get('event_id')}: {state.doc.get('reason', '')})",
                                behind=str(state.doc.get("event_id", "")))
            followers = int(state.doc.get("followers", 0)) + 1
            if not await self.dead.set_state(state, "parked", followers=followers):
                log_event(log, logging.INFO, "parked entry changed while parking a follower",
                          sink=sink, key=key)
            await row.msg.ack()
        except Exception as err:  # noqa: BLE001 - stays held; tried again next lease
            log_event(log, logging.ERROR, "could not park an event", sink=sink,
                      **event_ids(row.event), error=repr(err))
            return False
        self._drop(feed, row.event.seq, delivered=True)
        log_event(log, logging.INFO, "event parked behind its key's dead letter", sink=sink,
                  **event_ids(row.event), ordering_key=key)
        return True

    async def _stored_copy(self, feed: Feed, row: Row) -> bool:
        """A redelivered event the previous owner stored as a dead letter: acknowledged
        and dropped (its copy in the store is what an operator replays). True if so."""
        try:
            stored = await self._stored_already(feed.sink, row.event.ordering_key,
                                                row.event.id)
        except Exception as err:  # noqa: BLE001 - unknown: checked again next lease
            row.recheck = True
            log_event(log, logging.WARNING, "could not read the dead-letter store",
                      sink=feed.sink, error=repr(err))
            return True
        if not stored:
            return False
        with contextlib.suppress(Exception):
            await row.msg.ack()
        self._drop(feed, row.event.seq, delivered=True)
        return True

    async def _stored_already(self, sink: str, key: str | None, event_id: str) -> bool:
        """The event is in the dead-letter store (a takeover redelivers from the ack floor,
        so an event stored and acknowledged above it comes again): store it once."""
        entries = await self.dead.entries(sink, key if key is not None else event_id)
        return any(e.headers.get("Edge-Event-Id") == event_id for e in entries)

    async def operate(self, feed: Feed, park: ParkState) -> None:
        """Carry out an operator's ``replay`` or ``discard`` of a parked key whose partition
        this relay owns."""
        sink, key = feed.sink, park.key
        if (sink, key) in self._replays or (sink, key) in self._operating:
            return  # under way (the scan and a lease may both get here)
        self._operating.add((sink, key))
        try:
            await self._operate(feed, park)
        finally:
            self._operating.discard((sink, key))

    async def _operate(self, feed: Feed, park: ParkState) -> None:
        sink, key = feed.sink, park.key
        entries = await self.dead.entries(sink, key)
        if park.state == "discard":
            for entry in entries:
                await self.dead.remove(entry.seq)
                log_event(log, logging.WARNING, "dead letter discarded by an operator",
                          sink=sink, **_entry_ids(entry),
                          ordering_key=key, by=park.doc.get("by"),
                          reason=park.doc.get("why"))
            if await self.dead.unpark(park):
                self._parked.get(sink, set()).discard(key)
            return
        rows = [r for r in map(self._injected_row, entries) if r is not None]
        if not rows:
            if await self.dead.unpark(park):
                self._parked.get(sink, set()).discard(key)
            return
        # a takeover may have brought back copies of events that are in the store: the
        # replay sends them; the copies are acknowledged and dropped
        replayed = {r.event.id for r in rows}
        for live in list(feed.rows.values()):
            if (live.dlq_seq is None and live.event.id in replayed
                    and live.state != "leased"):
                with contextlib.suppress(Exception):
                    await live.msg.ack()
                self._drop(feed, live.event.seq, delivered=True)
        self._replays[(sink, key)] = Replay(park, feed.partition, {r.event.seq for r in rows})
        merged: OrderedDict[int, Row] = OrderedDict((r.event.seq, r) for r in rows)
        merged.update(feed.rows)
        feed.rows = merged
        where = self._where.setdefault(sink, {})
        for r in rows:
            where[r.event.seq] = feed
        log_event(log, logging.INFO, "replaying a parked key's dead letters", sink=sink,
                  ordering_key=key, events=len(rows), by=park.doc.get("by"))
        self.new_rows(sink).set()

    def _injected_row(self, entry: DeadLetterEntry) -> Row | None:
        seq = INJECTED_BASE + entry.seq
        try:
            ev = stored_event(seq, entry.body)
        except ValueError:
            return None  # an unreadable message stays in the dead-letter stream
        return Row(ev, None, entry.headers.get("Edge-Source-Subject", entry.subject),
                   dlq_seq=entry.seq)

    def release(self, sink: str, seqs: Sequence[int]) -> None:
        where = self._where.get(sink, {})
        for seq in seqs:
            feed = where.get(seq)
            row = feed.rows.get(seq) if feed is not None else None
            if row is not None and row.state == "leased":
                row.state = "queued"

    async def complete(self, sink: str, resolutions: Sequence[Resolution], *,
                       retry_after: tuple[float, float] | None = None) -> None:
        where = self._where.get(sink, {})
        park = self._park.get(sink, True)
        for r in resolutions:
            feed = where.get(r.seq)
            row = feed.rows.get(r.seq) if feed is not None else None
            if feed is None or row is None:
                continue  # the partition was given up meanwhile: its next owner sends it
            if r.kind in _FINAL:
                await self._final(feed, row)
            elif r.kind is OutcomeKind.dead_letter:
                await self._dead_letter(feed, row, r, park)
            else:  # retry, sink_fault, unrouted: stays, due at next_at
                if r.attempted:
                    row.event.attempts += 1
                row.state = "waiting" if r.next_at else "queued"
                row.next_at = r.next_at
                if (row.dlq_seq is not None
                        and (sink, _replay_key(row.event)) not in self._replays):
                    self._drop(feed, r.seq, delivered=False)  # its replay was aborted
        self.new_rows(sink).set()

    async def _final(self, feed: Feed, row: Row) -> None:
        sink = feed.sink
        try:
            if row.dlq_seq is not None:
                await self.dead.remove(row.dlq_seq)
            else:
                await row.msg.ack()
                self.acked += 1
        except Exception as err:  # noqa: BLE001 - delivered: a redelivery is a duplicate
            log_event(log, logging.WARNING, "could not acknowledge a delivered event",
                      sink=sink, **event_ids(row.event), error=repr(err))
        self._drop(feed, row.event.seq, delivered=row.dlq_seq is None)
        if row.dlq_seq is not None:
            await self._replayed(feed, row)

    async def _replayed(self, feed: Feed, row: Row) -> None:
        key = _replay_key(row.event)
        replay = self._replays.get((feed.sink, key))
        if replay is None:
            return
        replay.waiting.discard(row.event.seq)
        if replay.waiting:
            return
        self._replays.pop((feed.sink, key), None)
        if await self.dead.unpark(replay.park):
            self._parked.get(feed.sink, set()).discard(key)
            log_event(log, logging.INFO, "parked key replayed; it flows again",
                      sink=feed.sink, ordering_key=key)

    async def _dead_letter(self, feed: Feed, row: Row, r: Resolution, park: bool) -> None:
        sink, ev = feed.sink, row.event
        key = ev.ordering_key
        try:
            if row.dlq_seq is None and not await self._stored_already(sink, key, ev.id):
                await self.dead.put(sink, event_id=ev.id, key=key, body=ev.body,
                                    source_subject=row.subject, source_seq=ev.seq,
                                    kind="dead_letter", reason=r.reason, status=r.status,
                                    answer=r.body)
            if key is not None and park:
                await self.dead.park(sink, key, event_id=ev.id, reason=r.reason)
                self._parked.setdefault(sink, set()).add(key)
            if row.dlq_seq is None:
                await row.msg.ack()
                self.acked += 1
        except Exception as err:  # noqa: BLE001 - kept and retried: nothing is lost
            log_event(log, logging.ERROR, "could not store a dead letter; retrying",
                      sink=sink, **event_ids(ev), error=repr(err))
            row.state, row.next_at = "waiting", self.clock() + 5.0
            return
        log_event(log, logging.WARNING, "event dead-lettered", sink=sink, **event_ids(ev),
                  ordering_key=key, status=r.status, reason=r.reason[:200])
        self._drop(feed, ev.seq, delivered=row.dlq_seq is None)
        if row.dlq_seq is not None:
            await self._abort_replay(feed, _replay_key(ev), r.reason)

    async def _abort_replay(self, feed: Feed, key: str, reason: str) -> None:
        """A replayed dead letter failed again: the key is parked again (with
        ``on_dead_letter: continue`` its entry is removed); the rest of its injected rows
        stay in the dead-letter stream."""
        replay = self._replays.pop((feed.sink, key), None)
        if replay is None:
            return
        for seq in list(replay.waiting):
            row = feed.rows.get(seq)
            if row is not None and row.state != "leased":
                self._drop(feed, seq, delivered=False)
        if self._park.get(feed.sink, True):
            await self.dead.set_state(replay.park, "parked", reason=reason[:500])
        else:  # on_dead_letter: continue: the dead letters stay stored, the key goes on
            await self.dead.unpark(replay.park)

    def _drop(self, feed: Feed, seq: int, *, delivered: bool) -> None:
        feed.rows.pop(seq, None)
        self._where.get(feed.sink, {}).pop(seq, None)
        if delivered and seq > 0:
            self._remember_done(feed.sink, seq)
        feed.room.set()

    async def sink_paused(self, sink: str, *, reason: str, detail: dict[str, Any],
                          keep: dict[str, Any] | None = None) -> None:
        """A relay's pause is logged (there is no local audit trail) and ends with the
        process: after a restart the relay probes the receiver again."""
        log_event(log, logging.ERROR, "sink paused", sink=sink, reason=reason, **detail)


def _entry_ids(entry: DeadLetterEntry) -> dict[str, Any]:
    """``event_id`` and ``correlation_id`` of a dead-letter message, for its log lines."""
    event_id = entry.headers.get("Edge-Event-Id")
    try:
        doc = orjson.loads(entry.body)
        correlation_id = ((doc.get("correlation_id") or doc.get("id"))
                          if isinstance(doc, dict) else None)
    except orjson.JSONDecodeError:  # an unreadable message, dead-lettered as it came
        correlation_id = None
    return {"event_id": event_id, "correlation_id": correlation_id}
