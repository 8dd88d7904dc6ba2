"""Adaptive request concurrency per sink: how many requests a sink keeps in flight.

``AdaptiveConcurrency`` is one limiter per sink instance, shared by all of the forwarder's
lanes and all of their batches (``send_in_key_order`` takes a slot per request). The limit
follows AIMD, the scheme of TCP congestion control and of Vector's adaptive request
concurrency:

- It starts at ``INITIAL_LIMIT`` (at most the ceiling) in slow start: until the first
  cut it doubles per window instead of adding one, as TCP does, so a drain reaches its
  pace within a few round trips.
- Time is cut into windows of about one round trip (the long-term mean RTT, at least
  ``MIN_WINDOW_S``). At the end of a window in which the limit was reached (requests
  waited for a slot, or every slot was taken), nothing pushed back and the window's mean
  RTT was not clearly above the long-term mean (below), the limit grows by one (additive
  increase; doubles in slow start), up to ``ceiling``.
- Back pressure — an attempted request answered ``retry`` (408, 425, 429, 5xx that the
  response policy retries, a timeout, a connection error) or with a ``Retry-After`` —
  halves the limit at once (``BACKOFF_RATIO``). Answers to requests that started before
  that cut do not cut again: one cut per round of requests, as TCP does per RTT.
- ``HIGH_WINDOWS`` windows in a row whose mean RTT is clearly above the long-term mean
  (more than ``deviation_scale`` deviations and ``MIN_RISE`` of it: the receiver or the
  gateway itself queues) multiply the limit by ``LATENCY_RATIO``; one such window only
  holds it (a scheduling hiccup of a busy CPU is not a trend).
- The limit never goes below 1 nor above ``ceiling``.

With ``adaptive=False`` the limit is the ceiling, fixed.

It also says when no new request may start at all (``refusal()``), for every lane at once:
until the end of a ``Retry-After`` an answer gave (the receiver asked this client to wait;
the forwarder pauses leasing that long too), and while the forwarder has marked it
``paused`` (the sink's circuit is open: requests still queued in a lane's lease are not
sent to a receiver that is down).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

from edge.components import Outcome, OutcomeKind

__all__ = ["AdaptiveConcurrency", "pushes_back"]

INITIAL_LIMIT = 8
BACKOFF_RATIO = 0.5  # on back pressure (429, 503, timeouts ...)
LATENCY_RATIO = 0.75  # on a clear rise of the round-trip time
MIN_WINDOW_S = 0.005
MIN_RISE = 0.5  # a window's RTT must exceed the mean by this share too to count as a rise
EWMA_ALPHA = 0.2  # weight of a new window in the long-term mean and deviation
HIGH_WINDOWS = 2  # windows in a row the RTT must be clearly above the mean to cut


def pushes_back(outcomes: Sequence[Outcome]) -> bool:
    """True when the receiver pushed back on a request: an attempted event came back
    ``retry`` (408, 425, 429, 500, 502, 503, 504, a timeout, a connection error) or any
    answer carried a ``Retry-After``."""
    return any(o.attempted and (o.kind is OutcomeKind.retry or o.retry_after_s)
               for o in outcomes)


class AdaptiveConcurrency:
    """A sink-wide limit on requests in flight, adapted with AIMD (see the module text).

    ``await acquire()`` takes a slot (waiting in FIFO order while the limit is taken) and
    returns the start time; ``release(started, outcomes)`` gives it back and learns from
    the request's round trip and outcomes (``outcomes=None``: the request did not finish,
    nothing is learned). ``async with limiter.slot() as s: s.outcomes = await ...`` does both.
    """

    def __init__(self, ceiling: int, *, adaptive: bool = True,
                 initial: int = INITIAL_LIMIT, deviation_scale: float = 2.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.adaptive = adaptive
        self.deviation_scale = deviation_scale
        self.clock = clock
        self._limit = min(max(1, initial), ceiling) if adaptive else ceiling
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # long-term round trip (EWMA of window means) and its mean absolute deviation
        self.rtt_mean: float | None = None
        self.rtt_dev = 0.0
        # the current window
        self._window_end: float | None = None
        self._window_sum = 0.0
        self._window_n = 0
        self._reached = False
        self._high_windows = 0  # windows in a row with the RTT clearly above the mean
        self._cut_at = -1e18  # when the limit was last cut for back pressure
        self.slow_start = adaptive  # doubling per window until the first cut
        self.cuts = 0  # back-pressure cuts so far
        self.latency_cuts = 0  # latency cuts so far
        self.hold_until = 0.0  # ``clock`` time: the end of the latest Retry-After
        self.paused: str | None = None  # why no request may start (set by the forwarder)

    @property
    def limit(self) -> int:
        return self._limit

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows of it."""
        return {"limit": self._limit, "ceiling": self.ceiling, "adaptive": self.adaptive,
                "in_flight": self.in_flight,
                "rtt_ms": None if self.rtt_mean is None else round(self.rtt_mean * 1000, 1)}

    def refusal(self) -> str | None:
        """Why no new request may start now, or None: a ``Retry-After`` still running, or
        the forwarder's ``paused`` reason."""
        if self.hold_until and self.clock() < self.hold_until:
            return "the receiver asked to wait (Retry-After)"
        return self.paused

    # ------------------------------------------------------------------ slots

    async def acquire(self) -> float:
        """Take a slot; returns the start time to hand to ``release``."""
        if self.in_flight < self._limit and not self._waiters:
            self.in_flight += 1
            if self.in_flight >= self._limit:
                self._reached = True
            return self.clock()
        self._reached = True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1  # granted as we were cancelled: give it back
                self._wake()
            elif waiter in self._waiters:  # ``_wake`` may have dropped it already
                self._waiters.remove(waiter)
            raise
        return self.clock()

    def release(self, started: float, outcomes: Sequence[Outcome] | None) -> None:
        """Give the slot back; learn from the request (round trip since ``started``)."""
        self.in_flight -= 1
        if outcomes is not None:
            wait = max((o.retry_after_s or 0.0 for o in outcomes
                        if o.attempted and o.kind is not OutcomeKind.delivered), default=0.0)
            if wait > 0:
                self.hold_until = max(self.hold_until, self.clock() + wait)
            if self.adaptive:
                self._learn(started, outcomes)
        self._wake()

    def slot(self) -> _Slot:
        return _Slot(self)

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    # ------------------------------------------------------------------ AIMD

    def _learn(self, started: float, outcomes: Sequence[Outcome]) -> None:
        now = self.clock()
        if not any(o.attempted for o in outcomes):
            return  # nothing was sent: no round trip
        if pushes_back(outcomes):
            if started >= self._cut_at:  # one cut per round of requests
                self._set_limit(int(self._limit * BACKOFF_RATIO))
                self._cut_at = now
                self.cuts += 1
                self._new_window(now)
            return
        self._window_sum += now - started
        self._window_n += 1
        if self._window_end is None:
            self._window_end = now  # the first answer ends the first window
        if now >= self._window_end:
            self._end_window(now)

    def _end_window(self, now: float) -> None:
        current = self._window_sum / self._window_n
        mean = self.rtt_mean
        if mean is None:
            self.rtt_mean = current
        else:
            high = mean + max(self.deviation_scale * self.rtt_dev, MIN_RISE * mean)
            self._high_windows = self._high_windows + 1 if current > high else 0
            if self._high_windows >= HIGH_WINDOWS:
                self._set_limit(int(self._limit * LATENCY_RATIO))
                self.latency_cuts += 1
                self._high_windows = 0
            elif current > high:
                pass  # one slow window may be a hiccup (a busy CPU): hold, do not grow
            elif self._reached and self._limit < self.ceiling:
                self._set_limit(self._limit * 2 if self.slow_start else self._limit + 1)
            self.rtt_dev += EWMA_ALPHA * (abs(current - mean) - self.rtt_dev)
            self.rtt_mean = mean + EWMA_ALPHA * (current - mean)
        self._new_window(now)

    def _new_window(self, now: float) -> None:
        self._window_sum, self._window_n = 0.0, 0
        self._reached = self.in_flight >= self._limit or bool(self._waiters)
        span = max(self.rtt_mean or 0.0, MIN_WINDOW_S)
        self._window_end = now + span

    def _set_limit(self, limit: int) -> None:
        if limit < self._limit:
            self.slow_start = False
        self._limit = min(self.ceiling, max(1, limit))


class _Slot:
    """``async with limiter.slot() as s``: set ``s.outcomes`` before the block ends."""

    __slots__ = ("limiter", "outcomes", "started")

    def __init__(self, limiter: AdaptiveConcurrency) -> None:
        self.limiter = limiter
        self.outcomes: Sequence[Outcome] | None = None
        self.started = 0.0

    async def __aenter__(self) -> _Slot:
        self.started = await self.limiter.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.limiter.release(self.started, self.outcomes)
