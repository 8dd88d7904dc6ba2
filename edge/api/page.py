"""``GET /``: the status page a person reads in five seconds.

One self-contained HTML document: no script, no external URL, one inline stylesheet that
the API's CSP allows by its hash (``STYLE_HASH``), charts as inline SVG; it reloads itself
every ``REFRESH_S`` seconds (``<meta http-equiv=refresh>``). Top to bottom:

1. the verdict (OK / NEEDS ATTENTION / PROBLEM) in big letters with its reason, then every
   problem in words;
2. intake vs delivery and the backlog over the last hour (``edge.api.history``: sampled in
   memory by the API server, empty after a start, and the page says so);
3. receivers: state, in flight, queued, retrying, oldest, dead letters, time since the
   last delivery, last error;
4. dead letters by reason and the ordering keys (lots) held behind them;
5. the disk budget: used of budget, and a time to full only when the live data rises
   steadily (``edge.outbox.budget``), else "not growing" / "not enough history";
6. sources: connected or not, since when, connection gaps; other components;
7. lots, reconciliation, delivery SLAs and failed notifications when there are any.

Every value from the config, the events or a receiver is HTML-escaped. Key figures carry a
``data-field`` attribute (and sink rows ``data-sink``) so a test or a scraper can read them
from the rendered page.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from edge.api.headers import style_hash
from edge.api.history import SAMPLE_EVERY_S, WINDOW_S, History, chart_svg
from edge.api.summary import lot_text, overall, parked_key_text, problems
from edge.timefmt import ago, duration, utc_iso

__all__ = ["REFRESH_S", "STYLE_HASH", "Extras", "render"]

REFRESH_S = 10
CLASSES = ("critical", "high", "normal", "low")
MB = 1024 * 1024  # outbox.max_size_mb counts in these
LABELS = {"ok": "OK", "degraded": "NEEDS ATTENTION", "critical": "PROBLEM"}
OK_REASON = ("Nothing: every component runs, the receivers answer and nothing is waiting "
             "long.")

_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2125}
header{padding:16px 20px;color:#fff}header h1{margin:0;font-size:34px;letter-spacing:.5px}
header .reason{margin:6px 0 0;font-size:19px;font-weight:600}
header .meta{margin:6px 0 0;font-size:13px;opacity:.9}
.s-ok{background:#1f7a3a}.s-degraded{background:#8a5300}.s-critical{background:#b3261e}
main{padding:8px 20px 24px;max-width:1200px}h2{font-size:17px;margin:22px 0 6px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d5d8dc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#e9ebee}td.n{text-align:right;font-variant-numeric:tabular-nums}
ul.p{list-style:none;padding:0;margin:0}ul.p li{padding:8px 10px;margin:4px 0;background:#fff}
li.critical{border-left:6px solid #b3261e}li.warning{border-left:6px solid #e0a800}
.bad{color:#b3261e;font-weight:600}.good{color:#1f7a3a}.muted{color:#5f6b76}
.figures{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.figures div{background:#fff;padding:6px 12px;border:1px solid #d5d8dc}
.figures b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
svg.chart{background:#fff;border:1px solid #d5d8dc;max-width:100%;height:auto}
footer{padding:0 20px 20px;color:#5f6b76}
"""
STYLE_HASH = style_hash(_CSS)


