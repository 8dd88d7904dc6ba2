"""One forwarding loop per sink: lease → check → send → ack / retry / dead-letter.

Contract:
- Runs ``max_in_flight`` lanes; each lane leases a batch (``edge.outbox.lease`` rules:
  priority, per-key FIFO, live-first), checks each event's payload SHA-256 against the one
  taken at ingest (mismatch → dead letter), waits for the drain rate limit, calls
  ``sink.send`` and records every outcome in one outbox transaction.
- Retry timing: capped exponential backoff with full jitter, never earlier than the
  receiver's ``Retry-After``; a ``Retry-After`` also pauses the whole sink that long.
  ``retry.max_attempts`` (optional) turns the last retry into a dead letter.
- Circuit breaker: after ``failure_threshold`` consecutive failed batches the sink is
  "down": nothing is sent (events keep being stored) until a one-event probe succeeds.
- ``stop()``: no new leases; in-flight sends get ``shutdown_grace_s`` to finish and record
  their outcome; what is still running then is cancelled and its rows simply stay queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from edge.audit import utc_iso
from edge.components import Outcome, OutcomeKind, Sink, StoredEvent
from edge.config import SinkConfigBase
from edge.outbox import Outbox, Resolution
from edge.retry import CircuitBreaker, TokenBucket, backoff_s
from edge.telemetry import Metrics, log_event

__all__ = ["Forwarder", "blocks_key", "send_in_key_order"]

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.25
UNROUTED_RECHECK_S = 300.0


SendRequest = Callable[[list[StoredEvent]], Awaitable[list[Outcome]]]


async def send_in_key_order(
    requests: Sequence[list[StoredEvent]],
    send_request: SendRequest,
    concurrency: int,
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
    are not attempted. Returns the outcome of every event by ``seq``.
    """
    outcomes: dict[int, Outcome] = {}
    blocked: set[str] = set()
    last_for_key: dict[str, asyncio.Event] = {}
    sem = asyncio.Semaphore(concurrency)

    async def run(events: list[StoredEvent], after: list[asyncio.Event],
                  done: asyncio.Event) -> None:
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
                async with sem:
                    if stopping():
                        results = [Outcome.not_attempted("gateway stopping")] * len(todo)
                    else:
                        results = await send_request(todo)
                for ev, outcome in zip(todo, results, strict=True):
                    outcomes[ev.seq] = outcome
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
    return outcomes


def blocks_key(outcome: Outcome, dead_letter_blocks: bool = True) -> bool:
    """True when later events of the same ordering key must wait after ``outcome``
    (DESIGN invariant 4: only a delivered event lets its key move on)."""
    if outcome.kind in (OutcomeKind.delivered, OutcomeKind.duplicate):
        return False
    if outcome.kind is OutcomeKind.dead_letter:
        return dead_letter_blocks
    return True


