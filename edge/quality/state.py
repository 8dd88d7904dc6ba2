"""Lot state and CAPA counts: the rows, the changes to them, and the in-memory cache.

One set of pure functions (``apply_lot``, ``apply_capa``) says what a change does to a
row. The outbox writer applies them to the rows of its tables inside the transaction that
stores the events causing the changes (``edge.outbox.lots``); the rules apply the same
functions to a per-call view of the cache, so what they derive for the second failure of a
batch already sees the episode the first one opened.

The cache (``QualityState``) holds what the outbox committed, nothing else: it is filled
at open and updated from the rows a transaction returns, only after its COMMIT, so a
refused write changes nothing. Rows carry the revision of the transaction that wrote them;
an older row never replaces a newer one.

Lot states: ``unknown`` (seen — a receipt, a result — no disposition yet), ``hold``,
``quarantine``, ``rejected`` (the three "blocked" states) and ``released``. A hold episode
is the time a lot spends blocked: it opens when a lot that is not blocked fails (or a
source decides hold / quarantine / rejected) and ends only with a release. Episodes are
numbered per lot from 1; the number is in the dedupe keys of what an episode emits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "BLOCKED",
    "LOT_STATES",
    "CapaChange",
    "CapaRow",
    "Change",
    "Decision",
    "Failure",
    "LotChange",
    "LotRow",
    "QualityState",
    "QualityView",
    "apply_capa",
    "apply_lot",
]

LOT_STATES = ("unknown", "hold", "quarantine", "rejected", "released")
BLOCKED = frozenset({"hold", "quarantine", "rejected"})
DECISIONS = frozenset({"hold", "quarantine", "rejected", "released"})


@dataclass(slots=True)
class LotRow:
    lot_id: str
    first_seen: float
    updated_at: float
    state: str = "unknown"
    episode: int = 0  # the current (blocked) or last episode; 0: never blocked
    supplier: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # material, supplier_lot … of a receipt
    opened_at: float | None = None  # when the current / last episode opened
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None
    failures: int = 0  # failing results in the current / last episode
    last_type: str | None = None
    last_event_id: str | None = None
    last_at: float | None = None
    # event type → [event id, epoch s]; None in the cache (kept in the table only)
    last: dict[str, list[Any]] | None = None
    # a failure stored while the lot was not blocked that still needs its episode (a
    # release committed between deriving and storing it): what the episode is built from
    pending: dict[str, Any] | None = None
    rev: int = 0

    @property
    def blocked(self) -> bool:
        return self.state in BLOCKED

    def copy(self) -> LotRow:
        return LotRow(self.lot_id, self.first_seen, self.updated_at, self.state, self.episode,
                      self.supplier, dict(self.info), self.opened_at, self.decided_at,
                      self.decided_by, self.reason, self.failures, self.last_type,
                      self.last_event_id, self.last_at,
                      None if self.last is None else dict(self.last), self.pending, self.rev)


@dataclass(slots=True)
class CapaRow:
    rule: str  # CapaRule.key
    group: tuple[str, ...]  # the values of the rule's ``by`` fields
    threshold: int
    window_s: float
    updated_at: float
    # [time, lot_id, nonconformance id] counted since the last request, oldest first;
    # at most ``threshold`` entries within ``window_s`` of the newest
    times: list[list[Any]] = field(default_factory=list)
    last_start: float | None = None  # window start of the last capa.request
    last_capa_id: str | None = None
    requests: int = 0
    rev: int = 0

    @property
    def due(self) -> bool:
        """Enough nonconformances in the window and no request for them yet."""
        return len(self.times) >= self.threshold

    def copy(self) -> CapaRow:
        return replace(self, times=[list(t) for t in self.times])


@dataclass(frozen=True, slots=True)
class Decision:
    state: str  # released | hold | quarantine | rejected
    by: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A failing inspection result of the lot (a rule with ``hold: true`` failed)."""

    opens: int | None  # the episode this failure opens; None: the lot was blocked
    reason: str
    cause: dict[str, Any]  # enough to open an episode from it later (``pending``)
    resolves: str | None = None  # a catch-up: opens the episode of this pending failure


@dataclass(frozen=True, slots=True)
class LotChange:
    """What storing one event changes in its lot's row."""

    lot_id: str
    at: float  # gateway time, epoch seconds
    event_type: str
    event_id: str
    actor: str = "gateway"  # who, for the audit trail of a state change
    supplier: str | None = None
    supplier_final: bool = False  # from a receipt: replaces one known from a result
    info: dict[str, Any] | None = None
    decision: Decision | None = None
    failure: Failure | None = None

    @property
    def plain(self) -> bool:
        """Only a sighting: it sets the lot's last event (and creates an unknown lot)."""
        return (self.decision is None and self.failure is None and self.supplier is None
                and not self.info)


@dataclass(frozen=True, slots=True)
class CapaChange:
    rule: str
    group: tuple[str, ...]
    threshold: int
    window_s: float
    at: float
    count: tuple[float, str, str] | None = None  # (time, lot, nonconformance id)
    emitted: tuple[float, float, str] | None = None  # (window start, newest time, capa id)


Change = LotChange | CapaChange


