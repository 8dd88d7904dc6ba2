"""The edge quality logic: hold episodes, releases, supplier cases, notifications, CAPA.

``QualityRules.derive(items, state)`` is called by the pipeline once per submit call. For
each item from a source it returns the item with its lot-state change attached
(``Submission.quality``) and, right after it, the events derived from it (marked
``derived``: stored in the same transaction, dropped with a redelivered cause). It reads
the committed lot states (``QualityState``) through a view that applies the call's own
changes as it goes, so the second failure of a batch sees the episode the first opened.

A lot's events, by type (``lot_id`` in the data; other events pass untouched):

- ``material.receipt``: the lot is seen (state ``unknown`` until a disposition); its
  ``supplier`` (and ``material``, ``supplier_lot``, ``purchase_order``) are remembered.
- a result failing a ``spec_limits`` rule: one ``nonconformance`` per failing rule. When
  the lot is not blocked (on hold, in quarantine, rejected), a rule with ``hold: true``
  opens hold episode n+1: one ``quality.hold``, one ``lot.status`` (``hold``), one
  ``supplier.case`` when the supplier is known (receipt, or the result's ``supplier``), one
  ``notification`` per audience. While it is blocked, failures add nonconformances only.
- ``lot.status`` (``released`` / ``hold`` / ``quarantine`` / ``rejected``),
  ``quality.release`` and ``quality.hold`` from a source: the decision, with its
  ``decided_by`` (or ``source:<id>``). A release ends the episode; the next failure
  opens the next one. A blocking decision of a lot that was not blocked opens an episode
  without emitting anything (the decision itself is the record).

Dedupe keys carry the episode (``hold:{lot}:{n}``, ``lot-status:{lot}:{n}:hold``,
``supplier-case:{lot}:{n}``, ``notify:{lot}:{n}:{audience}``): two calls that both saw
"no episode" derive the same keys and the outbox stores one of each. A failure derived
while a release was being committed is stored as ``pending`` on the lot; ``catch_up``
opens its episode after the commit (and at start, should the process have died between).

CAPA: each nonconformance counts for every ``capa`` rule under the values of the rule's
``by`` fields (a nonconformance without one of them is not counted). The N-th within
``window_s`` (event time: the result's ``source_ts``, else its arrival) emits one
``capa.request`` with key ``capa:{values}:{window start}``; counting starts afresh after
it. Counts live in the outbox (``capa_counts``), so a restart keeps them; a threshold
reached by two calls at once is caught up after their commits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from edge.components import Submission
from edge.events import Event, make_event
from edge.quality.rules import CapaRule, SpecLimitsRule
from edge.quality.state import (
    DECISIONS,
    CapaChange,
    CapaRow,
    Change,
    Decision,
    Failure,
    LotChange,
    LotRow,
    QualityState,
    QualityView,
)
from edge.timefmt import duration, parse_iso, utc_iso

__all__ = ["OPERATOR_SOURCE", "RULES_SOURCE", "TRACKED_TYPES", "QualityRules"]

RULES_SOURCE = "rules"  # the source of every event the rules derive
OPERATOR_SOURCE = "operator"  # the source of a release decided with `edge lot release`
# Sources whose releases carry their own quality.release (the operator's release, one that
# came down from the ERP/QMS): a lot.status released from any other source gets one derived
_OWN_RELEASE_SOURCES = frozenset({OPERATOR_SOURCE, "reconcile"})
# event types that update a lot's row (besides the events a spec_limits rule judges)
TRACKED_TYPES = frozenset({"material.receipt", "inspection.result", "lot.status",
                           "quality.hold", "quality.release"})
_RECEIPT_INFO = ("material", "supplier_lot", "purchase_order")


def _text(value: Any) -> str | None:
    """An identifier as text (PLCs send numbers); None for missing, empty or structured."""
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return text if text.strip() else None


def _with_quality(item: Submission, changes: list[Change]) -> Submission:
    """A copy of ``item`` carrying ``changes`` too (the source's object is left alone: it
    may submit it again)."""
    return Submission(item.event, item.dedupe_key, item.redelivery_only, item.redelivered,
                      item.redelivery_horizon, item.derived, (*item.quality, *changes))


def _event_time(ev: Event) -> float:
    ts: datetime = ev.source_ts or ev.received_ts
    return ts.timestamp()


class QualityRules:
    """The configured rules, applied per submit call (see the module docstring)."""

    def __init__(self, rules: Iterable[BaseModel], site: str) -> None:
        self.site = site
        rules = list(rules)
        self.spec = [r for r in rules if isinstance(r, SpecLimitsRule)]
        self.capa = [r for r in rules if isinstance(r, CapaRule)]
        self._capa_by_key = {r.key: r for r in self.capa}
        self._spec_types = frozenset(t for r in self.spec for t in r.events)

    # ------------------------------------------------------------------ derive

    def derive(self, items: Sequence[Submission], state: QualityState,
               now: float | None = None) -> tuple[list[Submission], list[int]]:
        """``items`` with their changes, each followed by what it derives; and the
        position of each of ``items`` in that list.

        A change that only records a sighting (a passing result, a receipt of a known
        lot …) is kept only for the last event of its lot and type in the call: the rows
        it writes are the same, and a stream of results costs one row write per lot and
        transaction, not one per result."""
        now = time.time() if now is None else now
        view = state.view()
        batch: list[Submission] = []
        causes: list[int] = []
        attach: dict[int, list[Change]] = {}
        plain: dict[tuple[str, str], int] = {}  # (lot, type) → position of its last sighting
        for item in items:
            pos = len(batch)
            causes.append(pos)
            batch.append(item)
            ev = item.event
            if ev.type not in TRACKED_TYPES and ev.type not in self._spec_types:
                continue
            lot, changes, derived = self._derive_one(ev, view, now)
            if lot is None:
                continue
            plain.pop((lot, ev.type), None)  # an earlier sighting is superseded by this
            if changes:
                attach[pos] = changes
            else:
                plain[(lot, ev.type)] = pos
            batch.extend(derived)
        for (lot, type_), pos in plain.items():
            attach[pos] = [LotChange(lot, now, type_, batch[pos].event.id)]
        for pos, changes in attach.items():
            batch[pos] = _with_quality(batch[pos], changes)
        return batch, causes

    def _derive_one(self, ev: Event, view: QualityView, now: float
                    ) -> tuple[str | None, list[Change], list[Submission]]:
        """(the lot, its changes, what ``ev`` derives); no changes for a plain sighting
        (the caller records the last one of the call), no lot for an event without one."""
        data = ev.data
        lot = _text(data.get("lot_id"))
        if lot is None:
            return None, [], []
        row = view.lot(lot)
        supplier = _text(data.get("supplier"))
        info = None
        if ev.type == "material.receipt":
            info = {k: v for k in _RECEIPT_INFO if (v := _text(data.get(k))) is not None}
        decision = self._decision(ev)
        fails = [(r, why) for r in self.spec
                 if r.applies(ev.type, data) and (why := r.violation(data)) is not None]
        if not fails and decision is None and not info and (
                supplier is None or (row is not None and row.supplier is not None)):
            return lot, [], []  # a sighting: it changes nothing the rules read
        failure: Failure | None = None
        derived: list[Submission] = []
        known_supplier = (supplier if ev.type == "material.receipt" or row is None
                          or row.supplier is None else row.supplier)
        if fails:
            failure, derived = self._failure(ev, lot, row, fails, known_supplier, info)
        if (decision is not None and decision.state == "released" and ev.type == "lot.status"
                and ev.source not in _OWN_RELEASE_SOURCES and row is not None and row.blocked):
            # a release decided elsewhere (the MES, a QMS downlink) ends the episode: the
            # quality.release goes where the hold went (the line's retained hold topic)
            derived.append(self._derived(ev, "quality.release", {
                "lot_id": lot, "episode": row.episode, "lot_status_event_id": ev.id,
                "reason": decision.reason or f"released by lot.status from {ev.source}",
                "decided_by": decision.by or f"source:{ev.source}"},
                key=f"release:{lot}:{row.episode}"))
        change = LotChange(
            lot, now, ev.type, ev.id, supplier=supplier,
            supplier_final=ev.type == "material.receipt", info=info,
            decision=decision, failure=failure)
        view.apply_lot(change)
        changes: list[Change] = [change]
        for nc in [d for d in derived if d.event.type == "nonconformance"]:
            for rule in self.capa:
                changes_c, capa = self._count(rule, nc.event, ev, view, now)
                changes.extend(changes_c)
                derived.extend(capa)
        return lot, changes, derived

    def _decision(self, ev: Event) -> Decision | None:
        data = ev.data
        if ev.type == "lot.status":
            status = data.get("status")
            state = status.strip().lower() if isinstance(status, str) else None
            if state not in DECISIONS:
                return None
        elif ev.type == "quality.release":
            state = "released"
        elif ev.type == "quality.hold":
            state = "hold"
        else:
            return None
        reason = data.get("reason")
        return Decision(state, _text(data.get("decided_by")) or f"source:{ev.source}",
                        reason if isinstance(reason, str) else None)

    def _failure(self, ev: Event, lot: str, row: LotRow | None,
                 fails: list[tuple[SpecLimitsRule, str]], supplier: str | None,
                 info: dict[str, Any] | None) -> tuple[Failure | None, list[Submission]]:
        data = ev.data
        derived: list[Submission] = []
        for rule, why in fails:
            if not rule.nonconformance:
                continue
            nc = {"lot_id": lot, "reason": why, "inspection_event_id": ev.id,
                  "serial": data.get("serial"), "sample": data.get("sample"),
                  "characteristic": data.get("characteristic"),
                  "measured": data.get(rule.field), "unit": data.get("unit"),
                  "lower": rule.lower, "upper": rule.upper, "supplier": supplier,
                  "station": data.get("station"), "material": (info or {}).get("material")
                  or (row.info.get("material") if row is not None else None)}
            derived.append(self._derived(ev, "nonconformance",
                                         {k: v for k, v in nc.items() if v is not None}))
        holding = [(r, why) for r, why in fails if r.hold]
        if not holding:
            return None, derived
        reason = holding[0][1]
        cause = {
            "event_id": ev.id, "correlation_id": ev.correlation_id,
            "ordering_key": ev.ordering_key,
            "source_ts": utc_iso(ev.source_ts.timestamp()) if ev.source_ts else None,
            "serial": _text(data.get("serial")),
            "characteristic": _text(data.get("characteristic")),
            "supplier": supplier,
            "supplier_case": any(r.supplier_case for r, _ in holding),
            "notify": list(dict.fromkeys(a for r, _ in holding for a in r.notify)),
        }
        if row is not None and row.blocked:
            return Failure(None, reason, cause), derived
        n = (row.episode if row is not None else 0) + 1
        merged_info = {**(row.info if row is not None else {}), **(info or {})}
        derived += self.episode_events(lot, n, reason, cause, merged_info)
        return Failure(n, reason, cause), derived

    def _derived(self, ev: Event, type_: str, data: dict[str, Any],
                 key: str | None = None) -> Submission:
        return Submission(make_event(type=type_, site=self.site, source=RULES_SOURCE,
                                     data=data, ordering_key=ev.ordering_key,
                                     correlation_id=ev.correlation_id,
                                     source_ts=ev.source_ts),
                          dedupe_key=key, derived=True)

    def episode_events(self, lot: str, n: int, reason: str, cause: dict[str, Any],
                       info: dict[str, Any]) -> list[Submission]:
        """What opening episode ``n`` of ``lot`` emits (from the failing result ``cause``)."""
        ts = parse_iso(cause.get("source_ts"))
        source_ts = datetime.fromtimestamp(ts, UTC) if ts is not None else None
        supplier = cause.get("supplier")
        common = {"lot_id": lot, "reason": reason, "episode": n,
                  "inspection_event_id": cause["event_id"]}

        def event(type_: str, data: dict[str, Any], key: str) -> Submission:
            return Submission(make_event(
                type=type_, site=self.site, source=RULES_SOURCE,
                data={k: v for k, v in data.items() if v is not None},
                ordering_key=cause.get("ordering_key"),
                correlation_id=cause.get("correlation_id"), source_ts=source_ts),
                dedupe_key=key, derived=True)

        out = [
            event("quality.hold", {**common, "serial": cause.get("serial"),
                                   "characteristic": cause.get("characteristic"),
                                   "supplier": supplier}, f"hold:{lot}:{n}"),
            event("lot.status", {**common, "status": "hold", "decided_by": "gateway"},
                  f"lot-status:{lot}:{n}:hold"),
        ]
        if supplier and cause.get("supplier_case", True):
            out.append(event("supplier.case", {
                **common, "supplier": supplier, "characteristic": cause.get("characteristic"),
                "material": info.get("material"), "supplier_lot": info.get("supplier_lot")},
                f"supplier-case:{lot}:{n}"))
        of = f" of {supplier}" if supplier else ""
        for audience in cause.get("notify") or ():
            out.append(event("notification", {
                "audience": audience, "severity": "warning",
                "subject": f"Lot {lot}{of} on hold (episode {n})",
                "message": f"Lot {lot}{of} was put on hold at the edge: {reason}. It stays "
                           "on hold until it is released.",
                "lot_id": lot, "supplier": supplier, "episode": n,
                "cause_event_id": cause["event_id"]}, f"notify:{lot}:{n}:{audience}"))
        return out

    # ------------------------------------------------------------------ CAPA

    def _count(self, rule: CapaRule, nc: Event, cause: Event, view: QualityView, now: float
               ) -> tuple[list[Change], list[Submission]]:
        values = [_text(nc.data.get(f)) for f in rule.by]
        if any(v is None for v in values):
            return [], []
        group = tuple(v for v in values if v is not None)
        lot = str(nc.data.get("lot_id"))
        count = CapaChange(rule.key, group, rule.nonconformances, rule.window_s, now,
                           count=(_event_time(cause), lot, nc.id))
        row = view.apply_capa(count)
        if not row.due:
            return [count], []
        capa, emitted = self.capa_request(rule, row, cause.correlation_id, now)
        view.apply_capa(emitted)
        return [count, emitted], [capa]

    def capa_request(self, rule: CapaRule, row: CapaRow, correlation_id: str | None,
                     now: float) -> tuple[Submission, CapaChange]:
        """The ``capa.request`` for the nonconformances counted in ``row`` (due), and the
        change that records it."""
        counted = row.times[-rule.nonconformances:]
        start, newest = counted[0][0], counted[-1][0]
        fields = dict(zip(rule.by, row.group, strict=True))
        what = " / ".join(f"{k} {v}" for k, v in fields.items())
        data = {**fields, "count": len(counted), "window_s": rule.window_s,
                "window_start": utc_iso(start),
                "reason": f"{len(counted)} nonconformances of {what} within "
                          f"{duration(rule.window_s)}",
                "lot_ids": list(dict.fromkeys(str(t[1]) for t in counted)),
                "nonconformance_ids": [str(t[2]) for t in counted]}
        supplier = fields.get("supplier")
        ev = make_event(type="capa.request", site=self.site, source=RULES_SOURCE, data=data,
                        ordering_key=f"supplier:{supplier}" if supplier else None,
                        correlation_id=correlation_id)
        key = "capa:" + ":".join(row.group) + f":{utc_iso(start)}"
        emitted = CapaChange(rule.key, row.group, rule.nonconformances, rule.window_s, now,
                             emitted=(start, newest, ev.id))
        return Submission(ev, dedupe_key=key, derived=True), emitted

    # ------------------------------------------------------------------ release

    def release(self, row: LotRow, *, by: str, reason: str, actor: str,
                now: float | None = None) -> list[Submission]:
        """A release of ``row``'s lot decided by ``by``: a ``lot.status`` (released) that
        carries the change, and a ``quality.release`` after it (same correlation id)."""
        now = time.time() if now is None else now
        lot, n = row.lot_id, row.episode
        data = {"lot_id": lot, "reason": reason, "decided_by": by, "episode": n}
        status = make_event(type="lot.status", site=self.site, source=OPERATOR_SOURCE,
                            data={**data, "status": "released"})
        release = make_event(type="quality.release", site=self.site, source=OPERATOR_SOURCE,
                             data=dict(data), correlation_id=status.correlation_id)
        change = LotChange(lot, now, "lot.status", status.id, actor=actor,
                           decision=Decision("released", by, reason))
        return [Submission(status, dedupe_key=f"lot-status:{lot}:{n}:released",
                           quality=(change,)),
                Submission(release, dedupe_key=f"release:{lot}:{n}", derived=True)]

    # ------------------------------------------------------------------ catch-up

    def catch_up(self, state: QualityState, now: float | None = None
                 ) -> tuple[list[Submission], list[Change]]:
        """Episodes still owed to pending failures and CAPA requests owed to counts that
        reached their threshold in two calls at once: the events to store, then the changes
        that record them (apply them after the events: a crash in between repeats the same
        keys, which the outbox stores once)."""
        now = time.time() if now is None else now
        subs: list[Submission] = []
        changes: list[Change] = []
        for row in state.pending():
            cause = row.pending or {}
            n = row.episode + 1
            events = self.episode_events(row.lot_id, n, str(cause.get("reason")), cause,
                                         row.info)
            subs += events
            changes.append(LotChange(
                row.lot_id, now, "quality.hold", events[0].event.id,
                failure=Failure(n, str(cause.get("reason")), cause,
                                resolves=str(cause.get("event_id")))))
        for crow in state.due():
            rule = self._capa_by_key.get(crow.rule)
            if rule is not None:  # a rule no longer configured owes nothing
                capa, emitted = self.capa_request(rule, crow, None, now)
                subs.append(capa)
                changes.append(emitted)
        return subs, changes

    def owes(self, state: QualityState) -> bool:
        """Is there anything for ``catch_up`` to do?"""
        return bool(state.pending()) or any(c.rule in self._capa_by_key for c in state.due())
