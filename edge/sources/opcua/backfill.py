"""Gap recovery for the ``opcua`` source: HistoryRead pages, persisted watermarks, order.

``history_pages`` reads the raw history of one node strictly between two timestamps, page
by page, so a long gap never sits in memory at once. It follows continuation points and,
for servers that truncate a page without one (asyncua does when NumValuesPerNode cuts the
result), continues from the last timestamp it got. It stops after ``max_values`` (one
round; the caller continues in another round); an unfinished continuation point is
released.

``Backfill`` is the part of ``OpcUaSource`` that does this (its contract in its
docstring). A gap opens per historizing node at
the newest sample taken before it, on:

- a ``Gap`` marker in the notification queue: subscription re-created, or a restore of the
  subscriptions after a reconnect (``watch_restore`` wraps ``Subscription.restore`` so
  the markers ``restore`` / ``restored`` bracket it in the queue);
- a sample flagged Overflow by the server (its item queue dropped values before it);
- a local drop (the notification queue was full): every historizing node, at the next
  batch the drain takes (everything taken before the drop is older than what was dropped);
- a (re)start of the source: from the per-node watermark, see below.

The first sample of the node after the gap closes it; one task reads each closed gap back
(HistoryRead) in rounds of at most ``backfill.max_values`` values (a longer gap continues
in further rounds, audited ``backfill_round``), hands the values as ``backfilled`` events
to the same ordered commit path as the live samples and audits the result
(``backfilled``, ``backfill_truncated`` for the part older than ``max_gap_s``,
``backfill_failed``).

Order per node (``backfill.order``): ``strict`` (default) holds the live samples of a node
newer than its open gap in memory until the gap's backfilled values are committed, so a
receiver gets every node's values in source-time order; the hold is bounded (``queue_max``
samples per node; beyond that the node's order is relaxed for that gap, audited
``backfill_order_relaxed``). ``live_first`` commits live samples at once and the
backfilled values after them (they carry their ``source_ts``). Values replayed by
Republish after a reconnect are committed before the live values that arrived during the
restore (``strict`` or not: the replay is short and bounded).

``Watermarks`` keeps, per monitored node, the source timestamp up to which the node's
samples are committed without a hole (never past an open gap), plus the open gaps
themselves (start, and whether a backfill was running), in
``<state_dir>/opcua/<source id>.watermarks.json``. After a kill -9, a gateway restart or a
supervisor restart of the source, the source backfills from there, so no historized
sample is lost; an interrupted backfill is audited ``backfill_resumed``. A file written
for another endpoint is migrated (the node references are what count) and audited
``watermarks_migrated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from asyncua import Client, ua

from edge.plugin import ComponentContext, InputError, Submission, log_event
from edge.sources.opcua.queue import Gap, NotificationQueue
from edge.sources.opcua.values import source_ts
from edge.timefmt import iso_z

if TYPE_CHECKING:
    from asyncua.common.subscription import Subscription

    from edge.sources.opcua.config import OpcUaSourceConfig
    from edge.sources.opcua.nodes import Resolved

__all__ = ["JOB_DONE", "Backfill", "Watermarks", "history_pages"]

log = logging.getLogger("edge.sources.opcua")

# A mark without a Submission in the ordered commit path: "the backfill job of this node
# is committed up to here" (never a real source timestamp).
JOB_DONE = datetime(1, 1, 1, tzinfo=UTC)

Mapped = tuple[list[Submission], list[tuple[int, datetime]]]


async def history_pages(
    client: Client,
    node_id: ua.NodeId,
    start: datetime,
    end: datetime,
    *,
    page_values: int,
    max_values: int,
    timeout_s: float,
    more: list[bool] | None = None,
) -> AsyncIterator[list[ua.DataValue]]:
    """Yield lists of DataValues with start < SourceTimestamp < end, oldest first.

    Stops after ``max_values`` values; ``more`` (if given) then gets ``True`` appended
    when the range may hold further values (read on from the newest one yielded).
    Raises ``ua.UaStatusCodeError`` when the server refuses (e.g. BadHistoryOperation
    Unsupported) and network errors as they are.
    """
    cursor = start  # StartTime of the next request (without a continuation point)
    after = start  # yield only values newer than this (exclusive lower bound)
    continuation: bytes | None = None
    total = 0
    try:
        while True:
            if total >= max_values:
                if more is not None:
                    more.append(True)
                return
            details = ua.ReadRawModifiedDetails()
            details.IsReadModified = False
            details.StartTime = cursor
            details.EndTime = end
            details.NumValuesPerNode = min(page_values, max_values - total)
            details.ReturnBounds = False
            rv = ua.HistoryReadValueId()
            rv.NodeId = node_id
            rv.ContinuationPoint = continuation
            params = ua.HistoryReadParameters()
            params.HistoryReadDetails = details
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            params.ReleaseContinuationPoints = False
            params.NodesToRead.append(rv)
            async with asyncio.timeout(timeout_s):
                result = (await client.uaclient.history_read(params))[0]
            result.StatusCode.check()
            values = list(getattr(result.HistoryData, "DataValues", None) or [])
            continuation = result.ContinuationPoint or None
            if len(values) > details.NumValuesPerNode:
                # More than asked for (asyncua's server ignores NumValuesPerNode when both
                # times are given): keep the page size, read on from the last one kept.
                values = values[:details.NumValuesPerNode]
                if continuation is not None:
                    await _release(client, node_id, continuation, timeout_s)
                    continuation = None
            total += len(values)
            page = []
            last = after
            for dv in values:
                ts = _aware(dv.SourceTimestamp or dv.ServerTimestamp)
                if ts is None or ts <= after or ts >= end:
                    continue
                page.append(dv)
                last = max(last, ts)
            if page:
                yield page
            if continuation is not None:
                continue
            if len(values) < details.NumValuesPerNode or last <= after:
                return  # the server has no more in the range
            # Truncated without a continuation point: ask again from the last timestamp.
            cursor = after = last
    finally:
        if continuation is not None:
            await _release(client, node_id, continuation, timeout_s)


async def _release(client: Client, node_id: ua.NodeId, cp: bytes, timeout_s: float) -> None:
    details = ua.ReadRawModifiedDetails()
    rv = ua.HistoryReadValueId()
    rv.NodeId = node_id
    rv.ContinuationPoint = cp
    params = ua.HistoryReadParameters()
    params.HistoryReadDetails = details
    params.ReleaseContinuationPoints = True
    params.NodesToRead.append(rv)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            await client.uaclient.history_read(params)


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


class Watermarks:
    """Per-node "committed up to" timestamps and open gaps, persisted atomically.

    File: ``{"endpoint": ..., "nodes": {node: iso}, "gaps": {node: {"from": iso,
    "state": "open" | "running"}}}``.
    """

    def __init__(self, path: Path, endpoint: str) -> None:
        self.path = path
        self.endpoint = endpoint
        self.values: dict[str, datetime] = {}
        self.gaps: dict[str, dict[str, str]] = {}
        self.migrated_from: str | None = None  # set by load() for a foreign file
        self._saved: tuple[dict[str, datetime], dict[str, dict[str, str]]] = ({}, {})

    def load(self) -> dict[str, datetime]:
        """Read the file → per node the timestamp to resume from (the older of the
        watermark and an open gap's start); a missing or damaged file yields {} (logged)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            log_event(log, logging.WARNING, "cannot read opcua watermarks; no restart backfill",
                      path=str(self.path), error=str(err))
            return {}
        try:
            doc = orjson.loads(raw)
            values = {k: _parse(v) for k, v in doc.get("nodes", {}).items()}
            gaps = {k: {"from": iso_z(_parse(g["from"])), "state": str(g.get("state", "open"))}
                    for k, g in (doc.get("gaps") or {}).items()}
            endpoint = doc.get("endpoint")
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, KeyError) as err:
            log_event(log, logging.WARNING, "damaged opcua watermarks ignored",
                      path=str(self.path), error=str(err))
            return {}
        if endpoint != self.endpoint:
            self.migrated_from = str(endpoint)
            log_event(log, logging.WARNING, "opcua watermarks were written for another "
                      "endpoint; taken over for the same node references",
                      path=str(self.path), was=str(endpoint), now=self.endpoint)
        self.values = dict(values)
        self.gaps = gaps
        self._saved = (dict(values), {k: dict(v) for k, v in gaps.items()})
        out = dict(values)
        for node, gap in gaps.items():
            start = _parse(gap["from"])
            out[node] = min(out.get(node, start), start)
        return out

    def dirty(self) -> bool:
        return (self.values, self.gaps) != self._saved

    def unsaved_nodes(self) -> bool:
        """Does a node have a watermark the file does not name yet? Until it does, a
        restart after kill -9 cannot tell where that node's committed samples end and would
        start it live, losing what was written meanwhile without a word."""
        return any(node not in self._saved[0] for node in self.values)

    async def save(self) -> None:
        """Write the file if anything changed (off the event loop)."""
        if not self.dirty():
            return
        values = dict(self.values)
        gaps = {k: dict(v) for k, v in self.gaps.items()}
        doc = {"endpoint": self.endpoint,
               "nodes": {k: v.isoformat() for k, v in values.items()}, "gaps": gaps}
        await asyncio.to_thread(self._write, orjson.dumps(doc))
        self._saved = (values, gaps)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# A file up to this old only makes a restart read back more (deduplicated); a node missing
