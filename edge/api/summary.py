"""What is wrong, in words: the ``/status`` document turned into a short list of problems.

Shared by the HTML status page and ``edge status`` so both say the same thing. Pure
functions over the ``Gateway.status_report()`` dict (no web framework imported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge.timefmt import ago, duration

__all__ = ["OLD_BACKLOG_S", "Problem", "lot_text", "overall", "parked_key_text",
           "problems"]

OLD_BACKLOG_S = 300.0  # an undelivered event older than this is worth a line


@dataclass(frozen=True)
class Problem:
    severity: str  # critical | warning
    subject: str  # what it is about: "outbox", "sink erp", "source line1"
    message: str
    since: str | None = None  # UTC ISO time when known

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "subject": self.subject, "message": self.message,
                "since": self.since}


def problems(report: dict[str, Any]) -> list[Problem]:
    """Everything an operator should look at, most severe first."""
    out: list[Problem] = []
    outbox = report.get("outbox") or {}
    for alarm in report.get("alarms") or []:
        sev = "critical" if alarm.get("code") == "outbox_corrupt" else "warning"
        out.append(Problem(sev, "outbox", alarm.get("message", alarm.get("code", "")),
                           alarm.get("since")))
    out.extend(_integrity(outbox.get("integrity") or {}))
    if outbox and not outbox.get("accepting", True):
        out.append(Problem("critical", "outbox",
                           "new events are refused (backpressure): the disk budget is used by "
                           "events that may not be expired; sources stop acknowledging and "
                           "the broker keeps their messages"))
    for comp in report.get("components") or []:
        out.extend(_component(comp))
    for sid, sink in sorted((report.get("sinks") or {}).items()):
        out.extend(_sink(sid, sink))
    out.extend(_lots(report.get("lots") or {}))
    out.extend(_reconcile((report.get("lots") or {}).get("reconcile") or {}))
    out.extend(_business(report.get("business") or {}))
    out.sort(key=lambda p: p.severity != "critical")
    return out


def _integrity(check: dict[str, Any]) -> list[Problem]:
    """The background integrity check when it has no verdict to give (``outbox.integrity``;
    a corrupt verdict is the ``outbox_corrupt`` alarm)."""
    if check.get("state") == "deferred":
        return [Problem("warning", "outbox",
                        "the full integrity check gave way to intake (the WAL it holds grew "
                        f"past its bound); next attempt {check.get('next_attempt_at') or 'later'}",
                        check.get("started_at"))]
    if check.get("state") == "error":
        return [Problem("warning", "outbox", "the full integrity check could not run (this "
                        f"says nothing about the data): {check.get('problem')}",
                        check.get("finished_at"))]
    return []


def overall(found: list[Problem]) -> str:
    """``critical``, ``degraded`` or ``ok``."""
    if any(p.severity == "critical" for p in found):
        return "critical"
    return "degraded" if found else "ok"


def _component(comp: dict[str, Any]) -> list[Problem]:
    subject = f"{comp.get('kind', 'component')} {comp.get('id')}"
    conditions = [Problem("critical" if c.get("severity") == "critical" else "warning",
                          subject, str(c.get("message")), c.get("since"))
                  for c in comp.get("conditions") or []]
    return _component_state(comp, subject) + conditions


def _component_state(comp: dict[str, Any], subject: str) -> list[Problem]:
    state, error = comp.get("state"), comp.get("error")
    if state == "failed":
        return [Problem("critical", subject, f"stopped: {error or 'failed'}", comp.get("since"))]
    if state == "retrying":
        return [Problem("warning", subject,
                        f"restarting after an error ({comp.get('restarts', 0)} restarts): "
                        f"{error or 'unknown error'}", comp.get("since"))]
    if comp.get("kind") == "source" and state == "running" and not comp.get("connected"):
        return [Problem("warning", subject, "not connected", comp.get("since"))]
    return []


def _sink(sid: str, sink: dict[str, Any]) -> list[Problem]:
    subject = f"sink {sid}"
    out: list[Problem] = []
    waiting = sink.get("total", 0)
    if not sink.get("configured", True):
        if waiting:
            out.append(Problem("warning", subject,
                               f"{waiting} event(s) kept for a sink that is no longer in the "
                               "config: reroute or discard them (edge outbox reroute|discard)"))
    elif sink.get("up") is False:
        out.append(Problem("critical", subject,
                           f"unreachable (circuit {sink.get('circuit')}): "
                           f"{sink.get('last_error') or 'failing'}; last delivery "
                           f"{ago(sink.get('last_delivery'))}; {waiting} event(s) waiting"))
    out.extend(_paused(sid, sink))
    if sink.get("paused_for_s"):
        out.append(Problem("warning", subject,
                           f"paused for {duration(sink['paused_for_s'])} (Retry-After)"))
    age = sink.get("oldest_age_s")
    if age is not None and age > OLD_BACKLOG_S:
        out.append(Problem("warning", subject,
                           f"oldest undelivered event is {duration(age)} old "
                           f"({waiting} waiting, {sink.get('retrying', 0)} retrying)"))
    if sink.get("dead_letters"):
        out.append(Problem("warning", subject,
                           f"{sink['dead_letters']} dead letter(s) refused by the receiver: "
                           "fix the cause, then replay (edge dlq list / POST /dlq/replay)"))
    out.extend(_parked(sid, sink))
    if sink.get("unrouted"):
        out.append(Problem("warning", subject,
                           f"{sink['unrouted']} event(s) match no route of this sink"))
    return out


def _paused(sid: str, sink: dict[str, Any]) -> list[Problem]:
    """A pause (``paused``: storm guard, refused credentials) and the sink's ``alarm``.

    Both fields are optional (older gateways); an alarm of the same code as the pause is
    the same story and gives one line.
    """
    out: list[Problem] = []
    pause, alarm = sink.get("paused") or {}, sink.get("alarm") or {}
    if pause:
        code = pause.get("code")
        out.append(Problem(
            "critical", f"sink {sid}",
            f"paused{f' ({code})' if code else ''}: {pause.get('reason') or 'no reason given'}; "
            f"events are kept. Fix the cause, then: edge sink resume {sid} --reason ... "
            f"(or POST /sinks/{sid}/resume)", pause.get("since")))
    if alarm and not (pause and alarm.get("code") == pause.get("code")):
        sev = "critical" if alarm.get("code") == "auth" else "warning"
        out.append(Problem(sev, f"sink {sid}", alarm.get("message") or alarm.get("code", ""),
                           alarm.get("since")))
    return out


def _parked(sid: str, sink: dict[str, Any]) -> list[Problem]:
    """Ordering keys held behind a dead letter (``parked``, ``parked_keys``; optional)."""
    keys = sink.get("parked_keys") or []
    count = max(int(sink.get("parked") or 0), len(keys))
    if not count:
        return []
    dead = keys[0].get("dead_letter_id") if keys else None
    first = (f": {keys[0].get('key')}" + (f" (dead letter #{dead})" if dead is not None else "")
             if keys else "")
    more = f" and {count - 1} more" if count > 1 and keys else ""
    return [Problem("warning", f"sink {sid}",
                    f"{count} ordering key(s) held behind a dead letter{first}{more}; replay "
                    "or discard the dead letter to release the events after it",
                    keys[0].get("since") if keys else None)]


def _lots(section: dict[str, Any]) -> list[Problem]:
    """Stuck lots (``lots`` section of ``/status``; absent in older gateways)."""
    count = int(section.get("stuck") or 0)
    if not count:
        return []
    shown = section.get("stuck_lots") or []
    first = f": {lot_text(shown[0])}" if shown else ""
    more = f" and {count - 1} more" if count > 1 and shown else ""
    return [Problem("warning", "lots",
                    f"{count} lot(s) without a disposition for more than "
                    f"{duration(section.get('stuck_after_s'))}{first}{more}; decide them "
                    "(release: edge lot release LOT --reason ... --by ...)",
                    shown[0].get("since") if shown else None)]


def _reconcile(section: dict[str, Any]) -> list[Problem]:
    """ERP / QMS reconciliation (``lots.reconcile``; absent or disabled: nothing)."""
    if not section.get("enabled"):
        return []
    out: list[Problem] = []
    count = int(section.get("mismatches") or 0)
    if count:
        shown = section.get("mismatch_lots") or []
        first = (f": {shown[0]['lot_id']} "
                 f"({'; '.join(m.get('text', '') for m in shown[0].get('mismatches') or [])})"
                 if shown else "")
        more = f" and {count - 1} more" if count > 1 and shown else ""
        out.append(Problem("warning", "lots",
                           f"{count} lot(s) whose status differs between the gateway, the "
                           f"ERP and the QMS{first}{more}; see edge lots"))
    unknown = int(section.get("unknown") or 0)
    if unknown:
        reads = section.get("unknown_reads") or []
        first = f": {reads[0]['lot_id']} at {reads[0]['system']}, {reads[0]['reason']}" \
            if reads else ""
        out.append(Problem("warning", "lots",
                           f"{unknown} lot status read(s) failed (status unknown, not a "
                           f"mismatch){first}"))
    return out


def _business(section: dict[str, Any]) -> list[Problem]:
    """Breached delivery SLAs and failed supplier notifications (``business``)."""
    out: list[Problem] = []
    for sla in section.get("sla") or []:
        if sla.get("breached"):
            out.append(Problem("warning", f"SLA {sla.get('type')}", str(
                sla.get("message") or f"{sla.get('type')} late by {duration(sla.get('late_s'))}")))
    nt = section.get("notifications") or {}
    if nt.get("dead_letters"):
        items = nt.get("items") or []
        first = (f": {items[0].get('type')} of {items[0].get('ordering_key') or '-'} at "
                 f"{items[0].get('sink')} ({items[0].get('reason')})" if items else "")
        out.append(Problem("warning", "notifications",
                           f"{nt['dead_letters']} supplier case(s) / notification(s) "
                           f"dead-lettered{first}; fix and replay (edge dlq)"))
    return out


def lot_text(lot: dict[str, Any]) -> str:
    """``L7 on hold (episode 2, supplier acme) for 3.4 h`` (plain text)."""
    state = {"unknown": "without a disposition", "hold": "on hold"}.get(
        str(lot.get("state")), str(lot.get("state")))
    extra = [f"episode {lot['episode']}" if lot.get("episode") else "",
             f"supplier {lot['supplier']}" if lot.get("supplier") else ""]
    inner = ", ".join(e for e in extra if e)
    return (f"{lot.get('lot_id')} {state}" + (f" ({inner})" if inner else "")
            + f" for {duration(lot.get('age_s'))}")


def parked_key_text(key: dict[str, Any]) -> str:
    """``lot:L7 parked since 2026-…Z (12 min ago), dead letter #12`` (plain text)."""
    since = key.get("since")
    when = f" since {since} ({ago(since)})" if since else ""
    dead = key.get("dead_letter_id")
    return f"{key.get('key')} parked{when}" + (f", dead letter #{dead}" if dead is not None
                                                  else "")