def apply_lot(row: LotRow | None, ch: LotChange, *, own: bool = False) -> LotRow:
    """The lot's row after ``ch`` (a new row for a lot seen first). ``row`` is changed in
    place when the caller owns it (``own``), else copied.

    Written so that applying the changes of two concurrent derivations in either order
    ends in the same episode: a failure that meant to open episode n finds it open already
    (counted in it), or finds it released meanwhile (kept as ``pending``: the pipeline
    opens the next episode for it after the commit).
    """
    if row is None:
        r = LotRow(ch.lot_id, first_seen=ch.at, updated_at=ch.at)
    else:
        r = row if own else row.copy()
    r.updated_at = ch.at
    r.last_type, r.last_event_id, r.last_at = ch.event_type, ch.event_id, ch.at
    if r.last is not None:
        r.last[ch.event_type] = [ch.event_id, ch.at]
    if ch.supplier and (ch.supplier_final or r.supplier is None):
        r.supplier = ch.supplier
    if ch.info:
        r.info.update(ch.info)
    d = ch.decision
    if d is not None:
        if d.state != "released" and not r.blocked:
            r.episode += 1
            r.opened_at = ch.at
            r.failures = 0
        if d.state != "released":
            r.pending = None  # blocked now: the pending failure falls into this episode
        r.state, r.decided_at, r.decided_by, r.reason = d.state, ch.at, d.by, d.reason
    f = ch.failure
    if f is not None:
        if f.resolves is not None:
            if r.pending is not None and r.pending.get("event_id") == f.resolves:
                r.pending = None
                if not r.blocked:
                    _open(r, ch, f)
        elif f.opens is not None and not r.blocked and r.episode < f.opens:
            _open(r, ch, f)
        elif r.blocked:
            r.failures += 1
        else:  # released after the episode this failure saw: it needs a new one
            r.pending = {**f.cause, "reason": f.reason}
    return r


def _open(r: LotRow, ch: LotChange, f: Failure) -> None:
    r.episode = f.opens if f.opens is not None and f.opens > r.episode else r.episode + 1
    r.state, r.opened_at, r.failures = "hold", ch.at, 1
    r.decided_at, r.decided_by, r.reason = ch.at, ch.actor, f.reason


def apply_capa(row: CapaRow | None, ch: CapaChange, *, own: bool = False) -> CapaRow:
    """The counts after ``ch``; ``row`` is changed in place when the caller owns it."""
    if row is None:
        r = CapaRow(ch.rule, ch.group, ch.threshold, ch.window_s, updated_at=ch.at)
    else:
        r = row if own else row.copy()
    r.threshold, r.window_s, r.updated_at = ch.threshold, ch.window_s, ch.at
    if ch.count is not None:
        r.times.append(list(ch.count))
        r.times.sort(key=lambda t: t[0])
        newest = r.times[-1][0]
        r.times = [t for t in r.times if t[0] >= newest - r.window_s][-r.threshold:]
    if ch.emitted is not None:
        start, newest, capa_id = ch.emitted
        r.times = [t for t in r.times if t[0] > newest]
        r.last_start, r.last_capa_id = start, capa_id
        r.requests += 1
    return r


class QualityState:
    """What the outbox committed: every lot row (without ``last``) and every CAPA row."""

    def __init__(self) -> None:
        self.lots: dict[str, LotRow] = {}
        self.capa: dict[tuple[str, tuple[str, ...]], CapaRow] = {}
        self._pending: set[str] = set()  # lots with a failure waiting for its episode
        self._due: set[tuple[str, tuple[str, ...]]] = set()  # CAPA rows at their threshold

    def commit(self, lots: Iterable[LotRow] = (), capa: Iterable[CapaRow] = (),
               gone: Iterable[str] = (),
               gone_capa: Iterable[tuple[str, tuple[str, ...]]] = ()) -> None:
        """Take rows a committed transaction returned (never older over newer) and forget
        removed ones."""
        for row in lots:
            old = self.lots.get(row.lot_id)
            if old is None or row.rev >= old.rev:
                kept = row.copy()
                kept.last = None
                self.lots[row.lot_id] = kept
                if kept.pending is not None:
                    self._pending.add(kept.lot_id)
                else:
                    self._pending.discard(kept.lot_id)
        for c in capa:
            key = (c.rule, c.group)
            old_c = self.capa.get(key)
            if old_c is None or c.rev >= old_c.rev:
                self.capa[key] = c.copy()
                if c.due:
                    self._due.add(key)
                else:
                    self._due.discard(key)
        for lot_id in gone:
            self.lots.pop(lot_id, None)
            self._pending.discard(lot_id)
        for key in gone_capa:
            self.capa.pop(key, None)
            self._due.discard(key)

    def pending(self) -> list[LotRow]:
        """Lots with a failure still waiting for its episode."""
        return [self.lots[k] for k in sorted(self._pending)]

    def due(self) -> list[CapaRow]:
        """CAPA rows at their threshold without a request."""
        return [self.capa[k] for k in sorted(self._due)]

    def view(self) -> QualityView:
        return QualityView(self)


class QualityView:
    """The cache plus the changes of one call, applied in order (copy on write)."""

    def __init__(self, state: QualityState) -> None:
        self._state = state
        self._lots: dict[str, LotRow] = {}
        self._capa: dict[tuple[str, tuple[str, ...]], CapaRow] = {}

    def lot(self, lot_id: str) -> LotRow | None:
        return self._lots.get(lot_id) or self._state.lots.get(lot_id)

    def apply_lot(self, ch: LotChange) -> LotRow:
        own = ch.lot_id in self._lots
        row = self._lots[ch.lot_id] = apply_lot(self.lot(ch.lot_id), ch, own=own)
        return row

    def capa(self, rule: str, group: tuple[str, ...]) -> CapaRow | None:
        key = (rule, group)
        return self._capa.get(key) or self._state.capa.get(key)

    def apply_capa(self, ch: CapaChange) -> CapaRow:
        key = (ch.rule, ch.group)
        row = self._capa[key] = apply_capa(self.capa(*key), ch, own=key in self._capa)
        return row
