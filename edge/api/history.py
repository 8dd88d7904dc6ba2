"""Intake, delivery and backlog over the last hour, for the status page's chart.

``History`` keeps, in memory, one sample every ``SAMPLE_EVERY_S`` of three figures the
gateway already counts: events committed (``edge_events_received_total``), deliveries a
sink confirmed (``edge_events_delivered_total``) and rows waiting (``edge_outbox_depth``,
refreshed by the gateway every 5 s, so up to that much behind), for ``WINDOW_S``. Nothing is stored: after a start the history is empty and the page says
so. ``sample_forever`` is the API server's sampling task; ``chart_svg`` draws the points as
an inline SVG (no script, colours as attributes: it passes the page's CSP).

Rates are per minute between two consecutive samples; a counter that went down (a
registry reset) starts over from that sample instead of drawing a negative rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from edge.timefmt import duration

__all__ = ["SAMPLE_EVERY_S", "WINDOW_S", "History", "Point", "chart_svg", "sample_forever"]

SAMPLE_EVERY_S = 30.0
WINDOW_S = 3600.0

# chart geometry (SVG user units)
_W, _LEFT, _RIGHT = 740, 80, 12
_RATE_TOP, _RATE_H = 22, 96
_BACKLOG_TOP, _BACKLOG_H = 150, 50
_H = _BACKLOG_TOP + _BACKLOG_H + 22
_INTAKE, _DELIVERY, _BACKLOG = "#1f5fbf", "#1f7a3a", "#b86e00"


@dataclass(frozen=True)
class Point:
    """One interval between two samples: it ends at ``at`` (epoch s)."""

    at: float
    intake_per_min: float
    delivery_per_min: float
    backlog: int


class History:
    """The last ``window_s`` of samples; ``sample()`` is called by one task only."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.started_at = time.time()
        self._samples: deque[tuple[float, float, float, int]] = deque()

    def sample(self, now: float, received: float, delivered: float, backlog: int) -> None:
        """Record the counters' totals and the backlog at ``now`` (epoch seconds)."""
        self._samples.append((now, received, delivered, backlog))
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def points(self) -> list[Point]:
        """One point per interval between consecutive samples, oldest first."""
        out = []
        prev = None
        for cur in self._samples:
            if prev is not None and cur[0] > prev[0]:
                minutes = (cur[0] - prev[0]) / 60.0
                got, sent = cur[1] - prev[1], cur[2] - prev[2]
                if got >= 0 and sent >= 0:
                    out.append(Point(cur[0], got / minutes, sent / minutes, cur[3]))
            prev = cur
        return out

    def totals(self) -> tuple[float, float] | None:
        """(events in, deliveries) over the samples kept; None before two samples."""
        if len(self._samples) < 2:
            return None
        first, last = self._samples[0], self._samples[-1]
        return max(0.0, last[1] - first[1]), max(0.0, last[2] - first[2])

    def span_s(self) -> float:
        return self._samples[-1][0] - self._samples[0][0] if len(self._samples) > 1 else 0.0


def _total(collector: Any) -> float:
    """Sum of a prometheus counter's or gauge's children (public collection API)."""
    total = 0.0
    for family in collector.collect():
        for s in family.samples:
            if s.name in (family.name, family.name + "_total"):
                total += float(s.value)
    return total


def sample_gateway(history: History, gateway: Any, now: float | None = None) -> None:
    """One sample of ``gateway``'s counters into ``history``."""
    m = gateway.metrics
    history.sample(time.time() if now is None else now, _total(m.events_received),
                   _total(m.events_delivered), int(_total(m.outbox_depth)))


async def sample_forever(history: History, gateway: Any) -> None:
    """Sample now and every ``SAMPLE_EVERY_S`` until cancelled."""
    while True:
        sample_gateway(history, gateway)
        await asyncio.sleep(SAMPLE_EVERY_S)


