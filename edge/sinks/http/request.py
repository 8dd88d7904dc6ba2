"""One request of the ``http`` sink: what it carries, and what its answer means.

What it carries (DESIGN invariant 3):
- the body: one event's envelope (or its ``data`` with ``body: data``), or on a batched
  route (``max_batch > 1``) a JSON array of envelopes — every element carries its ``id``,
  however the batch was cut or split (``body: data`` on a batched route is a config error);
- ``Idempotency-Key``: the event id when the request carries one event, also on a batched
  route (a live event, a split half of one, a probe); for several events a stable hash of
  their ids (``batch-…``), the same on every attempt of the same events;
- ``X-Correlation-ID`` and a W3C ``traceparent`` whose trace id is the correlation id.

- the route's ``api_version`` in its ``api_version_header`` (default ``Api-Version``).

What its answer means: ``judge_response`` and ``judge_error`` implement the response
policy table in ``edge/sinks/http/README.md``; ``should_split`` says when a
refused batch is split to find the events the receiver judged.

The answer's body (``read_body``): kept whole up to ``MAX_ERROR_BODY`` characters — the
dead-letter table's bound, so what the receiver said about a refused event reaches the
operator as it was. A longer body is cut and ends with a note of how long it was; the
sink's transport never reads more than ``MAX_READ_BYTES`` of an answer (a receiver cannot
fill the gateway's memory), and an answer longer than that is not read to its end (the
connection is closed instead of reused).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
from collections.abc import Collection, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson

from edge.plugin import Outcome, OutcomeKind, StoredEvent, parse_retry_after
from edge.sinks.http.auth import REFRESH_STATUSES, TokenRefused
from edge.sinks.http.transport import Reply, TransportError, TransportTimeout

if TYPE_CHECKING:
    from edge.sinks.http.config import RouteConfig

__all__ = [
    "MAX_ERROR_BODY",
    "MAX_READ_BYTES",
    "RETRY_STATUSES",
    "SINK_FAULT_4XX",
    "idempotency_key",
    "judge_error",
    "judge_response",
    "read_body",
    "request_body",
    "request_headers",
    "retry_after_s",
    "should_split",
]

# Characters of an answer's body kept with a dead letter or an error: what the outbox's
# dead-letter table keeps (edge.outbox.queries.MAX_BODY_CHARS).
MAX_ERROR_BODY = 65_536
# Bytes of an answer the sink reads at most: room for MAX_ERROR_BODY characters of UTF-8.
MAX_READ_BYTES = 4 * MAX_ERROR_BODY
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# 4xx answers about the request's form or channel, which the route's config or a proxy
# decides for every event alike: the sink is at fault, not the event.
SINK_FAULT_4XX = frozenset({
    405,  # Method Not Allowed: the route's method
    406,  # Not Acceptable
    407,  # Proxy Authentication Required: a proxy in the way
    411,  # Length Required
    415,  # Unsupported Media Type: the route's body format
    417,  # Expectation Failed
    421,  # Misdirected Request: the connection reached the wrong server
    426,  # Upgrade Required: the protocol
})


def request_body(route: RouteConfig, events: Sequence[StoredEvent]) -> bytes:
    if route.body == "data":
        items = [orjson.dumps(ev.data) for ev in events]
    else:
        items = [ev.body for ev in events]
    if route.max_batch == 1:
        return items[0]
    return b"[" + b",".join(items) + b"]"


def idempotency_key(events: Sequence[StoredEvent]) -> str:
    if len(events) == 1:
        return events[0].id
    return "batch-" + hashlib.sha256(",".join(e.id for e in events).encode()).hexdigest()[:40]


def request_headers(route: RouteConfig, events: Sequence[StoredEvent]) -> dict[str, str]:
    correlation_id = events[0].correlation_id
    headers = {"Content-Type": "application/json", **route.headers}
    if route.api_version is not None:
        headers[route.api_version_header] = route.api_version
    headers["Idempotency-Key"] = idempotency_key(events)
    headers["X-Correlation-ID"] = correlation_id
    headers["traceparent"] = _traceparent(correlation_id)
    return headers


def read_body(reply: Reply) -> str:
    """The body of an answer as text, at most ``MAX_ERROR_BODY`` characters (see the
    module docstring). A 2xx body says nothing the gateway keeps: empty."""
    if reply.is_success:
        return ""
    text = reply.text
    if reply.complete and len(text) <= MAX_ERROR_BODY:
        return text
    length = reply.headers.get("Content-Length", "")
    size = (f"{length} bytes" if length.isdigit() else
            f"{reply.read} bytes" if reply.complete else f"more than {MAX_READ_BYTES} bytes")
    note = "\n[cut by the gateway: the answer had {size}; its first {kept} bytes are above]"
    head = text[:MAX_ERROR_BODY - len(note.format(size=size, kept=MAX_READ_BYTES))]
    return head + note.format(size=size, kept=len(head.encode("utf-8", errors="replace")))


def _traceparent(correlation_id: str) -> str:
    trace = correlation_id.replace("-", "").lower()
    if len(trace) != 32 or not _HEX32.fullmatch(trace) or trace == _ZERO_TRACE:
        trace = hashlib.sha256(correlation_id.encode()).hexdigest()[:32]
    return f"00-{trace}-{random.getrandbits(64):016x}-01"


_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32


def judge_response(resp: Reply, duplicate_statuses: Collection[int],
                   body: str | None = None) -> Outcome:
    """The receiver's answer → one Outcome for every event of the request. ``body``: the
    answer's text as ``read_body`` kept it (default: ``read_body(resp)``).

    A duplicate or dead-letter status on a batch of several is not final: ``should_split``.
    """
    status = resp.status
    if 200 <= status < 300:
        return Outcome.delivered(status)
    if status in duplicate_statuses:
        return Outcome.duplicate(status)
    if body is None:
        body = read_body(resp)
    what = f"HTTP {status} {resp.reason}".strip()
    retry_after = retry_after_s(resp)
    if status in RETRY_STATUSES:
        return Outcome.retry(what, status, body=body, retry_after_s=retry_after)
    if status in REFRESH_STATUSES:
        return Outcome.sink_fault(f"{what}: credentials refused after one refresh", status,
                                  body, retry_after_s=retry_after)
    if 400 <= status < 500 and status not in SINK_FAULT_4XX:
        return Outcome.dead_letter(what, status, body)
    if 300 <= status < 400:
        where = _location(resp.headers.get("Location"))
        what += ": redirects are not followed" + (f" (Location: {where})" if where else "")
    return Outcome.sink_fault(what, status, body, retry_after_s=retry_after)


def retry_after_s(resp: Reply) -> float | None:
    """The answer's ``Retry-After`` in seconds. An HTTP-date is on the receiver's clock, so
    it is measured from the answer's own ``Date`` when there is one: a gateway whose wall
    clock is off or was stepped (NTP) then neither retries early nor pauses for the size
    of the error. Without a usable ``Date`` the local wall clock is the only reference."""
    sent_at = None
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        date = parsedate_to_datetime(resp.headers.get("Date", ""))
        sent_at = date.replace(tzinfo=date.tzinfo or UTC).timestamp()
    return parse_retry_after(resp.headers.get("Retry-After"), now=sent_at)


def judge_error(err: Exception) -> Outcome:
    """A request that got no answer from the receiver → Outcome.

    Timeouts (the transport's per phase, ``TimeoutError`` for the sink's whole-request
    deadline) and connection errors are retried. The OAuth2 token endpoint's refusal
    (``TokenRefused``) is a sink fault — the sink's credential, not the event — unless its
    status is one that is retried.
    """
    if isinstance(err, TokenRefused):
        status = err.status
        if status in RETRY_STATUSES:
            return Outcome.retry(f"auth: {err}", status,
                                 retry_after_s=retry_after_s(err.reply))
        return Outcome.sink_fault(f"auth: {err}", status)
    if isinstance(err, TransportTimeout):
        return Outcome.retry(f"timeout: {err}")
    if isinstance(err, TimeoutError):
        return Outcome.retry("timeout: no complete answer within timeout_s")
    if isinstance(err, TransportError):
        return Outcome.retry(f"connection: {err}")
    if isinstance(err, OSError):
        return Outcome.retry(f"connection: {type(err).__name__}: {err}")
    return Outcome.retry(f"request: {type(err).__name__}: {err}")


def should_split(outcome: Outcome, events: int) -> bool:
    """A batch of several answered with a dead-letter or duplicate status: which elements
    the receiver judged is unknown, so the halves are sent again. A retry or a sink fault
    is about the whole request: never split."""
    return events > 1 and outcome.kind in (OutcomeKind.dead_letter, OutcomeKind.duplicate)


def _location(value: str | None) -> str:
    """A redirect target for the reason text, without user info, query or fragment (a
    signed URL is a credential)."""
    if not value:
        return ""
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
    except ValueError:
        return "(unparseable)"
    return parts._replace(netloc=host, query="", fragment="").geturl()[:500]