@dataclass(frozen=True)
class Extras:
    """What the page shows besides ``/status``: the last hour's history, dead letters by
    reason (``edge.api.dead_letters.by_reason``), connection gaps per source."""

    history: History | None = None
    dead_letters: dict[str, Any] = field(default_factory=dict)
    source_gaps: dict[str, float] = field(default_factory=dict)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def render(report: dict[str, Any], not_ready: list[dict[str, str]],
           extras: Extras | None = None, now: float | None = None) -> str:
    """The page for ``report`` (``Gateway.status_report()``, or ``{"site", "error"}`` when
    the gateway cannot report) and ``not_ready`` (``routes.readiness``)."""
    extras = extras or Extras()
    now = time.time() if now is None else now
    found = problems(report) if "error" not in report else []
    state = "critical" if "error" in report else overall(found)
    if not_ready and state != "critical":
        # not taking data is a problem, except in the seconds of a start
        starting = all(r.get("code") == "starting" for r in not_ready)
        state = "degraded" if starting else "critical"
    label = LABELS[state]
    site = report.get("site", "?")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='refresh' content='{REFRESH_S}'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{label} · edge gateway {_e(site)}</title><style>{_CSS}</style></head><body>",
        f"<header class='s-{state}'><h1 data-field='health'>{label}</h1>"
        f"<p class='reason' data-field='health-reason'>{_e(_reason(report, found, not_ready))}"
        f"</p><p class='meta'>{_e(site)} · edge-gateway {_e(report.get('version', ''))} · up "
        f"{duration(report.get('uptime_s'))} · {_e(utc_iso(now)[:19].replace('T', ' '))} UTC"
        f" · refreshes every {REFRESH_S} s</p></header><main>",
    ]
    if "error" in report:
        parts.append(f"<p class='bad'>Status unavailable: {_e(report['error'])} "
                     "(the gateway may be stopping).</p>")
    parts += _attention(found, not_ready)
    if "error" not in report:
        parts += _figures(report)
        parts += _flow(extras.history, now)
        parts += _sinks(report.get("sinks") or {}, (report.get("outbox") or {}).get("inflight")
                        or {})
        parts += _dead_letters(extras.dead_letters, now)
        parts += _parked(report.get("sinks") or {})
        parts += _outbox(report.get("outbox") or {})
        parts += _sources(report.get("components") or [], extras.source_gaps)
        parts += _lots(report.get("lots") or {})
        parts += _reconcile((report.get("lots") or {}).get("reconcile") or {})
        parts += _business(report.get("business") or {})
    parts.append("</main><footer>Machine-readable: <a href='/status'>/status</a> · "
                 "<a href='/metrics'>/metrics</a> · dead letters: <a href='/dlq'>/dlq</a> · "
                 "lots: <a href='/lots'>/lots</a> · "
                 "on the gateway: <code>edge status</code>, <code>edge dlq list</code>, "
                 "<code>edge lots</code>, <code>edge trace ID</code></footer></body></html>")
    return "".join(parts)


def _reason(report: dict[str, Any], found: list[Any], not_ready: list[dict[str, str]]
            ) -> str:
    """The one line under the verdict: the most severe problem (and how many more)."""
    if "error" in report:
        return f"status unavailable: {report['error']}"
    lines = [f"not ready: {r['message']}" for r in not_ready]
    lines += [f"{p.subject}: {p.message}" for p in found]
    if not lines:
        return OK_REASON
    more = len(lines) - 1
    return lines[0] + (f" (and {more} more below)" if more else "")


def _attention(found: list[Any], not_ready: list[dict[str, str]]) -> list[str]:
    out = ["<h2>What needs attention</h2>"]
    if not found and not not_ready:
        return [*out, f"<p class='good'>{OK_REASON}</p>"]
    out.append("<ul class='p'>")
    for r in not_ready:
        out.append(f"<li class='critical'><b>not ready</b> — {_e(r['message'])}</li>")
    for p in found:
        since = f" <span class='muted'>since {_e(p.since)} ({ago(p.since)})</span>" \
            if p.since else ""
        out.append(f"<li class='{p.severity}'><b>{_e(p.subject)}</b> — {_e(p.message)}"
                   f"{since}</li>")
    return [*out, "</ul>"]


def _figures(report: dict[str, Any]) -> list[str]:
    """The few numbers everyone asks for first, big."""
    sinks = report.get("sinks") or {}
    ob = report.get("outbox") or {}
    queued = sum(int(s.get("total") or 0) for s in sinks.values())
    oldest = max((s.get("oldest_age_s") or 0 for s in sinks.values()), default=0)
    parked = sum(max(int(s.get("parked") or 0), len(s.get("parked_keys") or []))
                 for s in sinks.values())
    budget = ob.get("budget") or {}
    items = [("queued", "waiting for delivery", f"{queued}"),
             ("oldest", "oldest waiting", duration(oldest) if queued else "-"),
             ("dead-letters", "dead letters", f"{int(ob.get('dead_letters') or 0)}"),
             ("parked", "lots held", f"{parked}"),
             ("disk-percent", "disk budget used", f"{float(budget.get('percent') or 0):.1f} %")]
    return ["<div class='figures'>", *(f"<div>{label}<b data-field='{key}'>{_e(value)}</b></div>"
                                       for key, label, value in items), "</div>"]


