"""The gateway: builds components from config and runs them under one asyncio TaskGroup.

Contract:
- ``await gw.start()`` starts the local API first (``/healthz`` answers during start-up,
  ``/readyz`` says "starting"), opens the outbox (the cheap integrity check, recovery),
  starts sinks, one forwarder per sink and every source under a supervisor; ``gw.ready``
  is set when all of that is up (sources may still be connecting). Then the full
  integrity check runs in the background (``gw.integrity``, ``edge.outbox.integrity``):
  a corrupt verdict stops intake from being acknowledged (sources' submits fail with
  ``OutboxStorageError``), raises the ``outbox_corrupt`` alarm and fails readiness until
  a restart moves the file aside.
- ``await gw.stop()`` (also on SIGTERM/SIGINT in ``run``): stop intake first (sources are
  cancelled; anything not yet committed is not acked, so the upstream redelivers), then
  let forwarders finish in-flight sends within ``shutdown_grace_s``, close sinks, flush
  the writer and close the database. Idempotent.
- ``await gw.resume_sink(id, actor=..., reason=...)`` lifts a sink's pause (dead-letter
  storm guard, refused credentials); audited as ``sink_resumed``.
- ``await gw.release_lot(lot, by=..., reason=..., actor=...)`` releases a lot (ends its
  hold episode, ``edge.pipeline.Pipeline.release``); audited as ``lot_released``.
- With ``quality.reconcile`` configured, ``gw.reconciler`` reads lot statuses back from
  the ERP / QMS every ``every_s`` (``await gw.reconciler.round()`` runs one round now).
- A source that raises ``FatalStartupError`` is stopped and shown as failed; any other
  error restarts it with capped exponential backoff. The daemon never exits because one
  component fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge import systemd
from edge.components import ComponentContext, Sink, Source
from edge.config import GatewayConfig, SinkConfigBase
from edge.errors import FatalStartupError, OutboxError, OutboxStorageError
from edge.events import Event, EventClass
from edge.forwarder import Forwarder
from edge.outbox import Outbox
from edge.outbox.integrity import BackgroundCheck, EarlyCheck, corrupt_advice
from edge.pipeline import Pipeline, Release
from edge.quality.monitor import LotMonitor
from edge.quality.reconcile import Reconciler
from edge.registry import Registry, default_registry
from edge.rules import QualityConfig, build_rules
from edge.telemetry import Metrics, log_event
from edge.timefmt import utc_iso

__all__ = ["ComponentStatus", "Gateway"]

log = logging.getLogger(__name__)

RESTART_MAX_S = 60.0


@dataclass
class ComponentStatus:
    id: str
    kind: str
    type: str
    state: str = "starting"  # starting | running | retrying | failed | stopped
    connected: bool = False
    error: str | None = None
    since: float = field(default_factory=time.time)
    restarts: int = 0
    # code → (severity, message, since): lasting conditions a component reports itself
    conditions: dict[str, tuple[str, str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "type": self.type, "state": self.state,
            "connected": self.connected, "error": self.error, "since": utc_iso(self.since),
            "restarts": self.restarts,
            "conditions": [
                {"code": code, "severity": sev, "message": msg, "since": utc_iso(at)}
                for code, (sev, msg, at) in sorted(self.conditions.items())
            ],
        }

    def set_condition(self, code: str, message: str | None, severity: str = "warning"
                      ) -> None:
        """Set (or with ``message=None`` clear) a named condition; ``since`` is kept
        while the message only changes its wording."""
        if message is None:
            self.conditions.pop(code, None)
            return
        old = self.conditions.get(code)
        since = old[2] if old is not None else time.time()
        self.conditions[code] = (severity, message, since)


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        registry: Registry | None = None,
        metrics: Metrics | None = None,
        config_path: str | None = None,
        early_check: EarlyCheck | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.registry = registry or default_registry()
        self.metrics = metrics or Metrics()
        quality = quality_config(config)
        self.outbox = Outbox(config.state_dir, config.outbox, self.metrics, router=self._route,
                             early_check=early_check,
                             lot_retention_days=quality.lot_retention_days)
        self.pipeline = Pipeline(self.outbox, build_rules(config.rules, config.site))
        self.quality = quality
        self.lot_monitor = LotMonitor(self.metrics.registry, quality.stuck_after_s,
                                      sla=quality.sla,
                                      notification_types=quality.notification_types)
        self.reconciler: Reconciler | None = None
        self._reconcile_task: asyncio.Task[None] | None = None
        self.sinks: dict[str, Sink] = {}
        self.sources: dict[str, Source] = {}
        self.forwarders: dict[str, Forwarder] = {}
        self.status: dict[str, ComponentStatus] = {}
        self.ready = asyncio.Event()
        self.started_at = time.time()
        self._stop_requested = asyncio.Event()
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._forwarder_tasks: dict[str, asyncio.Task[None]] = {}
        self._api_task: asyncio.Task[None] | None = None
        self._api: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self._stopped = False
        self._lock_fd: int | None = None
        # the full integrity check beside intake, and its corrupt verdict (None: none)
        self.integrity: BackgroundCheck | None = None
        self.outbox_corrupt: str | None = None
        self._corrupt_since = 0.0
        self._intake = _IntakeGate(self)

    # ------------------------------------------------------------------ routing

    def _route(self, event: Event) -> list[str]:
        return [sid for sid, sink in self.sinks.items() if sink.accepts(event.type)]

    # ------------------------------------------------------------------ lifecycle

    def _context(self, comp_id: str, kind: str) -> ComponentContext:
        status = self.status[comp_id]

        def set_connected(up: bool) -> None:
            if status.connected != up:
                status.connected = up
                status.since = time.time()
            if up:
                status.error = None  # a retry succeeded: the old error is history
            if kind == "source":
                self.metrics.source_connected.labels(comp_id).set(1 if up else 0)

        return ComponentContext(
            site=self.config.site,
            state_dir=self.config.state_dir,
            metrics=self.metrics,
            ingest=self._intake if kind == "source" else None,
            set_connected=set_connected,
            set_condition=status.set_condition,
        )

    async def start(self) -> None:
        self._lock_state_dir()
        if self.config.api.enabled:
            from edge.api.server import ApiServer  # starlette/uvicorn only when enabled

            self._api = ApiServer(self)
            self._api.bind()  # a taken port fails now, before anything is opened or sent
            # /healthz answers from here on; /readyz says "starting" until ``ready``
            self._api_task = asyncio.create_task(self._api.serve(), name="api")
            await self._api.started()
        for cfg in self.config.sinks:
            self.status[cfg.id] = ComponentStatus(cfg.id, "sink", cfg.type)
            comp = self.registry.get("sink", cfg.type)
            self.sinks[cfg.id] = comp.factory(cfg, self._context(cfg.id, "sink"))
        for cfg in self.config.sources:
            self.status[cfg.id] = ComponentStatus(cfg.id, "source", cfg.type)
            comp = self.registry.get("source", cfg.type)
            self.sources[cfg.id] = comp.factory(cfg, self._context(cfg.id, "source"))
        if self.quality.reconcile is not None:
            self.reconciler = Reconciler(
                self.quality.reconcile, {c.id: c for c in self.config.sinks}, self.outbox,
                live=self.sinks, site=self.config.site, state_dir=self.config.state_dir,
                registry=self.metrics.registry)
        await self.outbox.open()
        await self._catch_up()  # a failure or CAPA count a crash left without its events
        for cfg in self.config.sinks:
            sink = self.sinks[cfg.id]
            await sink.start()
            self.status[cfg.id].state = "running"
            fwd = Forwarder(sink, _sink_config(cfg), self.outbox, self.metrics)
            self.forwarders[cfg.id] = fwd
            self._forwarder_tasks[cfg.id] = asyncio.create_task(
                fwd.run(), name=f"forwarder-{cfg.id}"
            )
        for sid, source in self.sources.items():
            self._source_tasks[sid] = asyncio.create_task(
                self._supervise(sid, source), name=f"source-{sid}"
            )
        self._gauges = asyncio.create_task(self._update_gauges(), name="outbox-gauges")
        if self.reconciler is not None:
            self._reconcile_task = asyncio.create_task(self.reconciler.run(),
                                                       name="reconcile")
        gc.freeze()  # modules, config, components: never garbage, never traversed again
        self.ready.set()
        systemd.ready()
        self._watchdog = systemd.start_watchdog(self._healthy)
        log_event(log, logging.INFO, "gateway started", site=self.config.site,
                  sources=len(self.sources), sinks=len(self.sinks),
                  api=self.config.api.listen if self.config.api.enabled else "off",
                  state_dir=self.config.state_dir)
        self._start_integrity_check()

    def _start_integrity_check(self) -> None:
        """The full check of the outbox file, beside intake (module contract)."""
        loop = asyncio.get_running_loop()

        def found(problem: str) -> None:  # on the check's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to stop
                loop.call_soon_threadsafe(self._outbox_found_corrupt, problem)

        # the WAL the check lets grow (no checkpoint can fold it back meanwhile) stays
        # within a quarter of the budget: past that, intake wins and the check runs later
        self.integrity = BackgroundCheck(
            self.outbox.path, found,
            max_wal_growth=max(64 << 20, self.outbox.budget.budget_bytes // 4))
        self.integrity.start()

    def _outbox_found_corrupt(self, problem: str) -> None:
        """The background check's corrupt verdict: stop acknowledging intake (invariant 1),
        alarm, and tell the operator what to do."""
        if self.outbox_corrupt is not None or self._stopped:
            return
        self.outbox_corrupt = problem
        self._corrupt_since = time.time()
        self.outbox.fail_integrity(problem)
        log_event(log, logging.ERROR, "outbox file is corrupt (found by the background "
                  "integrity check): new events are no longer acknowledged; restart the "
                  "gateway: it moves the file aside and starts a fresh outbox; then re-queue "
                  "the moved file's events with `edge outbox salvage FILE -c CONFIG`",
                  problem=problem[:300], path=self.outbox.path)

    def _lock_state_dir(self) -> None:
        """One daemon per state dir: a second one would share (and fight over) the outbox."""
        path = Path(self.config.state_dir)
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / "edge.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FatalStartupError(
                f"state_dir {path} is in use by another running gateway") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock_state_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    async def _update_gauges(self, interval_s: float = 5.0) -> None:
        """Refresh the outbox gauges (depth per sink and class, oldest age, DLQ size)."""
        from edge.outbox import queries

        m = self.metrics
        while True:
            try:
                st = await self.outbox.read(queries.stats)
            except Exception as err:  # noqa: BLE001 - gauges are best effort
                log_event(log, logging.DEBUG, "gauge refresh failed", error=repr(err))
            else:
                for sid in set(self.sinks) | set(st["sinks"]):
                    entry = st["sinks"].get(sid)
                    for cls in ("critical", "high", "normal", "low"):
                        m.outbox_depth.labels(sid, cls).set(entry["depth"][cls] if entry else 0)
                    m.outbox_oldest_age.labels(sid).set(
                        (entry or {}).get("oldest_age_s") or 0)
                    m.outbox_dead_letters.labels(sid).set((entry or {}).get("dead_letters", 0))
                    m.outbox_parked_keys.labels(sid).set((entry or {}).get("parked", 0))
            try:
                await self.lot_monitor.section(self.outbox)  # sets the lot gauges
                await self.lot_monitor.business(self.outbox)  # SLA and notification gauges
            except Exception as err:  # noqa: BLE001 - gauges are best effort
                log_event(log, logging.DEBUG, "lot gauge refresh failed", error=repr(err))
            await self._catch_up()
            await asyncio.sleep(interval_s)

    async def _catch_up(self) -> None:
        """Store what the quality rules still owe (``Pipeline.catch_up``); a failure is
        logged and retried on the next round."""
        try:
            await self.pipeline.catch_up()
        except OutboxError as err:
            log_event(log, logging.WARNING, "quality catch-up failed; retried later",
                      error=str(err))

    def _healthy(self) -> bool:
        return self.outbox.writable() or not self.outbox.accepting

    async def _supervise(self, sid: str, source: Source) -> None:
        status = self.status[sid]
        delay = 1.0
        while True:
            status.state = "running"
            started = time.monotonic()
            try:
                await source.run()
                status.state = "stopped"
                return
            except asyncio.CancelledError:
                status.state = "stopped"
                raise
            except FatalStartupError as err:
                status.state, status.error = "failed", str(err)
                self.metrics.source_connected.labels(sid).set(0)
                self.metrics.source_errors.labels(sid, "fatal").inc()
                log_event(log, logging.ERROR, "source stopped: cannot work with this config",
                          source=sid, error=str(err))
                return
            except Exception as err:  # noqa: BLE001 - any source failure is retried
                status.state, status.error = "retrying", f"{type(err).__name__}: {err}"
                status.restarts += 1
                self.metrics.source_connected.labels(sid).set(0)
                self.metrics.source_errors.labels(sid, type(err).__name__).inc()
                if time.monotonic() - started > 60:
                    delay = 1.0
                wait = delay * (0.5 + random.random() / 2)
                log_event(log, logging.WARNING, "source failed; restarting", source=sid,
                          error=status.error, retry_in_s=round(wait, 1))
                await asyncio.sleep(wait)
                delay = min(RESTART_MAX_S, delay * 2)

    def request_stop(self) -> None:
        self._stop_requested.set()

    @property
    def stopped(self) -> bool:
        """``stop()`` has begun."""
        return self._stopped

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.integrity is not None:
            self.integrity.stop()
        systemd.notify("STOPPING=1")
        log_event(log, logging.INFO, "gateway stopping: intake first, then in-flight sends")
        if self._gauges is not None:
            self._gauges.cancel()
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconcile_task
        if self.reconciler is not None:
            await self.reconciler.close()
        for task in self._source_tasks.values():
            task.cancel()
        for task in self._source_tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for fwd in self.forwarders.values():
            fwd.stop()
        for task in self._forwarder_tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sid, sink in self.sinks.items():
            try:
                await sink.close()
            except Exception as err:  # noqa: BLE001 - keep closing the rest
                log_event(log, logging.WARNING, "sink close failed", sink=sid, error=repr(err))
        await self.outbox.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._api is not None:
            await self._api.shutdown()
        if self._api_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._api_task
        for st in self.status.values():
            st.state = "stopped"
        self._unlock_state_dir()
        log_event(log, logging.INFO, "gateway stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT or ``request_stop()``, then stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    # ------------------------------------------------------------------ status

    async def status_report(self) -> dict[str, Any]:
        """The ``/status`` document (no secrets: config values are not included)."""
        stats = await self.outbox.stats()
        for sid, fwd in self.forwarders.items():
            up = fwd.breaker.state == "closed" and fwd.pause is None
            self.status[sid].connected = up
            if fwd.pause is not None:
                self.status[sid].error = f"paused: {fwd.pause.reason}"
            elif not up:
                self.status[sid].error = fwd.last_error
        configured = set(self.sinks)
        sinks_out: dict[str, Any] = {}
        for sid in sorted(configured | set(stats["sinks"])):
            entry = dict(stats["sinks"].get(sid) or {
                "depth": {c.name: 0 for c in EventClass}, "total": 0, "retrying": 0,
                "unrouted": 0, "oldest_age_s": None, "dead_letters": 0})
            if sid in self.forwarders:
                entry.update(self.forwarders[sid].status())
                entry["configured"] = True
            else:
                entry["configured"] = False
                entry["note"] = ("sink no longer in config: rows kept; reroute or discard them "
                                 "with `edge outbox reroute|discard --reason`")
            sinks_out[sid] = entry
        lots_section = await self.lot_monitor.section(self.outbox)
        lots_section["reconcile"] = (self.reconciler.section() if self.reconciler is not None
                                     else {"enabled": False})
        report: dict[str, Any] = {
            "site": self.config.site,
            "version": _version(),
            "started_at": utc_iso(self.started_at),
            "uptime_s": round(time.time() - self.started_at, 1),
            "ready": self.ready.is_set(),
            "components": [s.to_dict() for s in self.status.values()],
            "outbox": {
                "path": self.outbox.path,
                "events": stats["events"],
                "accepting": stats["accepting"],
                "budget": stats["budget"],
                "quarantine": stats["quarantine"],
                "dead_letters": stats["dead_letters"],
                "inflight": stats["inflight"],
                "integrity": (self.integrity.snapshot() if self.integrity is not None
                              else {"state": "pending"}),
            },
            "sinks": sinks_out,
            "alarms": stats["alarms"] + self._integrity_alarms(),
            "lots": lots_section,
            "business": await self.lot_monitor.business(self.outbox),
        }
        from edge.api.summary import overall, problems

        found = problems(report)
        report["health"] = {"state": overall(found),
                            "problems": [p.to_dict() for p in found]}
        return report

    def _integrity_alarms(self) -> list[dict[str, Any]]:
        """The ``outbox_corrupt`` alarm of a run-time verdict (the start's own is the
        outbox's)."""
        if self.outbox_corrupt is None:
            return []
        return [{"code": "outbox_corrupt", "since": utc_iso(self._corrupt_since),
                 "message": corrupt_advice(self.outbox.path, self.outbox_corrupt)}]

    # ------------------------------------------------------------------ operator actions

    async def resume_sink(self, sink_id: str, *, actor: str, reason: str) -> bool:
        """Lift a pause of ``sink_id`` (dead-letter storm guard, or refused credentials).

        Written to the audit trail (``sink_resumed`` with ``actor`` and ``reason``) before
        the sink sends again. Returns True when the sink was paused and now sends (an auth
        pause: probes at once), False when it was not paused. Raises KeyError for a sink
        that is not configured, and what ``Outbox.sink_resumed`` raises (``OutboxError``)
        when the audit row (written with the removal of the stored pause) cannot be written;
        the sink then stays paused.
        """
        fwd = self.forwarders[sink_id]
        pause = fwd.pause
        if pause is None:
            return False
        await self.outbox.sink_resumed(sink_id, actor=actor, reason=reason, detail={
            "sink": sink_id, "pause": pause.code, "paused_since": utc_iso(pause.since),
            "pause_reason": pause.reason})
        fwd.resume(by=actor, reason=reason)
        return True


    async def release_lot(self, lot_id: str, *, by: str, reason: str, actor: str) -> Release:
        """Release ``lot_id`` as decided by ``by`` (``actor``: who asked, for the audit):
        stores a ``lot.status`` (released) and a ``quality.release`` for the lot's sinks,
        the lot's new state and the ``lot_released`` audit row in one transaction.
        Raises ``UnknownLot``, ``AlreadyReleased`` or ``OutboxError`` (nothing changed)."""
        return await self.pipeline.release(lot_id, by=by, reason=reason, actor=actor)


class _IntakeGate:
    """The sources' ingest: the pipeline, refusing new records once the outbox file was
    found corrupt (``OutboxStorageError``: sources do not ack, the upstream keeps them)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def _check(self) -> None:
        if self._gateway.outbox_corrupt is not None:
            self._gateway.metrics.outbox_write_errors.labels("corrupt").inc()
            raise OutboxStorageError("the outbox file is corrupt (integrity check): not "
                                     "storing; restart the gateway to start a fresh outbox")

    async def submit(self, items: Any, *, chain: str | None = None) -> list[str]:
        self._check()
        return await self._gateway.pipeline.submit(items, chain=chain)

    async def quarantine(self, *args: Any, **kwargs: Any) -> None:
        self._check()  # a record quarantined would be acked: not into a corrupt file
        await self._gateway.pipeline.quarantine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gateway.pipeline, name)


def quality_config(config: Any) -> QualityConfig:
    """The ``quality:`` section, or its defaults where the config has none."""
    found = getattr(config, "quality", None)
    return found if isinstance(found, QualityConfig) else QualityConfig()


def _sink_config(cfg: Any) -> SinkConfigBase:
    return cfg if isinstance(cfg, SinkConfigBase) else SinkConfigBase.model_validate(
        {k: v for k, v in dict(cfg).items() if k in SinkConfigBase.model_fields}
    )


def _version() -> str:
    from edge import __version__

    return __version__
