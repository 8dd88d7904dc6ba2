"""ERP / QMS reconciliation: read each lot's status back from the systems that decide it.

Every ``quality.reconcile.every_s`` the gateway reads (HTTP GET through an ``http`` sink's
url, auth and TLS) the status of the lots with an open episode (hold, quarantine,
rejected) or a decision within ``recent_s`` from every configured system, and compares:

- **Mismatches**: the lot is usable in one place and blocked in another (``local`` vs a
  system, or two systems between them): e.g. on hold locally and released in the ERP; the
  QMS says rejected and the ERP available. While the gateway's own status of that lot is
  still on its way to a system (queued or retrying), that system's answer is not judged
  (``in_transit``). Each mismatch is logged once when it appears (and once when it is
  resolved), shown in ``/status`` (``lots.reconcile``), the page, ``edge status``, ``edge
  lots`` and counted in ``edge_lot_status_mismatch{between}`` (lots per pair of places).
- **Failed reads** (system down, 404, an answer without a known status) are no mismatch:
  the system's view of the lot is ``unknown`` with the reason, counted in
  ``edge_lot_status_read_failures_total{system,reason}`` and
  ``edge_lot_status_unknown{system}``.
- **Dispositions flow down**: a decision of a system that is authoritative for it (the
  source's ``apply``; default: a QMS's release or rejection) and *new* — the system's
  answer changed since the last read (or is the first one seen), is not older than the
  local decision, and no status of the gateway's own is on its way to it — is stored as a
  local ``lot.status`` (source ``reconcile``, data: ``system``, ``decided_by``,
  ``decided_at``, ``remote_status``), with a ``quality.release`` after a release, so the
  line's hold topic clears. The lot's state changes in the same transaction, audited with
  actor ``reconcile:<system>`` and who decided. Its dedupe key
  (``reconcile:{system}:{lot}:{episode}:{state}``) stores one per episode. When the
  authoritative systems disagree between them, nothing is applied (a mismatch is shown).
  An event the gateway sent itself cannot come back as a decision: its echo equals the
  local state, or is not new, or is still in transit.

The last answers are kept in ``<state_dir>/reconcile.json`` (also read by ``edge lots``),
so a restart does not take an old answer for a new decision.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from edge.components import Submission
from edge.errors import ConfigError, OutboxError
from edge.events import make_event
from edge.outbox import Outbox, lots
from edge.quality.rules import ReconcileConfig, ReconcileSource
from edge.quality.state import BLOCKED, Decision, LotChange, LotRow
from edge.telemetry import log_event
from edge.timefmt import parse_iso, utc_iso

__all__ = ["RECONCILE_SOURCE", "STATE_FILE", "LotCheck", "Read", "Reconciler", "load_checks"]

log = logging.getLogger(__name__)

RECONCILE_SOURCE = "reconcile"  # the source of a decision that came down
STATE_FILE = "reconcile.json"
LOCAL = "local"
SHOWN = 20  # lots listed per kind in /status


class _NotStarted(Exception):
    pass


def _category(state: str | None) -> str | None:
    """``usable`` (released), ``blocked`` (hold, quarantine, rejected) or None (no claim)."""
    if state == "released":
        return "usable"
    if state in BLOCKED:
        return "blocked"
    return None


@dataclass
class Read:
    """One system's answer about one lot."""

    system: str
    at: float
    raw: str | None = None  # the status word as the system said it
    state: str | None = None  # what it means locally; None: unknown (see ``error``)
    decided_by: str | None = None
    decided_at: float | None = None
    error: str | None = None  # why unknown
    reason_code: str | None = None  # not_found | http_error | unreachable | bad_answer

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.raw, "state": self.state or "unknown",
                "decided_by": self.decided_by,
                "decided_at": utc_iso(self.decided_at) if self.decided_at else None,
                "error": self.error, "read_at": utc_iso(self.at)}


@dataclass
class LotCheck:
    lot_id: str
    local: str
    episode: int
    reads: dict[str, Read] = field(default_factory=dict)
    in_transit: list[str] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    applied: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lot_id": self.lot_id, "local": self.local, "episode": self.episode,
                "systems": {s: r.to_dict() for s, r in self.reads.items()},
                "in_transit": self.in_transit, "mismatches": self.mismatches,
                "applied": self.applied}


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Any, ...]] = (
    weakref.WeakKeyDictionary())