def _flow(history: History | None, now: float) -> list[str]:
    out = [f"<h2>Intake vs delivery, last {duration(WINDOW_S)}</h2>"]
    points = history.points() if history is not None else []
    if not points:
        return [*out, "<p class='muted' data-field='history'>No history yet: intake, delivery "
                f"and backlog are sampled every {duration(SAMPLE_EVERY_S)} and kept in memory "
                f"for {duration(WINDOW_S)}; the chart starts empty after each start of the "
                "gateway.</p>"]
    assert history is not None
    last = points[-1]
    got, sent = history.totals() or (0.0, 0.0)
    out.append(chart_svg(points, now, history.window_s))
    short = (f" (history since {duration(history.span_s())} only: it starts empty after each "
             "start of the gateway)" if history.span_s() < history.window_s - 2 * SAMPLE_EVERY_S
             else "")
    out.append(f"<p class='muted' data-field='history'>Latest sample "
               f"({duration(max(0.0, now - last.at))} ago): intake "
               f"{last.intake_per_min:,.0f}/min, delivered "
               f"{last.delivery_per_min:,.0f}/min, backlog {last.backlog}. Over "
               f"{duration(history.span_s())}: {got:,.0f} events in, {sent:,.0f} deliveries"
               f"{short}.</p>")
    return out


def _sinks(sinks: dict[str, Any], inflight: dict[str, Any]) -> list[str]:
    out = ["<h2>Receivers</h2><table><tr><th>sink</th><th>state</th><th>in flight</th>"
           "<th>queued</th><th>retrying</th><th>oldest</th><th>dead letters</th>"
           "<th>parked keys</th><th>last delivery</th><th>last error</th></tr>"]
    if not sinks:
        out.append("<tr><td colspan='10' class='bad'>no sink configured</td></tr>")
    for sid, s in sorted(sinks.items()):
        depth = s.get("depth") or {}
        by_class = ", ".join(f"{c} {depth[c]}" for c in CLASSES if depth.get(c))
        dead = s.get("dead_letters", 0)
        parked = max(int(s.get("parked") or 0), len(s.get("parked_keys") or []))
        out.append(
            f"<tr data-sink='{_e(sid)}'><td>{_e(sid)}</td>"
            f"<td data-field='state'>{_reachable(s)}</td>"
            f"<td class='n' data-field='inflight'>{_e(inflight.get(sid, 0))}</td>"
            f"<td class='n'><span data-field='queued'>{_e(s.get('total', 0))}</span>"
            + (f" <span class='muted'>({_e(by_class)})</span>" if by_class else "")
            + f"</td><td class='n'>{_e(s.get('retrying', 0))}</td>"
            f"<td class='n'>{duration(s.get('oldest_age_s'))}</td>"
            f"<td class='n{' bad' if dead else ''}' data-field='dead-letters'>{_e(dead)}</td>"
            f"<td class='n{' bad' if parked else ''}'>{parked}</td>"
            f"<td data-field='last-delivery'>{_e(ago(s.get('last_delivery')))}</td>"
            f"<td>{_e(s.get('last_error') or '')}</td></tr>")
    return [*out, "</table>"]


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
    return "<span class='good'>delivering</span>"


def _dead_letters(section: dict[str, Any], now: float) -> list[str]:
    """Dead letters by reason (``edge.api.dead_letters.by_reason``), when there are any."""
    total = int(section.get("total") or 0)
    if not total:
        return []
    groups = section.get("groups") or []
    out = [f"<h2>Dead letters: {total}</h2><p class='muted'>Refused by the receiver; they "
           "stay until replayed or discarded (<code>edge dlq list</code>, "
           "<code>edge dlq replay|discard</code>).</p><table><tr><th>count</th><th>sink</th>"
           "<th>status</th><th>reason</th><th>the receiver said (latest)</th>"
           "<th>latest</th></tr>"]
    for g in groups:
        out.append(f"<tr><td class='n bad'>{_e(g.get('count'))}</td><td>{_e(g.get('sink'))}"
                   f"</td><td>{_e(g.get('status') if g.get('status') is not None else '-')}"
                   f"</td><td data-field='dead-letter-reason'>{_e(g.get('reason'))}</td>"
                   f"<td><code data-field='dead-letter-response'>{_e(g.get('response'))}"
                   "</code></td>"
                   f"<td>#{_e(g.get('latest_id'))}, "
                   f"{_e(duration(now - float(g.get('latest_at') or now)))} ago</td></tr>")
    shown = sum(int(g.get("count") or 0) for g in groups)
    if total > shown:
        out.append(f"<tr><td colspan='6' class='muted'>and {total - shown} more with other "
                   "reasons: <a href='/dlq'>/dlq</a></td></tr>")
    return [*out, "</table>"]


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




