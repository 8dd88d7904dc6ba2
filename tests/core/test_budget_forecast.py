"""The disk forecast says "full in ..." only for a steady rise of the live data.

A WAL that swells in the first seconds after a start, free pages, a drain or a sawtooth of
inserts and pruning are not growth; ``edge status`` says the same as ``/status``.
"""

from __future__ import annotations

from edge.cli.status import format_report
from edge.config import OutboxConfig
from edge.outbox.budget import Budget
from edge.telemetry import Metrics
from edge.timefmt import duration

MB = 1024 * 1024


def _budget(max_size_mb: float = 100) -> Budget:
    return Budget(OutboxConfig(max_size_mb=max_size_mb), Metrics())


def _report(budget: Budget) -> dict:
    return {"site": "plant-01", "version": "1", "uptime_s": 1, "components": [], "sinks": {},
            "outbox": {"events": 284, "accepting": True, "budget": budget.snapshot()}}


def test_a_wal_growing_for_23_seconds_after_start_gives_no_forecast():
    """What ``make run`` showed 23 s in: "28.1 MB of 2048 MB, full in about 27 min"."""
    budget = _budget(2048)
    live = 2 * MB  # 284 queued events and the schema: nothing that fills 2 GB
    for second in range(24):
        wal = second * MB  # the WAL grows until its checkpoint folds it back
        budget.observe(live + wal, float(second), total=live + wal, live=live)
    assert budget.time_to_full_s() is None
    assert budget.forecast().state == "not_enough_history"
    snap = budget.snapshot()
    assert snap["live_bytes"] == live and snap["used_bytes"] == live + 23 * MB
    assert snap["time_to_full_s"] is None
    assert snap["forecast"]["state"] == "not_enough_history"
    shown = "\n".join(format_report(_report(budget)))
    assert "full in" not in shown and "not enough history yet (23 s" in shown


def test_wal_growth_over_ten_minutes_is_not_growth():
    budget = _budget()
    for second in range(0, 601, 5):
        wal = second * 20_000  # the WAL swells; the live data stays put
        budget.observe(10 * MB + wal, float(second), total=10 * MB + wal, live=10 * MB)
    assert budget.time_to_full_s() is None
    assert budget.forecast().state == "not_growing"


def test_a_steady_rise_over_ten_minutes_gives_the_right_forecast():
    budget = _budget(100)
    rate = 10_000  # bytes per second
    for second in range(0, 601, 5):
        live = 10 * MB + rate * second
        budget.observe(live, float(second), live=live)
    used = 10 * MB + rate * 600
    expected = (100 * MB - used) / rate
    ttf = budget.time_to_full_s()
    assert ttf is not None and abs(ttf - expected) < 1.0
    fc = budget.forecast()
    assert fc.state == "growing" and abs((fc.bytes_per_s or 0) - rate) < 1
    assert budget.snapshot()["time_to_full_s"] == round(expected, 1)
    assert f"full in about {duration(expected)}" in "\n".join(format_report(_report(budget)))


def test_three_minutes_of_steady_rise_are_not_enough():
    budget = _budget()
    for second in range(0, 181, 5):
        budget.observe(10 * MB + 50_000 * second, float(second))
    assert budget.time_to_full_s() is None
    assert budget.forecast().state == "not_enough_history"


def test_a_drain_gives_no_forecast():
    budget = _budget()
    for second in range(0, 601, 5):
        live = 60 * MB - 30_000 * second
        budget.observe(live, float(second), live=live)
    assert budget.time_to_full_s() is None
    assert budget.forecast().state == "not_growing"


def test_a_sawtooth_of_inserts_and_pruning_gives_no_forecast():
    budget = _budget()
    for second in range(0, 601, 5):
        live = 40 * MB + (second % 100) * 200_000 + second * 100  # pruned every 100 s
        budget.observe(live, float(second), live=live)
    assert budget.time_to_full_s() is None
    assert "not growing steadily" in budget.forecast().text
