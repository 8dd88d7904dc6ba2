"""What the demo prints: one live line a second, and the verdict at the end.

Live line (from the gateway's metrics and outbox statistics)::

    [  12s] received 240  stored 240  delivered 200  backlog 40  dead letters 0  lots 9
    (hold 1, released 7, stuck 1)  ERP up

(one line; ``lots``: the gateway's lot table as ``/status`` shows it — lots by state and
the stuck ones, see docs/quality.md)

Verdict (what the stations had confirmed vs what the ERP received)::

    published 1234, delivered 1234 (0 lost, 0 duplicates)
      MQTT stations: 1170 published, 1170 delivered; OPC UA station: 64 published, 64 delivered

``lost`` counts confirmed records the ERP never received; ``duplicates`` counts records
that arrived under two different event ids (a receiver could not tell them apart).
A record sent again under the SAME event id is a retry the receiver dedupes by its
``Idempotency-Key``; those are reported separately as repeats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge.app import Gateway
    from edge.demo.stations import StationGroup

__all__ = ["Snapshot", "Tally", "Verdict", "judge", "snapshot"]


@dataclass(frozen=True)
class Snapshot:
    received: int
    stored: int
    delivered: int
    backlog: int
    dead_letters: int
    quarantined: int
    lots: dict[str, Any] | None = None  # the lots section of /status

    def line(self, elapsed_s: float, erp_state: str) -> str:
        text = (f"[{elapsed_s:4.0f}s] received {self.received}  stored {self.stored}  "
                f"delivered {self.delivered}  backlog {self.backlog}  "
                f"dead letters {self.dead_letters}")
        if self.quarantined:
            text += f"  quarantined {self.quarantined}"
        if self.lots is not None:
            by_state = self.lots.get("by_state") or {}
            states = ", ".join(f"{state} {n}" for state, n in by_state.items()
                               if n and state != "unknown")
            text += (f"  lots {self.lots.get('total', 0)} ({states + ', ' if states else ''}"
                     f"stuck {self.lots.get('stuck', 0)})")
        return f"{text}  ERP {erp_state}"


def _sample(gw: Gateway, name: str, label: str, values: Iterable[str]) -> int:
    registry = gw.metrics.registry
    return int(sum(registry.get_sample_value(name, {label: v}) or 0 for v in values))


async def snapshot(gw: Gateway) -> Snapshot:
    """Counters of a running gateway (sources' own counts where they keep them)."""
    # "rules": nonconformances and holds derived from inspection results (edge.rules)
    stored = _sample(gw, "edge_events_received_total", "source", [*gw.sources, "rules"])
    received = 0
    for sid, source in gw.sources.items():
        status = getattr(source, "status", None)
        counts = status() if callable(status) else {}
        received += int(counts.get("received", _sample(gw, "edge_events_received_total",
                                                          "source", [sid])))
    stats = await gw.outbox.stats()
    monitor = getattr(gw, "lot_monitor", None)
    lots = await monitor.section(gw.outbox) if monitor is not None else None
    return Snapshot(
        received=received,
        stored=stored,
        delivered=_sample(gw, "edge_events_delivered_total", "sink", gw.sinks),
        backlog=sum(int(s.get("total", 0)) for s in stats["sinks"].values()),
        dead_letters=int(stats["dead_letters"]),
        quarantined=int(sum(stats["quarantine"].values())),
        lots=lots,
    )


@dataclass(frozen=True)
class Verdict:
    published: int  # confirmed to the stations (PUBACK)
    unconfirmed: int  # produced but never confirmed by the broker
    delivered: int  # confirmed records the ERP received
    lost: int
    duplicates: int
    repeats: int  # same event id received again (retries, deduped by Idempotency-Key)
    lost_examples: tuple[str, ...] = ()
    by_group: tuple[tuple[str, int, int], ...] = ()  # (label, published, delivered)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0

    def line(self) -> str:
        text = (f"published {self.published}, delivered {self.delivered} "
                f"({self.lost} lost, {self.duplicates} duplicates)")
        extra = []
        if self.repeats:
            extra.append(f"{self.repeats} resent under the same Idempotency-Key")
        if self.unconfirmed:
            extra.append(f"{self.unconfirmed} never confirmed by the broker")
        text += f"; {', '.join(extra)}" if extra else ""
        if len(self.by_group) > 1:
            text += "\n  " + "; ".join(f"{label}: {pub} published, {dlv} delivered"
                                       for label, pub, dlv in self.by_group)
        return text


class Tally:
    """Incremental record of what the ERP accepted, per station group (keys and ids only).

    The demo moves accepted events out of the stand-in ERP into a tally every second, so
    memory grows with the number of distinct records, not with whole event bodies.
    """

    def __init__(self, groups: Sequence[StationGroup]) -> None:
        self.groups = list(groups)
        self._ids: list[dict[str, set[str]]] = [{} for _ in self.groups]
        self._arrivals: list[dict[str, int]] = [{} for _ in self.groups]

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        for ev in events:
            source = ev.get("source")
            for i, group in enumerate(self.groups):
                if source not in group.source_ids:
                    continue
                key = group.key_of(ev)
                if key is not None:
                    self._ids[i].setdefault(key, set()).add(str(ev.get("id")))
                    self._arrivals[i][key] = self._arrivals[i].get(key, 0) + 1
                break

    def missing(self, confirmed: Sequence[set[str]]) -> int:
        """How many of each group's ``confirmed`` keys have not arrived yet."""
        return sum(len(c - ids.keys()) for c, ids in zip(confirmed, self._ids, strict=True))

    def verdict(self) -> Verdict:
        published = unconfirmed = delivered = lost = duplicates = repeats = 0
        examples: list[str] = []
        by_group: list[tuple[str, int, int]] = []
        for group, ids_by_key, arrivals in zip(self.groups, self._ids, self._arrivals,
                                               strict=True):
            confirmed = group.confirmed()
            published += len(confirmed)
            unconfirmed += max(0, group.sent - len(confirmed))
            missing = sorted(confirmed - ids_by_key.keys())
            lost += len(missing)
            examples += missing[:5]
            arrived = len(confirmed & ids_by_key.keys())
            delivered += arrived
            by_group.append((group.label, len(confirmed), arrived))
            duplicates += sum(1 for ids in ids_by_key.values() if len(ids) > 1)
            repeats += sum(n - len(ids_by_key[k]) for k, n in arrivals.items())
        return Verdict(published, unconfirmed, delivered, lost, duplicates, repeats,
                       tuple(examples[:5]), tuple(by_group))


def judge(groups: Sequence[StationGroup], events: Sequence[dict[str, Any]]) -> Verdict:
    """Compare every group's confirmed records with the events the ERP accepted."""
    tally = Tally(groups)
    tally.add(events)
    return tally.verdict()