def _outbox(ob: dict[str, Any]) -> list[str]:
    budget = ob.get("budget") or {}
    pct = float(budget.get("percent") or 0.0)
    quarantine = sum((ob.get("quarantine") or {}).values())
    accepting = ("<span class='good'>yes</span>" if ob.get("accepting", True)
                 else "<span class='bad'>NO — backpressure</span>")
    fill = "#b3261e" if pct >= 80 else "#1f7a3a"
    bar = (f"<svg xmlns='http://www.w3.org/2000/svg' width='260' height='12' viewBox='0 0 260 "
           f"12' role='img' aria-label='{pct:.1f} % used'><rect width='260' height='12' "
           f"fill='#e9ebee'/><rect width='{2.6 * min(100.0, pct):.1f}' height='12' "
           f"fill='{fill}'/></svg>")
    return [
        "<h2>Disk budget</h2><table>",
        f"<tr><th>used</th><td>{bar} <span data-field='disk-used'>"
        f"{budget.get('used_bytes', 0) / MB:.1f} MB of {budget.get('budget_bytes', 0) / MB:.0f}"
        f" MB ({pct:.1f} %)</span>{_live(budget)}</td></tr>",
        f"<tr><th>forecast</th><td data-field='disk-forecast'>{_forecast(budget)}</td></tr>",
        f"<tr><th>accepting new events</th><td>{accepting}</td></tr>",
        f"<tr><th>events stored</th><td>{_e(ob.get('events', 0))}</td></tr>",
        f"<tr><th>quarantined inbound records</th><td>{quarantine}</td></tr>",
        f"<tr><th>file</th><td><code>{_e(ob.get('path', ''))}</code></td></tr></table>",
    ]


def _live(budget: dict[str, Any]) -> str:
    """How much of ``used`` is data (the rest is the WAL, folded back at checkpoints)."""
    live, used = budget.get("live_bytes"), budget.get("used_bytes") or 0
    if live is None or used - live < MB:
        return ""
    return (f" <span class='muted'>of which {live / MB:.1f} MB data, {(used - live) / MB:.1f}"
            " MB write-ahead log (given back at the next checkpoint)</span>")


def _forecast(budget: dict[str, Any]) -> str:
    """The budget's own words (``forecast.text``); older gateways send only the number."""
    forecast = budget.get("forecast") or {}
    if forecast.get("text"):
        cls = "bad" if forecast.get("state") == "growing" else "muted"
        return f"<span class='{cls}'>{_e(forecast['text'])}</span>"
    seconds = budget.get("time_to_full_s")
    if seconds is None:
        return "<span class='muted'>not growing, or not enough history to tell</span>"
    return f"full in about {_e(duration(seconds))}"


def _sources(components: list[dict[str, Any]], gaps: dict[str, float]) -> list[str]:
    sources = [c for c in components if c.get("kind") == "source"]
    # a running sink is told about under Receivers; one that failed to start or restarts is
    # listed here with its error
    others = [c for c in components if c.get("kind") not in ("source", "sink")
              or c.get("state") != "running"]
    out = ["<h2>Sources</h2><table><tr><th>source</th><th>type</th><th>connected</th>"
           "<th>since</th><th>gaps</th><th>state</th><th>error</th></tr>"]
    if not sources:
        out.append("<tr><td colspan='7' class='muted'>no source configured</td></tr>")
    for c in sources:
        connected = bool(c.get("connected"))
        gap = int(gaps.get(str(c.get("id")), 0))
        bad = c.get("state") in ("failed", "retrying")
        out.append(
            f"<tr data-source='{_e(c.get('id'))}'><td>{_e(c.get('id'))}</td>"
            f"<td>{_e(c.get('type'))}</td><td data-field='connected' class="
            f"'{'good' if connected else 'bad'}'>{'yes' if connected else 'NO'}</td>"
            f"<td>{_e(ago(c.get('since')))}</td>"
            f"<td class='n{' bad' if gap else ''}' data-field='gaps'>{gap}</td>"
            f"<td class='{'bad' if bad else ''}'>{_e(c.get('state'))}</td>"
            f"<td>{_e(c.get('error') or '')}</td></tr>")
    out.append("</table>")
    if others:
        out.append("<h2>Other components</h2><table><tr><th>id</th><th>kind</th><th>type</th>"
                   "<th>state</th><th>since</th><th>restarts</th><th>error</th></tr>")
        for c in others:
            bad = c.get("state") in ("failed", "retrying")
            out.append(
                f"<tr><td>{_e(c.get('id'))}</td><td>{_e(c.get('kind'))}</td>"
                f"<td>{_e(c.get('type'))}</td><td class='{'bad' if bad else ''}'>"
                f"{_e(c.get('state'))}</td><td>{_e(ago(c.get('since')))}</td>"
                f"<td class='n'>{_e(c.get('restarts', 0))}</td>"
                f"<td>{_e(c.get('error') or '')}</td></tr>")
        out.append("</table>")
    return out
