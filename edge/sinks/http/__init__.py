"""``type: http`` — deliver events to an ERP/QMS REST API.

Routes are matched at send time (first match wins), so a stored backlog follows a changed
API version after a restart. What each request carries (body, ``Idempotency-Key``,
``X-Correlation-ID``, ``traceparent``) is in ``edge.sinks.http.request``.

``send`` contract (``edge.components`` Sink): one Outcome per event, never raising for a
per-event failure. It plans requests in outbox order, then sends them with
``edge.forwarder.send_in_key_order``:
- An event with no route is ``unrouted``; one whose path cannot be rendered safely (a path
  value missing, empty, ``.``, ``..``) is a dead letter "unsafe path value: …", never sent.
  Each value in a path is exactly one percent-encoded segment.
- Per-key order across routes (DESIGN invariant 4): an event joins an open batch only if no
  request created after that batch already carries its key; otherwise it starts a new
  request. Requests sharing a key go one after the other, in the order they were planned.
- Once an event of a key is not delivered (retry, sink fault, unrouted, and a dead letter
  unless ``on_dead_letter: continue``), the later events of that key in this call are not
  sent (``Outcome.not_attempted``): at planning, between requests, and between the halves
  of a split batch.

Response policy (DESIGN.md):
  2xx → delivered; 409 and ``duplicate_statuses`` → duplicate (delivered, noted);
  408 425 429 500 502 503 504, timeouts, connection errors → retry, never before
  ``Retry-After`` (seconds or HTTP-date);
  400 404 410 413 422 and every other 4xx that judges the event → dead letter with status
  and body;
  401 / 403 after one credential refresh (``edge.sinks.http.auth``) → sink fault (the rows stay;
  the forwarder pauses and alarms);
  3xx (redirects are not followed), 405 406 407 411 415 417 421 426 (the request's form or
  channel, the same for every event), 501 505 507 511 520–524 and any other status →
  sink fault with status and body; the OAuth2 token endpoint refusing the client → sink
  fault.
A batch of several answered with a dead-letter or duplicate status (413 included) is split
in halves until the judged events stand alone; a batch answered with a retry or sink fault
is never split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.registry import ComponentType
from edge.sinks.http.config import HttpSinkConfig, RouteConfig

if TYPE_CHECKING:
    from edge.components import ComponentContext
    from edge.sinks.http.sink import HttpSink

__all__ = ["COMPONENT", "HttpSinkConfig", "RouteConfig"]


def _factory(config: HttpSinkConfig, ctx: ComponentContext) -> HttpSink:
    from edge.sinks.http.sink import HttpSink  # httpx only when an http sink is used

    return HttpSink(config, ctx)


COMPONENT = ComponentType(
    kind="sink",
    type="http",
    config_model=HttpSinkConfig,
    factory=_factory,
    description="ERP/QMS REST API over HTTP(S)",
)
