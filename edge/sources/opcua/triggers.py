"""Triggers of the ``opcua`` source: edge detection, ONE Read per raise, ack, and the
promise that a handshake station never stalls.

A trigger fires on a change of its node TO ``when`` (the first value after (re)connecting
counts as a change). Its group is read together with the trigger node itself in ONE Read
call as soon as the notification is processed. The identity of a result is the raise it
belongs to: the trigger's SourceTimestamp (its dedupe key ``trigger:<node>@<trigger
SourceTimestamp>``, unless the mapping names a ``dedupe_key``). Reading a still raised
trigger again therefore stores nothing new (the commit returns the first copy's id), and
a new raise is a new event. The result is mapped with ``edge.transforms.map``
(quarantined when unusable), waits in a bounded queue until it is committed — never
dropped after its Read — and then the ack, if configured, is written.

Nothing stalls a station:

- After a failed Read, a failed ack write, a local queue overflow and on every
  (re)connect or subscription re-creation the trigger nodes are read again; a trigger
  that still shows ``when`` is served again: read, commit (same id), ack. Retries back
  off (0.5 s doubling up to ``reconnect_max_s``); while one is pending, a named
  condition of the source says so in ``/status``.
- A quarantined result is acknowledged too (it is kept in the quarantine table).
- Two raises within one publishing interval are never one part stored twice: a raise
  with a newer raise of the same trigger queued behind it, or read when the station has
  raised again already, or whose Read returns exactly what the previous raise's Read
  returned (values and their timestamps), is a MISSED part — counted in
  ``edge_source_dropped_total{reason="trigger_missed"}`` and audited (``trigger_missed``)
  — and every Read is stored once.

Every outcome other than "stored and acknowledged at once" is audited: ``trigger_read_failed``
(first failure of a streak, with the retry delay), ``trigger_read_recovered``,
``trigger_ack_failed``, ``trigger_acked`` (after failed attempts), ``trigger_ack_skipped``
(the station took the result back before the ack could be written),
``trigger_quarantined``, ``trigger_missed``, ``trigger_dropped`` (local queue overflow).
All state lives on the event loop; the Read task and the commit task share it.

``Triggers`` is the part of ``OpcUaSource`` that does this (its contract in its docstring).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent

from edge.plugin import (
    ComponentContext,
    Ingest,
    InputError,
    Mapper,
    OutboxFullError,
    Submission,
    log_event,
)
from edge.sources.opcua.queue import Gap, NotificationQueue
from edge.sources.opcua.values import jsonable, source_ts, status_name
from edge.timefmt import iso_z

if TYPE_CHECKING:
    from edge.sources.opcua.config import OpcUaSourceConfig, TriggerConfig
    from edge.sources.opcua.nodes import Resolved

__all__ = ["Triggers"]

# The source's audit call: ``await audit(state, reason=..., detail=...)``.
Audit = Callable[..., Awaitable[None]]

log = logging.getLogger("edge.sources.opcua")

_READ_ERRORS = (OSError, TimeoutError, ConnectionError, ua.UaError)
_FIRST_RETRY_S = 0.5
_SERVED_KEPT = 64  # raises remembered per trigger (a late notification of one is skipped)
_MISSED_LISTED = 20  # raise timestamps listed in one trigger_missed audit row


class _Recheck(Gap):
    """Marker in the trigger queue: read these triggers again (``idx`` None: all).
    A ``Gap`` subclass, so the queue never drops it."""

    __slots__ = ("idx",)

    def __init__(self, why: str, idx: int | None = None) -> None:
        super().__init__(why)
        self.idx = idx


class _Dropped(Gap):
    """Marker: trigger notifications were dropped (queue full) before this point."""

    __slots__ = ()


@dataclass(slots=True, eq=False)
class _Handshake:
    """What the source knows about one trigger's station (event loop only)."""

    served: deque[datetime] = field(default_factory=lambda: deque(maxlen=_SERVED_KEPT))
    pending: datetime | None = None  # a raise seen whose result is not read yet
    key: datetime | None = None  # the raise in hand: its result was read last
    sig: tuple[Any, ...] | None = None  # what that Read returned (values, timestamps)
    outcome: str = ""  # of the raise in hand: queued | stored | quarantined | unconfirmed
    event_id: str | None = None
    quarantine_reason: str | None = None
    acked: datetime | None = None  # the raise whose ack was written last
    ids: deque[str] = field(default_factory=lambda: deque(maxlen=_SERVED_KEPT))
    read_failures: int = 0
    ack_failures: int = 0
    retry: asyncio.TimerHandle | None = None
    missed: list[tuple[datetime, str]] = field(default_factory=list)  # not yet audited


