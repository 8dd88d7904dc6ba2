"""The running ``opcua`` source (imported by the factory; imports asyncua).

Data path::

    asyncua publish loop ──► NotificationQueue (bounded, drop-oldest, counted)
        monitored subscription ──► drain task: map → Submission batch → ingest.submit
        trigger subscription   ──► trigger task: edge detect → ONE Read → map ──►
                                   bounded queue (blocking) ──► submit → optional ack write
        alarm subscription     ──► alarm task: map → submit; ConditionRefresh after gaps

The source owns three parts, each a small object with its contract in its docstring:
``self.triggers`` (``Triggers``: edge detection, the group Read, commit, ack),
``self.backfill`` (``Backfill``: gaps, HistoryRead, the order of live and backfilled
values, watermarks) and ``self.alarms`` (``Alarms``: event subscriptions, ConditionRefresh
after a gap). It hands them what they share (the client, the ordered commit path,
the audit call); they never reach into the source.

Why these queues: asyncua's handler mode spawns a task per notification and its iterator
mode drops the oldest notification silently. The source creates iterator-mode
subscriptions and gives them its own ``NotificationQueue`` (the one place where asyncua
internals are touched: ``Subscription._event_queue``, checked at start). Its ``put_nowait``
never blocks asyncua's publish loop (which also carries keep-alives, so blocking it would
make the stale-subscription watchdog recreate the subscription); when the queue is full
the OLDEST notification is dropped, counted in ``edge_source_dropped_total{reason=
"queue_full"}`` and logged once per storm — the freshest values survive, and where the
node historizes, the gap markers (below) are never dropped. Trigger results are never
dropped after their Read: they wait in a bounded queue (backpressure).

Gaps: a connection loss (``connection_lost_callback``) and every subscription re-creation
(observer ``RECREATED``) are written to the audit trail and counted in
``edge_source_gaps_total``. A re-creation puts a marker into the monitored queue, so the
drain task knows exactly which samples came before it; the first live sample of each node
after the marker ends that node's gap, and where the node historizes the gap is read back
with HistoryRead (events marked ``backfilled``, counted in ``edge_source_backfilled_total``).
The dedupe key ``<node>@<source timestamp>#<digest of value and status>`` (``sample_key``)
makes overlaps between live and backfilled samples duplicates, never second events, while
two values (or a new status) in one clock tick stay two events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent, Subscription
from asyncua.observer import Observer, SubscriptionEvent

from edge.plugin import (
    ComponentContext,
    FatalStartupError,
    Ingest,
    InputError,
    Mapper,
    OutboxClosedError,
    OutboxFullError,
    RetryableStartupError,
    Submission,
    log_event,
)
from edge.sources.opcua import client as opcua_client
from edge.sources.opcua import nodes as opcua_nodes
from edge.sources.opcua import security as opcua_security
from edge.sources.opcua.alarms import Alarms
from edge.sources.opcua.backfill import Backfill, Watermarks
from edge.sources.opcua.config import OpcUaSourceConfig
from edge.sources.opcua.queue import Gap, NotificationQueue
from edge.sources.opcua.triggers import Triggers
from edge.sources.opcua.values import OVERFLOW_BITS, jsonable, sample_key, source_ts, status_name
from edge.timefmt import iso_z

__all__ = ["OpcUaSource"]

log = logging.getLogger("edge.sources.opcua")


# what asyncua's publish loop fails with when the server went away or is going away
_SERVER_GONE = (ConnectionError, OSError, TimeoutError, ua.uaerrors.BadSessionClosed,
                ua.uaerrors.BadShutdown, ua.uaerrors.BadServerHalted)


class _OutageNoise(logging.Filter):
    """Drop asyncua records that only repeat what the source already logged once.

    While a server is down asyncua logs a traceback every second from its publish loop
    (``Publish iteration crashed`` with a ConnectionError, or the status a server answers
    while it shuts down: ``BadSessionClosed`` from a server stopped cleanly) and a warning
    per reconnect attempt; the source logs ``connection lost`` / ``reconnected`` instead.
    Other asyncua records (a protocol error, a security error on reconnect) stay visible.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("Publish iteration crashed"):
            exc = record.exc_info[1] if record.exc_info else None
            return not isinstance(exc, _SERVER_GONE)
        return not msg.startswith(("Reconnect attempt failed", "Requested session timeout"))