def chart_svg(points: list[Point], now: float, window_s: float = WINDOW_S) -> str:
    """Two panels over ``window_s`` ending at ``now``: intake and delivery per minute
    (lines), backlog (area). Plain SVG markup; every text in it is a number."""
    plot_w = _W - _LEFT - _RIGHT
    start = now - window_s

    def x(at: float) -> float:
        return _LEFT + max(0.0, min(1.0, (at - start) / window_s)) * plot_w

    top_rate = _nice(max([p.intake_per_min for p in points]
                         + [p.delivery_per_min for p in points] + [1.0]))
    top_backlog = _nice(max([float(p.backlog) for p in points] + [1.0]))

    def y_rate(v: float) -> float:
        return _RATE_TOP + _RATE_H * (1 - v / top_rate)

    def y_backlog(v: float) -> float:
        return _BACKLOG_TOP + _BACKLOG_H * (1 - v / top_backlog)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {_W} {_H}' width='{_W}' "
           f"height='{_H}' role='img' aria-label='intake, delivery and backlog over the last "
           f"{duration(window_s)}' class='chart'>",
           f"<rect x='0' y='0' width='{_W}' height='{_H}' fill='#ffffff'/>"]
    for top, height, label in ((_RATE_TOP, _RATE_H, f"{_fmt(top_rate)}/min"),
                               (_BACKLOG_TOP, _BACKLOG_H, f"{_fmt(top_backlog)} waiting")):
        out.append(f"<rect x='{_LEFT}' y='{top}' width='{plot_w}' height='{height}' "
                   "fill='none' stroke='#d5d8dc'/>")
        out.append(f"<text x='{_LEFT - 4}' y='{top + 10}' text-anchor='end' font-size='10' "
                   f"fill='#5f6b76'>{label}</text>")
        out.append(f"<text x='{_LEFT - 4}' y='{top + height}' text-anchor='end' "
                   "font-size='10' fill='#5f6b76'>0</text>")
    for minutes in range(0, int(window_s // 60) + 1, 15):
        at = now - minutes * 60
        tx = x(at)
        out.append(f"<line x1='{tx:.1f}' y1='{_RATE_TOP}' x2='{tx:.1f}' "
                   f"y2='{_BACKLOG_TOP + _BACKLOG_H}' stroke='#eef0f2'/>")
        out.append(f"<text x='{tx:.1f}' y='{_H - 6}' text-anchor='middle' font-size='10' "
                   f"fill='#5f6b76'>{'now' if minutes == 0 else f'-{minutes} min'}</text>")
    out.append(f"<text x='{_LEFT}' y='14' font-size='11' fill='{_INTAKE}'>intake per minute"
               f"</text><text x='{_LEFT + 130}' y='14' font-size='11' fill='{_DELIVERY}'>"
               f"delivered per minute</text><text x='{_LEFT}' y='{_BACKLOG_TOP - 6}' "
               f"font-size='11' fill='{_BACKLOG}'>backlog (rows waiting)</text>")
    if points:
        base = _BACKLOG_TOP + _BACKLOG_H
        area = " ".join(f"{x(p.at):.1f},{y_backlog(p.backlog):.1f}" for p in points)
        out.append(f"<polygon points='{x(points[0].at):.1f},{base} {area} "
                   f"{x(points[-1].at):.1f},{base}' fill='{_BACKLOG}' fill-opacity='0.35' "
                   f"stroke='{_BACKLOG}'/>")
        for attr, colour in (("intake_per_min", _INTAKE), ("delivery_per_min", _DELIVERY)):
            line = " ".join(f"{x(p.at):.1f},{y_rate(getattr(p, attr)):.1f}" for p in points)
            out.append(f"<polyline points='{line}' fill='none' stroke='{colour}' "
                       "stroke-width='2'/>")
            last = points[-1]  # a dot at the latest value: one point draws no line
            out.append(f"<circle cx='{x(last.at):.1f}' cy='{y_rate(getattr(last, attr)):.1f}' "
                       f"r='2.5' fill='{colour}'/>")
    out.append("</svg>")
    return "".join(out)


def _nice(value: float) -> float:
    """The next 1, 2 or 5 × 10ⁿ at or above ``value`` (the axis top)."""
    step = 1.0
    while step * 10 <= value:
        step *= 10
    for m in (1, 2, 5, 10):
        if m * step >= value:
            return m * step
    return 10 * step


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"