# from it is saved at once instead (``Watermarks.unsaved_nodes``).
WATERMARK_FLUSH_S = 5.0


def _parse(value: str) -> datetime:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


class Backfill:
    """The gaps of one ``opcua`` source: where they open and end, the backfill, the order
    of live and backfilled values, the watermarks (module docstring). Owned by
    ``OpcUaSource``.

    What the source hands in: ``connection()`` returns ``(client, resolved)`` while a
    session is up (None otherwise); ``queue`` is the monitored notification queue (the
    restore markers go into it); ``mapped`` is the ordered commit path the source's commit
    task drains, and ``put_ordered`` the only way into it (the source's drain task and the
    backfill share it, so puts keep the order they were asked in); ``sample`` maps one
    DataValue of a monitored item to a Submission (raises ``InputError``) and
    ``quarantine`` keeps one that cannot be mapped; ``audit`` writes a component audit row
    at once, ``note_audit`` queues one that the drain task writes between two batches
    (for calls that must not await); ``watermarks`` is the persisted state.

    The source calls, from its drain task, in arrival order: ``open_gap`` for a ``Gap``
    marker, ``live_sample`` and ``hold`` for each sample taken, ``server_overflow`` for a
    sample flagged Overflow, ``open_local_drop_gap`` before each batch; from its commit
    task ``committed`` after each COMMIT; at every start of its session ``start(history)``
    before the monitored items exist and ``watch_restore(sub)``. It runs ``loop()`` (the
    backfill) and ``flush_loop()`` (the periodic watermark save) as tasks of its session;
    both return at once when no monitored node historizes.

    State, per monitored item index, touched only on the event loop: ``_gap_open`` gaps
    waiting for their first sample, ``_jobs`` closed gaps to read, ``_running`` the gap
    being read (its start moves up as its values commit), ``_held`` live samples waiting
    for their node's backfill (``strict`` order).
    """

    def __init__(
        self,
        cfg: OpcUaSourceConfig,
        ctx: ComponentContext,
        *,
        connection: Callable[[], tuple[Client, Resolved] | None],
        queue: NotificationQueue,
        mapped: asyncio.Queue[Mapped],
        sample: Callable[..., Submission],
        quarantine: Callable[[int, ua.DataValue, Any, datetime, InputError], Awaitable[None]],
        audit: Callable[..., Awaitable[None]],
        note_audit: Callable[[str, str | None, dict[str, Any]], None],
        watermarks: Watermarks,
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.ctx = ctx
        self._connection = connection
        self._queue = queue
        self._mapped = mapped
        self._sample = sample
        self._quarantine = quarantine
        self._audit = audit
        self._note_audit = note_audit
        self.watermarks = watermarks
        self._m_backfilled = ctx.metrics.source_backfilled.labels(cfg.id)
        self.history: list[bool] = [False] * len(cfg.monitored)  # set by start()
        self._loaded = False  # the watermarks file was read (once per process)
        self._last_ts: dict[int, datetime] = {}  # newest live sample taken from the queue
        self._gap_open: dict[int, tuple[datetime, float]] = {}  # start, monotonic opened
        self._jobs: dict[int, tuple[datetime, datetime]] = {}  # backfill start, end
        self._jobs_ready = asyncio.Event()
        self._running: dict[int, tuple[datetime, datetime]] = {}  # gap being read
        self._held: dict[int, list[tuple[Submission, datetime]]] = {}  # behind a backfill
        self._releasing: set[int] = set()
        self._relaxed: set[int] = set()
        self._job_done: dict[int, asyncio.Event] = {}
        self._job_stats: dict[int, dict[str, Any]] = {}
        self._put_lock = asyncio.Lock()  # the one ordered way into mapped
        self._restoring = False  # between the restore markers of a reconnect
        self._restore_held: list[Any] = []
        self._drop_pending = False
        self._overflow_counts: dict[int, int] = {}
        self._overflow_since = 0.0

    # ------------------------------------------------------------------ what the source sees

    def start(self, history: list[bool]) -> None:
        """At every start of the session, before the monitored items exist: ``history``
        per monitored item, does its gap get read back (backfill on, node historizes).
        Opens a gap since the last COMMITTED samples (watermarks and open gaps) — of this
        process (the supervisor restarted the source: samples taken from the queue but not
        committed are read back too) or of the previous one (kill -9, restart, update)."""
        self.history = history
        self._restart_gaps()

    def open_gaps(self) -> dict[str, str]:
        """Per node with a gap (open, waiting or being read): its start (ISO-8601)."""
        out = {}
        for idx, item in enumerate(self.cfg.monitored):
            floor = self._gap_floor(idx)
            if floor is not None:
                out[item.node] = iso_z(floor)
        return out

    def running(self) -> list[str]:
        """The nodes whose gap is being read back right now."""
        return [self.cfg.monitored[idx].node for idx in self._running]

    # ------------------------------------------------------------------ gap state

    def _strict(self) -> bool:
        return self.cfg.backfill.order == "strict"

    def _gap_floor(self, idx: int) -> datetime | None:
        """The oldest start of the node's open, pending or running gaps (None: no gap)."""
        starts = [s for s in (self._gap_open.get(idx, (None,))[0],
                              self._jobs.get(idx, (None,))[0],
                              self._running.get(idx, (None,))[0]) if s is not None]
        return min(starts) if starts else None

    def _sync_gap(self, idx: int) -> None:
        """Mirror the node's gap into the watermarks file (written by the flush loop)."""
        node = self.cfg.monitored[idx].node
        floor = self._gap_floor(idx)
        if floor is None:
            self.watermarks.gaps.pop(node, None)
        else:
            self.watermarks.gaps[node] = {
                "from": iso_z(floor), "state": "running" if idx in self._running else "open"}

    def open_gap(self, mark: Gap) -> None:
        if mark.reason == "restore":
            self._restoring = True
        now = time.monotonic()
        starts = mark.starts if mark.starts is not None else self._last_ts
        for idx, ts in starts.items():
            if self.history[idx] and idx not in self._gap_open:
                self._gap_open[idx] = (ts, now)
                self._sync_gap(idx)
        self._jobs_ready.set()  # wake the loop so first-sample timeouts are tracked

    def _add_job(self, idx: int, start: datetime, end: datetime) -> None:
        if end > start:
            old = self._jobs.get(idx)
            if old is not None:
                start, end = min(start, old[0]), max(end, old[1])
            self._jobs[idx] = (start, end)
        self._sync_gap(idx)
        self._jobs_ready.set()

    def live_sample(self, idx: int, ts: datetime, *, ends_gap: bool = True) -> None:
        """A live sample was taken from the queue: it ends the node's open gap (a sample
        flagged Overflow does not: servers differ in which queued value carries the flag,
        so the gap runs to the next sample)."""
        gap = self._gap_open.pop(idx, None) if ends_gap else None
        if gap is not None:
            self._add_job(idx, gap[0], ts)
        last = self._last_ts.get(idx)
        if last is None or ts > last:
            self._last_ts[idx] = ts

    def hold(self, idx: int, sub: Submission, ts: datetime
              ) -> list[tuple[Submission, datetime]] | None:
        """Hold a live sample behind its node's backfill (None), or return what to commit
        now: the sample, after the held ones when the hold limit was reached."""
        if not self._strict() or idx in self._relaxed:
            return [(sub, ts)]
        floor = self._gap_floor(idx)
        if floor is None and idx not in self._releasing:
            return [(sub, ts)]
        if floor is not None and ts <= floor:
            return [(sub, ts)]  # older than the gap: before the backfilled values
        held = self._held.setdefault(idx, [])
        if len(held) < self.cfg.queue_max:
            held.append((sub, ts))
            return None
        self._relaxed.add(idx)
        out = held[:] + [(sub, ts)]
        held.clear()
        node = self.cfg.monitored[idx].node
        log_event(log, logging.WARNING, "opcua backfill slower than live data; live values "
                  "of this node are committed before the rest of its gap", source=self.id,
                  node=node, held=len(out))
        self._note_audit("backfill_order_relaxed", "hold_limit", {
            "node": node, "gap_from": iso_z(floor) if floor else None, "held": len(out)})
        return out

    async def put_ordered(self, subs: list[Submission], marks: list[tuple[int, datetime]]
                          ) -> None:
        """The one way into the commit path: puts keep the order they were asked in."""
        async with self._put_lock:
            await self._mapped.put((subs, marks))

    async def committed(self, subs: Sequence[Submission], ids: Sequence[str],
                        marks: Sequence[tuple[int, datetime]]) -> None:
        """After COMMIT (``ids`` as the outbox returned them): watermarks, backfill
        progress, counts, job completions; a node's first watermark is saved at once."""
        self._committed(subs, ids, marks)
        if self.watermarks.unsaved_nodes():
            # a node's first committed sample: on disk at once, not at the next flush,
            # so a kill -9 right after the start still resumes from here
            await self.save_watermarks()

    def _committed(self, subs: Sequence[Submission], ids: Sequence[str],
                   marks: Sequence[tuple[int, datetime]]) -> None:
        k = 0
        for idx, ts in marks:
            if ts is JOB_DONE:
                done = self._job_done.pop(idx, None)
                if done is not None:
                    done.set()
                continue
            sub = subs[k]
            new = ids[k] == sub.event.id
            k += 1
            if sub.event.backfilled:
                if new:
                    self._m_backfilled.inc()
                    stats = self._job_stats.get(idx)
                    if stats is not None:
                        stats["stored"] += 1
                run = self._running.get(idx)
                if run is not None and ts > run[0]:
                    self._running[idx] = (ts, run[1])
                    self._sync_gap(idx)
            self._advance_watermark(idx, ts)

    def _advance_watermark(self, idx: int, ts: datetime) -> None:
        """Committed: the watermark moves up, never past the start of an open gap."""
        floor = self._gap_floor(idx)
        if floor is not None and ts > floor:
            ts = floor
        key = self.cfg.monitored[idx].node
        old = self.watermarks.values.get(key)
        if old is None or ts > old:
            self.watermarks.values[key] = ts

    # ------------------------------------------------------------------ (re)start

    def _restart_gaps(self) -> dict[int, datetime]:
        """At every start of ``run``: resume from what is committed, not from what was
        taken. Returns per historizing node the start of its gap (now open)."""
        if not self._loaded:
            self._loaded = True
            loaded = self.watermarks.load()
            if self.watermarks.migrated_from is not None:
                self._note_audit("watermarks_migrated", "endpoint_changed", {
                    "from_endpoint": self.watermarks.migrated_from,
                    "to_endpoint": self.cfg.endpoint})
            for node, gap in self.watermarks.gaps.items():
                self._note_audit("backfill_resumed", (
                    "interrupted" if gap.get("state") == "running" else "gap_open"),
                    {"node": node, "from": gap["from"]})
        else:  # the supervisor restarts run(): the same process, the same memory
            loaded = dict(self.watermarks.values)
            for node, gap in self.watermarks.gaps.items():
                start = _parse(gap["from"])
                loaded[node] = min(loaded.get(node, start), start)
        self._gap_open.clear()
        self._jobs.clear()
        self._running.clear()
        self._releasing.clear()
        self._relaxed.clear()
        self._job_done.clear()
        self._job_stats.clear()
        self._held.clear()  # taken, not committed: read back from the history
        self._restoring = False
        keys = {m.node: i for i, m in enumerate(self.cfg.monitored)}
        starts: dict[int, datetime] = {}
        now = time.monotonic()
        for ref, ts in loaded.items():
            idx = keys.get(ref)
            if idx is None:
                continue
            if self.history[idx]:
                starts[idx] = ts
                self._last_ts[idx] = ts
                self._gap_open[idx] = (ts, now)
            else:
                self._last_ts.setdefault(idx, ts)
        for idx in range(len(self.cfg.monitored)):
            self._sync_gap(idx)
        # Chunks mapped by the previous run but not committed: the samples of nodes with a
        # gap now wait behind its backfill (they are read back anyway), the rest commit.
        keep: list[Mapped] = []
        while not self._mapped.empty():
            subs, marks = self._mapped.get_nowait()
            k_subs: list[Submission] = []
            k_marks: list[tuple[int, datetime]] = []
            k = 0
            for idx, ts in marks:
                if ts is JOB_DONE:
                    continue
                sub = subs[k]
                k += 1
                floor = self._gap_floor(idx)
                if floor is not None and ts > floor and self._strict():
                    self._held.setdefault(idx, []).append((sub, ts))
                else:
                    k_subs.append(sub)
                    k_marks.append((idx, ts))
            if k_subs:
                keep.append((k_subs, k_marks))
        for chunk in keep:
            self._mapped.put_nowait(chunk)
        if starts:
            self._jobs_ready.set()
        return starts

    def watch_restore(self, sub: Subscription | None) -> None:
        """Bracket asyncua's restore of the monitored subscription (transfer + Republish
        after a reconnect) with markers in the queue: live notifications that arrive
        meanwhile wait until the replayed ones are taken, so per node the older replayed
        values are committed first."""
        if sub is None or getattr(sub, "_edge_restore_watched", False):
            return
        original = sub.restore
        queue = self._queue

        async def restore() -> None:
            queue.put_nowait(Gap("restore"))
            try:
                await original()
            finally:
                queue.put_nowait(Gap("restored"))

        sub.restore = restore  # type: ignore[method-assign]
        sub._edge_restore_watched = True  # type: ignore[attr-defined]

    def end_restore(self) -> list[Any]:
        """The ``restored`` marker was taken: the live notifications held meanwhile."""
        self._restoring = False
        held, self._restore_held = self._restore_held, []
        return held

    def hold_for_restore(self, item: Any) -> bool:
        """During a restore: keep a live (not replayed) notification for after it."""
        if not self._restoring or getattr(item, "replayed", False):
            return False
        if len(self._restore_held) >= self.cfg.queue_max:
            return False
        self._restore_held.append(item)
        return True

    # ------------------------------------------------------------------ drops

    def note_local_drop(self) -> None:
        """The notification queue dropped one (called inside asyncua's publish callback):
        the drain opens the gap before its next batch (``open_local_drop_gap``)."""
        self._drop_pending = True

    def open_local_drop_gap(self) -> None:
        """Before a batch: if the queue dropped notifications since the last one, every
        historizing node may have lost values newer than the ones taken so far."""
        if not self._drop_pending:
            return
        self._drop_pending = False
        self.open_gap(Gap("queue_full"))

    def server_overflow(self, idx: int) -> None:
        """The server flagged Overflow on a sample: values before it were dropped."""
        self._overflow_counts[idx] = self._overflow_counts.get(idx, 0) + 1
        if not self._overflow_since:
            self._overflow_since = time.monotonic()
            # a storm is audited when it starts (a steady overload may never end) and
            # then with its counts when it ends, or once a minute while it lasts
            node = self.cfg.monitored[idx].node
            self._note_audit("dropped", "server_queue_overflow", {
                "flagged": 1, "nodes": {node: 1}, "storm": "started",
                "backfill": [node] if self.history[idx] else []})
        last = self._last_ts.get(idx)
        if self.history[idx] and last is not None and idx not in self._gap_open:
            self._gap_open[idx] = (last, time.monotonic())
            self._sync_gap(idx)

    def overflow_count(self) -> int:
        """Samples flagged Overflow in the current storm (0: none)."""
        return sum(self._overflow_counts.values())

    def overflow_storm_over(self, seen_before: int) -> bool:
        """True when overflows were counted and this batch added none (or a minute passed)."""
        if not self._overflow_counts:
            return False
        total = sum(self._overflow_counts.values())
        return total == seen_before or time.monotonic() - self._overflow_since > 60

    def overflow_audit(self) -> tuple[str, str | None, dict[str, Any]]:
        """The audit row of the storm that is over (``state, reason, detail``); resets it."""
        nodes = {self.cfg.monitored[i].node: n for i, n in self._overflow_counts.items()}
        backfill = [self.cfg.monitored[i].node for i in self._overflow_counts
                    if self.history[i]]
        self._overflow_counts = {}
        self._overflow_since = 0.0
        return ("dropped", "server_queue_overflow", {
            "flagged": sum(nodes.values()), "nodes": nodes, "backfill": backfill})

    # ------------------------------------------------------------------ backfill

    async def loop(self) -> None:
        """Close gaps that waited too long for their first sample, release held samples,
        read the closed gaps back, one round at a time (runs for the session)."""
        if not any(self.history):
            return
        wait_s = self.cfg.backfill.first_sample_wait_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if self._gap_open else None):
                    await self._jobs_ready.wait()
            self._jobs_ready.clear()
            stale = [i for i, (_, at) in self._gap_open.items()
                     if time.monotonic() - at > wait_s]
            if stale:
                end = await self.server_time()
                for idx in stale:
                    if idx in self._gap_open:
                        start, _ = self._gap_open.pop(idx)
                        self._add_job(idx, start, end)
            for idx in [i for i, h in self._held.items()
                        if h and self._gap_floor(i) is None and i not in self._releasing]:
                self._releasing.add(idx)
                await self._release_held(idx)
            while self._jobs:
                idx = next(iter(self._jobs))
                start, end = self._jobs.pop(idx)
                await self._backfill(idx, start, end)

    async def server_time(self) -> datetime:
        """The server's clock (the end of a gap without a live sample); ours if unread."""
        conn = self._connection()
        assert conn is not None
        client = conn[0]
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                ts = await client.get_node(
                    ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerStatus_CurrentTime))).read_value()
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        except (OSError, TimeoutError, ua.UaError, ConnectionError):
            return datetime.now(UTC)

    async def _backfill(self, idx: int, start: datetime, end: datetime) -> None:
        """One round of a gap: read, hand to the commit path; then another round, a retry
        after the reconnect, or the end of the job (committed, audited, held released)."""
        conn = self._connection()
        assert conn is not None
        client, resolved = conn
        cfg = self.cfg
        node = cfg.monitored[idx].node
        stats = self._job_stats.setdefault(
            idx, {"from": start, "read": 0, "stored": 0, "rounds": 0})
        self._running[idx] = (start, end)
        self._sync_gap(idx)
        limit = end - timedelta(seconds=cfg.backfill.max_gap_s)
        if start < limit:
            log_event(log, logging.WARNING, "opcua gap longer than backfill.max_gap_s; "
                      "reading only its newest part", source=self.id, node=node,
                      gap_start=iso_z(start), read_from=iso_z(limit))
            await self._audit("backfill_truncated", reason="max_gap_s",
                              detail={"node": node, "gap_start": iso_z(start),
                                      "read_from": iso_z(limit)})
            start = limit
            self._running[idx] = (start, end)
            stats["from"] = max(stats["from"], start)
        read = 0
        newest = start
        more: list[bool] = []
        stats["rounds"] += 1
        try:
            async for page in history_pages(
                client, resolved[node].node_id, start, end,
                page_values=cfg.backfill.page_values, max_values=cfg.backfill.max_values,
                timeout_s=cfg.timeout_s, more=more,
            ):
                subs: list[Submission] = []
                marks: list[tuple[int, datetime]] = []
                for dv in page:
                    ts = source_ts(dv)
                    value = dv.Value.Value if dv.Value is not None else None
                    try:
                        subs.append(self._sample(idx, dv, value, ts, backfilled=True))
                        marks.append((idx, ts))
                    except InputError as err:
                        await self._quarantine(idx, dv, value, ts, err)
                    newest = max(newest, ts)
                read += len(page)
                stats["read"] += len(page)
                if subs:
                    await self.put_ordered(subs, marks)
        except (OSError, TimeoutError, ConnectionError) as err:
            # Connection trouble: the gap stays open; the unread rest after the reconnect.
            self._running.pop(idx, None)
            self._add_job(idx, newest, end)
            log_event(log, logging.WARNING, "opcua backfill interrupted; will resume",
                      source=self.id, node=node, error=repr(err))
            await asyncio.sleep(1.0)
            return
        except ua.UaError as err:
            self.ctx.metrics.source_errors.labels(self.id, "history_read_failed").inc()
            log_event(log, logging.WARNING, "opcua backfill failed: the server refused "
                      "HistoryRead", source=self.id, node=node, error=repr(err))
            await self._finish_job(idx)
            await self._audit("backfill_failed", reason=type(err).__name__,
                              detail={"node": node, "from": iso_z(start), "to": iso_z(end),
                                      "read": stats["read"]})
            return
        if more:
            # max_values reached: this round is handed over; the rest is read in another
            # round (after the other nodes' gaps had theirs), the gap stays open.
            self._running.pop(idx, None)
            self._add_job(idx, newest, end)
            log_event(log, logging.INFO, "opcua backfill round done; gap continues",
                      source=self.id, node=node, read=read, next_from=iso_z(newest),
                      gap_to=iso_z(end))
            await self._audit("backfill_round", reason="max_values", detail={
                "node": node, "from": iso_z(start), "to": iso_z(end), "read": read,
                "next_from": iso_z(newest), "max_values": cfg.backfill.max_values})
            return
        done = asyncio.Event()
        self._job_done[idx] = done
        await self.put_ordered([], [(idx, JOB_DONE)])
        await done.wait()  # every value of the gap is committed
        await self._finish_job(idx)
        log_event(log, logging.INFO, "opcua backfilled", source=self.id, node=node,
                  read=stats["read"], stored=stats["stored"],
                  duplicates=stats["read"] - stats["stored"], rounds=stats["rounds"],
                  gap_from=iso_z(stats["from"]), gap_to=iso_z(end))
        await self._audit("backfilled", detail={
            "node": node, "from": iso_z(stats["from"]), "to": iso_z(end), "read": stats["read"],
            "stored": stats["stored"], "rounds": stats["rounds"]})

    async def _finish_job(self, idx: int) -> None:
        """The running gap is done: forget it, then commit the live samples held for it."""
        self._job_stats.pop(idx, None)
        self._releasing.add(idx)  # before the gap goes: the drain keeps holding meanwhile
        self._running.pop(idx, None)
        if self._gap_floor(idx) is None:
            self._relaxed.discard(idx)
        self._sync_gap(idx)
        await self._release_held(idx)

    async def _release_held(self, idx: int) -> None:
        """Commit the held samples older than the node's next gap (all, without one), in
        the order taken; the caller has put ``idx`` into ``_releasing``."""
        try:
            while True:
                floor = self._gap_floor(idx)
                held = self._held.get(idx) or []
                n = 0
                while n < len(held) and (floor is None or held[n][1] <= floor):
                    n += 1
                if n == 0:
                    break
                chunk = held[:n]
                del held[:n]
                await self.put_ordered([s for s, _ in chunk], [(idx, ts) for _, ts in chunk])
        finally:
            self._releasing.discard(idx)  # no await since the last check: nothing slips by

    async def flush_loop(self) -> None:
        """Save the watermarks every ``WATERMARK_FLUSH_S`` (runs for the session)."""
        if not any(self.history):
            return
        while True:
            await asyncio.sleep(WATERMARK_FLUSH_S)
            await self.save_watermarks()

    async def save_watermarks(self) -> None:
        """Write the watermarks file now (a failure is logged; the next flush retries)."""
        try:
            await self.watermarks.save()
        except OSError as err:
            log_event(log, logging.WARNING, "cannot save opcua watermarks",
                      source=self.id, error=str(err))
