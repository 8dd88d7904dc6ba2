"""Stuck lots: the ``lots`` section of ``/status`` and its gauges.

A lot is stuck when it has a receipt or results but no disposition (``unknown``) for
``quality.stuck_after_s``, or has been on hold that long without a decision. The section
(``edge.outbox.lots.summary``) counts lots by state and lists the stuck ones, oldest
first; the page and ``edge status`` show them (``edge.api.summary``).

Gauges (``/metrics``): ``edge_lots_stuck`` and ``edge_lots{state}``.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from edge.outbox import Outbox, lots
from edge.quality.state import LOT_STATES

__all__ = ["LotMonitor"]

_GAUGES: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Gauge, Gauge]] = (
    weakref.WeakKeyDictionary())


def _gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """The monitor's gauges in ``registry`` (made once per registry)."""
    found = _GAUGES.get(registry)
    if found is None:
        found = (
            Gauge("edge_lots_stuck", "Lots without a disposition (or on hold without a "
                  "decision) for longer than quality.stuck_after_s", registry=registry),
            Gauge("edge_lots", "Lots in the lots table by state", ["state"], registry=registry),
        )
        _GAUGES[registry] = found
    return found


class LotMonitor:
    def __init__(self, registry: CollectorRegistry, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self._stuck, self._by_state = _gauges(registry)

    async def section(self, outbox: Outbox) -> dict[str, Any]:
        """The ``lots`` section of ``/status`` (read on the outbox's reader thread); the
        gauges follow it."""
        now = time.time()
        doc: dict[str, Any] = await outbox.read(
            lambda c: lots.summary(c, now=now, stuck_after_s=self.stuck_after_s))
        self._stuck.set(doc["stuck"])
        for state in LOT_STATES:
            self._by_state.labels(state).set(doc["by_state"].get(state, 0))
        return doc