class Forwarder:
    def __init__(
        self,
        sink: Sink,
        config: SinkConfigBase,
        outbox: Outbox,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
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
        self.bucket = TokenBucket(config.rate_limit_per_s) if config.rate_limit_per_s else None
        self.paused_until = 0.0  # wall clock; set by Retry-After
        self.last_delivery_at: float | None = None
        self.last_error: str | None = None
        self.down_since: float | None = None  # when the circuit opened
        self._retried = 0
        self._retry_logged_at = -1e9
        self._down_logged_at = -1e9
        self.delivered = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.sink_up.labels(sink.id).set(1)
        metrics.sink_circuit_open.labels(sink.id).set(0)

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
        stop_new = getattr(self.sink, "stop_new_requests", None)
        if stop_new is not None:
            stop_new()
        self.outbox.new_rows(self.sink.id).set()  # wake idle lanes

    def status(self) -> dict[str, Any]:
        return {
            "circuit": self.breaker.state,
            "up": self.breaker.state == "closed",
            "paused_for_s": round(max(0.0, self.paused_until - self.clock()), 1),
            "last_delivery": _iso(self.last_delivery_at),
            "last_error": self.last_error,
            "down_since": _iso(self.down_since),
            "delivered": self.delivered,
        }

    # ------------------------------------------------------------------ the lane loop

    async def _lane(self, index: int) -> None:
        new_rows = self.outbox.new_rows(self.sink.id)
        while not self._stopping.is_set():
            wait = max(self.paused_until - self.clock(), self.breaker.wait_s())
            if wait > 0:
                await self._sleep(wait)
                continue
            probing = self.breaker.state == "half_open"
            if probing:
                if self.breaker.probing or index != 0:
                    await self._sleep(0.2)
                    continue
                self.breaker.probing = True
            limit = 1 if probing else self._lease_size()
            live = 0 if probing else int(limit * self.config.live_share)
            try:
                batch = await self.outbox.lease(self.sink.id, limit, live_limit=live)
            except Exception as err:  # noqa: BLE001 - a failing read must not kill the lane
                log_event(log, logging.ERROR, "lease failed", sink=self.sink.id, error=repr(err))
                self.breaker.probing = False
                await self._sleep(1.0)
                continue
            if not batch:
                self.breaker.probing = False
                new_rows.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_POLL_S):
                        await new_rows.wait()
                continue
            try:
                await self._forward(batch)
            finally:
                # a probe that reached no verdict (e.g. nothing was sendable) must not
                # leave the other lanes waiting for it
                self.breaker.probing = False

    def _lease_size(self) -> int:
        size = self.config.lease_batch
        if self.config.rate_limit_per_s:
            size = min(size, max(1, int(self.config.rate_limit_per_s)))
        return size

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, 1.0)):
                await self._stopping.wait()

    async def _forward(self, batch: list[StoredEvent]) -> None:
        resolutions: list[Resolution] = []
        sendable: list[StoredEvent] = []
        for ev in batch:
            if _integrity_ok(ev):
                sendable.append(ev)
            else:
                resolutions.append(self._resolution(ev, Outcome.dead_letter(
                    "integrity: stored event differs from its SHA-256 taken at ingest"), False))
        try:
            if sendable:
                if self.bucket is not None:
                    await self.bucket.acquire(len(sendable))
                outcomes = await self._send(sendable)
                resolutions.extend(
                    self._resolution(ev, o, True) for ev, o in zip(sendable, outcomes, strict=True)
                )
                self._account(outcomes)
        except asyncio.CancelledError:
            self.outbox.release(self.sink.id, [ev.seq for ev in batch])
            raise
        try:
            await self.outbox.complete(self.sink.id, resolutions)
        except Exception as err:  # noqa: BLE001 - outcome not recorded: rows are resent later
            log_event(log, logging.ERROR, "could not record delivery results; will resend",
                      sink=self.sink.id, error=repr(err), events=len(resolutions))
        now = self.clock()
        for r in resolutions:
            if r.kind in ("delivered", "duplicate"):
                self.delivered += 1
                self.last_delivery_at = now
        latency = self.metrics.delivery_latency.labels(self.sink.id)
        for ev, r in zip(sendable, resolutions[len(batch) - len(sendable):], strict=False):
            if r.kind in ("delivered", "duplicate") and ev.received_at:
                latency.observe(max(0.0, now - ev.received_at))

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

    def _account(self, outcomes: list[Outcome]) -> None:
        attempted = [o for o in outcomes if o.attempted]
        for o in attempted:
            self.metrics.delivery_attempts.labels(self.sink.id, o.kind.value).inc()
        if not attempted:
            self.breaker.probing = False
            return
        ok = any(o.kind in (OutcomeKind.delivered, OutcomeKind.duplicate,
                            OutcomeKind.dead_letter) for o in attempted)
        pause = max((o.retry_after_s or 0.0) for o in attempted)
        if pause > 0:
            self.paused_until = max(self.paused_until, self.clock() + pause)
        if ok:
            if self.breaker.state != "closed":
                log_event(log, logging.INFO, "sink is back; circuit closed", sink=self.sink.id)
            self.breaker.record_success()
            self.down_since = None
            self.metrics.sink_up.labels(self.sink.id).set(1)
            self.metrics.sink_circuit_open.labels(self.sink.id).set(0)
            return
        first = next(o for o in attempted if o.kind is OutcomeKind.retry)
        self.last_error = first.reason
        self._retried += len(attempted)
        now = time.monotonic()
        if now - self._retry_logged_at >= 10.0:  # one line per 10 s, with the count since
            log_event(log, logging.WARNING, "delivery failed; events stay queued for retry",
                      sink=self.sink.id, error=first.reason[:200], status=first.status,
                      retried_since_last_line=self._retried)
            self._retry_logged_at, self._retried = now, 0
        if self.breaker.record_failure():
            opened = self.down_since is None
            if self.down_since is None:
                self.down_since = self.clock()
            down_for_s = self.clock() - self.down_since
            self.metrics.sink_up.labels(self.sink.id).set(0)
            self.metrics.sink_circuit_open.labels(self.sink.id).set(1)
            # one line when the sink goes down, then one a minute: a failed probe every
            # few seconds is the breaker working, not news
            if opened or now - self._down_logged_at >= 60.0:
                log_event(log, logging.WARNING,
                          "sink failing; circuit open, events keep being stored" if opened
                          else "sink still down; events keep being stored",
                          sink=self.sink.id, down_for_s=round(down_for_s),
                          probe_in_s=round(self.breaker.wait_s(), 1), error=self.last_error)
                self._down_logged_at = now

    def _resolution(self, ev: StoredEvent, o: Outcome, sent: bool) -> Resolution:
        r = Resolution(ev.seq, ev.id, o.kind.value, o.status, o.reason, o.body,
                       attempted=o.attempted and sent, event_class=int(ev.event_class),
                       ordering_key=ev.ordering_key, type=ev.type)
        if o.kind is OutcomeKind.retry:
            attempts = ev.attempts + (1 if r.attempted else 0)
            retry = self.config.retry
            if r.attempted and retry.max_attempts is not None and attempts >= retry.max_attempts:
                r.kind = "dead_letter"
                r.reason = f"gave up after {attempts} attempts: {o.reason}"
                return r
            if r.attempted:
                delay = backoff_s(attempts, retry.initial_backoff_s, retry.max_backoff_s)
                delay = max(delay, o.retry_after_s or 0.0)
                r.next_at = self.clock() + delay
            else:
                r.next_at = 0.0
        elif o.kind is OutcomeKind.unrouted:
            r.next_at = self.clock() + UNROUTED_RECHECK_S
        return r


def _integrity_ok(ev: StoredEvent) -> bool:
    """The stored envelope still hashes to what was recorded at ingest (its payload and
    the payload's own SHA-256 included): one hash of the bytes about to be sent."""
    return not ev.sha256 or hashlib.sha256(ev.body).hexdigest() == ev.sha256


def _iso(ts: float | None) -> str | None:
    return utc_iso(ts) if ts is not None else None
