"""The campaign's one checker: what the ERP applied, judged against what had to arrive.

Input: ``Expectation`` records (what the sources were given and confirmed, in ingest order
per ordering key) and every request the ERP saw (``edge.sim.erp.RequestRecord``). Output: a
``Report`` of the promises of DESIGN.md that were broken:

- lost: a confirmed message never applied (invariants 1, 2);
- duplicates: one message applied under two event ids (invariant 3; the same id applied
  twice is a redelivery, which the Idempotency-Key lets the ERP absorb: counted, allowed);
- order violations: per ordering key, first applications out of ingest order across every
  route; a derived event (nonconformance, quality.hold) before its cause or after the next
  message of its key (invariant 4);
- early retries: an event sent again before the Retry-After its previous attempt got had
  elapsed (HTTP response policy), judged on the test process's monotonic clock;
- missing headers: a request without ``Idempotency-Key``, ``X-Correlation-ID`` or
  ``traceparent``, or a one-event request whose key is not the event id (contracts).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge.sim.erp import RequestRecord

__all__ = ["Expectation", "Report", "check", "default_identify"]

DEAD_LETTER_STATUSES = frozenset({400, 404, 410, 413, 422})
REQUIRED_HEADERS = ("idempotency-key", "x-correlation-id", "traceparent")
# a retry may not arrive before not_before_mono; timers and the clock read are not exact
EARLY_TOLERANCE_S = 0.005


@dataclass(frozen=True)
class Expectation:
    """One message a source was given (and, when ``required``, confirmed to its sender).

    ``seq`` orders the messages of one ``ordering_key`` as the gateway ingested them.
    ``derived``: event types the rules must derive from it (e.g. ``("nonconformance",)``).
    """

    source: str
    message_id: str
    ordering_key: str
    seq: int
    derived: tuple[str, ...] = ()
    required: bool = True


class HasRequests(Protocol):
    @property
    def requests(self) -> list[RequestRecord]: ...


@dataclass
class Report:
    lost: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    redeliveries: int = 0
    order_violations: list[str] = field(default_factory=list)
    early_retries: list[str] = field(default_factory=list)
    early_retries_after_crash: list[str] = field(default_factory=list)
    missing_headers: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    audit_chain: list[str] = field(default_factory=list)  # a broken link of the audit trail
    counts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # shown, not judged (e.g. a traceback)

    PROBLEMS = ("lost", "duplicates", "order_violations", "early_retries", "missing_headers",
                "audit_chain")

    @property
    def clean(self) -> bool:
        return not any(getattr(self, name) for name in self.PROBLEMS)

    def summary(self) -> str:
        c = self.counts
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(c.get("statuses", {}).items()))
        return (f"expected {c.get('expected', 0)} (confirmed {c.get('required', 0)}), "
                f"applied {c.get('applied_events', 0)} events in {c.get('requests', 0)} "
                f"requests [{statuses}]; derived {c.get('derived', 0)}; "
                f"lost {len(self.lost)}, duplicates {len(self.duplicates)}, "
                f"redeliveries {self.redeliveries}, order violations "
                f"{len(self.order_violations)}, early retries {len(self.early_retries)} "
                f"(+{len(self.early_retries_after_crash)} after a crash), "
                f"missing headers {len(self.missing_headers)}, dead-lettered "
                f"{len(self.dead_lettered)}, unexpected {len(self.unexpected)}, audit chain "
                f"{'broken' if self.audit_chain else 'whole'}")

    def assert_clean(self) -> None:
        if self.clean:
            return
        lines = [self.summary()]
        for name in self.PROBLEMS:
            found = getattr(self, name)
            if found:
                lines.append(f"{name} ({len(found)}):")
                lines += [f"  {item}" for item in found[:10]]
        raise AssertionError("\n".join(lines))

    def to_json(self) -> dict[str, Any]:
        return {
            "lost": len(self.lost), "duplicates": len(self.duplicates),
            "redeliveries": self.redeliveries, "order_violations": len(self.order_violations),
            "early_retries": len(self.early_retries),
            "early_retries_after_crash": len(self.early_retries_after_crash),
            "missing_headers": len(self.missing_headers),
            "dead_lettered": len(self.dead_lettered), "unexpected": len(self.unexpected),
            "audit_chain": len(self.audit_chain),
            "counts": self.counts,
            "examples": {name: getattr(self, name)[:20] for name in self.PROBLEMS},
        }


def default_identify(event: dict[str, Any]) -> str | None:
    """The message id of an applied event: ``data.message_id`` (the MQTT mapping's)."""
    mid = (event.get("data") or {}).get("message_id")
    return None if mid is None else str(mid)


def _cause_of(event: dict[str, Any]) -> str | None:
    cause = (event.get("data") or {}).get("inspection_event_id")
    return None if cause is None else str(cause)


def check(expectations: Iterable[Expectation], erp: HasRequests | Sequence[RequestRecord], *,
          allow_dead_letter_types: Iterable[str] = (),
          identify: Callable[[dict[str, Any]], str | None] = default_identify,
          derived_order: Sequence[str] = ("nonconformance", "quality.hold"),
          crashes: Sequence[float] = (), crash_grace_s: float = 1.0) -> Report:
    """Judge every request the ERP saw against ``expectations``; see the module docstring.

    ``crashes``: monotonic times the gateway was killed (``kill -9``). A gateway killed
    between receiving an answer and committing what it said cannot know the Retry-After
    it was given: an early retry with a crash within ``crash_grace_s`` after that answer is
    listed in ``early_retries_after_crash`` (shown, not a failure); so is one with a crash
    shortly before the answer (the gateway never read it). A crash later than that excuses
    nothing: the answer's outcome should have been committed by then.
    """
    requests = list(erp if isinstance(erp, Sequence) else erp.requests)
    expected: dict[str, Expectation] = {}
    for exp in expectations:
        expected[exp.message_id] = exp
    allowed_dl = set(allow_dead_letter_types)
    report = Report()

    _check_headers(requests, report)
    _check_retry_after(requests, report, sorted(crashes), crash_grace_s)

    applied = [(r, ev) for r in requests if r.applied for ev in r.events]
    first_seen: dict[str, tuple[int, dict[str, Any]]] = {}  # event id → (position, event)
    ids_of_message: dict[str, list[str]] = defaultdict(list)
    derived_ids: dict[tuple[str, str], list[str]] = defaultdict(list)  # (cause, type) → ids
    redeliveries = 0
    for pos, (_r, ev) in enumerate(applied):
        eid = str(ev.get("id", ""))
        if eid in first_seen:
            redeliveries += 1
            continue
        first_seen[eid] = (pos, ev)
        cause = _cause_of(ev)
        if cause is not None:
            derived_ids[(cause, str(ev.get("type")))].append(eid)
            continue
        mid = identify(ev)
        if mid is None:
            continue
        ids_of_message[mid].append(eid)
        if mid not in expected:
            report.unexpected.append(f"{ev.get('type')} {eid} message {mid}")
    report.redeliveries = redeliveries

    for mid, ids in ids_of_message.items():
        if len(ids) > 1:
            report.duplicates.append(f"message {mid} applied under {len(ids)} event ids: "
                                     f"{', '.join(ids)}")
    for (cause, typ), ids in derived_ids.items():
        if len(ids) > 1:
            report.duplicates.append(f"{typ} of {cause} applied under {len(ids)} event ids: "
                                     f"{', '.join(ids)}")

    # dead-letter answers per event id, for the allowed types
    dead: set[str] = set()
    for r in requests:
        if r.status in DEAD_LETTER_STATUSES:
            dead.update(str(e.get("id")) for e in r.events if e.get("type") in allowed_dl)
    # message id → the event id its first application carried
    event_of_message = {mid: ids[0] for mid, ids in ids_of_message.items()}
    message_of_event = {eid: mid for mid, eid in event_of_message.items()}
    sent_ids_of_message: dict[str, set[str]] = defaultdict(set)
    for r in requests:
        for ev in r.events:
            mid = identify(ev)
            if mid is not None and _cause_of(ev) is None:
                sent_ids_of_message[mid].add(str(ev.get("id")))

    derived_count = 0
    for exp in expected.values():
        eid = event_of_message.get(exp.message_id)
        if eid is None:
            if not exp.required:
                continue
            if sent_ids_of_message.get(exp.message_id, set()) & dead:
                report.dead_lettered.append(f"{exp.source} {exp.message_id}")
            else:
                report.lost.append(f"{exp.source} {exp.message_id} ({exp.ordering_key} "
                                   f"#{exp.seq})")
            continue
        for typ in exp.derived:
            if (eid, typ) in derived_ids:
                derived_count += 1
            elif typ in allowed_dl and any(
                    str(e.get("id")) in dead for r in requests for e in r.events
                    if _cause_of(e) == eid and e.get("type") == typ):
                report.dead_lettered.append(f"{typ} of {exp.message_id}")
            elif exp.required:
                report.lost.append(f"{typ} derived from {exp.source} {exp.message_id}")

    _check_order(expected, first_seen, message_of_event, derived_order, identify, report)

    statuses = Counter(r.status for r in requests)
    report.counts = {
        "expected": len(expected),
        "required": sum(1 for e in expected.values() if e.required),
        "applied_events": len(first_seen),
        "applied_total": len(applied),
        "requests": len(requests),
        "statuses": dict(statuses),
        "derived": sum(len(v) for v in derived_ids.values()),
        "derived_required_applied": derived_count,
        "faults": dict(Counter(r.fault for r in requests if r.fault)),
    }
    return report


def _check_headers(requests: list[RequestRecord], report: Report) -> None:
    for i, r in enumerate(requests):
        missing = [h for h in REQUIRED_HEADERS if not r.headers.get(h)]
        if missing:
            report.missing_headers.append(f"request {i} {r.method} {r.path}: no "
                                          f"{', '.join(missing)}")
        key = r.headers.get("idempotency-key")
        if key and len(r.events) == 1 and r.path != "/oauth/token":
            eid = str(r.events[0].get("id"))
            if key != eid:
                report.missing_headers.append(
                    f"request {i} {r.method} {r.path}: Idempotency-Key {key} is not the "
                    f"event id {eid}")


def _check_retry_after(requests: list[RequestRecord], report: Report,
                       crashes: list[float], grace_s: float) -> None:
    """An event sent again after an answer with a Retry-After, before it allowed.

    Records are kept in the order their answers went out; a request is judged by when it
    arrived (``mono``) against the answers given before that moment (``answered_mono``). A
    slow request of a killed gateway can arrive before an answer and be recorded after it:
    it was no reaction to that answer.
    """
    answers: dict[str, list[tuple[float, float, int, str]]] = {}  # id → (answered, nb, i, value)
    for i, r in enumerate(requests):
        if r.not_before_mono is not None:
            for ev in r.events:
                answers.setdefault(str(ev.get("id")), []).append(
                    (r.answered_mono if r.answered_mono is not None else r.mono,
                     r.not_before_mono, i, r.retry_after or ""))
    for i, r in enumerate(requests):
        for ev in r.events:
            eid = str(ev.get("id"))
            due = [a for a in answers.get(eid, ()) if a[2] != i and a[0] <= r.mono
                   and r.mono + EARLY_TOLERANCE_S < a[1]]
            if not due:
                continue
            _, nb, gi, value = max(due, key=lambda a: a[1])
            given = requests[gi]
            excused = any(given.mono - grace_s <= t <= min(r.mono, given.answered_mono
                                                            + grace_s)
                          for t in crashes)
            what = (f"request {i} {r.method} {r.path} sent {eid} "
                    f"{nb - r.mono:.3f} s before the Retry-After "
                    f"{value!r} given to request {gi} allowed")
            if excused:
                report.early_retries_after_crash.append(
                    what + " (the gateway was killed right after that answer)")
            else:
                between = [f"+{t - given.answered_mono:.3f}" for t in crashes
                           if given.mono - grace_s <= t <= r.mono]
                report.early_retries.append(
                    what + (f" (kill -9 at {', '.join(between)} s after that answer)"
                            if between else ""))


def _check_order(expected: dict[str, Expectation],
                 first_seen: dict[str, tuple[int, dict[str, Any]]],
                 message_of_event: dict[str, str], derived_order: Sequence[str],
                 identify: Callable[[dict[str, Any]], str | None], report: Report) -> None:
    """Per ordering key, ranks (seq, 0) for a message and (cause's seq, 1 + kind) for a
    derived event must grow along the order of first applications."""
    kind_rank = {t: i + 1 for i, t in enumerate(derived_order)}
    last: dict[str, tuple[tuple[int, int], str]] = {}
    for _pos, ev in sorted(first_seen.values(), key=lambda pe: pe[0]):
        eid = str(ev.get("id"))
        cause = _cause_of(ev)
        if cause is None:
            mid = identify(ev)
            exp = expected.get(mid) if mid is not None else None
            if exp is None or message_of_event.get(eid) != mid:
                continue  # unexpected, or a duplicate already reported
            rank, key = (exp.seq, 0), exp.ordering_key
            what = f"{exp.message_id} (#{exp.seq})"
        else:
            cmid = message_of_event.get(cause)
            exp = expected.get(cmid) if cmid is not None else None
            typ = str(ev.get("type"))
            if exp is None:
                if cause not in first_seen or first_seen[cause][0] > first_seen[eid][0]:
                    report.order_violations.append(
                        f"{typ} {eid} applied before its cause {cause}")
                continue
            rank = (exp.seq, kind_rank.get(typ, len(kind_rank) + 1))
            key = exp.ordering_key
            what = f"{typ} of {exp.message_id} (#{exp.seq})"
        prev = last.get(key)
        if prev is not None and rank <= prev[0]:
            report.order_violations.append(f"{key}: {what} applied after {prev[1]}")
        if prev is None or rank > prev[0]:
            last[key] = (rank, what)
