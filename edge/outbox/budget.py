"""Disk budget of the outbox: alarm, forecast, when to expire, when to refuse.

Thresholds (``outbox`` config): from 10 points below ``alarm_at_percent`` bookkeeping of
finished events (audit history, old dedupe keys, quarantine) is given up down to half the
budget; above ``alarm_at_percent`` health is degraded with a time-to-full forecast; above ``expire_at_percent`` the oldest ``low`` rows are expired down
to 5 points below that threshold; at 100 % with nothing expirable new events are refused
(backpressure) until usage falls under 97 %.

The WAL counts: for backpressure all of it, for the alarm and expiry up to its size limit
(a tenth of the budget). Deletes (expiry, pruning) grow the WAL until the next checkpoint
folds it back, so expiring events because of a swollen WAL would only swell it further.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from edge.config import OutboxConfig
from edge.telemetry import Metrics
from edge.timefmt import duration

__all__ = ["Budget", "BudgetState"]

_WINDOW_S = 600.0
_RESUME_PERCENT = 97.0


@dataclass(frozen=True)
class BudgetState:
    percent: float
    alarm: bool
    expire_needed: bool
    full: bool
    may_resume: bool
    message: str


class Budget:
    def __init__(self, config: OutboxConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.budget_bytes = int(config.max_size_mb * 1024 * 1024)
        self.used_bytes = 0
        self.last_percent = 0.0
        # bookkeeping of finished events is given up from here on, down to half the budget
        self.bookkeeping_percent = max(10.0, config.alarm_at_percent - 10)
        self._samples: deque[tuple[float, int]] = deque()
        metrics.outbox_budget_bytes.set(self.budget_bytes)

    def observe(self, used: int, now: float | None = None, *, total: int | None = None
                ) -> BudgetState:
        """``used``: bytes that expiry or pruning can act on (the WAL counted up to its
        size limit); ``total``: everything on disk now (default ``used``), which decides
        backpressure. A WAL grown past its limit by deletes is folded back by the next
        checkpoint; expiring events for it would only grow it further."""
        now = time.monotonic() if now is None else now
        total = used if total is None else total
        self.used_bytes = used
        self.metrics.outbox_size_bytes.set(used)
        self._samples.append((now, used))
        while self._samples and now - self._samples[0][0] > _WINDOW_S:
            self._samples.popleft()
        pct = 100.0 * used / self.budget_bytes
        self.last_percent = pct
        alarm = pct >= self.config.alarm_at_percent
        ttf = self.time_to_full_s()
        message = ""
        if alarm:
            message = (
                f"outbox at {pct:.0f}% of its {self.config.max_size_mb:g} MB budget"
                + (f"; full in about {duration(ttf)} at the current rate" if ttf else "")
            )
        return BudgetState(
            percent=pct,
            alarm=alarm,
            expire_needed=pct >= self.config.expire_at_percent,
            full=100.0 * total / self.budget_bytes >= 100.0,
            may_resume=100.0 * total / self.budget_bytes < _RESUME_PERCENT,
            message=message,
        )

    def bytes_to_free(self, used: int) -> int:
        target = self.budget_bytes * max(0.0, self.config.expire_at_percent - 5) / 100
        return max(0, int(used - target))

    def bookkeeping_to_free(self, used: int) -> int:
        """Bytes of bookkeeping to give up: down to half the budget."""
        return max(0, int(used - self.budget_bytes * 0.5))

    def time_to_full_s(self) -> float | None:
        """Least-squares growth rate over the last 10 minutes → seconds until 100 %."""
        if len(self._samples) < 3:
            return None
        t0 = self._samples[0][0]
        xs = [t - t0 for t, _ in self._samples]
        ys = [float(u) for _, u in self._samples]
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        if var == 0:
            return None
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
        if slope <= 0:
            return None
        return max(0.0, (self.budget_bytes - self.used_bytes) / slope)

    def snapshot(self) -> dict[str, Any]:
        ttf = self.time_to_full_s()
        return {
            "used_bytes": self.used_bytes,
            "budget_bytes": self.budget_bytes,
            "percent": round(100.0 * self.used_bytes / self.budget_bytes, 2),
            "time_to_full_s": round(ttf, 1) if ttf is not None else None,
        }
