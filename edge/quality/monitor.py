"""Business monitors: stuck lots (the ``lots`` section of ``/status``), delivery SLAs per
event type and failed supplier notifications (the ``business`` section), and their gauges.

A lot is stuck when it has a receipt or results but no disposition (``unknown``) for
``quality.stuck_after_s``, or has been on hold that long without a decision. The section
(``edge.outbox.lots.summary``) counts lots by state and lists the stuck ones, oldest
first; the page and ``edge status`` show them (``edge.api.summary``).

Delayed dispositions are the stuck lots on hold (``delayed_dispositions``).

A delivery SLA (``quality.sla``: ``{type, within_s}``) is breached while an event of that
type is still undelivered to some sink ``within_s`` after it arrived (oldest undelivered
age per type and sink, from the outbox). Supplier notifications (``quality.
notification_types``: supplier cases, notifications, CAPA requests) that were
dead-lettered or are retrying after a failed attempt are listed.

Gauges (``/metrics``): ``edge_lots_stuck``, ``edge_lots{state}``,
``edge_delivery_sla_breached{type}`` (0/1), ``edge_delivery_sla_oldest_seconds{type}``,
``edge_notifications_dead_letters`` and ``edge_notifications_retrying``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from edge.outbox import Outbox, lots
from edge.quality.rules import SlaConfig
from edge.quality.state import LOT_STATES
from edge.timefmt import duration

__all__ = ["LotMonitor"]

_GAUGES: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Gauge, Gauge]] = (
    weakref.WeakKeyDictionary())
_BUSINESS: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Gauge, Gauge, Gauge, Gauge]] = (
    weakref.WeakKeyDictionary())


def _business_gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge, Gauge, Gauge]:
    found = _BUSINESS.get(registry)
    if found is None:
        found = (
            Gauge("edge_delivery_sla_breached", "1 while an event of this type is undelivered "
                  "to some sink for longer than its SLA (quality.sla)", ["type"],
                  registry=registry),
            Gauge("edge_delivery_sla_oldest_seconds", "Age of the oldest undelivered event of "
                  "a type with an SLA (0: none waiting)", ["type"], registry=registry),
            Gauge("edge_notifications_dead_letters", "Dead letters of supplier cases, "
                  "notifications and CAPA requests", registry=registry),
            Gauge("edge_notifications_retrying", "Supplier cases, notifications and CAPA "
                  "requests retrying after a failed attempt", registry=registry),
        )
        _BUSINESS[registry] = found
    return found


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
    def __init__(self, registry: CollectorRegistry, stuck_after_s: float, *,
                 sla: Sequence[SlaConfig] = (),
                 notification_types: Sequence[str] = ()) -> None:
        self.stuck_after_s = stuck_after_s
        self.sla = list(sla)
        self.notification_types = list(notification_types)
        self._stuck, self._by_state = _gauges(registry)
        (self._sla_breached, self._sla_oldest, self._nt_dead,
         self._nt_retrying) = _business_gauges(registry)

    async def business(self, outbox: Outbox) -> dict[str, Any]:
        """The ``business`` section of ``/status``: delivery SLAs per type and failed
        supplier notifications; the gauges follow it."""
        now = time.time()
        types = [s.type for s in self.sla]
        nt = self.notification_types

        def read(c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            return (lots.undelivered_by_type(c, types, now=now),
                    lots.notification_failures(c, nt))

        waiting, failures = await outbox.read(read)
        slas = [sla_entry(s, waiting.get(s.type) or {}) for s in self.sla]
        for entry in slas:
            self._sla_breached.labels(entry["type"]).set(1 if entry["breached"] else 0)
            self._sla_oldest.labels(entry["type"]).set(entry["oldest_age_s"] or 0)
        self._nt_dead.set(failures["dead_letters"])
        self._nt_retrying.set(failures["retrying"])
        return {"sla": slas, "sla_breached": sum(1 for e in slas if e["breached"]),
                "notifications": {"types": nt, **failures}}

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


def sla_entry(sla: SlaConfig, per_sink: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One SLA's state: breached when its oldest undelivered event (at any sink) is older
    than ``within_s``; ``late_s`` by how much, the sinks that are late."""
    oldest = max((w["oldest_age_s"] for w in per_sink.values()), default=None)
    late = {sid: w for sid, w in per_sink.items() if w["oldest_age_s"] > sla.within_s}
    breached = bool(late)
    entry: dict[str, Any] = {
        "type": sla.type, "within_s": sla.within_s, "breached": breached,
        "oldest_age_s": oldest, "waiting": sum(w["waiting"] for w in per_sink.values()),
        "late_s": round(oldest - sla.within_s, 1) if breached and oldest is not None else 0,
        "sinks": {sid: {**w, "late": sid in late} for sid, w in sorted(per_sink.items())},
    }
    if breached and oldest is not None:
        worst = max(late.items(), key=lambda kv: kv[1]["oldest_age_s"])[0]
        entry["message"] = (f"{sla.type} not delivered within {duration(sla.within_s)}: the "
                            f"oldest waits {duration(oldest)} ({duration(entry['late_s'])} "
                            f"late) at {', '.join(sorted(late))}; worst {worst}")
    return entry