def _tame_asyncua() -> None:
    for name in ("asyncua.client.ua_session.UaSession", "asyncua.client.client"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OutageNoise) for f in logger.filters):
            logger.addFilter(_OutageNoise())


_tame_asyncua()

_CHUNK = 256  # notifications mapped between two yields to the event loop


class _Observer(Observer):
    """asyncua → source signals; called synchronously inside asyncua: only enqueue."""

    def __init__(self, source: OpcUaSource) -> None:
        self._source = source

    def observe_request(self, request: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # no per-request timing on the hot path

    def on_state_change(self, state: UaClientState) -> None:
        self._source._on_state(state)

    def on_subscription_event(self, subscription_id: int | None, event: SubscriptionEvent
                              ) -> None:
        self._source._on_subscription_event(subscription_id, event)


class OpcUaSource:
    """One OPC UA server connection: monitored items and triggers → events.

    ``run()`` connects (security checked first), resolves and checks every node, creates
    the subscriptions and serves until cancelled; asyncua reconnects by itself after
    that. Raises ``FatalStartupError`` for configuration problems found on the server
    (located), ``RetryableStartupError`` when the server cannot be reached.
    """

    def __init__(self, cfg: OpcUaSourceConfig, ctx: ComponentContext) -> None:
        if ctx.ingest is None:
            raise FatalStartupError(f"source {cfg.id}: no ingest (not started by a gateway)")
        self.id = cfg.id
        self.cfg = cfg
        self.ctx = ctx
        self.ingest: Ingest = ctx.ingest
        m = ctx.metrics
        self._m_dropped_queue = m.source_dropped.labels(cfg.id, "queue_full")
        self._m_dropped_server = m.source_dropped.labels(cfg.id, "server_queue_overflow")
        self._m_gaps = m.source_gaps.labels(cfg.id)
        self._mon_mappers = [Mapper(i.mapping(), site=ctx.site, source=cfg.id)
                             for i in cfg.monitored]
        self._mon_q = NotificationQueue(cfg.queue_max, self._dropped_notification)
        # The ordered commit path of the monitored items: the drain task and the backfill
        # put mapped chunks in (through ``Backfill.put_ordered``), the commit task drains it.
        self._mapped: asyncio.Queue[tuple[list[Submission], list[tuple[int, datetime]]]] = \
            asyncio.Queue(maxsize=max(2, 2 * cfg.max_batch // _CHUNK))
        self._ctl: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(maxsize=1000)
        self._client: Client | None = None
        self._resolved: opcua_nodes.Resolved | None = None
        self._mon_sub: Subscription | None = None
        self._trig_sub: Subscription | None = None
        self._pending_audits: list[tuple[str, str | None, dict[str, Any]]] = []
        self._storm_dropped = 0
        self._overflow_logged = 0.0
        self._lost_at: float | None = None
        self._failure_reason: str | None = None  # last reconnect failure reported
        self._connected = False  # as last told to ctx.set_connected
        self._last_error: str | None = None  # why not connected now (status())
        self._unknown_kinds: set[str] = set()
        self._loss_epoch = 0
        self._sub_epoch = {"monitored": 0, "triggers": 0, "alarms": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.triggers = Triggers(
            cfg, ctx, ingest=self.ingest, connection=self._connection, submit=self._submit,
            audit=self._audit, status_change=self._status_change,
            unknown_item=self._unknown_item)
        self.alarms = Alarms(
            cfg, ctx, ingest=self.ingest, connection=self._connection, submit=self._submit,
            audit=self._audit, status_change=self._status_change,
            unknown_item=self._unknown_item)
        self._alarm_sub: Subscription | None = None
        self.backfill = Backfill(
            cfg, ctx, connection=self._connection, queue=self._mon_q, mapped=self._mapped,
            sample=self._sample, quarantine=self._quarantine_sample, audit=self._audit,
            note_audit=self._note_audit,
            watermarks=Watermarks(
                Path(ctx.state_dir) / "opcua" / f"{cfg.id}.watermarks.json", cfg.endpoint))

    def status(self) -> dict[str, Any]:
        """What the source is doing, for the demo and for operators (JSON-friendly):
        ``connected``; ``endpoint``; ``last_error`` (why it is not connected: the failed
        start or the last reconnect failure; None while connected); ``open_gaps`` (node →
        gap start, for gaps open, waiting or being read back); ``backfill_running``
        (nodes being read back now); ``monitored`` and ``triggers`` (configured items);
        ``historizing`` (monitored items whose gaps are read back)."""
        return {
            "connected": self._connected,
            "endpoint": self.cfg.endpoint,
            "last_error": self._last_error,
            "open_gaps": self.backfill.open_gaps(),
            "backfill_running": self.backfill.running(),
            "monitored": len(self.cfg.monitored),
            "triggers": len(self.cfg.triggers),
            "historizing": sum(self.backfill.history),
        }

    def _connection(self) -> tuple[Client, opcua_nodes.Resolved] | None:
        """The session's client and resolved nodes; None while not connected."""
        if self._client is None or self._resolved is None:
            return None
        return self._client, self._resolved

    def _note_audit(self, state: str, reason: str | None, detail: dict[str, Any]) -> None:
        """Queue an audit row for the drain task to write between two batches (for code
        that must not await: asyncua callbacks, the middle of a batch)."""
        self._pending_audits.append((state, reason, detail))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self._session()
        except (RetryableStartupError, FatalStartupError) as err:
            self._last_error = str(err)
            raise

    async def _session(self) -> None:
        """One client session: connect, check the nodes, subscribe, serve until cancelled
        (asyncua reconnects inside it)."""
        cfg = self.cfg
        opcua_client.check_internals()
        client = opcua_client.GatewayClient(
            cfg.endpoint, timeout=cfg.timeout_s, watchdog_intervall=cfg.watchdog_s,
            auto_reconnect=True, reconnect_max_delay=cfg.reconnect_max_s,
            attempt_timeout_s=min(cfg.connect_timeout_s, cfg.timeout_s),
            on_attempt_failed=self._reconnect_failed)
        client.name = f"edge-gateway {self.ctx.site}/{cfg.id}"
        client.description = client.name
        client.product_uri = "urn:edge-gateway"
        warnings = opcua_security.security_warnings(cfg)
        for warning in warnings:
            log_event(log, logging.WARNING, "opcua security warning", source=self.id,
                      warning=warning)
        self.ctx.set_condition("security", "; ".join(warnings) or None, "warning")
        security = await opcua_security.configure(client, cfg)
        client.uaclient.observer = _Observer(self)
        client.connection_lost_callback = self._on_connection_lost
        await self._connect(client)
        self._client = client
        try:
            try:
                self._resolved = await opcua_nodes.resolve(client, self.id, cfg, cfg.timeout_s)
                await self._subscribe(client, self._resolved)
            except (OSError, TimeoutError, ConnectionError, ua.UaError) as err:
                raise RetryableStartupError(
                    f"{cfg.endpoint}: failed while checking nodes and subscribing: {err!r}"
                ) from err
            self._set_connected(True)
            self.triggers.recheck("connected")
            log_event(log, logging.INFO, "opcua connected", source=self.id,
                      endpoint=cfg.endpoint, security=security,
                      monitored=len(cfg.monitored), historizing=sum(self.backfill.history),
                      triggers=len(cfg.triggers), alarms=len(cfg.alarms))
            await _run_all([
                self._drain_monitored(), self._commit_monitored(), self.triggers.read_loop(),
                self.triggers.commit_loop(), self.alarms.loop(),
                self._control(), self.backfill.loop(), self.backfill.flush_loop(),
            ])
        finally:
            self._set_connected(False)
            client.connection_lost_callback = None
            await self._close(client)

    async def _connect(self, client: Client) -> None:
        """Connect; every failure is classified with what the operator can do about it.

        A server that does not (yet) trust the gateway's certificate is retried, not fatal:
        the usual onboarding is that the first attempt lands the certificate in the
        server's "rejected" folder and an administrator then trusts it.
        """
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.timeout_s * 2):
                await client.connect()
        except (ua.uaerrors.BadUserAccessDenied, ua.uaerrors.BadIdentityTokenInvalid,
                ua.uaerrors.BadIdentityTokenRejected) as err:
            raise RetryableStartupError(
                f"{cfg.endpoint} refused the login of {cfg.username or 'anonymous'}: "
                f"{type(err).__name__}") from err
        except (ConnectionRefusedError, socket.gaierror) as err:
            raise RetryableStartupError(f"cannot connect to {cfg.endpoint}: {err!r}") from err
        except Exception as err:  # noqa: BLE001 - asyncua raises anything here (even
            # AssertionError when a server drops an untrusted client's channel)
            if not cfg.security.enabled:
                raise RetryableStartupError(
                    f"cannot connect to {cfg.endpoint}: {err!r}") from err
            raise RetryableStartupError(
                f"cannot open a {cfg.security.policy}/{cfg.security.mode} channel to "
                f"{cfg.endpoint} ({type(err).__name__}: {err}); if the server does not trust "
                f"the gateway yet, trust its certificate {self._client_thumbprint()} on the "
                "server (often waiting in the server's rejected-certificates folder)"
            ) from err

    def _client_thumbprint(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding

        path = self.cfg.security.cert_file
        try:
            cert = opcua_security.load_certificate(path or "")
        except FatalStartupError:
            return f"({path})"
        return f"{path} (thumbprint {opcua_security.thumbprint(cert.public_bytes(Encoding.DER))})"

    async def _close(self, client: Client) -> None:
        with contextlib.suppress(Exception):
            await self.backfill.watermarks.save()
        try:
            async with asyncio.timeout(self.cfg.timeout_s + 1):
                await client.disconnect()
        except (Exception, TimeoutError) as err:  # noqa: BLE001 - best effort on the way out
            log_event(log, logging.DEBUG, "opcua disconnect incomplete", source=self.id,
                      error=repr(err))
            client.disconnect_socket()
        self._client = None

    def _set_connected(self, up: bool) -> None:
        self._connected = up
        if up:
            self._last_error = None
        self.ctx.set_connected(up)

    # ------------------------------------------------------------------ subscriptions

    async def _new_subscription(self, client: Client, publishing_ms: float,
                                queue: NotificationQueue) -> Subscription:
        cfg = self.cfg
        keepalive = max(1, math.ceil(cfg.keepalive_s * 1000 / publishing_ms))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = publishing_ms
        params.RequestedMaxKeepAliveCount = keepalive
        # Lifetime ≥ 3 keep-alives (spec) and ≥ 60 s, so a short outage can resume the
        # session and transfer the subscription (no gap) instead of recreating it.
        params.RequestedLifetimeCount = max(3 * keepalive, math.ceil(60_000 / publishing_ms))
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        async with asyncio.timeout(cfg.timeout_s):
            sub = await client.create_subscription(params, None, queue_maxsize=1)
        if not hasattr(sub, "_event_queue"):
            raise FatalStartupError("this asyncua version is not supported (no event queue)")
        sub._event_queue = queue  # type: ignore[assignment]  # see module docstring
        opcua_client.bound_republish(sub)
        return sub

    async def _subscribe(self, client: Client, resolved: opcua_nodes.Resolved) -> None:
        cfg = self.cfg
        where = f"sources[{self.id}]"
        issues: list[str] = []
        if cfg.monitored:
            self.backfill.start([cfg.backfill.enabled and m.backfill
                                 and resolved[m.node].historizes for m in cfg.monitored])
            self._mon_sub = await self._new_subscription(client, cfg.publishing_ms, self._mon_q)
            requests = [self._item_request(i + 1, resolved[m.node].node_id, m.sampling_ms,
                                           m.queue_size, m.deadband)
                        for i, m in enumerate(cfg.monitored)]
            await self._create_items(self._mon_sub, requests, f"{where}.monitored", issues)
        if cfg.triggers:
            publishing = min(t.sampling_ms for t in cfg.triggers) or 100
            self._trig_sub = await self._new_subscription(client, max(publishing, 50),
                                                           self.triggers.queue)
            requests = [self._item_request(i + 1, resolved[t.node].node_id, t.sampling_ms,
                                           t.queue_size, None)
                        for i, t in enumerate(cfg.triggers)]
            await self._create_items(self._trig_sub, requests, f"{where}.triggers", issues)
        if issues:
            raise FatalStartupError("; ".join(issues))
        if cfg.alarms:
            self._alarm_sub = await self._new_subscription(client, cfg.publishing_ms,
                                                            self.alarms.queue)
            await self.alarms.subscribe(client, self._alarm_sub)

    @staticmethod
    def _item_request(handle: int, node_id: ua.NodeId, sampling_ms: float, queue_size: int,
                      deadband: Any) -> ua.MonitoredItemCreateRequest:
        params = ua.MonitoringParameters()
        params.ClientHandle = handle  # = config index + 1; kept by asyncua on re-creation
        params.SamplingInterval = sampling_ms
        params.QueueSize = queue_size
        params.DiscardOldest = True
        if deadband is not None:
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            if deadband.absolute is not None:
                flt.DeadbandType = ua.DeadbandType.Absolute
                flt.DeadbandValue = deadband.absolute
            else:
                flt.DeadbandType = ua.DeadbandType.Percent
                flt.DeadbandValue = deadband.percent
            params.Filter = flt
        req = ua.MonitoredItemCreateRequest()
        req.ItemToMonitor = ua.ReadValueId(NodeId=node_id, AttributeId=ua.AttributeIds.Value)
        req.MonitoringMode = ua.MonitoringMode.Reporting
        req.RequestedParameters = params
        return req

    async def _create_items(self, sub: Subscription, requests: list[ua.MonitoredItemCreateRequest],
                            where: str, issues: list[str]) -> None:
        for start in range(0, len(requests), opcua_nodes.CHUNK):
            chunk = requests[start:start + opcua_nodes.CHUNK]
            async with asyncio.timeout(self.cfg.timeout_s * 3):
                results = await sub.create_monitored_items(chunk)
            for k, res in enumerate(results):
                if isinstance(res, ua.StatusCode):
                    issues.append(f"{where}[{start + k}]: the server refused the monitored "
                                  f"item: {res.name}")

    # ------------------------------------------------------------------ asyncua signals

    def _on_state(self, state: UaClientState) -> None:
        if state is UaClientState.CONNECTED:
            self._ctl_put(("connected",))
        elif state in (UaClientState.RECONNECTING, UaClientState.DISCONNECTED):
            self._set_connected(False)

    def _on_subscription_event(self, sid: int | None, event: SubscriptionEvent) -> None:
        if event is not SubscriptionEvent.RECREATED:
            return
        if self._mon_sub is not None and sid == self._mon_sub.subscription_id:
            self._mon_q.put_nowait(Gap("recreated"))
            self._ctl_put(("recreated", "monitored"))
        elif self._trig_sub is not None and sid == self._trig_sub.subscription_id:
            self.triggers.queue.put_nowait(Gap("recreated"))
            self._ctl_put(("recreated", "triggers"))
        elif self._alarm_sub is not None and sid == self._alarm_sub.subscription_id:
            self.alarms.recreated()  # the refresh follows once its items are back
            self._ctl_put(("recreated", "alarms"))

    async def _on_connection_lost(self, exc: Exception) -> None:
        # asyncua awaits this before reconnecting: only record and return.
        self._set_connected(False)
        self._last_error = f"connection lost: {exc!r}"
        self.alarms.connection_lost()
        self._ctl_put(("lost", exc))

    def _reconnect_failed(self, exc: BaseException) -> None:
        """A reconnect attempt failed (called by the client's reconnect loop): log the
        reason once per change, show it in ``/status`` until the source is back."""
        reason, severity = opcua_client.describe_failure(exc, self.cfg)
        self._last_error = reason
        if reason == self._failure_reason:
            return
        self._failure_reason = reason
        log_event(log, logging.ERROR if severity == "critical" else logging.WARNING,
                  "opcua reconnect failing", source=self.id, endpoint=self.cfg.endpoint,
                  reason=reason)
        self.ctx.set_condition("reconnect", f"cannot reconnect to {self.cfg.endpoint}: "
                               f"{reason}", severity)

    def _ctl_put(self, item: tuple[Any, ...]) -> None:
        try:
            self._ctl.put_nowait(item)
        except asyncio.QueueFull:
            log_event(log, logging.ERROR, "opcua control queue full; state change not recorded",
                      source=self.id, change=item[0])

    async def _control(self) -> None:
        """Log, audit and count connection state changes (one line each)."""
        while True:
            kind, *args = await self._ctl.get()
            if kind == "lost":
                self._lost_at = time.monotonic()
                self._loss_epoch += 1
                self._m_gaps.inc()
                log_event(log, logging.WARNING, "opcua connection lost; reconnecting",
                          source=self.id, endpoint=self.cfg.endpoint, error=repr(args[0]))
                await self._audit("gap", reason="connection_lost",
                                  detail={"endpoint": self.cfg.endpoint, "error": repr(args[0])})
            elif kind == "connected" and self._lost_at is not None:
                down = round(time.monotonic() - self._lost_at, 1)
                self._lost_at = None
                self._set_connected(True)
                self._failure_reason = None
                self.ctx.set_condition("reconnect", None, "warning")
                log_event(log, logging.INFO, "opcua reconnected", source=self.id,
                          endpoint=self.cfg.endpoint, down_s=down)
                await self._audit("reconnected", detail={"endpoint": self.cfg.endpoint,
                                                         "down_s": down})
                self.triggers.recheck("reconnected")
            elif kind == "recreated":
                which = args[0]
                own_gap = self._sub_epoch[which] == self._loss_epoch
                self._sub_epoch[which] = self._loss_epoch
                if own_gap:  # re-created without a connection loss (stale subscription)
                    self._m_gaps.inc()
                log_event(log, logging.INFO, "opcua subscription recreated", source=self.id,
                          subscription=which, after_connection_loss=not own_gap)
                await self._audit("gap" if own_gap else "subscription_recreated",
                                  reason="subscription_recreated",
                                  detail={"subscription": which})
                if which == "triggers":
                    self.triggers.recheck("subscription_recreated")

    async def _audit(self, state: str, *, reason: str | None = None,
                     detail: dict[str, Any] | None = None) -> None:
        try:
            await self.ingest.audit(state, source=self.id, reason=reason, detail=detail)
        except (OutboxClosedError, OutboxFullError) as err:
            log_event(log, logging.WARNING, "opcua audit row not written", source=self.id,
                      state=state, error=repr(err))

    # ------------------------------------------------------------------ monitored items

    def _dropped_notification(self) -> None:
        self._m_dropped_queue.inc()
        if self._storm_dropped == 0:
            log_event(log, logging.WARNING,
                      "opcua notification queue full; dropping the oldest notifications",
                      source=self.id, queue_max=self.cfg.queue_max)
        self._storm_dropped += 1
        self.backfill.note_local_drop()  # the drain opens gaps before its next batch

    def _sample(self, idx: int, dv: ua.DataValue, value: Any, ts: datetime,
                backfilled: bool = False) -> Submission:
        """One monitored sample → Submission; raises InputError (→ quarantine)."""
        item = self.cfg.monitored[idx]
        status = status_name(dv.StatusCode)
        if item.quarantine_status != "none" and not status.startswith("Good") and (
                item.quarantine_status == "not_good" or status.startswith("Bad")):
            raise InputError("bad_status", f"{item.node}: {status}")
        data = jsonable(value)
        payload = {"value": data, "status": status, "node": item.node}
        event, _ = self._mon_mappers[idx].map(payload, source_ts=ts, backfilled=backfilled)
        return Submission(event, sample_key(item.node, ts, data, dv.StatusCode))

    async def _drain_monitored(self) -> None:
        """Map notifications in arrival order, a chunk at a time, yielding to the event loop
        between chunks so asyncua's publish loop keeps its pace (a starved publish loop
        makes the SERVER drop values). Mapped chunks go to ``_commit_monitored``; live
        samples of a node whose gap is being backfilled wait behind it (``Backfill.hold``),
        live notifications that arrive during a restore wait behind the replayed ones."""
        if not self.cfg.monitored:
            return
        q = self._mon_q
        backfill = self.backfill
        backfill.watch_restore(self._mon_sub)
        await self._flush_audits()
        carried = backfill.end_restore()  # held for a restore when the previous run ended

        def take(item: DataChangeEvent, subs: list[Submission],
                 marks: list[tuple[int, datetime]], bad: list[Any]) -> None:
            mi = item.data.monitored_item
            idx = mi.ClientHandle - 1
            dv = mi.Value
            ts = source_ts(dv)
            flagged = dv.StatusCode is not None and \
                dv.StatusCode.value & OVERFLOW_BITS == OVERFLOW_BITS
            if flagged:
                self._server_overflow(idx)
            backfill.live_sample(idx, ts, ends_gap=not flagged)
            try:
                sub = self._sample(idx, dv, item.value, ts)
            except InputError as err:
                bad.append((idx, dv, item.value, ts, err))
                return
            now = backfill.hold(idx, sub, ts)
            if now is not None:
                for s, t in now:
                    subs.append(s)
                    marks.append((idx, t))

        while True:
            batch = carried or await q.get_batch(_CHUNK)
            carried = []
            backfill.open_local_drop_gap()
            subs: list[Submission] = []
            marks: list[tuple[int, datetime]] = []
            bad: list[Any] = []
            overflows = backfill.overflow_count()

            for item in batch:
                if type(item) is DataChangeEvent:
                    if not backfill.hold_for_restore(item):
                        take(item, subs, marks, bad)
                elif isinstance(item, Gap):
                    if item.reason == "restored":
                        for held in backfill.end_restore():
                            take(held, subs, marks, bad)
                    else:
                        backfill.open_gap(item)
                elif isinstance(item, StatusChangeEvent):
                    self._status_change("monitored", item)
                else:
                    self._unknown_item("monitored", item)
            if self._storm_dropped and q.qsize() < q.maxsize // 2:
                log_event(log, logging.WARNING, "opcua notification storm over",
                          source=self.id, dropped=self._storm_dropped)
                self._pending_audits.append(("dropped", "queue_full", {
                    "count": self._storm_dropped, "queue_max": q.maxsize,
                    "backfill": [m.node for i, m in enumerate(self.cfg.monitored)
                                 if backfill.history[i]]}))
                self._storm_dropped = 0
            if backfill.overflow_storm_over(overflows):
                self._pending_audits.append(backfill.overflow_audit())
            if subs:
                await backfill.put_ordered(subs, marks)  # bounded: waits while commits lag
            for args in bad:  # after the chunk: an await here must not let a backfill in
                await self._quarantine_sample(*args)
            if self._pending_audits:
                await self._flush_audits()
            await asyncio.sleep(0)

    async def _commit_monitored(self) -> None:
        """One outbox commit at a time, merging the chunks mapped meanwhile (order kept);
        watermarks and backfill progress move only after the COMMIT."""
        if not self.cfg.monitored:
            return
        mapped = self._mapped
        limit = self.cfg.max_batch
        while True:
            subs, marks = await mapped.get()
            while len(subs) < limit and not mapped.empty():
                more, more_marks = mapped.get_nowait()
                subs = subs + more
                marks = marks + more_marks
            ids = await self._submit(subs) if subs else []
            await self.backfill.committed(subs, ids, marks)

    async def _flush_audits(self) -> None:
        """Write the audit rows noted meanwhile (``_note_audit``), oldest first."""
        while self._pending_audits:
            state, reason, detail = self._pending_audits.pop(0)
            await self._audit(state, reason=reason, detail=detail)

    def _server_overflow(self, idx: int) -> None:
        """The server's item queue dropped values before this one: counted, audited once
        per storm, and where the node historizes its gap is backfilled."""
        self._m_dropped_server.inc()
        self.backfill.server_overflow(idx)
        now = time.monotonic()
        if now - self._overflow_logged > 60:
            self._overflow_logged = now
            log_event(log, logging.WARNING,
                      "opcua server queue overflow: the server dropped values between publishes "
                      "(raise queue_size or lower sampling)", source=self.id,
                      node=self.cfg.monitored[idx].node)

    def _unknown_item(self, which: str, item: Any) -> None:
        """Something asyncua put into a queue that this source does not know (a newer
        asyncua, or an event subscription): counted, logged once per kind, never silent."""
        self.ctx.metrics.source_errors.labels(self.id, "unknown_notification").inc()
        kind = type(item).__name__
        if kind not in self._unknown_kinds:
            self._unknown_kinds.add(kind)
            log_event(log, logging.ERROR, "opcua: unknown item in the notification queue "
                      "(ignored; check the asyncua version)", source=self.id,
                      subscription=which, kind=kind)

    def _status_change(self, which: str, ev: StatusChangeEvent) -> None:
        log_event(log, logging.WARNING, "opcua subscription status change", source=self.id,
                  subscription=which, status=status_name(ev.notification.Status))

    async def _quarantine_sample(self, idx: int, dv: ua.DataValue, value: Any, ts: datetime,
                                 err: InputError) -> None:
        node = self.cfg.monitored[idx].node
        raw = orjson.dumps({"value": jsonable(value), "status": status_name(dv.StatusCode)},
                           default=str)
        await self.ingest.quarantine(self.id, err.reason, raw,
                                     {"node": node, "source_ts": iso_z(ts)}, err.detail)

    async def _submit(self, subs: Sequence[Submission]) -> list[str]:
        """Commit; under backpressure wait until the outbox accepts again (never drops)."""
        waited = False
        while True:
            try:
                return await self.ingest.submit(subs)
            except OutboxFullError:
                if not waited:
                    waited = True
                    log_event(log, logging.WARNING,
                              "opcua: outbox full, holding events until it accepts again",
                              source=self.id, events=len(subs))
                await self.ingest.wait_accepting()


async def _run_all(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run the loops together; the first failure cancels the rest and is raised as is
    (not as an ExceptionGroup, so the supervisor classifies it)."""
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
