"""Retry timing and sink health: capped exponential backoff with full jitter,
``Retry-After``, circuit breaker, dead-letter storm guard, token-bucket rate limit. Clock
and randomness are injectable for tests; nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["CircuitBreaker", "StormGuard", "TokenBucket", "backoff_s", "parse_retry_after",
           "steady_time"]

_WALL_AT_MONOTONIC_ZERO = time.time() - time.monotonic()


def steady_time() -> float:
    """Epoch seconds for scheduling: the wall clock as read at start, advanced by the
    monotonic clock. A step of the wall clock (NTP correcting a PC's clock, an operator)
    does not move it, so a retry time or a ``Retry-After`` pause neither stalls for the
    size of a step back nor comes due early after a step forward. Times stored with it
    (``deliveries.next_at``) keep their meaning across a restart unless the wall clock was
    stepped in between; audit and display times stay on the wall clock."""
    return _WALL_AT_MONOTONIC_ZERO + time.monotonic()


def backoff_s(
    attempt: int, initial_s: float, cap_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Full jitter: uniform in [0, min(cap, initial * 2**(attempt-1))] (attempt ≥ 1)."""
    ceiling = min(cap_s, initial_s * (2 ** max(0, min(attempt - 1, 62))))
    return ceiling * rng()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as delay-seconds or HTTP-date → seconds from now (≥ 0); None if absent
    or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return max(0.0, (when - now_dt).total_seconds())


class CircuitBreaker:
    """Closed → (``failure_threshold`` consecutive failures) → open for ``open_s`` →
    half-open: one probe (``start_probe``); its success closes the circuit, its failure
    re-opens it with the wait doubled up to ``max_open_s``.

    Only the probe's own verdict moves an open circuit: a failure reported while open by a
    request that was sent before the circuit opened (``record_failure(probe=False)``)
    changes nothing, so a burst of in-flight requests failing together opens the circuit
    for ``open_s`` once instead of doubling it per request. A success from any request
    closes it: the receiver answered. ``trip()`` opens it at once (the receiver refused the
    credentials: waiting for the threshold would only send more requests it refuses).
    """

    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        max_open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_open_s = open_s
        self.max_open_s = max(open_s, max_open_s)
        self.clock = clock
        self.failures = 0
        self.open_until: float | None = None
        self._current_open_s = open_s
        self.probing = False

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        if self.probing or self.clock() >= self.open_until:
            return "half_open"
        return "open"

    def wait_s(self) -> float:
        """Seconds until a probe may be sent (0 when closed or due)."""
        if self.open_until is None:
            return 0.0
        return max(0.0, self.open_until - self.clock())

    def start_probe(self) -> bool:
        """Claim the one probe of a half-open circuit; False when it is not due or taken."""
        if self.state != "half_open" or self.probing:
            return False
        self.probing = True
        return True

    def probe_now(self) -> None:
        """Let the next probe go at once with the base wait (an operator said: try again)."""
        if self.open_until is not None:
            self.open_until = self.clock()
            self._current_open_s = self.base_open_s

    def record_success(self) -> None:
        self.failures = 0
        self.open_until = None
        self.probing = False
        self._current_open_s = self.base_open_s

    def record_failure(self, *, probe: bool = False) -> bool:
        """Count a failure; True if this opened the circuit or re-opened it after a failed
        probe. ``probe``: the failing request was the half-open probe."""
        if self.open_until is not None:
            if not probe:
                return False  # sent before the circuit opened: no news about the receiver
            self._current_open_s = min(self.max_open_s, self._current_open_s * 2)
            self.open_until = self.clock() + self._current_open_s
            self.probing = False
            return True
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self.open_until = self.clock() + self._current_open_s
            return True
        return False

    def record_no_verdict(self) -> None:
        """The probe was answered with something that says nothing about the receiver's
        health (a dead letter): wait the current interval again, without doubling it."""
        if self.open_until is not None and self.probing:
            self.open_until = self.clock() + self._current_open_s
        self.probing = False

    def trip(self) -> bool:
        """Open now, whatever the count; True if it was closed."""
        self.failures = max(self.failures, self.failure_threshold)
        if self.open_until is not None:
            return False
        self.open_until = self.clock() + self._current_open_s
        return True


class StormGuard:
    """Dead-letter storm detector over a sink's last ``window`` answers, one per event.

    ``observe(key, event_id)`` records one answer: ``key`` is what identifies a dead letter
    (its HTTP status, or its reason when it has none), None for anything else (delivered,
    retry, sink fault). It returns the key once, among the last ``window`` answers, at least
    ``ceil(min_share * window)`` are dead letters with that key from at least ``min_events``
    distinct events; None otherwise (also while fewer than ``window`` answers were seen).
    O(1) per answer that is not a dead letter. ``reset()`` forgets everything (after an
    operator resumed the sink: it takes a full fresh window to fire again).
    """

    def __init__(self, window: int, min_share: float, min_events: int) -> None:
        self.window = window
        self.needed = max(1, math.ceil(min_share * window - 1e-9))
        self.min_events = min_events
        self._recent: deque[tuple[Hashable | None, str]] = deque()
        self._counts: Counter[Hashable] = Counter()

    def observe(self, key: Hashable | None, event_id: str) -> Hashable | None:
        self._recent.append((key, event_id))
        if key is not None:
            self._counts[key] += 1
        if len(self._recent) > self.window:
            old, _ = self._recent.popleft()
            if old is not None:
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
        if key is None or len(self._recent) < self.window or self._counts[key] < self.needed:
            return None
        events = {eid for k, eid in self._recent if k == key}
        return key if len(events) >= self.min_events else None

    def reset(self) -> None:
        self._recent.clear()
        self._counts.clear()


class TokenBucket:
    """``rate`` tokens/s, burst of ``burst`` tokens. ``acquire(n)`` may run into debt so a
    batch larger than the burst waits proportionally instead of forever."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.clock = clock
        self.tokens = self.burst
        self.updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self, n: float = 1) -> None:
        async with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= n
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)