def _metrics(registry: CollectorRegistry) -> tuple[Gauge, Counter, Gauge, Counter]:
    found = _METRICS.get(registry)
    if found is None:
        found = (
            Gauge("edge_lot_status_mismatch", "Lots whose status differs between two places "
                  "(local or a system): usable in one, blocked in the other",
                  ["between"], registry=registry),
            Counter("edge_lot_status_read_failures", "Lot status reads that failed "
                    "(the system's view is unknown)", ["system", "reason"], registry=registry),
            Gauge("edge_lot_status_unknown", "Lots whose last status read from the system "
                  "failed", ["system"], registry=registry),
            Counter("edge_lot_dispositions_applied", "Decisions of a system applied to a "
                    "local lot by the reconciliation", ["system", "status"],
                    registry=registry),
        )
        _METRICS[registry] = found
    return found


def _get(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(part)
    return doc


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    text = str(value).strip()
    return text or None


def _when(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return parse_iso(value) if isinstance(value, str) else None


def lot_path(template: str, lot_id: str) -> str | None:
    """The path with the lot id as one percent-encoded segment; None for an unsafe id."""
    if lot_id in ("", ".", ".."):
        return None
    return template.replace("{lot_id}", quote(lot_id, safe=""))


def load_checks(state_dir: str | Path) -> dict[str, Any]:
    """The last round as written to ``reconcile.json`` (empty when there is none)."""
    try:
        doc = orjson.loads((Path(state_dir) / STATE_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Reconciler:
    """Reads lot statuses from the configured systems and acts on them (module docstring).

    ``await round()`` runs one round now (tests, and the periodic task ``run``)."""

    def __init__(self, config: ReconcileConfig, sinks: Mapping[str, Any], outbox: Outbox,
                 *, live: Mapping[str, Any], site: str, state_dir: str | Path,
                 registry: CollectorRegistry) -> None:
        """``sinks``: the sinks' configs by id; ``live``: the sink objects (started before
        the first round)."""
        self.config = config
        self.outbox = outbox
        self.live = live
        self.site = site
        self.state_path = Path(state_dir) / STATE_FILE
        self.sources = list(config.sources)
        self.sink_configs: dict[str, Any] = {}
        for i, src in enumerate(self.sources):
            sink = sinks.get(src.sink)
            if sink is None:
                raise ConfigError(f"names sink {src.sink!r}, which is not configured",
                                  location=f"quality.reconcile.sources[{i}].sink")
            if getattr(sink, "type", None) != "http":
                raise ConfigError(f"sink {src.sink!r} is of type {getattr(sink, 'type', '?')}"
                                  "; reconciliation reads through an http sink",
                                  location=f"quality.reconcile.sources[{i}].sink")
            self.sink_configs[src.sink] = sink
        self._mismatch, self._failures, self._unknown, self._applied_n = _metrics(registry)
        self._checks: dict[str, LotCheck] = {}
        self._active: dict[tuple[str, str], str] = {}  # (lot, between) → text, logged once
        self._seen: dict[str, dict[str, str | None]] = {}  # lot → system → last raw answer
        self._last_round: float | None = None
        self._rounds = 0
        self._applied: list[dict[str, Any]] = []  # recent decisions applied, newest last
        self._lock = asyncio.Lock()
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        doc = load_checks(self.state_path.parent)
        for lot_id, entry in (doc.get("lots") or {}).items():
            systems = (entry or {}).get("systems") or {}
            self._seen[lot_id] = {s: (v or {}).get("status") for s, v in systems.items()
                                  if not (v or {}).get("error")}
            for m in (entry or {}).get("mismatches") or []:
                self._active[(lot_id, m.get("between", ""))] = m.get("text", "")

    def _client(self, sink_id: str) -> Any:
        """The sink itself: an ``http`` sink's public ``get(path, timeout_s=…)`` reads with its
        base URL, auth (OAuth2 tokens included), TLS and headers. The core never imports a
        component, so nothing of the sink's credentials code is copied or imported here."""
        sink = self.live.get(sink_id)
        if sink is None or not callable(getattr(sink, "get", None)):
            raise _NotStarted(f"sink {sink_id!r} is not started or cannot read (not http)")
        return sink

    async def run(self) -> None:
        """Rounds every ``every_s`` until cancelled; a failed round is logged."""
        while True:
            await asyncio.sleep(self.config.every_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - the next round tries again
                log_event(log, logging.WARNING, "reconciliation round failed",
                          error=f"{type(err).__name__}: {err}")

    async def close(self) -> None:
        """Nothing of its own to close: the reads use the sinks' clients."""

    # ------------------------------------------------------------------ one round

    def candidates(self, now: float) -> list[LotRow]:
        """Lots with an open episode or a decision within ``recent_s``, newest first."""
        since = now - self.config.recent_s
        rows = [r for r in self.outbox.quality.lots.values()
                if r.state in BLOCKED or (r.decided_at is not None and r.decided_at >= since)]
        rows.sort(key=lambda r: r.updated_at, reverse=True)
        return rows[:self.config.max_lots]

    async def round(self, now: float | None = None) -> dict[str, Any]:
        """Read, apply what flows down, compare; returns the ``/status`` section."""
        async with self._lock:
            now = time.time() if now is None else now
            rows = self.candidates(now)
            ids = [r.lot_id for r in rows]
            sinks = sorted({s.sink for s in self.sources})
            transit = await self.outbox.read(lambda c: lots.in_transit(c, ids, sinks))
            reads = await self._read_all(ids)
            checks: dict[str, LotCheck] = {}
            subs: list[Submission] = []
            for row in rows:
                check = LotCheck(row.lot_id, row.state, row.episode,
                                 reads={s.name: reads[(row.lot_id, s.name)]
                                        for s in self.sources},
                                 in_transit=[s.name for s in self.sources
                                             if (row.lot_id, s.sink) in transit])
                chosen = self._decision(row, check)
                if chosen is not None:
                    src, rd = chosen
                    made = self._events(row, src, rd, now)
                    subs += made
                    check.applied = {"system": src.name, "status": rd.state,
                                     "decided_by": rd.decided_by,
                                     "event_id": made[0].event.id, "at": utc_iso(now)}
                checks[row.lot_id] = check
            if subs:
                await self._store(subs, checks)
            for check in checks.values():
                row2 = self.outbox.quality.lots.get(check.lot_id)
                if row2 is not None:
                    check.local, check.episode = row2.state, row2.episode
                check.mismatches = self._compare(check)
                self._seen[check.lot_id] = {
                    name: rd.raw for name, rd in check.reads.items() if rd.error is None}
            for lot_id in list(self._seen):
                if lot_id not in checks:
                    del self._seen[lot_id]
            self._checks = checks
            self._last_round = now
            self._rounds += 1
            self._report(checks)
            self._save(now)
            return self.section()

    async def _read_all(self, lot_ids: list[str]) -> dict[tuple[str, str], Read]:
        out: dict[tuple[str, str], Read] = {}

        async def one(src: ReconcileSource, lot_id: str, sem: asyncio.Semaphore) -> None:
            async with sem:
                out[(lot_id, src.name)] = await self._read(src, lot_id)

        tasks = []
        for src in self.sources:
            sem = asyncio.Semaphore(self.config.concurrency)
            tasks += [one(src, lot_id, sem) for lot_id in lot_ids]
        await asyncio.gather(*tasks)
        return out

    async def _read(self, src: ReconcileSource, lot_id: str) -> Read:
        now = time.time()
        rd = Read(src.name, now)
        path = lot_path(src.path, lot_id)
        if path is None:
            return self._failed(rd, "bad_answer", "unsafe lot id for a URL path")
        try:
            resp = await self._client(src.sink).get(path, timeout_s=self.config.timeout_s)
        except _NotStarted as err:
            return self._failed(rd, "unreachable", str(err))
        except TimeoutError:
            return self._failed(rd, "unreachable", "timed out")
        except OSError as err:  # the sink's transport: no usable answer
            return self._failed(rd, "unreachable",
                                f"unreachable: {type(err).__name__}: {err}"[:200])
        if resp.status_code == 404:
            return self._failed(rd, "not_found", "not found (404)")
        if not 200 <= resp.status_code < 300:
            return self._failed(rd, "http_error", f"answered {resp.status_code}")
        try:
            doc = resp.json()
        except ValueError:
            return self._failed(rd, "bad_answer", "answer is not JSON")
        raw = _text(doc if isinstance(doc, str) else _get(doc, src.field))
        if raw is None:
            return self._failed(rd, "bad_answer", f"answer has no {src.field!r}")
        rd.raw = raw
        state = src.state_of(raw)
        if state is None:
            return self._failed(rd, "bad_answer", f"unrecognised status {raw!r} (map it "
                                                  "under statuses:)")
        rd.state = state
        if isinstance(doc, Mapping):
            rd.decided_by = _text(_get(doc, src.decided_by_field))
            rd.decided_at = _when(_get(doc, src.decided_at_field))
        return rd

    def _failed(self, rd: Read, code: str, why: str) -> Read:
        rd.error, rd.reason_code = why, code
        self._failures.labels(rd.system, code).inc()
        return rd

    # ------------------------------------------------------------------ deciding

    def _decision(self, row: LotRow, check: LotCheck) -> tuple[ReconcileSource, Read] | None:
        """The decision that flows down to ``row``, if any (module docstring)."""
        seen = self._seen.get(row.lot_id)
        found: list[tuple[ReconcileSource, Read]] = []
        for src in self.sources:
            rd = check.reads[src.name]
            if rd.state is None or rd.state not in (src.apply or ()):
                continue
            if rd.state == row.state or src.name in check.in_transit:
                continue  # agrees, or the gateway's own status has not reached it yet
            if seen is not None and src.name in seen and seen[src.name] == rd.raw:
                continue  # not new: the same answer as last time (reported, not applied)
            if rd.decided_at is not None and row.decided_at is not None \
                    and rd.decided_at < row.decided_at:
                continue  # older than the local decision
            if rd.decided_by == "gateway":
                continue  # the gateway's own hold, echoed
            found.append((src, rd))
        if not found or len({_category(rd.state) for _, rd in found}) > 1:
            return None  # nothing new, or the deciding systems disagree: report only
        return found[0]

    def _events(self, row: LotRow, src: ReconcileSource, rd: Read, now: float
                ) -> list[Submission]:
        assert rd.state is not None
        by = rd.decided_by or src.name
        reason = f"{src.kind.upper() if src.kind else ''} {src.name} says {rd.raw}".strip()
        data: dict[str, Any] = {
            "lot_id": row.lot_id, "status": rd.state, "reason": reason, "decided_by": by,
            "system": src.name, "remote_status": rd.raw, "episode": row.episode}
        if rd.decided_at is not None:
            data["decided_at"] = utc_iso(rd.decided_at)
        status = make_event(type="lot.status", site=self.site, source=RECONCILE_SOURCE,
                            data=data)
        change = LotChange(row.lot_id, now, "lot.status", status.id,
                           actor=f"reconcile:{src.name}",
                           decision=Decision(rd.state, by, reason))
        key = f"reconcile:{src.name}:{row.lot_id}:{row.episode}:{rd.state}"
        out = [Submission(status, dedupe_key=key, quality=(change,))]
        if rd.state == "released":
            release = make_event(type="quality.release", site=self.site,
                                 source=RECONCILE_SOURCE,
                                 data={k: data[k] for k in ("lot_id", "reason", "decided_by",
                                                            "system", "episode")},
                                 correlation_id=status.correlation_id)
            out.append(Submission(release, dedupe_key=f"{key}:release", derived=True))
        return out

    async def _store(self, subs: list[Submission], checks: dict[str, LotCheck]) -> None:
        try:
            ids = await self.outbox.submit(subs)
        except OutboxError as err:
            log_event(log, logging.WARNING, "reconciliation could not store decisions; "
                      "retried next round", error=str(err))
            for check in checks.values():
                check.applied = None
            return
        stored = set(ids)
        for check in checks.values():
            a = check.applied
            if a is None:
                continue
            if a["event_id"] not in stored:
                check.applied = None  # stored before (its key): nothing new
                continue
            self._applied_n.labels(a["system"], a["status"]).inc()
            self._applied = [*self._applied, {"lot_id": check.lot_id, **a}][-SHOWN:]
            log_event(log, logging.WARNING, "lot disposition applied from "
                      f"{a['system']}", lot_id=check.lot_id, status=a["status"],
                      decided_by=a["decided_by"], was=check.local, episode=check.episode)

    def _compare(self, check: LotCheck) -> list[dict[str, Any]]:
        places: list[tuple[str, str]] = [(LOCAL, check.local)]
        places += [(name, rd.state) for name, rd in check.reads.items()
                   if rd.state is not None and name not in check.in_transit]
        out = []
        for i, (a, sa) in enumerate(places):
            for b, sb in places[i + 1:]:
                ca, cb = _category(sa), _category(sb)
                if ca is None or cb is None or ca == cb:
                    continue
                raw_a = sa if a == LOCAL else check.reads[a].raw
                raw_b = check.reads[b].raw
                out.append({"between": f"{a}/{b}", a: sa, b: sb,
                            "text": f"{'locally' if a == LOCAL else a} {raw_a}, "
                                    f"{b} {raw_b}"})
        return out

    # ------------------------------------------------------------------ reporting

    def _report(self, checks: dict[str, LotCheck]) -> None:
        counts: dict[str, int] = {}
        names = [LOCAL, *(s.name for s in self.sources)]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                counts[f"{a}/{b}"] = 0
        active: dict[tuple[str, str], str] = {}
        for check in checks.values():
            for m in check.mismatches:
                counts[m["between"]] = counts.get(m["between"], 0) + 1
                key = (check.lot_id, m["between"])
                active[key] = m["text"]
                if self._active.get(key) != m["text"]:
                    log_event(log, logging.WARNING, f"lot status mismatch: {m['text']}",
                              lot_id=check.lot_id, between=m["between"],
                              episode=check.episode)
        for key, text in self._active.items():
            if key not in active and key[0] in checks:
                log_event(log, logging.INFO, f"lot status mismatch resolved (was: {text})",
                          lot_id=key[0], between=key[1])
        self._active = active
        for between, n in counts.items():
            self._mismatch.labels(between).set(n)
        for src in self.sources:
            self._unknown.labels(src.name).set(sum(
                1 for c in checks.values() if c.reads[src.name].state is None))

    def _save(self, now: float) -> None:
        doc = {"at": utc_iso(now), "systems": [s.name for s in self.sources],
               "lots": {lot: c.to_dict() for lot, c in self._checks.items()}}
        tmp = self.state_path.with_suffix(".json.tmp")
        try:
            tmp.write_bytes(orjson.dumps(doc))
            os.replace(tmp, self.state_path)
        except OSError as err:
            log_event(log, logging.WARNING, "cannot write the reconciliation file",
                      path=str(self.state_path), error=str(err))

    def check(self, lot_id: str) -> dict[str, Any] | None:
        """The last round's result for ``lot_id`` (None: not read)."""
        c = self._checks.get(lot_id)
        return c.to_dict() if c is not None else None

    def section(self) -> dict[str, Any]:
        """``lots.reconcile`` of ``/status``."""
        checks = list(self._checks.values())
        mism = [c for c in checks if c.mismatches]
        unknown = [(c, name, rd) for c in checks for name, rd in c.reads.items()
                   if rd.state is None]
        by_between: dict[str, int] = {}
        for c in mism:
            for m in c.mismatches:
                by_between[m["between"]] = by_between.get(m["between"], 0) + 1
        return {
            "enabled": True, "every_s": self.config.every_s,
            "systems": [{"system": s.name, "sink": s.sink, "kind": s.kind,
                         "applies": list(s.apply or ())} for s in self.sources],
            "last_round": utc_iso(self._last_round) if self._last_round else None,
            "rounds": self._rounds, "lots_checked": len(checks),
            "mismatches": len(mism), "by_between": by_between,
            "mismatch_lots": [{"lot_id": c.lot_id, "local": c.local, "episode": c.episode,
                               "mismatches": c.mismatches,
                               "systems": {n: r.to_dict() for n, r in c.reads.items()}}
                              for c in mism[:SHOWN]],
            "unknown": len(unknown),
            "unknown_reads": [{"lot_id": c.lot_id, "system": name, "reason": rd.error}
                              for c, name, rd in unknown[:SHOWN]],
            "in_transit": sum(1 for c in checks if c.in_transit),
            "applied": list(reversed(self._applied)),
        }
