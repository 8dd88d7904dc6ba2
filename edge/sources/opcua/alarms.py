"""Alarms & Conditions of the ``opcua`` source: event subscriptions → ``machine.alarm``.

Every ``alarms[]`` entry is one event monitored item (on its ``notifier``, the Server
object by default) in the source's alarm subscription, with an EventFilter:

- select clauses for the standard fields (EventId, EventType, SourceNode, SourceName,
  Time, ReceiveTime, Message, Severity, ConditionName, BranchId, Retain, ActiveState/Id,
  AckedState/Id, ConfirmedState/Id, the ConditionId) plus the entry's ``select`` extras;
- a where clause: the configured event types and their subtypes (EventType InList),
  ``where.min_severity``, ``where.source_names`` — OR the three refresh event types, so a
  ConditionRefresh's bracket always arrives whatever the filter.

Each notification becomes one event (``machine.alarm``) with its severity class (event
class and ``severity_class``); its identity is the EventId (dedupe key
``alarm:<EventId hex>``), so a condition state that arrives twice — live and again from a
refresh — is stored once (the outbox returns the first copy's id).

Gaps: on the first connect, after every reconnect (once asyncua restored or re-created the
subscription), after a re-creation by the stale-subscription watchdog, after a local queue
overflow, and when the server sends RefreshRequired, the source calls ConditionRefresh
(ConditionType i=2782, method i=3875, the subscription id). The server re-sends every
retained condition between a RefreshStartEvent and a RefreshEndEvent: those events carry
``refresh: true``; states already stored are duplicates, not new events. The window of a
connection loss or re-creation is audited ``alarm_gap`` (from, to, what the refresh did),
the refresh ``alarms_refreshed`` (conditions, stored, duplicates). A server that does not
implement ConditionRefresh (BadMethodInvalid, BadNotImplemented, BadNothingToDo …) is
tolerated: logged once, audited ``alarm_refresh_unsupported``, shown as the condition
``alarm_refresh`` in ``/status``; alarm states that changed while the link was down are
then known only from their next change. Other refresh failures are retried with backoff
(``alarm_refresh_failed``).

The alarm queue (``queue_max``) drops its oldest notification when full — never a marker
nor a refresh's start or end — counts it, and once it drained audits ``dropped`` and
refreshes. Three refreshes in a row that overflow it again stop the refreshes after drops
(``alarm_refresh_skipped``, condition ``alarm_queue``) instead of looping.

``Alarms`` is the part of ``OpcUaSource`` that does this (its contract in its docstring).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import OpcEvent, StatusChangeEvent, Subscription
from asyncua.common.ua_utils import get_node_subtypes

from edge.plugin import (
    ComponentContext,
    FatalStartupError,
    Ingest,
    InputError,
    Submission,
    log_event,
    make_event,
    render_template,
    validate_data,
)
from edge.sources.opcua import nodes as opcua_nodes
from edge.sources.opcua.queue import Gap, NotificationQueue
from edge.sources.opcua.values import jsonable
from edge.timefmt import iso_z

if TYPE_CHECKING:
    from edge.sources.opcua.config import AlarmConfig, OpcUaSourceConfig

__all__ = ["Alarms", "event_filter"]

log = logging.getLogger("edge.sources.opcua")

Audit = Callable[..., Awaitable[None]]

_BASE = ua.ObjectIds.BaseEventType
_COND = ua.ObjectIds.ConditionType
_ACK = ua.ObjectIds.AcknowledgeableConditionType
_ALARM = ua.ObjectIds.AlarmConditionType


def _nid(i: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(i))


REFRESH_START = _nid(ua.ObjectIds.RefreshStartEventType)
REFRESH_END = _nid(ua.ObjectIds.RefreshEndEventType)
REFRESH_REQUIRED = _nid(ua.ObjectIds.RefreshRequiredEventType)

# data field, the type that defines it, browse path (None: the ConditionId, AttributeId
# NodeId of the condition itself). The order is the order of the select clauses.
STANDARD: tuple[tuple[str, int, str | None], ...] = (
    ("event_id", _BASE, "EventId"),
    ("event_type", _BASE, "EventType"),
    ("source_node", _BASE, "SourceNode"),
    ("source", _BASE, "SourceName"),
    ("time", _BASE, "Time"),
    ("receive_time", _BASE, "ReceiveTime"),
    ("message", _BASE, "Message"),
    ("severity", _BASE, "Severity"),
    ("condition", _COND, "ConditionName"),
    ("branch_id", _COND, "BranchId"),
    ("retain", _COND, "Retain"),
    ("active", _ALARM, "ActiveState/Id"),
    ("acked", _ACK, "AckedState/Id"),
    ("confirmed", _ACK, "ConfirmedState/Id"),
    ("condition_id", _COND, None),
)
_IDX = {name: i for i, (name, _, _) in enumerate(STANDARD)}

# what a server answers when it has no ConditionRefresh
UNSUPPORTED = frozenset({
    "BadMethodInvalid", "BadNotImplemented", "BadNotSupported", "BadNothingToDo",
    "BadServiceUnsupported", "BadNodeIdUnknown", "BadNodeIdInvalid", "BadNotExecutable"})
_FIRST_RETRY_S = 1.0
_MAX_OVERFLOWING_REFRESHES = 3  # queue_full refreshes in a row that overflow the queue


def _operand(type_id: int | ua.NodeId, path: str | None) -> ua.SimpleAttributeOperand:
    op = ua.SimpleAttributeOperand()
    op.TypeDefinitionId = type_id if isinstance(type_id, ua.NodeId) else _nid(type_id)
    if path is None:
        op.AttributeId = ua.AttributeIds.NodeId
        return op
    op.AttributeId = ua.AttributeIds.Value
    for step in path.split("/"):
        ns, _, name = step.rpartition(":")
        op.BrowsePath.append(ua.QualifiedName(name, int(ns) if ns else 0))
    return op


class _Where:
    """A ContentFilter built bottom-up; element 0 is the root (OPC UA Part 4, 7.7)."""

    def __init__(self) -> None:
        self.elements: list[ua.ContentFilterElement] = [ua.ContentFilterElement()]

    def add(self, op: ua.FilterOperator, *operands: Any) -> int:
        self.elements.append(ua.ContentFilterElement(FilterOperator=op,
                                                     FilterOperands=list(operands)))
        return len(self.elements) - 1

    def root(self, op: ua.FilterOperator, *operands: Any) -> ua.ContentFilter:
        self.elements[0] = ua.ContentFilterElement(FilterOperator=op,
                                                   FilterOperands=list(operands))
        return ua.ContentFilter(Elements=self.elements)


def _ref(index: int) -> ua.ElementOperand:
    return ua.ElementOperand(Index=index)


def _lit(value: Any, vtype: ua.VariantType | None = None) -> ua.LiteralOperand:
    return ua.LiteralOperand(Value=ua.Variant(value, vtype) if vtype else ua.Variant(value))


def event_filter(alarm: AlarmConfig, types: Sequence[ua.NodeId] | None,
                 extras_type: ua.NodeId) -> ua.EventFilter:
    """The EventFilter of one ``alarms[]`` entry. ``types``: the event types to let
    through, subtypes included (None: every type). ``extras_type``: the type the
    ``select`` extras are browsed from."""
    flt = ua.EventFilter()
    flt.SelectClauses = [_operand(t, p) for _, t, p in STANDARD]
    flt.SelectClauses += [_operand(extras_type, p) for p in alarm.select.values()]
    where = _Where()
    etype = _operand(_BASE, "EventType")
    conds: list[int] = []
    if types is not None:
        conds.append(where.add(ua.FilterOperator.InList, etype, *[_lit(t) for t in types]))
    w = alarm.where
    if w is not None and w.min_severity is not None:
        conds.append(where.add(ua.FilterOperator.GreaterThanOrEqual, _operand(_BASE, "Severity"),
                               _lit(w.min_severity, ua.VariantType.UInt16)))
    if w is not None and w.source_names:
        conds.append(where.add(ua.FilterOperator.InList, _operand(_BASE, "SourceName"),
                               *[_lit(n, ua.VariantType.String) for n in w.source_names]))
    if not conds:
        return flt  # no where clause: every event of the notifier
    wanted = conds[0]
    for nxt in conds[1:]:
        wanted = where.add(ua.FilterOperator.And, _ref(wanted), _ref(nxt))
    refresh = where.add(ua.FilterOperator.InList, etype, _lit(REFRESH_START),
                        _lit(REFRESH_END), _lit(REFRESH_REQUIRED))
    flt.WhereClause = where.root(ua.FilterOperator.Or, _ref(wanted), _ref(refresh))
    return flt


def _refresh_bracket(item: Any) -> bool:
    """A RefreshStart/RefreshEnd event: the bracket of a refresh, never dropped."""
    if not isinstance(item, OpcEvent):
        return False
    fields = item.event.event_fields or []
    if len(fields) <= _IDX["event_type"]:
        return False
    return fields[_IDX["event_type"]].Value in (REFRESH_START, REFRESH_END)


class _AlarmQueue(NotificationQueue):
    """The alarm queue: drops the oldest notification when full, but never a marker nor
    a refresh bracket (a refresh that lost its start would not be recognized as one)."""

    def _drop_oldest(self) -> None:
        for i, old in enumerate(self._items):
            if old is not None and not isinstance(old, Gap) and not _refresh_bracket(old):
                del self._items[i]
                self.dropped += 1
                self._on_drop()
                return


class _Refresh(Gap):
    """Marker in the alarm queue: call ConditionRefresh (a ``Gap``: never dropped)."""

    __slots__ = ()


@dataclass(slots=True)
class _Round:
    """One refresh bracket of one monitored item: what it re-sent."""

    why: str
    conditions: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0


def _good(dv: ua.DataValue) -> bool:
    return dv.StatusCode is None or dv.StatusCode.is_good()


def _status(dv: ua.DataValue) -> str:
    return dv.StatusCode.name if dv.StatusCode is not None else "Good"


def _null_id(v: Any) -> bool:
    return isinstance(v, ua.NodeId) and v.is_null()


class Alarms:
    """The alarm subscriptions of one ``opcua`` source (module docstring: what it
    promises). Owned by ``OpcUaSource``.

    The source hands in what it shares: ``connection()`` returns ``(client, resolved)``
    while a session is up, else None; ``ingest`` quarantines; ``submit`` commits and waits
    while the outbox refuses (backpressure); ``audit`` writes an audit row;
    ``status_change`` and ``unknown_item`` report what asyncua put into the queue besides
    events. The source creates the subscription with ``queue`` and calls
    ``subscribe(client, sub)`` (resolves and checks the nodes, creates the items; raises
    ``FatalStartupError`` with located problems), ``connection_lost()`` (from asyncua's
    callback: only records the time) and ``recreated()`` (the alarm subscription was
    re-created), and runs ``loop()`` as a task of its session (returns at once without
    alarms).
    """

    def __init__(
        self,
        cfg: OpcUaSourceConfig,
        ctx: ComponentContext,
        *,
        ingest: Ingest,
        connection: Callable[[], tuple[Client, Any] | None],
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
        m = ctx.metrics
        self._m_dropped = m.source_dropped.labels(cfg.id, "alarm_queue_full")
        self._m_refresh_failed = m.source_errors.labels(cfg.id, "alarm_refresh_failed")
        self.queue = _AlarmQueue(cfg.queue_max, self._dropped)
        self.refresh_enabled = any(a.refresh for a in cfg.alarms)
        self._sub: Subscription | None = None
        self._by_select: dict[int, int] = {}  # id(select clause list) → alarms index
        self._refresh_queued = False
        self._rounds: dict[int, _Round] = {}  # alarms index → open refresh bracket
        self._why = "connected"  # of the refresh called last
        self._gap: tuple[datetime, str] | None = None  # (from, reason) of an open gap
        self._drops = 0  # dropped in the current storm (audited when it is over)
        self._dropped_total = 0
        self._drops_at_refresh = 0  # _dropped_total when the last refresh was called
        self._overflowing_refreshes = 0  # queue_full refreshes in a row that overflowed
        self._refresh_failures = 0
        self._retry: asyncio.TimerHandle | None = None
        self._unsupported: str | None = None  # status of the last unsupported answer

    # ------------------------------------------------------------------ setup

    async def subscribe(self, client: Client, sub: Subscription) -> None:
        """Resolve and check the notifiers and event types, create one event item per
        ``alarms[]`` entry in ``sub`` and ask for the first refresh."""
        cfg = self.cfg
        where = f"sources[{self.id}]"
        refs: dict[str, str] = {}
        for i, a in enumerate(cfg.alarms):
            refs.setdefault(a.notifier, f"{where}.alarms[{i}].notifier")
            for k, t in enumerate(a.event_types):
                refs.setdefault(t, f"{where}.alarms[{i}].event_types[{k}]")
        issues: list[str] = []
        ids = await opcua_nodes._node_ids(client, refs, issues, cfg.timeout_s)
        await self._check(client, ids, refs, issues)
        if issues:
            raise FatalStartupError("; ".join(issues))
        requests = []
        self._by_select.clear()  # a new session: new filters
        for i, a in enumerate(cfg.alarms):
            types = [ids[t] for t in a.event_types]
            wanted = await self._subtypes(client, types)
            flt = event_filter(a, wanted, types[0])
            self._by_select[id(flt.SelectClauses)] = i
            params = ua.MonitoringParameters(ClientHandle=i + 1, SamplingInterval=0,
                                             QueueSize=a.queue_size, DiscardOldest=True,
                                             Filter=flt)
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor = ua.ReadValueId(NodeId=ids[a.notifier],
                                               AttributeId=ua.AttributeIds.EventNotifier)
            req.MonitoringMode = ua.MonitoringMode.Reporting
            req.RequestedParameters = params
            requests.append(req)
        async with asyncio.timeout(cfg.timeout_s * 3):
            results = await sub.create_monitored_items(requests)
        for i, res in enumerate(results):
            if isinstance(res, ua.StatusCode):
                issues.append(f"{where}.alarms[{i}]: the server refused the event item: "
                              f"{res.name}")
        if issues:
            raise FatalStartupError("; ".join(issues))
        self._sub = sub
        self._watch(sub)
        self.request_refresh("connected")

    async def _check(self, client: Client, ids: dict[str, ua.NodeId], refs: dict[str, str],
                     issues: list[str]) -> None:
        """Notifiers must produce events; event types must be ObjectTypes."""
        items = list(ids.items())
        params = ua.ReadParameters()
        for _, nid in items:
            params.NodesToRead.append(ua.ReadValueId(NodeId=nid,
                                                     AttributeId=ua.AttributeIds.NodeClass))
            params.NodesToRead.append(ua.ReadValueId(
                NodeId=nid, AttributeId=ua.AttributeIds.EventNotifier))
        async with asyncio.timeout(self.cfg.timeout_s):
            values = await client.uaclient.read(params) if items else []
        notifiers = {a.notifier for a in self.cfg.alarms}
        for k, (ref, _) in enumerate(items):
            nc, notifier = values[2 * k], values[2 * k + 1]
            loc = refs[ref]
            if not _good(nc) or nc.Value is None:
                issues.append(f"{loc}: {_status(nc)} ({ref})")
                continue
            node_class = ua.NodeClass(int(nc.Value.Value))
            if ref in notifiers and ".notifier" in loc:
                bits = int(notifier.Value.Value) if _good(notifier) and \
                    notifier.Value is not None and notifier.Value.Value is not None else 0
                if not bits & (1 << int(ua.EventNotifier.SubscribeToEvents)):
                    issues.append(f"{loc}: {ref} ({node_class.name}) does not produce events "
                                  "(its EventNotifier lacks SubscribeToEvents); the Server "
                                  "object i=2253 does")
            elif node_class != ua.NodeClass.ObjectType:
                issues.append(f"{loc}: {ref} is a {node_class.name}, not an event type "
                              "(an ObjectType such as i=2915 AlarmConditionType)")

    async def _subtypes(self, client: Client, types: list[ua.NodeId]) -> list[ua.NodeId] | None:
        """The types and all their subtypes (None for BaseEventType: every event)."""
        if any(t == _nid(_BASE) for t in types):
            return None
        found: dict[ua.NodeId, None] = {}
        async with asyncio.timeout(self.cfg.timeout_s * 3):
            for t in types:
                for node in await get_node_subtypes(client.get_node(t)):
                    found[node.nodeid] = None
        return list(found)

    def _watch(self, sub: Subscription) -> None:
        """After asyncua restored (transfer) or re-created the subscription, refresh."""
        if getattr(sub, "_edge_alarms_watched", False):
            return
        restore, recreate = sub.restore, sub.recreate

        async def restored() -> None:
            try:
                await restore()
            finally:
                self.request_refresh("reconnected")

        async def recreated() -> None:
            try:
                await recreate()
            finally:
                self.request_refresh("subscription_recreated")

        sub.restore = restored  # type: ignore[method-assign]
        sub.recreate = recreated  # type: ignore[method-assign]
        sub._edge_alarms_watched = True  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ signals

    def connection_lost(self) -> None:
        """The link went down (asyncua's callback): the alarm gap starts now; a refresh
        in progress will not end (its RefreshEnd is lost)."""
        if self._gap is None:
            self._gap = (datetime.now(UTC), "connection_lost")
        if self.cfg.alarms:
            self.queue.put_nowait(Gap("lost"))

    def recreated(self) -> None:
        """The alarm subscription was re-created (server restart, stale subscription)."""
        if self._gap is None:
            self._gap = (datetime.now(UTC), "subscription_recreated")
        if self.cfg.alarms:
            self.queue.put_nowait(Gap("recreated"))

    def request_refresh(self, why: str) -> None:
        """Schedule a ConditionRefresh, in order with the notifications; one pending
        request covers any number. Never blocks (asyncua callbacks call it)."""
        if not self.cfg.alarms or self._refresh_queued:
            return
        self._refresh_queued = True
        self.queue.put_nowait(_Refresh(why))

    def _dropped(self) -> None:
        """The alarm queue dropped its oldest notification (inside asyncua's publish
        callback): count it; once the storm is over (``loop``) a refresh brings the
        current states back."""
        self._m_dropped.inc()
        if self._drops == 0:
            log_event(log, logging.WARNING, "opcua alarm queue full; dropping the oldest "
                      "notifications, refreshing the conditions when it drained",
                      source=self.id, queue_max=self.queue.maxsize)
            if self._gap is None:
                self._gap = (datetime.now(UTC), "queue_full")
        self._drops += 1
        self._dropped_total += 1

    async def _storm_over(self) -> None:
        """The queue drained after drops: audit them, and refresh — unless the last
        refreshes themselves overflowed the queue (more retained conditions than
        ``queue_max``): then say so instead of refreshing in a loop."""
        await self._audit("dropped", reason="alarm_queue_full",
                          detail={"count": self._drops, "queue_max": self.queue.maxsize})
        self._drops = 0
        if self._overflowing_refreshes >= _MAX_OVERFLOWING_REFRESHES:
            if self._overflowing_refreshes == _MAX_OVERFLOWING_REFRESHES:
                self._overflowing_refreshes += 1  # said once
                log_event(log, logging.ERROR, "opcua alarm refresh overflows the alarm "
                          "queue; not refreshing after drops (raise queue_max)",
                          source=self.id, queue_max=self.queue.maxsize)
                await self._audit("alarm_refresh_skipped", reason="queue_too_small",
                                  detail={"queue_max": self.queue.maxsize})
                self.ctx.set_condition(
                    "alarm_queue", f"a ConditionRefresh re-sends more alarms than the alarm "
                    f"queue holds (queue_max {self.queue.maxsize}): raise queue_max",
                    "critical")
            return
        self.request_refresh("queue_full")

    # ------------------------------------------------------------------ the task

    async def loop(self) -> None:
        """Take notifications in order: map, commit (a batch at a time), refresh."""
        if not self.cfg.alarms:
            return
        pending: list[tuple[int, bool, Submission]] = []
        while True:
            batch = await self.queue.get_batch(256)
            for item in batch:
                if isinstance(item, OpcEvent):
                    await self._take(item, pending)
                elif isinstance(item, _Refresh):
                    await self._flush(pending)
                    self._refresh_queued = False
                    await self._refresh(item.reason)
                elif isinstance(item, Gap):  # lost / recreated: open brackets never end
                    await self._flush(pending)
                    self._rounds.clear()
                elif isinstance(item, StatusChangeEvent):
                    self._status_change("alarms", item)
                elif item is not None:
                    self._unknown_item("alarms", item)
            await self._flush(pending)
            if self._drops and self.queue.qsize() < self.queue.maxsize // 2:
                await self._storm_over()

    async def _take(self, item: OpcEvent, pending: list[tuple[int, bool, Submission]]) -> None:
        ev = item.event
        idx = self._by_select.get(id(ev.select_clauses))
        fields = ev.event_fields or []
        if idx is None or len(fields) < len(STANDARD):
            self._unknown_item("alarms", item)
            return
        values = [f.Value for f in fields]
        etype = values[_IDX["event_type"]]
        if etype == REFRESH_START:
            await self._flush(pending)
            self._rounds[idx] = _Round(self._why)
            return
        if etype == REFRESH_END:
            await self._flush(pending)
            await self._end_round(idx)
            return
        if etype == REFRESH_REQUIRED:
            self.request_refresh("refresh_required")
            return
        refresh = idx in self._rounds
        try:
            sub = self._event(idx, values, refresh)
        except InputError as err:
            await self._flush(pending)
            await self._quarantine(idx, values, err, refresh)
            return
        pending.append((idx, refresh, sub))

    def _event(self, idx: int, values: list[Any], refresh: bool) -> Submission:
        """One notification → Submission; raises InputError (→ quarantine)."""
        a = self.cfg.alarms[idx]
        raw_id = values[_IDX["event_id"]]
        if not isinstance(raw_id, (bytes, bytearray)) or not raw_id:
            raise InputError("invalid_data", f"{a.event}: an event without an EventId")
        event_id = bytes(raw_id).hex()
        data: dict[str, Any] = {}
        for name, _, _ in STANDARD:
            v = values[_IDX[name]]
            if v is None or _null_id(v) or name == "receive_time":
                continue
            data[name] = jsonable(v)
        data["event_id"] = event_id
        for name, field in zip(a.select, values[len(STANDARD):], strict=False):
            if field is not None:
                data[name] = jsonable(field)
        severity = values[_IDX["severity"]]
        band = a.severity_class(severity) if isinstance(severity, int) and \
            not isinstance(severity, bool) else None
        if band is not None:
            data["severity_class"] = band.label
        if refresh:
            data["refresh"] = True
        for k, v in a.static.items():
            data.setdefault(k, v)
        data = validate_data(a.event, data)
        key = None
        if a.ordering_key:
            key = render_template(a.ordering_key, {"site": self.ctx.site, **data, "data": data})
        when = values[_IDX["time"]] or values[_IDX["receive_time"]]
        event = make_event(type=a.event, site=self.ctx.site, source=self.id, data=data,
                           ordering_key=key,
                           event_class=band.event_class if band is not None else None,
                           source_ts=when if isinstance(when, datetime) else None)
        return Submission(event, f"alarm:{event_id}")

    async def _flush(self, pending: list[tuple[int, bool, Submission]]) -> None:
        """Commit what was mapped (in order); count what refreshes re-sent."""
        if not pending:
            return
        items = list(pending)
        pending.clear()
        ids = await self._submit([s for _, _, s in items])
        for (idx, refresh, sub), got in zip(items, ids, strict=True):
            rnd = self._rounds.get(idx) if refresh else None
            if rnd is None:
                continue
            rnd.conditions += 1
            if got == sub.event.id:
                rnd.stored += 1
            else:
                rnd.duplicates += 1

    async def _quarantine(self, idx: int, values: list[Any], err: InputError,
                          refresh: bool) -> None:
        raw = orjson.dumps({name: jsonable(values[i]) for i, (name, _, _) in
                            enumerate(STANDARD)}, default=str)
        await self._ingest.quarantine(self.id, err.reason, raw,
                                      {"alarm": idx, "notifier": self.cfg.alarms[idx].notifier},
                                      err.detail)
        rnd = self._rounds.get(idx) if refresh else None
        if rnd is not None:
            rnd.conditions += 1
            rnd.quarantined += 1

    async def _end_round(self, idx: int) -> None:
        rnd = self._rounds.pop(idx, None)
        if rnd is None:
            return
        if not self._rounds:  # the refresh is complete (every item's bracket closed)
            overflowed = self._dropped_total > self._drops_at_refresh
            if overflowed and rnd.why == "queue_full":
                self._overflowing_refreshes += 1
            elif not overflowed:
                if self._overflowing_refreshes > _MAX_OVERFLOWING_REFRESHES:
                    self.ctx.set_condition("alarm_queue", None, "critical")
                self._overflowing_refreshes = 0
        detail = {"alarms": idx, "notifier": self.cfg.alarms[idx].notifier,
                  "conditions": rnd.conditions, "stored": rnd.stored,
                  "duplicates": rnd.duplicates, "quarantined": rnd.quarantined}
        log_event(log, logging.INFO, "opcua alarm conditions refreshed", source=self.id,
                  why=rnd.why, **detail)
        await self._audit("alarms_refreshed", reason=rnd.why, detail=detail)

    # ------------------------------------------------------------------ refresh

    async def _refresh(self, why: str) -> None:
        """Call ConditionRefresh for the alarm subscription (see module docstring)."""
        conn = self._connection()
        sub = self._sub
        if conn is None or sub is None or sub.subscription_id is None \
                or conn[0].uaclient.state is not UaClientState.CONNECTED:
            return  # the link is down: the restore after the reconnect asks again
        gap, self._gap = self._gap, None
        if not self.refresh_enabled:
            if gap is not None:
                await self._audit_gap(gap, "off")
            return
        self._why = why
        self._drops_at_refresh = self._dropped_total
        client = conn[0]
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                await client.get_node(_nid(_COND)).call_method(
                    _nid(ua.ObjectIds.ConditionType_ConditionRefresh),
                    ua.Variant(sub.subscription_id, ua.VariantType.UInt32))
        except ua.UaStatusCodeError as err:
            name = ua.StatusCode(err.code).name
            if name in UNSUPPORTED:
                await self._not_supported(name, gap)
                return
            await self._refresh_failed(why, f"{name}", gap)
            return
        except (OSError, TimeoutError, ConnectionError, ua.UaError) as err:
            await self._refresh_failed(why, repr(err), gap)
            return
        if self._refresh_failures or self._unsupported:
            self.ctx.set_condition("alarm_refresh", None, "warning")
            log_event(log, logging.INFO, "opcua ConditionRefresh works again", source=self.id)
        self._refresh_failures = 0
        self._unsupported = None
        if gap is not None:
            await self._audit_gap(gap, "requested")

    async def _audit_gap(self, gap: tuple[datetime, str], refresh: str) -> None:
        start, reason = gap
        await self._audit("alarm_gap", reason=reason, detail={
            "from": iso_z(start), "to": iso_z(datetime.now(UTC)), "refresh": refresh})

    async def _not_supported(self, status: str, gap: tuple[datetime, str] | None) -> None:
        if gap is not None:
            await self._audit_gap(gap, "unsupported")
        if self._unsupported == status:
            return
        self._unsupported = status
        log_event(log, logging.WARNING, "opcua server does not support ConditionRefresh; "
                  "alarm states that changed while disconnected arrive with their next "
                  "change", source=self.id, status=status)
        await self._audit("alarm_refresh_unsupported", reason=status,
                          detail={"endpoint": self.cfg.endpoint})
        self.ctx.set_condition(
            "alarm_refresh", f"the server does not support ConditionRefresh ({status}): "
            "alarm states that changed while disconnected are not re-sent", "warning")

    async def _refresh_failed(self, why: str, error: str,
                              gap: tuple[datetime, str] | None) -> None:
        self._m_refresh_failed.inc()
        self._refresh_failures += 1
        if gap is not None:
            self._gap = gap  # still open: audited when a refresh gets through
        delay = min(_FIRST_RETRY_S * 2 ** min(self._refresh_failures - 1, 16),
                    max(_FIRST_RETRY_S, self.cfg.reconnect_max_s))
        if self._refresh_failures == 1:
            log_event(log, logging.WARNING, "opcua ConditionRefresh failed; retrying",
                      source=self.id, why=why, error=error, retry_s=delay)
            await self._audit("alarm_refresh_failed", reason=why,
                              detail={"error": error, "retry_s": delay})
            self.ctx.set_condition("alarm_refresh", f"ConditionRefresh failed ({error}); "
                                   "retrying", "warning")
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(delay, self.request_refresh, why)
