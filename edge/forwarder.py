"""One forwarding loop per sink: lease → check → send → ack / retry / dead-letter.

Contract:
- Runs ``max_in_flight`` lanes; each lane leases a batch (``edge.outbox.lease`` rules:
  priority, per-key FIFO, live-first), checks each stored envelope against the SHA-256
  taken of it at ingest (mismatch → dead letter, never sent; with ``on_dead_letter: park``
  the later events of its key in that lease are not sent either), waits for the drain rate
  limit, calls ``sink.send`` and records every outcome in one outbox transaction
  (``Outbox.complete`` with one ``Resolution`` per event, its ``kind`` the outcome's).
- Outcomes: ``delivered``/``duplicate`` remove the row; ``dead_letter`` moves it to the
  dead-letter table; ``retry`` keeps it with capped exponential backoff and full jitter,
  never earlier than the receiver's ``Retry-After`` (which also pauses the whole sink that
  long), and ``retry.max_attempts`` (optional) turns the last retry into a dead letter;
  ``unrouted`` keeps it and looks again ``UNROUTED_RECHECK_S`` later. A not-attempted
  outcome with ``defer_s`` (``Outcome.deferred``: a route that sends once per period)
  keeps the row until then: recorded as its ``next_at`` in the same transaction, no
  attempt counted, no audit row, nothing for the breaker, the storm guard or the alarms;
  the lease scan then passes the row (and holds its key) until it is due, so it is not
  leased over and over.
  ``sink_fault`` (the receiver, not the event, is at fault: 3xx, 401/403, an unlisted
  status) keeps the row like a retry but never turns it into a dead letter; it raises an
  alarm (``status()["alarm"]``, code ``auth`` for 401/403, else ``sink_fault``, cleared by
  the next delivery), counts ``edge_sink_faults_total`` and logs one line a minute.
- Circuit breaker (``edge.retry.CircuitBreaker``): a batch with a delivery is a success;
  a batch with a retry or sink fault and no delivery is a failure; a batch of dead letters
  only is neither (a receiver that refuses everything is not "up"). After
  ``failure_threshold`` failures the sink is "down": nothing is sent (events keep being
  stored) until a one-event probe, ``open_s`` later, succeeds; the first lane free then
  sends it (a lane busy with a hung request does not hold it up). Only the probe's own
  failure doubles the wait; requests in flight when the circuit opened do not.
- Pauses (``status()["paused"]``, ``edge_sink_paused``): 401/403 opens the circuit at once
  and pauses the sink with an ``auth`` alarm; it probes with backoff and a delivery ends
  it. The dead-letter storm guard (``storm_guard``, ``edge.retry.StormGuard``) pauses the
  sink when most of its recent answers are dead letters with one status: nothing is sent
  until an operator calls ``resume()`` (``edge sink resume``); the dead letters with that
  status that arrive from requests still in flight are kept as rows, not dead-lettered.
  Both pauses are written to the audit trail (``sink_paused``). A pause never drops rows.
- Pauses that outlive a restart (``edge.outbox.pauses``): a storm-guard pause is stored
  in the transaction of its ``sink_paused`` audit row and removed in the one of the
  operator's ``sink_resumed`` (``Outbox.sink_resumed``); a Retry-After pause's end is stored
  with the outcomes that carried it and removed once it has passed. A forwarder built on
  the same outbox restores both: the storm-guard pause with its reason, ``since`` and
  alarm as before the restart, until resumed; the Retry-After pause until its end. An
  auth pause is not stored: after a restart the sink simply probes the receiver again,
  which refuses the credentials at once if they are still wrong.
- Concurrency: a sink that sends requests concurrently keeps its sink-wide limiter
  (``edge.concurrency.AdaptiveConcurrency``) as ``sink.concurrency``; the lanes' requests
  share it. ``status()["concurrency"]`` and ``edge_sink_concurrency{sink}`` show its
  current limit. While the circuit is open the limiter refuses new requests, so what the
  lanes still hold of their leases is not sent to a receiver that is down (not attempted:
  the rows stay queued); the probe lifts that, and a closed circuit never leaves it shut.
  The lanes (``max_in_flight``) each hold a lease of up to ``lease_batch`` rows, so with
  one event per request they offer far more requests than the limit.
- ``stop()``: no new leases; in-flight sends get ``shutdown_grace_s`` to finish and record
  their outcome; what is still running then is cancelled and its rows simply stay queued.
  Until then a lane never ends: an error of one turn is logged and the lane goes on 1 s
  later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edge.components import Outcome, OutcomeKind, Sink, StoredEvent
from edge.concurrency import AdaptiveConcurrency
from edge.config import SinkConfigBase
from edge.outbox import Resolution
from edge.retry import CircuitBreaker, StormGuard, TokenBucket, backoff_s, steady_time
from edge.telemetry import Metrics, event_ids, log_event
from edge.timefmt import utc_iso

__all__ = ["Alarm", "DeliveryQueue", "Forwarder", "Pause"]

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.25
UNROUTED_RECHECK_S = 300.0
FAULT_LOG_EVERY_S = 60.0
AUTH_STATUSES = frozenset({401, 403})
_ALARM_RANK = {"sink_fault": 1, "auth": 2, "storm_guard": 3}  # a higher one is not replaced
_DELIVERED = frozenset({OutcomeKind.delivered, OutcomeKind.duplicate})  # the row leaves


class DeliveryQueue(Protocol):
    """Where a forwarder leases events and records their outcomes: the gateway's SQLite
    outbox (``edge.outbox.Outbox``) or the relay's JetStream partitions
    (``edge.relay.queue.RelayQueue``). The contract is the outbox's:

    - ``lease`` returns deliverable events of ``sink`` in order (per key FIFO: never an
      event while an earlier one of its key is leased, waiting for a retry or parked),
      marked in flight so concurrent lanes never get the same event;
    - ``release`` forgets in-flight marks (never attempted); ``complete`` records one
      ``Resolution`` per leased event (delivered → gone, retry → due at ``next_at``,
      dead letter → out of the queue with its reason, parking its key with ``park``);
    - ``new_rows(sink)`` is set when events arrive; ``stored_pauses`` are the pauses a
      restart must keep (``sink_paused`` with ``keep`` stores one).
    """

    stored_pauses: dict[str, dict[str, Any]]

    def new_rows(self, sink: str) -> asyncio.Event: ...

    async def lease(self, sink: str, limit: int, *, live_limit: int = 0, park: bool = True
                    ) -> list[StoredEvent]: ...

    def release(self, sink: str, seqs: Sequence[int]) -> None: ...

    async def complete(self, sink: str, resolutions: Sequence[Resolution], *,
                       retry_after: tuple[float, float] | None = None) -> None: ...

    async def sink_paused(self, sink: str, *, reason: str, detail: dict[str, Any],
                          keep: dict[str, Any] | None = None) -> None: ...


@dataclass(slots=True)
class Alarm:
    """Why a sink needs a person: ``auth`` (credentials refused), ``sink_fault`` (answers
    that fault the sink, not the event) or ``storm_guard`` (paused on a dead-letter storm)."""

    code: str
    message: str
    since: float  # epoch seconds of the first fault of this kind in a row

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "since": utc_iso(self.since)}


@dataclass(slots=True)
class Pause:
    """The sink sends nothing (``storm_guard``: until resumed) or only probes (``auth``)."""

    code: str  # storm_guard | auth
    reason: str
    since: float  # epoch seconds
    key: Hashable | None = None  # storm_guard: the dead-letter status (or reason) it holds

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "since": utc_iso(self.since)}


class Forwarder:
    def __init__(
        self,
        sink: Sink,
        config: SinkConfigBase,
        outbox: DeliveryQueue,
        metrics: Metrics,
        *,
        # retry times and pauses must not move with a step of the wall clock
        clock: Callable[[], float] = steady_time,
    ) -> None:
        self.sink = sink
        self.config = config
        self.outbox = outbox
        self.metrics = metrics
        self.clock = clock
        self.breaker = CircuitBreaker(
            config.circuit_breaker.failure_threshold,
            config.circuit_breaker.open_s,
            config.circuit_breaker.max_open_s,
        )
        guard = config.storm_guard
        self.guard = (StormGuard(guard.window_outcomes, guard.min_share, guard.min_events)
                      if guard.enabled else None)
        self.bucket = TokenBucket(config.rate_limit_per_s) if config.rate_limit_per_s else None
        self.paused_until = 0.0  # ``clock`` time; set by Retry-After
        self._paused_for_s = 0.0  # the Retry-After delay that set ``paused_until``
        self._stored_until = 0.0  # the Retry-After end the outbox holds for this sink
        self.pause: Pause | None = None
        self.alarm: Alarm | None = None
        self.last_delivery_at: float | None = None
        self.last_error: str | None = None
        self.down_since: float | None = None  # when the circuit opened
        self._retried = 0
        self._retry_logged_at = -1e9
        self._down_logged_at = -1e9
        self._faults = 0
        self._fault_logged_at = -1e9
        self.delivered = 0
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()  # replaced by resume(); set for good by stop()
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.sink_up.labels(sink.id).set(1)
        metrics.sink_circuit_open.labels(sink.id).set(0)
        metrics.sink_paused.labels(sink.id).set(0)
        limiter = getattr(sink, "concurrency", None)
        self.concurrency: AdaptiveConcurrency | None = None
        if isinstance(limiter, AdaptiveConcurrency):
            self.concurrency = limiter
            metrics.sink_concurrency.labels(sink.id).set_function(lambda: limiter.limit)
        self._restore(outbox.stored_pauses.get(sink.id, {}))

    def _restore(self, stored: dict[str, Any]) -> None:
        """Take up the pauses the last run stored (the outbox read them at open; a
        Retry-After end that has passed is gone by then)."""
        retry_after = stored.get("retry_after")
        if retry_after:
            self.paused_until = self._stored_until = float(retry_after["until"])
            self._paused_for_s = float(retry_after.get("for_s", 0.0))
            log_event(log, logging.INFO, "sink still paused by the receiver's Retry-After "
                      "(kept across the restart)", sink=self.sink.id,
                      paused_for_s=round(max(0.0, self.paused_until - self.clock()), 1))
        guard = stored.get("storm_guard")
        if guard:
            since = float(guard.get("since") or self.clock())
            reason = str(guard.get("reason") or "dead-letter storm: nothing is sent until an "
                         f"operator runs `edge sink resume {self.sink.id} --reason ...`")
            self.pause = Pause("storm_guard", reason, since, key=guard.get("key"))
            self.alarm = Alarm("storm_guard", reason, since)
            self.metrics.sink_paused.labels(self.sink.id).set(1)
            log_event(log, logging.ERROR, "sink still paused by the dead-letter storm guard "
                      "(kept across the restart): " + reason, sink=self.sink.id,
                      since=utc_iso(since))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Lanes until ``stop()``; returns after in-flight work finished or was cancelled."""
        lanes = [
            asyncio.create_task(self._lane(i), name=f"forward-{self.sink.id}-{i}")
            for i in range(self.config.max_in_flight)
        ]
        self._tasks.update(lanes)
        try:
            await self._stopping.wait()
            done, pending = await asyncio.wait(lanes, timeout=self.config.shutdown_grace_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            for task in lanes:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        stop_new = getattr(self.sink, "stop_new_requests", None)
        if stop_new is not None:
            stop_new()
        self.outbox.new_rows(self.sink.id).set()  # wake idle lanes

    def resume(self, *, by: str = "", reason: str = "") -> bool:
        """Lift a pause (an operator's decision; ``Gateway.resume_sink`` audits it and
        removes the stored pause first, with ``Outbox.sink_resumed``).

        A storm-guard pause ends: sending starts again and the guard needs a full fresh
        window to fire again. An auth pause sends its next probe now. True when the sink
        was paused; False when it was not.
        """
        pause = self.pause
        if pause is None:
            return False
        self.pause = None
        self.metrics.sink_paused.labels(self.sink.id).set(0)
        if self.guard is not None:
            self.guard.reset()
        if self.alarm is not None and self.alarm.code == pause.code:
            self.alarm = None
        if pause.code == "auth":
            self.breaker.probe_now()
        log_event(log, logging.INFO, "sink resumed by an operator", sink=self.sink.id,
                  pause=pause.code, paused_for_s=round(self.clock() - pause.since), by=by,
                  reason=reason[:200])
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        if self._stopping.is_set():
            self._wakeup.set()
        wakeup.set()
        return True

    def status(self) -> dict[str, Any]:
        return {
            "circuit": self.breaker.state,
            "up": self.breaker.state == "closed" and self.pause is None,
            "paused": self.pause.to_dict() if self.pause else None,
            "alarm": self.alarm.to_dict() if self.alarm else None,
            "paused_for_s": round(max(0.0, self.paused_until - self.clock()), 1),
            "last_delivery": _iso(self.last_delivery_at),
            "last_error": self.last_error,
            "down_since": _iso(self.down_since),
            "delivered": self.delivered,
            "concurrency": self.concurrency.status() if self.concurrency else None,
        }

    # ------------------------------------------------------------------ the lane loop

    async def _lane(self, index: int) -> None:
        new_rows = self.outbox.new_rows(self.sink.id)
        while not self._stopping.is_set():
            try:
                wait = await self.step(index)
            except Exception as err:  # noqa: BLE001 - a lane that ended would send nothing
                log_event(log, logging.ERROR, "forwarding lane failed; going on in 1 s",
                          sink=self.sink.id, lane=index, error=repr(err))
                wait = 1.0
            if wait is None:
                new_rows.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_POLL_S):
                        await new_rows.wait()
            elif wait > 0:
                await self._sleep(wait)  # until resume() or stop() at the latest

    async def step(self, index: int) -> float | None:
        """One turn of lane ``index``: lease → check → send → record, unless a pause, the
        circuit or another lane's probe says wait. Returns the seconds to wait before the
        next turn (0: go on at once), or None when nothing was deliverable (wait for new
        rows). The lanes run this in a loop; tests drive it with a controlled clock."""
        if self.pause is not None and self.pause.code == "storm_guard":
            return 60.0
        wait = max(self.paused_until - self.clock(), self.breaker.wait_s())
        if wait > 0:
            return wait
        state = self.breaker.state
        if state == "closed" and self.concurrency is not None:
            self.concurrency.paused = None  # the gate is shut only while the circuit is open
        probing = state == "half_open"
        if probing and not self.breaker.start_probe():
            return 0.2  # one lane (the first free one) probes; the others wait for its verdict
        if probing and self.concurrency is not None:
            self.concurrency.paused = None  # the probe's request must go
        limit = 1 if probing else self._lease_size()
        live = 0 if probing else int(limit * self.config.live_share)
        try:
            batch = await self.outbox.lease(self.sink.id, limit, live_limit=live,
                                            park=self.config.on_dead_letter == "park")
        except Exception as err:  # noqa: BLE001 - a failing read must not kill the lane
            log_event(log, logging.ERROR, "lease failed", sink=self.sink.id, error=repr(err))
            if probing:
                self.breaker.probing = False
            return 1.0
        if not batch:
            if probing:
                self.breaker.probing = False
            return None
        try:
            await self._forward(batch, probe=probing)
        finally:
            # a probe that reached no verdict (e.g. nothing was sendable) must not
            # leave the other lanes waiting for it
            if probing:
                self.breaker.probing = False
        return 0.0

    def _lease_size(self) -> int:
        size = self.config.lease_batch
        if self.config.rate_limit_per_s:
            size = min(size, max(1, int(self.config.rate_limit_per_s)))
        return size

    async def _sleep(self, seconds: float) -> None:
        """Up to ``seconds`` (at most 1 s, so waits are re-checked), or until stop/resume."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, 1.0)):
                await self._wakeup.wait()

    async def _forward(self, batch: list[StoredEvent], *, probe: bool = False) -> None:
        resolutions: list[Resolution] = []
        sendable: list[StoredEvent] = []
        parked: set[str] = set()  # keys whose earlier event in this lease was dead-lettered
        park = self.config.on_dead_letter == "park"
        for ev in batch:  # in seq order: per key, earlier events come first
            if ev.ordering_key is not None and ev.ordering_key in parked:
                resolutions.append(self._resolution(ev, Outcome.not_attempted(), False))
            elif _integrity_ok(ev):
                sendable.append(ev)
            else:
                resolutions.append(self._resolution(ev, Outcome.dead_letter(
                    "integrity: stored event differs from its SHA-256 taken at ingest"), False))
                if park and ev.ordering_key is not None:
                    parked.add(ev.ordering_key)
        paused: Pause | None = None
        try:
            if sendable:
                if self.bucket is not None:
                    await self.bucket.acquire(len(sendable))
                outcomes = await self._send(sendable)
                outcomes, paused = self._account(sendable, outcomes, probe)
                resolutions.extend(
                    self._resolution(ev, o, True) for ev, o in zip(sendable, outcomes, strict=True)
                )
        except asyncio.CancelledError:
            self.outbox.release(self.sink.id, [ev.seq for ev in batch])
            raise
        retry_after = self._retry_after_to_store()
        try:
            await self.outbox.complete(self.sink.id, resolutions, retry_after=retry_after)
        except Exception as err:  # noqa: BLE001 - outcome not recorded: rows are resent later
            log_event(log, logging.ERROR, "could not record delivery results; will resend",
                      sink=self.sink.id, error=repr(err), events=len(resolutions))
        else:
            if retry_after is not None:
                self._stored_until = max(self._stored_until, retry_after[0]) \
                    if retry_after[0] > self.clock() else 0.0
            self._log_recorded(batch, resolutions, park)
        if paused is not None:
            await self._audit_pause(paused)
        now = self.clock()
        for r in resolutions:
            if r.kind in _DELIVERED:
                self.delivered += 1
                self.last_delivery_at = now
        latency = self.metrics.delivery_latency
        for ev, r in zip(sendable, resolutions[len(batch) - len(sendable):], strict=False):
            if r.kind in _DELIVERED and ev.received_at:
                latency.labels(self.sink.id, ev.type).observe(max(0.0, now - ev.received_at))

    def _retry_after_to_store(self) -> tuple[float, float] | None:
        """What the next ``complete`` stores of the Retry-After pause: its (end, delay)
        when it ends later than what is stored, or when what is stored has passed (to
        remove it); None when the stored end is still right."""
        if self.paused_until > self._stored_until or (
                0.0 < self._stored_until <= self.clock()):
            return self.paused_until, self._paused_for_s
        return None

    async def _send(self, batch: list[StoredEvent]) -> list[Outcome]:
        try:
            outcomes = await self.sink.send(batch)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a sink bug is a retryable batch failure
            log_event(log, logging.ERROR, "sink raised; retrying the batch", sink=self.sink.id,
                      error=repr(err))
            return [Outcome.retry(f"sink error: {err!r}")] * len(batch)
        if len(outcomes) != len(batch):
            log_event(log, logging.ERROR, "sink returned the wrong number of outcomes",
                      sink=self.sink.id, expected=len(batch), got=len(outcomes))
            return [Outcome.retry("sink returned a wrong outcome count")] * len(batch)
        return outcomes

    # ------------------------------------------------------------------ judging outcomes

    def _account(self, events: list[StoredEvent], outcomes: list[Outcome], probe: bool
                 ) -> tuple[list[Outcome], Pause | None]:
        """Metrics, breaker, alarms and pauses for one sent batch. Returns the outcomes to
        record (dead letters held by the storm guard become sink faults: the row stays)
        and the pause this batch started, if any (the caller audits it)."""
        attempted = [o for o in outcomes if o.attempted]
        for o in attempted:
            self.metrics.delivery_attempts.labels(self.sink.id, o.kind.value).inc()
        if not attempted:
            return outcomes, None
        started = self._watch_storm(events, outcomes)
        delivered = any(o.kind in _DELIVERED for o in attempted)
        faults = [o for o in attempted if o.kind is OutcomeKind.sink_fault]
        failures = [o for o in attempted if o.kind in (OutcomeKind.retry, OutcomeKind.sink_fault)]
        about: dict[int, StoredEvent] = {}  # an outcome -> the first event it answers
        for ev, o in zip(events, outcomes, strict=True):
            about.setdefault(id(o), ev)
        pause_s = max((o.retry_after_s or 0.0) for o in attempted)
        if pause_s > 0 and self.clock() + pause_s > self.paused_until:
            self.paused_until = self.clock() + pause_s
            self._paused_for_s = pause_s
        auth = None
        if faults:
            auth = self._sink_faults(faults, delivered, about)
            started = started or auth
        if delivered:
            self._up()
        elif failures:
            self._failed(failures, probe, trip=auth is not None, about=about)
        elif probe:  # dead letters only: says nothing about the receiver being up
            self.breaker.record_no_verdict()
        if self.pause is not None and self.pause.code == "storm_guard":
            outcomes = [self._hold(o, self.pause) for o in outcomes]
        return outcomes, started

    def _up(self) -> None:
        if self.breaker.state != "closed":
            log_event(log, logging.INFO, "sink is back; circuit closed", sink=self.sink.id)
        self.breaker.record_success()
        self.down_since = None
        self.metrics.sink_up.labels(self.sink.id).set(1)
        self.metrics.sink_circuit_open.labels(self.sink.id).set(0)
        if self.concurrency is not None:
            self.concurrency.paused = None
        if self.alarm is not None and self.alarm.code != "storm_guard":
            log_event(log, logging.INFO, "sink fault cleared by a delivery", sink=self.sink.id,
                      alarm=self.alarm.code, faults_since_last_line=self._faults)
            self.alarm = None
            self._faults = 0
        if self.pause is not None and self.pause.code == "auth":
            self.pause = None
            self.metrics.sink_paused.labels(self.sink.id).set(0)

    def _failed(self, failures: list[Outcome], probe: bool, *, trip: bool,
                about: dict[int, StoredEvent]) -> None:
        first = failures[0]
        self.last_error = first.reason
        now = time.monotonic()
        retries = [o for o in failures if o.kind is OutcomeKind.retry]
        if retries:
            self._retried += len(retries)
            if now - self._retry_logged_at >= 10.0:  # one line per 10 s, with the count since
                log_event(log, logging.WARNING, "delivery failed; events stay queued for retry",
                          sink=self.sink.id, **_ids(about, retries[0]),
                          error=retries[0].reason[:200], status=retries[0].status,
                          retried_since_last_line=self._retried)
                self._retry_logged_at, self._retried = now, 0
        opened = self.breaker.record_failure(probe=probe)
        if trip:  # refused credentials: no point in waiting for the threshold
            opened = self.breaker.trip() or opened
        if not opened:
            return
        if self.concurrency is not None:  # what the lanes still hold is not sent
            self.concurrency.paused = "the sink's circuit is open (the receiver is failing)"
        first_open = self.down_since is None
        if first_open:
            self.down_since = self.clock()
        down_for_s = self.clock() - (self.down_since or self.clock())
        self.metrics.sink_up.labels(self.sink.id).set(0)
        self.metrics.sink_circuit_open.labels(self.sink.id).set(1)
        # one line when the sink goes down, then one a minute: a failed probe every
        # few seconds is the breaker working, not news
        if first_open or now - self._down_logged_at >= 60.0:
            log_event(log, logging.WARNING,
                      "sink failing; circuit open, events keep being stored" if first_open
                      else "sink still down; events keep being stored",
                      sink=self.sink.id, down_for_s=round(down_for_s),
                      probe_in_s=round(self.breaker.wait_s(), 1), error=self.last_error)
            self._down_logged_at = now

    def _sink_faults(self, faults: list[Outcome], delivered: bool,
                     about: dict[int, StoredEvent]) -> Pause | None:
        """Alarm, count and log answers that fault the sink; 401/403 without a delivery in
        the same batch pauses it (returned, to be audited)."""
        for o in faults:
            self.metrics.sink_faults.labels(self.sink.id,
                                            str(o.status) if o.status else "none").inc()
        auth = next((o for o in faults if o.status in AUTH_STATUSES), None)
        first = auth or faults[0]
        code = "auth" if auth is not None else "sink_fault"
        message = (f"the receiver refuses the gateway's credentials ({first.reason[:200]}); "
                   "events are kept, the sink is paused and probes with backoff"
                   if code == "auth" else
                   f"the receiver, not the event, is at fault ({first.reason[:200]}); "
                   "events are kept and retried")
        if self.alarm is None or _ALARM_RANK[code] > _ALARM_RANK[self.alarm.code]:
            self.alarm = Alarm(code, message, self.clock())
            self._fault_logged_at = -1e9  # a new alarm is news: log it now
        elif self.alarm.code == code:
            self.alarm.message = message
        self._faults += len(faults)
        now = time.monotonic()
        if now - self._fault_logged_at >= FAULT_LOG_EVERY_S:
            log_event(log, logging.ERROR if code == "auth" else logging.WARNING,
                      "sink fault: " + message, sink=self.sink.id, alarm=code,
                      status=first.status, **_ids(about, first),
                      faults_since_last_line=self._faults)
            self._fault_logged_at, self._faults = now, 0
        if auth is None or delivered or self.pause is not None:
            return None
        self.pause = Pause("auth", message, self.clock())
        self.metrics.sink_paused.labels(self.sink.id).set(1)
        return self.pause

    def _watch_storm(self, events: list[StoredEvent], outcomes: list[Outcome]
                     ) -> Pause | None:
        """Feed the storm guard; pause the sink when it fires (returned, to be audited)."""
        if self.guard is None:
            return None
        fired: Hashable | None = None
        firing: StoredEvent | None = None
        for ev, o in zip(events, outcomes, strict=True):
            if not o.attempted:
                continue
            hit = self.guard.observe(_storm_key(o), ev.id)
            if hit is not None and fired is None:
                fired, firing = hit, ev
        if fired is None or (self.pause is not None and self.pause.code == "storm_guard"):
            return None
        cfg = self.config.storm_guard
        what = f"HTTP {fired}" if isinstance(fired, int) else repr(fired)
        reason = (f"dead-letter storm: {what} for at least {self.guard.needed} of the last "
                  f"{cfg.window_outcomes} events; nothing is sent and no event is "
                  f"dead-lettered until an operator runs `edge sink resume {self.sink.id} "
                  f"--reason ...`")
        self.pause = Pause("storm_guard", reason, self.clock(), key=fired)
        self.alarm = Alarm("storm_guard", reason, self.pause.since)
        self.metrics.sink_paused.labels(self.sink.id).set(1)
        log_event(log, logging.ERROR, "sink paused: " + reason, sink=self.sink.id,
                  status=fired if isinstance(fired, int) else None,
                  **(event_ids(firing) if firing is not None else {}))
        return self.pause

    def _hold(self, o: Outcome, pause: Pause) -> Outcome:
        """A dead letter with the status the storm guard paused on stays a row."""
        if o.kind is not OutcomeKind.dead_letter or _storm_key(o) != pause.key:
            return o
        return Outcome(OutcomeKind.sink_fault, o.status,
                       f"held by the dead-letter storm guard: {o.reason}", o.body,
                       attempted=o.attempted)

    async def _audit_pause(self, pause: Pause) -> None:
        """Audit the pause; a storm-guard pause is stored with it (survives a restart)."""
        detail: dict[str, Any] = {"sink": self.sink.id, "pause": pause.code}
        if pause.key is not None:
            detail["status" if isinstance(pause.key, int) else "dead_letter_reason"] = pause.key
        keep = None
        # not when an operator resumed it while its outcomes were being recorded: that
        # resume's write is queued before this one and must stay the last word
        if pause.code == "storm_guard" and self.pause is pause:
            keep = {"code": pause.code, "reason": pause.reason, "since": pause.since,
                    "key": pause.key}
        try:
            await self.outbox.sink_paused(self.sink.id, reason=pause.reason, detail=detail,
                                          keep=keep)
        except Exception as err:  # noqa: BLE001 - the pause holds; the log line has it too
            log_event(log, logging.ERROR, "could not audit the sink pause", sink=self.sink.id,
                      error=repr(err))

    def _log_recorded(self, batch: list[StoredEvent], resolutions: list[Resolution],
                      park: bool) -> None:
        """One line per event whose recorded outcome an operator acts on or asks about:
        a dead letter (and the key it parks) and a delivery the receiver already had.
        Logged after the outcome is committed, with the event's id and correlation id."""
        by_seq = {ev.seq: ev for ev in batch}
        for r in resolutions:
            ev = by_seq.get(r.seq)
            if ev is None:
                continue
            if r.kind is OutcomeKind.dead_letter:
                log_event(log, logging.WARNING, "event dead-lettered", sink=self.sink.id,
                          **event_ids(ev), type=ev.type, ordering_key=ev.ordering_key,
                          parks_key=park and ev.ordering_key is not None,
                          status=r.status, reason=r.reason[:200])
            elif r.kind is OutcomeKind.duplicate:
                log_event(log, logging.INFO, "receiver already had the event (duplicate); "
                          "counted as delivered", sink=self.sink.id, **event_ids(ev),
                          type=ev.type, status=r.status)

    def _resolution(self, ev: StoredEvent, o: Outcome, sent: bool) -> Resolution:
        r = Resolution(ev.seq, ev.id, o.kind, o.status, o.reason, o.body,
                       attempted=o.attempted and sent, event_class=int(ev.event_class),
                       ordering_key=ev.ordering_key, type=ev.type)
        if o.kind in (OutcomeKind.retry, OutcomeKind.sink_fault):
            attempts = ev.attempts + (1 if r.attempted else 0)
            retry = self.config.retry
            if (o.kind is OutcomeKind.retry and r.attempted and retry.max_attempts is not None
                    and attempts >= retry.max_attempts):
                r.kind = OutcomeKind.dead_letter
                r.reason = f"gave up after {attempts} attempts: {o.reason}"
                return r
            if r.attempted:
                delay = backoff_s(attempts, retry.initial_backoff_s, retry.max_backoff_s)
                delay = max(delay, o.retry_after_s or 0.0)
                r.next_at = self.clock() + delay
            elif o.defer_s is not None:  # held back on purpose: scheduled delivery
                r.next_at = self.clock() + o.defer_s
            else:
                r.next_at = 0.0
        elif o.kind is OutcomeKind.unrouted:
            r.next_at = self.clock() + UNROUTED_RECHECK_S
        return r


def _ids(about: dict[int, StoredEvent], o: Outcome) -> dict[str, Any]:
    """The ids of the event ``o`` is the outcome of (none when it is not in ``about``)."""
    ev = about.get(id(o))
    return event_ids(ev) if ev is not None else {}


def _storm_key(o: Outcome) -> Hashable | None:
    """What makes dead letters "the same" for the storm guard: the receiver's status, or
    the reason when there is none (a refused MQTT publish, a route that cannot be filled);
    None for anything that is not a dead letter."""
    if o.kind is not OutcomeKind.dead_letter:
        return None
    return o.status if o.status is not None else o.reason


def _integrity_ok(ev: StoredEvent) -> bool:
    """The stored envelope still hashes to what was recorded at ingest (its payload and
    the payload's own SHA-256 included): one hash of the bytes about to be sent."""
    return not ev.sha256 or hashlib.sha256(ev.body).hexdigest() == ev.sha256


def _iso(ts: float | None) -> str | None:
    return utc_iso(ts) if ts is not None else None
