"""``GET /``: a small, self-contained status page for plant IT.

One HTML document, no scripts, no external assets; it reloads itself every
``REFRESH_S`` seconds. Top to bottom it answers: is anything wrong and since when, can the
gateway take data (ready), are the receivers reachable, how big and how old is the backlog,
how full is the disk budget. Every value is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from typing import Any
from urllib.parse import quote

from edge.api.summary import lot_text, overall, parked_key_text, problems
from edge.timefmt import ago, duration

__all__ = ["REFRESH_S", "render"]

REFRESH_S = 10
CLASSES = ("critical", "high", "normal", "low")
MB = 1024 * 1024  # outbox.max_size_mb counts in these

_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2125}
header{padding:14px 20px;color:#fff}header h1{margin:0;font-size:22px}header p{margin:4px 0 0}
.s-ok{background:#1f7a3a}.s-degraded{background:#b86e00}.s-critical{background:#b3261e}
main{padding:8px 20px 24px}h2{font-size:17px;margin:20px 0 6px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d5d8dc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#e9ebee}td.n{text-align:right;font-variant-numeric:tabular-nums}
ul.p{list-style:none;padding:0;margin:0}ul.p li{padding:8px 10px;margin:4px 0;background:#fff}
li.critical{border-left:6px solid #b3261e}li.warning{border-left:6px solid #e0a800}
.bad{color:#b3261e;font-weight:600}.good{color:#1f7a3a}.muted{color:#5f6b76}
.bar{background:#e9ebee;height:12px;width:260px;display:inline-block;vertical-align:middle}
.bar span{display:block;height:12px;background:#1f7a3a}.bar span.hi{background:#b3261e}
footer{padding:0 20px 20px;color:#5f6b76}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def render(report: dict[str, Any], not_ready: list[dict[str, str]]) -> str:
    found = problems(report) if "error" not in report else []
    state = "critical" if "error" in report else overall(found)
    label = {"ok": "OK", "degraded": "NEEDS ATTENTION", "critical": "PROBLEM"}[state]
    site = report.get("site", "?")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='refresh' content='{REFRESH_S}'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{label} · edge gateway {_e(site)}</title><style>{_CSS}</style></head><body>",
        f"<header class='s-{state}'><h1>{_e(site)} — {label}</h1><p>edge-gateway "
        f"{_e(report.get('version', ''))} · up {duration(report.get('uptime_s'))} · "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC · refreshes every "
        f"{REFRESH_S} s</p></header><main>",
    ]
    if "error" in report:
        parts.append(f"<p class='bad'>Status unavailable: {_e(report['error'])} "
                     "(the gateway may be stopping).</p>")
    parts += _attention(found, not_ready)
    if "error" not in report:
        parts += _sinks(report.get("sinks") or {})
        parts += _lots(report.get("lots") or {})
        parts += _reconcile((report.get("lots") or {}).get("reconcile") or {})
        parts += _business(report.get("business") or {})
        parts += _components(report.get("components") or [])
        parts += _outbox(report.get("outbox") or {})
    parts.append("</main><footer>Machine-readable: <a href='/status'>/status</a> · "
                 "<a href='/metrics'>/metrics</a> · dead letters: <a href='/dlq'>/dlq</a> · "
                 "lots: <a href='/lots'>/lots</a> · "
                 "on the gateway: <code>edge status</code>, <code>edge dlq list</code>, "
                 "<code>edge lots</code>, <code>edge trace ID</code></footer></body></html>")
    return "".join(parts)


def _attention(found: list[Any], not_ready: list[dict[str, str]]) -> list[str]:
    out = ["<h2>What needs attention</h2>"]
    if not found and not not_ready:
        return [*out, "<p class='good'>Nothing: every component runs, the receivers answer "
                "and nothing is waiting long.</p>"]
    out.append("<ul class='p'>")
    for r in not_ready:
        out.append(f"<li class='critical'><b>not ready</b> — {_e(r['message'])}</li>")
    for p in found:
        since = f" <span class='muted'>since {_e(p.since)} ({ago(p.since)})</span>" \
            if p.since else ""
        out.append(f"<li class='{p.severity}'><b>{_e(p.subject)}</b> — {_e(p.message)}"
                   f"{since}</li>")
    return [*out, "</ul>"]


def _sinks(sinks: dict[str, Any]) -> list[str]:
    out = ["<h2>Receivers and backlog</h2><table><tr><th>sink</th><th>reachable</th>",
           *(f"<th>{c}</th>" for c in CLASSES),
           "<th>waiting</th><th>retrying</th><th>oldest</th><th>dead letters</th>"
           "<th>parked keys</th><th>last delivery</th><th>last error</th></tr>"]
    if not sinks:
        out.append("<tr><td colspan='13' class='bad'>no sink configured</td></tr>")
    for sid, s in sorted(sinks.items()):
        depth = s.get("depth") or {}
        dead = s.get("dead_letters", 0)
        parked = max(int(s.get("parked") or 0), len(s.get("parked_keys") or []))
        out.append(
            f"<tr><td>{_e(sid)}</td><td>{_reachable(s)}</td>"
            + "".join(f"<td class='n'>{depth.get(c, 0)}</td>" for c in CLASSES)
            + f"<td class='n'>{s.get('total', 0)}</td><td class='n'>{s.get('retrying', 0)}</td>"
            f"<td class='n'>{duration(s.get('oldest_age_s'))}</td>"
            f"<td class='n{' bad' if dead else ''}'>{dead}</td>"
            f"<td class='n{' bad' if parked else ''}'>{parked}</td>"
            f"<td>{_e(ago(s.get('last_delivery')))}</td><td>{_e(s.get('last_error') or '')}</td>"
            "</tr>")
    return [*out, "</table>", *_parked(sinks)]


def _reachable(s: dict[str, Any]) -> str:
    if not s.get("configured", True):
        return "<span class='bad'>removed from config</span>"
    pause = s.get("paused") or {}
    if pause:
        code = f" ({_e(pause.get('code'))})" if pause.get("code") else ""
        since = f" since {_e(ago(pause.get('since')))}" if pause.get("since") else ""
        return f"<span class='bad'>PAUSED{code}</span>{since}"
    if s.get("up") is False:
        return f"<span class='bad'>NO (circuit {_e(s.get('circuit'))})</span>"
    return "<span class='good'>yes</span>"


def _parked(sinks: dict[str, Any]) -> list[str]:
    """Ordering keys held behind a dead letter, per sink (absent in older stats)."""
    held = [(sid, s) for sid, s in sorted(sinks.items())
            if s.get("parked") or s.get("parked_keys")]
    if not held:
        return []
    out = ["<h2>Held ordering keys</h2><p class='muted'>Later events of these keys wait "
           "until the dead letter is replayed or discarded.</p><ul class='p'>"]
    for sid, s in held:
        keys = s.get("parked_keys") or []
        for key in keys:
            waiting = key.get("waiting")
            behind = f"; {_e(waiting)} event(s) waiting behind it" if waiting else ""
            event = (f" <span class='muted'>(event {_e(key['event_id'])})</span>"
                     if key.get("event_id") else "")
            out.append(f"<li class='warning'><b>{_e(sid)}</b>: {_e(parked_key_text(key))}"
                       f"{event}{behind}</li>")
        rest = int(s.get("parked") or 0) - len(keys)
        if rest > 0:
            href = _e(f"/dlq?sink={quote(sid, safe='')}")
            out.append(f"<li class='warning'><b>{_e(sid)}</b>: {rest} more key(s), see "
                       f"<a href='{href}'>{href}</a></li>")
    return [*out, "</ul>"]


LOT_STATES = ("unknown", "hold", "quarantine", "rejected", "released")


def _lots(section: dict[str, Any]) -> list[str]:
    """Lots by state and the stuck ones (absent in older reports)."""
    if not section:
        return []
    by_state = section.get("by_state") or {}
    stuck = int(section.get("stuck") or 0)
    out = ["<h2>Lots</h2><table><tr>", *(f"<th>{s}</th>" for s in LOT_STATES),
           "<th>stuck</th></tr><tr>",
           *(f"<td class='n'>{_e(by_state.get(s, 0))}</td>" for s in LOT_STATES),
           f"<td class='n{' bad' if stuck else ''}'>{stuck}</td></tr></table>"]
    shown = section.get("stuck_lots") or []
    if not shown:
        return out
    out.append(f"<p class='muted'>Stuck: no disposition, or on hold without a decision, "
               f"for more than {_e(duration(section.get('stuck_after_s')))}. Release with "
               "<code>edge lot release LOT --reason ... --by ...</code>.</p>"
               "<table><tr><th>lot</th><th>state</th><th>episode</th><th>supplier</th>"
               "<th>since</th><th>last event</th><th>reason</th></tr>")
    for lot in shown:
        last = lot.get("last_event") or {}
        out.append(
            f"<tr><td title='{_e(lot_text(lot))}'>{_e(lot.get('lot_id'))}</td>"
            f"<td class='bad'>{_e(lot.get('state'))}</td>"
            f"<td class='n'>{_e(lot.get('episode'))}</td><td>{_e(lot.get('supplier') or '')}"
            f"</td><td>{_e(ago(lot.get('since')))}</td>"
            f"<td>{_e(last.get('type') or '')} {_e(ago(last.get('at')) if last else '')}</td>"
            f"<td>{_e(lot.get('reason') or '')}</td></tr>")
    if stuck > len(shown):
        out.append(f"<tr><td colspan='7' class='muted'>and {stuck - len(shown)} more: "
                   "<a href='/lots'>/lots</a></td></tr>")
    return [*out, "</table>"]


def _reconcile(section: dict[str, Any]) -> list[str]:
    """ERP / QMS reconciliation: mismatches, failed reads, decisions applied."""
    if not section.get("enabled"):
        return []
    systems = [s.get("system") for s in section.get("systems") or []]
    out = [f"<h2>Reconciliation with {_e(', '.join(str(s) for s in systems))}</h2>"
           f"<p class='muted'>Every {_e(duration(section.get('every_s')))}; last round "
           f"{_e(ago(section.get('last_round')))}: {_e(section.get('lots_checked', 0))} lot(s) "
           f"read, {_e(section.get('mismatches', 0))} mismatch(es), "
           f"{_e(section.get('unknown', 0))} failed read(s), "
           f"{_e(section.get('in_transit', 0))} with a status on its way.</p>"]
    shown = section.get("mismatch_lots") or []
    if shown:
        out.append("<table><tr><th>lot</th><th>local</th>"
                   + "".join(f"<th>{_e(s)}</th>" for s in systems)
                   + "<th>mismatch</th></tr>")
        for lot in shown:
            cells = "".join(
                f"<td>{_e(((lot.get('systems') or {}).get(s) or {}).get('status') or 'unknown')}"
                "</td>" for s in systems)
            text = "; ".join(m.get("text", "") for m in lot.get("mismatches") or [])
            out.append(f"<tr><td>{_e(lot.get('lot_id'))}</td><td>{_e(lot.get('local'))}</td>"
                       f"{cells}<td class='bad'>{_e(text)}</td></tr>")
        out.append("</table>")
    reads = section.get("unknown_reads") or []
    if reads:
        out.append("<p class='muted'>Failed reads (unknown, not a mismatch):</p><ul class='p'>")
        out += [f"<li class='warning'>{_e(r.get('lot_id'))} at {_e(r.get('system'))}: "
                f"{_e(r.get('reason'))}</li>" for r in reads]
        out.append("</ul>")
    applied = section.get("applied") or []
    if applied:
        out.append("<p class='muted'>Decisions that came down:</p><ul class='p'>")
        out += [f"<li>{_e(a.get('lot_id'))}: {_e(a.get('status'))} by "
                f"{_e(a.get('decided_by') or a.get('system'))} ({_e(a.get('system'))}, "
                f"{_e(ago(a.get('at')))})</li>" for a in applied]
        out.append("</ul>")
    return out


def _business(section: dict[str, Any]) -> list[str]:
    """Delivery SLAs per type and failed supplier notifications."""
    out: list[str] = []
    slas = section.get("sla") or []
    if slas:
        out.append("<h2>Delivery SLAs</h2><table><tr><th>type</th><th>within</th>"
                   "<th>waiting</th><th>oldest</th><th>state</th></tr>")
        for sla in slas:
            late = sla.get("breached")
            state = (f"LATE by {_e(duration(sla.get('late_s')))} at "
                     f"{_e(', '.join(k for k, v in (sla.get('sinks') or {}).items() if v.get('late')))}"
                     if late else "ok")
            out.append(f"<tr><td>{_e(sla.get('type'))}</td>"
                       f"<td>{_e(duration(sla.get('within_s')))}</td>"
                       f"<td class='n'>{_e(sla.get('waiting', 0))}</td>"
                       f"<td>{_e(duration(sla.get('oldest_age_s')))}</td>"
                       f"<td class='{'bad' if late else 'good'}'>{state}</td></tr>")
        out.append("</table>")
    nt = section.get("notifications") or {}
    items = nt.get("items") or []
    retrying = nt.get("retrying_items") or []
    if items or retrying:
        out.append(f"<h2>Supplier notifications that failed</h2><p class='muted'>"
                   f"{_e(nt.get('dead_letters', 0))} dead-lettered, {_e(nt.get('retrying', 0))} "
                   "retrying.</p><table><tr><th>type</th><th>key</th><th>sink</th>"
                   "<th>state</th><th>reason</th></tr>")
        for d in items:
            out.append(f"<tr><td>{_e(d.get('type'))}</td><td>{_e(d.get('ordering_key'))}</td>"
                       f"<td>{_e(d.get('sink'))}</td><td class='bad'>dead letter "
                       f"#{_e(d.get('dead_letter_id'))}</td><td>{_e(d.get('reason'))}</td></tr>")
        for d in retrying:
            out.append(f"<tr><td>{_e(d.get('type'))}</td><td>{_e(d.get('ordering_key'))}</td>"
                       f"<td>{_e(d.get('sink'))}</td><td>retrying ({_e(d.get('attempts'))} "
                       f"attempts)</td><td>{_e(d.get('last_error'))}</td></tr>")
        out.append("</table>")
    return out


def _components(components: list[dict[str, Any]]) -> list[str]:
    out = ["<h2>Components</h2><table><tr><th>id</th><th>kind</th><th>type</th><th>state</th>"
           "<th>connected</th><th>since</th><th>restarts</th><th>error</th></tr>"]
    for c in components:
        bad = c.get("state") in ("failed", "retrying")
        conn = "yes" if c.get("connected") else ("no" if c.get("kind") == "source" else "-")
        out.append(
            f"<tr><td>{_e(c.get('id'))}</td><td>{_e(c.get('kind'))}</td><td>{_e(c.get('type'))}"
            f"</td><td class='{'bad' if bad else ''}'>{_e(c.get('state'))}</td><td>{conn}</td>"
            f"<td>{_e(ago(c.get('since')))}</td><td class='n'>{_e(c.get('restarts', 0))}</td>"
            f"<td>{_e(c.get('error') or '')}</td></tr>")
    return [*out, "</table>"]


def _outbox(ob: dict[str, Any]) -> list[str]:
    budget = ob.get("budget") or {}
    pct = float(budget.get("percent") or 0.0)
    quarantine = sum((ob.get("quarantine") or {}).values())
    accepting = ("<span class='good'>yes</span>" if ob.get("accepting", True)
                 else "<span class='bad'>NO — backpressure</span>")
    return [
        "<h2>Local outbox</h2><table>",
        f"<tr><th>events stored</th><td>{_e(ob.get('events', 0))}</td></tr>",
        f"<tr><th>accepting new events</th><td>{accepting}</td></tr>",
        f"<tr><th>disk used</th><td><span class='bar'><span class='{'hi' if pct >= 80 else ''}'"
        f" style='width:{min(100.0, pct):.0f}%'></span></span> "
        f"{budget.get('used_bytes', 0) / MB:.1f} MB of {budget.get('budget_bytes', 0) / MB:.0f}"
        f" MB ({pct:.1f} %)</td></tr>",
        f"<tr><th>full in</th><td>{_full_in(budget.get('time_to_full_s'))}</td></tr>",
        f"<tr><th>dead letters</th><td>{_e(ob.get('dead_letters', 0))}</td></tr>",
        f"<tr><th>quarantined inbound records</th><td>{quarantine}</td></tr>",
        f"<tr><th>file</th><td><code>{_e(ob.get('path', ''))}</code></td></tr></table>",
    ]


def _full_in(seconds: float | None) -> str:
    if seconds is None:
        return "<span class='muted'>not filling up (or too early to tell)</span>"
    return f"about {duration(seconds)} <span class='muted'>(rate of the last 10 minutes)</span>"
