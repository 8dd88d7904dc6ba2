"""The page's disk budget: what the budget counts, how much of it is data, and a forecast
only when the budget has one (what ``make run`` showed 23 s in was a swelling WAL)."""

from __future__ import annotations

import re

from edge.api import page
from edge.config import OutboxConfig
from edge.outbox.budget import Budget
from edge.telemetry import Metrics

MB = 1024 * 1024


def _text(budget: Budget) -> str:
    report = {"site": "s", "version": "1", "uptime_s": 23, "components": [], "sinks": {},
              "alarms": [], "outbox": {"events": 284, "accepting": True,
                                       "budget": budget.snapshot()}}
    return re.sub(r"<[^>]+>", "", page.render(report, []))


def test_23_seconds_in_the_page_shows_the_wal_and_no_forecast():
    budget = Budget(OutboxConfig(max_size_mb=2048), Metrics())
    for second in range(24):
        wal = int(second * 1.1 * MB)
        budget.observe(2 * MB + wal, float(second), total=2 * MB + wal, live=2 * MB)
    text = _text(budget)
    assert "27.3 MB of 2048 MB" in text
    assert "of which 2.0 MB data, 25.3 MB write-ahead log" in text
    assert "not enough history yet (23 s of the 5 min a forecast needs)" in text
    assert "full in" not in text


def test_a_steady_rise_is_forecast_on_the_page():
    budget = Budget(OutboxConfig(max_size_mb=100), Metrics())
    for second in range(0, 601, 5):
        live = 10 * MB + 10_000 * second
        budget.observe(live, float(second), live=live)
    assert "full in about 2.5 h at the growth of the last 10 min" in _text(budget)
