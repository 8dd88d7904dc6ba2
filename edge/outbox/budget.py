"""Disk budget of the outbox: alarm, forecast, when to expire, when to refuse.

Thresholds (``outbox`` config): from 10 points below ``alarm_at_percent`` bookkeeping of
finished events (audit history, old dedupe keys, quarantine) is given up down to half the
budget; above ``alarm_at_percent`` health is degraded with a time-to-full forecast; above ``expire_at_percent`` the oldest ``low`` rows are expired down
to 5 points below that threshold; at 100 % with nothing expirable new events are refused
(backpressure) until usage falls under 97 %.

The forecast (``time_to_full_s``) is made from the live data only — database pages in use,
not the WAL and not free pages, which a checkpoint or the next inserts give back — and only
when there is something honest to say: at least ``FORECAST_MIN_SPAN_S`` of samples and a
steady rise over the last ``FORECAST_WINDOW_S`` (a least-squares line that explains at
least ``FORECAST_MIN_FIT`` of the variation). A WAL swelling in the first seconds after a
start, a sawtooth of inserts and pruning, or a drain give no forecast, and
``forecast()`` says which of these it is.

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

__all__ = ["FORECAST_MIN_FIT", "FORECAST_MIN_SPAN_S", "FORECAST_WINDOW_S", "Budget",
           "BudgetState", "Forecast"]

FORECAST_WINDOW_S = 600.0  # samples of the live data kept for the forecast
FORECAST_MIN_SPAN_S = 300.0  # no forecast from less history than this
FORECAST_MIN_FIT = 0.8  # R² of the growth line: a steady rise, not noise or a sawtooth
_SAMPLE_EVERY_S = 5.0  # observe() may run many times a second; keep one sample per 5 s
_RESUME_PERCENT = 97.0


@dataclass(frozen=True)
class Forecast:
    """What the live data does: ``state`` is ``growing`` (then ``time_to_full_s`` and
    ``bytes_per_s`` are set), ``not_growing`` or ``not_enough_history``; ``text`` says it
    in words for the page and ``edge status``."""

    state: str
    text: str
    time_to_full_s: float | None = None
    bytes_per_s: float | None = None


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
        self.live_bytes = 0
        self.last_percent = 0.0
        # bookkeeping of finished events is given up from here on, down to half the budget
        self.bookkeeping_percent = max(10.0, config.alarm_at_percent - 10)
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic s, live bytes)
        self._last_observed: float | None = None
        metrics.outbox_budget_bytes.set(self.budget_bytes)

    def observe(self, used: int, now: float | None = None, *, total: int | None = None,
                live: int | None = None) -> BudgetState:
        """``used``: bytes that expiry or pruning can act on (the WAL counted up to its
        size limit); ``total``: everything on disk now (default ``used``), which decides
        backpressure; ``live``: bytes of database pages in use, without the WAL (default
        ``used``), the only figure the forecast grows from. A WAL grown past its limit by
        deletes is folded back by the next checkpoint; expiring events for it would only
        grow it further."""
        now = time.monotonic() if now is None else now
        total = used if total is None else total
        live = used if live is None else live
        self.used_bytes = used
        self.live_bytes = live
        self.metrics.outbox_size_bytes.set(used)
        self._last_observed = now
        if not self._samples or now - self._samples[-1][0] >= _SAMPLE_EVERY_S:
            self._samples.append((now, live))
        while self._samples and now - self._samples[0][0] > FORECAST_WINDOW_S:
            self._samples.popleft()
        pct = 100.0 * used / self.budget_bytes
        self.last_percent = pct
        alarm = pct >= self.config.alarm_at_percent
        message = ""
        if alarm:
            ttf = self.time_to_full_s()
            message = (
                f"outbox at {pct:.0f}% of its {self.config.max_size_mb:g} MB budget"
                + (f"; full in about {duration(ttf)} at the current rate"
                   if ttf is not None else "")
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
        """Seconds until 100 % at the live data's steady growth rate; None when
        ``forecast()`` has none to give."""
        return self.forecast().time_to_full_s

    def forecast(self) -> Forecast:
        """The forecast from the samples of the last ``FORECAST_WINDOW_S`` (module
        docstring): a least-squares growth rate of the live data → seconds until the
        budget's remaining room (``budget - used``) is gone."""
        if len(self._samples) < 3 or (self._samples[-1][0] - self._samples[0][0]
                                      < FORECAST_MIN_SPAN_S):
            have = (self._last_observed - self._samples[0][0]
                    if self._samples and self._last_observed is not None else 0.0)
            return Forecast("not_enough_history",
                            f"not enough history yet ({duration(have)} of the "
                            f"{duration(FORECAST_MIN_SPAN_S)} a forecast needs)")
        slope, fit = _growth(self._samples)
        if slope <= 0 or fit < FORECAST_MIN_FIT:
            return Forecast("not_growing", "not growing" if slope <= 0 else
                            "not growing steadily (the live data rises and falls)")
        ttf = max(0.0, (self.budget_bytes - self.used_bytes) / slope)
        return Forecast("growing", f"full in about {duration(ttf)} at the growth of the "
                        f"last {duration(FORECAST_WINDOW_S)}", ttf, slope)

    def snapshot(self) -> dict[str, Any]:
        """``/status`` → ``outbox.budget``: ``used_bytes`` (what the budget counts: live
        data and the WAL up to its limit), ``live_bytes`` (pages in use), ``time_to_full_s``
        only for a steady rise, ``forecast`` (state, text, bytes_per_s) always."""
        fc = self.forecast()
        return {
            "used_bytes": self.used_bytes,
            "live_bytes": self.live_bytes,
            "budget_bytes": self.budget_bytes,
            "percent": round(100.0 * self.used_bytes / self.budget_bytes, 2),
            "time_to_full_s": round(fc.time_to_full_s, 1) if fc.time_to_full_s is not None
            else None,
            "forecast": {"state": fc.state, "text": fc.text,
                         "bytes_per_s": round(fc.bytes_per_s, 1) if fc.bytes_per_s else None},
        }


def _growth(samples: deque[tuple[float, int]]) -> tuple[float, float]:
    """(least-squares slope in bytes/s, R² of the line) of ``(time, bytes)`` samples."""
    t0 = samples[0][0]
    xs = [t - t0 for t, _ in samples]
    ys = [float(b) for _, b in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0, 0.0
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx, sxy * sxy / (sxx * syy)