@dataclass(slots=True)
class _Out:
    """A served raise on its way to the commit task: commit (or quarantine), then ack."""

    idx: int
    key: datetime
    sub: Submission | None = None
    quarantine: tuple[str, bytes, dict[str, Any], str] | None = None  # reason, raw, meta, detail
    again: bool = False  # the raise in hand, served again (after a failed ack / restart)


class Triggers:
    """The triggers of one ``opcua`` source: edge detection, the group Read, the commit,
    the ack (module docstring: what a station can rely on). Owned by ``OpcUaSource``.

    The source hands in what it shares: ``connection()`` returns ``(client, resolved)``
    while a session is up, else None (every Read and ack write then fails as "not
    connected" and is retried); ``ingest`` commits and quarantines; ``submit`` commits
    and waits while the outbox refuses (backpressure); ``audit`` writes a component
    audit row; ``status_change`` and ``unknown_item`` report what asyncua put into the
    queue besides data changes.

    The source feeds ``queue`` (the trigger subscription's notification queue) and calls
    ``recheck(why)`` on (re)connect and subscription re-creation; it runs ``read_loop()``
    and ``commit_loop()`` as two tasks of its session. Both return at once when no
    trigger is configured. Everything runs on the event loop; ``_dropped`` is called by
    the queue inside asyncua's publish callback and only counts and schedules.
    """

    def __init__(
        self,
        cfg: OpcUaSourceConfig,
        ctx: ComponentContext,
        *,
        ingest: Ingest,
        connection: Callable[[], tuple[Client, Resolved] | None],
        submit: Callable[[Sequence[Submission]], Awaitable[list[str]]],
        audit: Audit,
        status_change: Callable[[str, StatusChangeEvent], None],
        unknown_item: Callable[[str, Any], None],
    ) -> None:
        self.id = cfg.id
        self.cfg = cfg
        self.ctx = ctx
        self._ingest = ingest
        self._connection = connection
        self._submit = submit
        self._audit = audit
        self._status_change = status_change
        self._unknown_item = unknown_item
        self._m_dropped = ctx.metrics.source_dropped.labels(cfg.id, "trigger_queue_full")
        self._mappers = [Mapper(t, site=ctx.site, source=cfg.id) for t in cfg.triggers]
        self.queue = NotificationQueue(max(100, cfg.queue_max // 10), self._dropped)
        self._out: asyncio.Queue[_Out] = asyncio.Queue(maxsize=1000)  # served raises
        self._hs = [_Handshake() for _ in cfg.triggers]
        self._recheck_queued = False
        self._drops = 0  # dropped since the last trigger_dropped audit row
        self._drop_marker_queued = False

    # ------------------------------------------------------------------ scheduling

    def recheck(self, why: str) -> None:
        """Schedule a re-read of every trigger node (``why``: ``connected``,
        ``reconnected``, ``subscription_recreated``); returns at once (called from the
        source's control loop). Handled in order with the notifications by the trigger
        task; one pending re-read covers any number of requests."""
        if not self.cfg.triggers or self._recheck_queued:
            return
        self._recheck_queued = True
        self.queue.put_nowait(_Recheck(why))

    def _retry_later(self, idx: int, failures: int) -> float:
        """Re-read trigger ``idx`` after a backoff; returns the delay."""
        delay = min(_FIRST_RETRY_S * 2 ** min(failures - 1, 16),
                    max(_FIRST_RETRY_S, self.cfg.reconnect_max_s))
        st = self._hs[idx]
        if st.retry is not None:
            st.retry.cancel()
        st.retry = asyncio.get_running_loop().call_later(delay, self._retry_due, idx)
        return delay

    def _retry_due(self, idx: int) -> None:
        self._hs[idx].retry = None
        self.queue.put_nowait(_Recheck("retry", idx))

    def _dropped(self) -> None:
        """Called by the trigger queue (inside asyncua's publish callback) per dropped
        notification: count now; the trigger task audits the drops and re-reads every
        trigger (a dropped notification may have been a raise)."""
        self._m_dropped.inc()
        self._drops += 1
        if not self._drop_marker_queued:
            self._drop_marker_queued = True
            log_event(log, logging.ERROR, "opcua trigger queue full; oldest trigger "
                      "notifications dropped (the triggers are read again)", source=self.id)
            # not from inside the queue's own put_nowait: queue the marker right after
            asyncio.get_running_loop().call_soon(self.queue.put_nowait, _Dropped("dropped"))

    # ------------------------------------------------------------------ the Read task

    async def read_loop(self) -> None:
        """Edge detection in arrival order; the Read happens right at the edge."""
        if not self.cfg.triggers:
            return
        prev: dict[int, Any] = {}
        unknown = object()
        q = self.queue
        try:
            while True:
                batch = await q.get_batch(q.maxsize)
                for pos, item in enumerate(batch):
                    if isinstance(item, _Recheck):
                        if item.idx is None:
                            self._recheck_queued = False
                            for idx in range(len(self.cfg.triggers)):
                                await self._serve(idx, None)
                        else:
                            await self._serve(item.idx, None)
                        continue
                    if isinstance(item, _Dropped):
                        await self._audit_drops()
                        prev.clear()
                        for idx in range(len(self.cfg.triggers)):
                            await self._serve(idx, None)
                        continue
                    if isinstance(item, Gap):
                        prev.clear()  # the next value may or may not be an edge: treat it as one
                        continue
                    if isinstance(item, StatusChangeEvent):
                        self._status_change("triggers", item)
                        continue
                    if type(item) is not DataChangeEvent:
                        self._unknown_item("triggers", item)
                        continue
                    mi = item.data.monitored_item
                    idx = mi.ClientHandle - 1
                    dv = mi.Value
                    if dv.StatusCode is not None and not dv.StatusCode.is_good():
                        continue  # no usable value: neither an edge nor a reset
                    trig = self.cfg.triggers[idx]
                    value = item.value
                    fired = value == trig.when and prev.get(idx, unknown) != trig.when
                    prev[idx] = value
                    if not fired:
                        continue
                    ts = source_ts(dv)
                    if ts in self._hs[idx].served:
                        continue  # its result was read already (a re-read was first)
                    if _raised_again(batch, pos, idx, trig.when):
                        # Its values were overwritten before they could be read.
                        self._missed(idx, ts, "raised_again")
                        continue
                    await self._serve(idx, ts)
                await self._flush_missed()
        finally:
            for st in self._hs:
                if st.retry is not None:
                    st.retry.cancel()
                    st.retry = None  # the next run reads every trigger at connect

    async def _serve(self, idx: int, edge: datetime | None) -> None:
        """Read trigger ``idx`` and its group; hand what is to be stored or acked to the
        commit task. ``edge``: the raise just notified (None: a re-read)."""
        st = self._hs[idx]
        trig = self.cfg.triggers[idx]
        if edge is not None:
            if st.pending is not None and st.pending != edge:
                self._missed(idx, st.pending, "raised_again")  # never read, now replaced
            st.pending = edge
        got = await self._read_group(idx)
        if got is None:
            return
        value, raised_ts, dvs = got
        if value == trig.when:
            if st.pending is not None and st.pending != raised_ts:
                # The station raised again since the notified raise: that part is gone.
                self._missed(idx, st.pending, "raised_again")
            key = raised_ts
        elif st.pending is not None:
            # Taken back already (a station without handshake): the group still holds
            # the result of the notified raise, as at once after a notification.
            key = st.pending
        else:
            await self._idle(idx)
            return
        st.pending = None
        sig = tuple((dv.StatusCode.value if dv.StatusCode is not None else 0,
                     jsonable(dv.Value.Value if dv.Value is not None else None),
                     dv.SourceTimestamp) for dv in dvs)
        if key == st.key:  # the raise in hand
            if st.outcome == "queued" or (st.outcome in ("stored", "quarantined")
                                          and (trig.ack is None or st.acked == key)):
                return  # on its way, or served completely
            if st.outcome == "quarantined":
                await self._out.put(_Out(idx, key, again=True))  # the ack only
            else:
                await self._out.put(self._result(idx, key, dvs, again=True))
            return
        if st.sig is not None and sig == st.sig:
            # The same Read as for the raise in hand: one part shown twice, the other
            # part missed. Stored once; this raise is acknowledged like the first.
            self._missed(idx, key, "same_values")
            st.key = key
            await self._out.put(_Out(idx, key))
            return
        st.served.append(key)
        out = self._result(idx, key, dvs)
        st.key, st.sig, st.outcome = key, sig, "queued"
        st.event_id = st.quarantine_reason = None
        await self._out.put(out)

    async def _read_group(self, idx: int) -> tuple[Any, datetime, list[ua.DataValue]] | None:
        """ONE Read of the trigger node and its group: (trigger value, its SourceTimestamp,
        group values). None after a failure (counted, audited, retry scheduled)."""
        st = self._hs[idx]
        trig = self.cfg.triggers[idx]
        try:
            conn = self._connection()
            if conn is None:
                raise ConnectionError("not connected")
            client, resolved = conn
            params = ua.ReadParameters()
            for ref in (trig.node, *trig.read.values()):
                params.NodesToRead.append(ua.ReadValueId(
                    NodeId=resolved[ref].node_id, AttributeId=ua.AttributeIds.Value))
            async with asyncio.timeout(self.cfg.timeout_s):
                values = await client.uaclient.read(params)
            head = values[0]
            if head.StatusCode is not None and not head.StatusCode.is_good():
                raise ua.UaStatusCodeError(head.StatusCode.value)
        except _READ_ERRORS as err:
            await self._read_failed(idx, trig, err)
            return None
        if st.read_failures:
            log_event(log, logging.INFO, "opcua trigger read again after failures",
                      source=self.id, trigger=trig.node, failed=st.read_failures)
            await self._audit("trigger_read_recovered", detail={
                "trigger": trig.node, "failed_reads": st.read_failures})
            st.read_failures = 0
            self.ctx.set_condition(f"trigger_read_failed:{trig.node}", None, "warning")
        value = head.Value.Value if head.Value is not None else None
        return value, source_ts(head), list(values[1:])

    async def _read_failed(self, idx: int, trig: TriggerConfig, err: BaseException) -> None:
        st = self._hs[idx]
        st.read_failures += 1
        self.ctx.metrics.source_errors.labels(self.id, "trigger_read_failed").inc()
        delay = self._retry_later(idx, st.read_failures)
        raised = iso_z(st.pending) if st.pending is not None else None
        if st.read_failures == 1:
            log_event(log, logging.WARNING, "opcua trigger read failed; reading it again",
                      source=self.id, trigger=trig.node, trigger_ts=raised, error=repr(err),
                      retry_in_s=delay)
            self.ctx.set_condition(
                f"trigger_read_failed:{trig.node}",
                f"trigger {trig.node}: cannot read the station's result"
                + (f" raised at {raised}" if raised else "")
                + f" ({type(err).__name__}); reading it again with backoff", "warning")
            await self._audit("trigger_read_failed", reason="read_failed", detail={
                "trigger": trig.node, "trigger_ts": raised, "error": repr(err),
                "retry_in_s": delay})

    async def _idle(self, idx: int) -> None:
        """The trigger does not show ``when`` and no raise is pending: nothing to serve."""
        st = self._hs[idx]
        trig = self.cfg.triggers[idx]
        if st.ack_failures and st.key is not None and st.acked != st.key:
            await self._audit("trigger_ack_skipped", reason="station_reset", detail={
                "trigger": trig.node, "trigger_ts": iso_z(st.key), "event_id": st.event_id,
                "failed_acks": st.ack_failures})
            log_event(log, logging.INFO, "opcua trigger no longer raised; its ack is not "
                      "needed any more", source=self.id, trigger=trig.node,
                      failed_acks=st.ack_failures)
            st.acked = st.key
            st.ack_failures = 0
            if st.retry is not None:
                st.retry.cancel()
                st.retry = None
        self.ctx.set_condition(f"trigger_ack_failed:{trig.node}", None, "warning")

    def _result(self, idx: int, key: datetime, dvs: list[ua.DataValue], *,
                again: bool = False) -> _Out:
        """The Read → one Submission, or what goes to the quarantine."""
        trig = self.cfg.triggers[idx]
        payload: dict[str, Any] = {}
        bad: dict[str, str] = {}
        for name, dv in zip(trig.read, dvs, strict=True):
            if dv.StatusCode is not None and dv.StatusCode.is_bad():
                bad[name] = status_name(dv.StatusCode)
            else:
                payload[name] = jsonable(dv.Value.Value if dv.Value is not None else None)
        meta = {"trigger": trig.node, "trigger_ts": iso_z(key)}
        raw = orjson.dumps({"read": payload, "bad": bad}, default=str)
        if bad:
            detail = ", ".join(f"{k}: {v}" for k, v in bad.items())
            return _Out(idx, key, quarantine=("bad_status", raw, meta, detail), again=again)
        try:
            event, dedupe = self._mappers[idx].map(
                payload, source_ts=None if trig.source_ts else key)
        except InputError as err:
            return _Out(idx, key, quarantine=(err.reason, raw, meta, err.detail), again=again)
        return _Out(idx, key, Submission(event, dedupe or f"trigger:{trig.node}@{iso_z(key)}"),
                    again=again)

    def _missed(self, idx: int, raised: datetime, why: str, *, read: bool = False) -> None:
        """A raise whose part was never read (``read``: whose Read returned an earlier
        raise's result): counted now, audited by ``_flush_missed``."""
        st = self._hs[idx]
        if raised in st.served and not read:
            return
        if raised not in st.served:
            st.served.append(raised)
        if st.pending == raised:
            st.pending = None
        st.missed.append((raised, why))
        self.ctx.metrics.source_dropped.labels(self.id, "trigger_missed").inc()

    async def _flush_missed(self) -> None:
        for idx, st in enumerate(self._hs):
            if not st.missed:
                continue
            missed, st.missed = st.missed, []
            trig = self.cfg.triggers[idx]
            log_event(log, logging.WARNING, "opcua station raised results faster than they "
                      "could be read; parts missed", source=self.id, trigger=trig.node,
                      missed=len(missed), first=iso_z(missed[0][0]))
            for why in dict.fromkeys(w for _, w in missed):
                times = [ts for ts, w in missed if w == why]
                await self._audit("trigger_missed", reason=why, detail={
                    "trigger": trig.node, "trigger_ts": iso_z(times[0]), "count": len(times),
                    "raised_at": [iso_z(t) for t in times[:_MISSED_LISTED]]})

    async def _audit_drops(self) -> None:
        self._drop_marker_queued = False
        dropped, self._drops = self._drops, 0
        if dropped:
            await self._audit("trigger_dropped", reason="trigger_queue_full", detail={
                "dropped": dropped, "queue_max": self.queue.maxsize,
                "triggers": [t.node for t in self.cfg.triggers]})

    # ------------------------------------------------------------------ the commit task

    async def commit_loop(self) -> None:
        if not self.cfg.triggers:
            return
        while True:
            out = await self._out.get()
            st = self._hs[out.idx]
            try:
                await self._store(out)
                if self.cfg.triggers[out.idx].ack is not None:
                    await self._write_ack(out)
            finally:
                if st.key == out.key and st.outcome == "queued":
                    st.outcome = "unconfirmed"  # cancelled or failed before the COMMIT

    async def _store(self, out: _Out) -> None:
        st = self._hs[out.idx]
        trig = self.cfg.triggers[out.idx]
        if out.sub is not None:
            event_id = (await self._commit(out.idx, out.sub))[0]
            if event_id != out.sub.event.id and not out.again and event_id in st.ids:
                # The dedupe key of an earlier raise's result: the same part read twice.
                self._missed(out.idx, out.key, "same_result", read=True)
                await self._flush_missed()
            st.ids.append(event_id)
            if st.key == out.key:
                st.event_id, st.outcome = event_id, "stored"
        elif out.quarantine is not None:
            reason, raw, meta, detail = out.quarantine
            await self._ingest.quarantine(self.id, reason, raw, meta, detail)
            if st.key == out.key:
                st.outcome, st.quarantine_reason = "quarantined", reason
            if trig.ack is None:
                await self._audit("trigger_quarantined", reason=reason, detail={
                    "trigger": trig.node, "trigger_ts": iso_z(out.key),
                    "quarantine_reason": reason, "detail": detail, "acked": False})

    async def _commit(self, idx: int, sub: Submission) -> list[str]:
        """Commit; while the outbox refuses (backpressure) the station is shown waiting."""
        trig = self.cfg.triggers[idx]
        code = f"trigger_waiting:{trig.node}"
        try:
            return await self._ingest.submit([sub])
        except OutboxFullError:
            log_event(log, logging.WARNING, "opcua trigger result waits for the outbox "
                      "(full); the station is not acknowledged meanwhile", source=self.id,
                      trigger=trig.node)
            self.ctx.set_condition(code, f"trigger {trig.node}: a result waits until the "
                                   "outbox accepts again (full); the station is not "
                                   "acknowledged meanwhile", "warning")
            try:
                return await self._submit([sub])
            finally:
                self.ctx.set_condition(code, None, "warning")

    async def _write_ack(self, out: _Out) -> None:
        st = self._hs[out.idx]
        trig = self.cfg.triggers[out.idx]
        ack = trig.ack
        assert ack is not None
        if st.acked == out.key:
            return  # written already for this raise (never twice: the next may be raised)
        code = f"trigger_ack_failed:{trig.node}"
        try:
            conn = self._connection()
            if conn is None:
                raise ConnectionError("not connected")
            client, resolved = conn
            node = client.get_node(resolved[ack.node].node_id)
            vtype = resolved[ack.node].variant_type
            variant = ua.Variant(ack.value, vtype) if vtype not in (None, ua.VariantType.Null) \
                else ua.Variant(ack.value)
            async with asyncio.timeout(self.cfg.timeout_s):
                await node.write_value(ua.DataValue(variant))
        except (*_READ_ERRORS, ValueError) as err:
            st.ack_failures += 1
            self.ctx.metrics.source_errors.labels(self.id, "ack_failed").inc()
            delay = self._retry_later(out.idx, st.ack_failures)
            if st.ack_failures == 1:
                log_event(log, logging.WARNING, "opcua ack write failed (the result is "
                          "stored); writing it again", source=self.id, ack_node=ack.node,
                          # a trigger result starts its chain: correlation id = its id
                          event_id=st.event_id, correlation_id=st.event_id,
                          error=repr(err), retry_in_s=delay)
                self.ctx.set_condition(
                    code, f"trigger {trig.node}: the station waits for its ack (the result "
                    f"raised at {iso_z(out.key)} is kept); writing {ack.node} failed "
                    f"({type(err).__name__}), writing it again with backoff", "warning")
                await self._audit("trigger_ack_failed", reason="write_failed", detail={
                    "trigger": trig.node, "trigger_ts": iso_z(out.key), "ack_node": ack.node,
                    "event_id": st.event_id, "error": repr(err), "retry_in_s": delay})
            return
        st.acked = out.key
        if st.ack_failures:
            log_event(log, logging.INFO, "opcua ack written after failures", source=self.id,
                      ack_node=ack.node, failed=st.ack_failures)
            await self._audit("trigger_acked", reason="after_retries", detail={
                "trigger": trig.node, "trigger_ts": iso_z(out.key), "ack_node": ack.node,
                "event_id": st.event_id, "attempts": st.ack_failures + 1})
            st.ack_failures = 0
        if st.retry is not None and not st.read_failures:
            st.retry.cancel()
            st.retry = None
        self.ctx.set_condition(code, None, "warning")
        if out.quarantine is not None or (out.again and st.outcome == "quarantined"):
            reason = out.quarantine[0] if out.quarantine else st.quarantine_reason
            await self._audit("trigger_quarantined", reason=reason, detail={
                "trigger": trig.node, "trigger_ts": iso_z(out.key),
                "quarantine_reason": reason,
                "detail": out.quarantine[3] if out.quarantine else None, "acked": True})


def _raised_again(batch: list[Any], pos: int, idx: int, when: Any) -> bool:
    """Is a newer raise of trigger ``idx`` queued behind ``batch[pos]`` (a fall, then
    ``when`` again)? Then the values of the raise at ``pos`` are gone already."""
    fell = False
    for item in batch[pos + 1:]:
        if isinstance(item, Gap) and not isinstance(item, _Recheck):
            return False  # a new subscription: its first value need not be a new raise
        if type(item) is not DataChangeEvent:
            continue
        mi = item.data.monitored_item
        if mi.ClientHandle - 1 != idx:
            continue
        if mi.Value.StatusCode is not None and not mi.Value.StatusCode.is_good():
            continue
        if item.value != when:
            fell = True
        elif fell:
            return True
    return False
