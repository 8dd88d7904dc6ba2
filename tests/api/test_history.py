"""The page's last hour: intake and delivery per minute and the backlog, from samples of
the gateway's counters kept in memory (empty after a start, and the page says so)."""

from __future__ import annotations

import re

from edge.api import page
from edge.api.history import History, chart_svg


def test_rates_per_minute_between_samples_and_one_hour_kept():
    h = History()
    h.sample(1000.0, received=0, delivered=0, backlog=0)
    h.sample(1030.0, received=60, delivered=30, backlog=30)  # 120/min in, 60/min out
    h.sample(1060.0, received=60, delivered=90, backlog=0)  # drained
    [a, b] = h.points()
    assert (a.at, a.intake_per_min, a.delivery_per_min, a.backlog) == (1030.0, 120, 60, 30)
    assert (b.intake_per_min, b.delivery_per_min, b.backlog) == (0, 120, 0)
    assert h.totals() == (60, 90)
    for i in range(1, 200):  # another 100 minutes: only the last hour stays
        h.sample(1060.0 + 30 * i, received=60 + i, delivered=90 + i, backlog=0)
    assert h.span_s() == 3600.0
    assert len(h.points()) == 120


def test_a_counter_that_went_down_draws_no_negative_rate():
    h = History()
    h.sample(0.0, received=500, delivered=500, backlog=0)
    h.sample(30.0, received=3, delivered=2, backlog=1)  # counters started over
    h.sample(60.0, received=33, delivered=32, backlog=1)
    assert [(p.intake_per_min, p.delivery_per_min) for p in h.points()] == [(60, 60)]


def test_the_chart_is_drawn_where_the_samples_are_and_labels_its_scale():
    h = History()
    now = 10_000.0
    h.sample(now - 1800, received=0, delivered=0, backlog=0)
    h.sample(now - 1770, received=300, delivered=100, backlog=200)
    svg = chart_svg(h.points(), now)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    # 600/min in: the axis tops at the next 1-2-5 step
    assert "1,000/min" in svg and "200 waiting" in svg and ">-30 min<" in svg
    xs = [float(x) for x in re.findall(r"(?:points|cx)='([\d.]+)", svg)]
    width = float(re.search(r"viewBox='0 0 ([\d.]+) ", svg).group(1))  # type: ignore[union-attr]
    assert xs and all(0.45 * width < x < 0.65 * width for x in xs)  # 30 min ago: mid-chart
    assert " style=" not in svg and "<script" not in svg


def test_the_page_says_when_it_has_no_history_yet():
    report = {"site": "s", "version": "1", "uptime_s": 3, "components": [], "sinks": {},
              "alarms": [], "outbox": {"events": 0, "accepting": True}}
    empty = page.render(report, [], page.Extras(history=History()))
    assert "No history yet" in empty and "starts empty after each start" in empty
    assert "<svg xmlns='http://www.w3.org/2000/svg' viewBox" not in empty
    h = History()
    h.sample(100.0, received=0, delivered=0, backlog=0)
    h.sample(130.0, received=30, delivered=30, backlog=0)
    drawn = page.render(report, [], page.Extras(history=h), now=131.0)
    assert "polyline" in drawn and "30 events in, 30 deliveries" in drawn
    assert "history since 30 s only" in drawn
