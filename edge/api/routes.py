"""Request handlers of the local API (see ``edge.api.server`` for the list of endpoints).

Handlers find the gateway in ``request.app.state.gateway``. Reads go through
``Outbox.read`` (the reader thread), operator actions through the audited ``Outbox``
methods (a sink resume through ``Gateway.resume_sink``, a lot release through
``Gateway.release_lot``), so the API never blocks the event loop and never writes around
the single writer.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from edge.api import dead_letters, lineage, page
from edge.errors import OutboxClosedError, OutboxError
from edge.outbox import lots, queries
from edge.outbox.integrity import corrupt_advice
from edge.pipeline import AlreadyReleased, UnknownLot
from edge.quality.state import LOT_STATES

__all__ = ["dlq_discard", "dlq_list", "dlq_replay", "dlq_show", "healthz", "index", "lot_release",
           "lots_list", "readiness", "readyz", "sink_resume", "status", "trace"]

MAX_DLQ_LIMIT = 1000
MAX_LOTS_LIMIT = 1000
MAX_REASON_CHARS = 2000
MAX_BY_CHARS = 200


def json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc, default=str), status_code=status,
                    media_type="application/json")


def error(status: int, message: str) -> Response:
    return json({"error": message}, status)


def _gateway(request: Request) -> Any:
    return request.app.state.gateway


def _actor(request: Request, by: str | None = None) -> str:
    """Who acts, for the audit: the token's actor ("api" without a token), plus the person
    the request names in ``by`` (``api:alice by J. Doe``)."""
    token = getattr(request.state, "token", None)
    actor = token.actor if token else "api"
    return f"{actor} by {by}" if by else actor


async def _json_body(request: Request) -> Any:
    """The parsed body; ``ValueError`` when it is not JSON."""
    try:
        return orjson.loads(await request.body() or b"null")
    except orjson.JSONDecodeError as err:
        raise ValueError("the body must be a JSON object") from err


def _outbox(request: Request) -> Any:
    """The gateway's outbox; ``OutboxClosedError`` (→ 503) once it is closed."""
    outbox = _gateway(request).outbox
    if _closed(outbox):
        raise OutboxClosedError("the outbox is closed")
    return outbox


def _closed(outbox: Any) -> bool:
    # Not writable although not refusing for space: the writer is gone (closed or stopping).
    return not outbox.writable() and outbox.accepting


def readiness(gateway: Any) -> list[dict[str, str]]:
    """Why the gateway cannot take events now; empty when it is ready.

    Readiness does not depend on the receivers: storing while the ERP is down is the job.
    """
    if not gateway.ready.is_set() and not getattr(gateway, "stopped", False):
        # /healthz answers from the start; the outbox is being checked and opened
        reasons = [{"code": "starting", "message": "the gateway is starting (checking and "
                    "opening the outbox, starting sinks and sources)"}]
        if not gateway.sinks:
            reasons.append({"code": "no_sinks", "message": "no sink is configured"})
        return reasons
    reasons = []
    outbox = gateway.outbox
    fault = getattr(outbox, "storage_fault", None)
    corrupt = getattr(gateway, "outbox_corrupt", None)
    if corrupt is not None:
        reasons.append({"code": "outbox_corrupt",
                        "message": corrupt_advice(outbox.path, corrupt)})
    if _closed(outbox):
        reasons.append({"code": "outbox_closed", "message": "the outbox is closed"})
    elif not outbox.writable() and not fault:
        # refusing with a storage fault (a full disk) is said below, not blamed on the budget
        reasons.append({"code": "backpressure", "message":
                        "the outbox budget is used by events that may not be expired; "
                        "new events are refused"})
    if fault:
        reasons.append({"code": "outbox_storage", "message":
                        f"outbox writes fail ({fault}); nothing is acknowledged upstream "
                        "until they succeed again"})
    if not gateway.sinks:
        reasons.append({"code": "no_sinks", "message": "no sink is configured"})
    if not gateway.ready.is_set() and not reasons:
        reasons.append({"code": "starting", "message": "the gateway is starting"})
    return reasons


async def healthz(request: Request) -> Response:
    return json({"status": "alive"})


async def readyz(request: Request) -> Response:
    reasons = readiness(_gateway(request))
    if reasons:
        return json({"status": "not ready", "reasons": reasons}, 503)
    return json({"status": "ready"})


async def status(request: Request) -> Response:
    _outbox(request)
    return json(await _gateway(request).status_report())


