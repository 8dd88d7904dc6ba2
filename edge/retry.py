"""Retry timing: capped exponential backoff with full jitter, ``Retry-After``, circuit
breaker, token-bucket rate limit. Clock and randomness are injectable for tests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["CircuitBreaker", "TokenBucket", "backoff_s", "parse_retry_after"]


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
    half-open: one probe; success closes, failure reopens with the wait doubled up to
    ``max_open_s``."""

    def __init__(
        self,
        failure_threshold: int,
        open_s: float,
        max_open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_open_s = open_s
        self.max_open_s = max_open_s
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

    def record_success(self) -> None:
        self.failures = 0
        self.open_until = None
        self.probing = False
        self._current_open_s = self.base_open_s

    def record_failure(self) -> bool:
        """Count a failure; True if this opened (or re-opened) the circuit."""
        self.failures += 1
        if self.open_until is not None:  # a failed probe
            self._current_open_s = min(self.max_open_s, self._current_open_s * 2)
            self.open_until = self.clock() + self._current_open_s
            self.probing = False
            return True
        if self.failures >= self.failure_threshold:
            self.open_until = self.clock() + self._current_open_s
            return True
        return False


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