async def index(request: Request) -> Response:
    """The status page (``edge.api.page``): ``/status`` plus the last hour's history, dead
    letters by reason and connection gaps per source."""
    gateway = _gateway(request)
    extras = page.Extras(history=getattr(request.app.state, "history", None),
                         source_gaps=_per_label(gateway.metrics.source_gaps))
    try:
        outbox = _outbox(request)
        report = await gateway.status_report()
        extras = page.Extras(history=extras.history, source_gaps=extras.source_gaps,
                             dead_letters=await outbox.read(dead_letters.by_reason))
    except OutboxError as err:
        report = {"site": gateway.config.site, "error": str(err)}
    return HTMLResponse(page.render(report, readiness(gateway), extras),
                        headers={"Cache-Control": "no-store"})


def _per_label(collector: Any) -> dict[str, float]:
    """A one-label counter's values by label (``{"line1": 2.0}``), public API only."""
    out: dict[str, float] = {}
    for family in collector.collect():
        for s in family.samples:
            if s.name == family.name + "_total" and s.labels:
                out[next(iter(s.labels.values()))] = float(s.value)
    return out


async def dlq_list(request: Request) -> Response:
    sink = request.query_params.get("sink") or None
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DLQ_LIMIT:
        return error(400, f"limit must be an integer from 1 to {MAX_DLQ_LIMIT}, got {raw!r}")
    outbox = _outbox(request)
    rows = await outbox.read(lambda c: queries.dlq_list(c, sink=sink, limit=int(raw)))
    return json({"dead_letters": rows, "count": len(rows)})


async def dlq_show(request: Request) -> Response:
    ref = request.path_params["ref"]
    found = await _outbox(request).read(queries.dlq_show, ref)
    return json(found) if found else error(404, f"no dead letter {ref!r}")


async def dlq_replay(request: Request) -> Response:
    return await _dlq_action(request, "replay")


async def dlq_discard(request: Request) -> Response:
    return await _dlq_action(request, "discard")


async def _dlq_action(request: Request, action: str) -> Response:
    """``{"ids": [..]}`` or ``{"sink": ".."}`` plus a required reason; audited."""
    try:
        body = await _json_body(request)
    except ValueError as err:
        return error(400, str(err))
    problem = _check_action(body)
    if problem:
        return error(400, problem)
    outbox = _outbox(request)
    kwargs = {"ids": body.get("ids"), "sink": body.get("sink"), "actor": _actor(request),
              "reason": body["reason"].strip()}
    if action == "replay":
        n = await outbox.dlq_replay(**kwargs)
        return json({"replayed": n})
    n = await outbox.dlq_discard(**kwargs)
    return json({"discarded": n})


def _check_action(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object: {\"ids\": [1, 2]} or {\"sink\": \"erp\"}, " \
               "plus \"reason\""
    unknown = set(body) - {"ids", "sink", "reason"}
    if unknown:
        return f"unknown key {sorted(unknown)[0]!r} (allowed: ids, sink, reason)"
    problem = _check_reason(body.get("reason"))
    if problem:
        return problem
    ids, sink = body.get("ids"), body.get("sink")
    if ids is None and sink is None:
        return "say which dead letters: \"ids\": [..] or \"sink\": \"..\""
    if ids is not None and (not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        return "ids must be a non-empty list of dead-letter ids (integers)"
    if sink is not None and (not isinstance(sink, str) or not sink):
        return "sink must be a sink id"
    return None


def _check_reason(reason: Any) -> str | None:
    if not isinstance(reason, str) or not reason.strip():
        return "reason is required: say why (it is recorded in the audit trail)"
    if len(reason) > MAX_REASON_CHARS:
        return f"reason must be at most {MAX_REASON_CHARS} characters"
    return None


async def sink_resume(request: Request) -> Response:
    """``POST /sinks/{sink_id}/resume`` with ``{"reason": "..", "by": ".."}``; audited.

    200 ``{"sink", "resumed": true}`` when the sink was paused (storm guard, auth) and now
    sends again, ``"resumed": false`` when it was not paused; 404 for an unknown sink; 501
    when this gateway cannot resume sinks.
    """
    sink_id = request.path_params["sink_id"]
    try:
        body = await _json_body(request)
    except ValueError as err:
        return error(400, str(err))
    problem = _check_resume(body)
    if problem:
        return error(400, problem)
    resume = getattr(_gateway(request), "resume_sink", None)
    if resume is None:
        return error(501, "this gateway version cannot resume sinks")
    by = (body.get("by") or "").strip() or None
    try:
        resumed = await resume(sink_id, actor=_actor(request, by),
                               reason=body["reason"].strip())
    except KeyError:
        return error(404, f"no sink {sink_id!r}")
    if not resumed:
        return json({"sink": sink_id, "resumed": False, "detail": "the sink was not paused"})
    return json({"sink": sink_id, "resumed": True})


def _check_resume(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object: {\"reason\": \"...\", \"by\": \"...\"}"
    unknown = set(body) - {"reason", "by"}
    if unknown:
        return f"unknown key {sorted(unknown)[0]!r} (allowed: reason, by)"
    by = body.get("by")
    if by is not None and (not isinstance(by, str) or len(by) > MAX_BY_CHARS):
        return f"by must be a name of at most {MAX_BY_CHARS} characters"
    return _check_reason(body.get("reason"))


async def lots_list(request: Request) -> Response:
    """``GET /lots?state=hold&limit=200``: lots, most recently changed first."""
    import time

    state = request.query_params.get("state") or None
    if state is not None and state not in LOT_STATES:
        return error(400, f"state must be one of {', '.join(LOT_STATES)}, got {state!r}")
    raw = request.query_params.get("limit", "200")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LOTS_LIMIT:
        return error(400, f"limit must be an integer from 1 to {MAX_LOTS_LIMIT}, got {raw!r}")
    gateway = _gateway(request)
    stuck_after_s = gateway.lot_monitor.stuck_after_s
    now = time.time()
    rows = await _outbox(request).read(lambda c: lots.list_lots(
        c, now=now, state=state, stuck_after_s=stuck_after_s, limit=int(raw)))
    reconciler = getattr(gateway, "reconciler", None)
    if reconciler is not None:  # the last reconciliation round's view of each lot
        for r in rows:
            r["reconcile"] = reconciler.check(r["lot_id"])
    return json({"lots": rows, "count": len(rows)})


async def lot_release(request: Request) -> Response:
    """``POST /lots/{lot_id}/release`` with ``{"reason": "..", "by": ".."}`` (both
    required: ``by`` is who decided). Stores a ``lot.status`` (released) and a
    ``quality.release``, audited (``lot_released``) with the token's actor and ``by``.

    200 ``{"lot_id", "released": true, "episode", "previous_state", "event_ids"}``; 404 for
    a lot the gateway has never seen; 409 with the lot when it is released already.
    """
    lot_id = request.path_params["lot_id"]
    try:
        body = await _json_body(request)
    except ValueError as err:
        return error(400, str(err))
    problem = _check_release(body)
    if problem:
        return error(400, problem)
    _outbox(request)
    by = body["by"].strip()
    try:
        done = await _gateway(request).release_lot(
            lot_id, by=by, reason=body["reason"].strip(), actor=_actor(request, by))
    except UnknownLot:
        return error(404, f"no lot {lot_id!r}: the gateway has seen no receipt, result or "
                          "status of it")
    except AlreadyReleased as err:
        return json({"error": str(err), "lot": err.lot}, 409)
    return json({"lot_id": done.lot_id, "released": True, "episode": done.episode,
                 "previous_state": done.previous_state, "event_ids": done.event_ids})


def _check_release(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object: {\"reason\": \"...\", \"by\": \"...\"}"
    unknown = set(body) - {"reason", "by"}
    if unknown:
        return f"unknown key {sorted(unknown)[0]!r} (allowed: reason, by)"
    by = body.get("by")
    if not isinstance(by, str) or not by.strip():
        return "by is required: who decided the release (it is recorded with the release)"
    if len(by) > MAX_BY_CHARS:
        return f"by must be a name of at most {MAX_BY_CHARS} characters"
    return _check_reason(body.get("reason"))


async def trace(request: Request) -> Response:
    """GET /trace/{event_id} or GET /trace?key=lot:L1."""
    outbox = _outbox(request)
    event_id = request.path_params.get("event_id")
    if event_id:
        doc = await outbox.read(lineage.trace_event, event_id)
        return json(doc) if doc else error(404, f"no trace of event {event_id!r}")
    key = request.query_params.get("key")
    if not key:
        return error(400, "give an event id (/trace/ID) or an ordering key (/trace?key=lot:L1)")
    doc = await outbox.read(lineage.trace_key, key)
    return json(doc) if doc else error(404, f"no event with ordering key {key!r}")
