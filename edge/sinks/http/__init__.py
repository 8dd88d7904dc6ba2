"""``type: http`` — deliver events to an ERP/QMS REST API.

``README.md`` beside this file is the reference: every option, the response policy table
(status → outcome), what each request carries (``Idempotency-Key``, ``X-Correlation-ID``,
``traceparent``), per-key order across routes and the guarantees; ``sample.yaml`` is a
complete ERP sink. In short: routes are matched at send time (first match wins); 2xx and
409 deliver; answers that say "later" (429, 503 …), timeouts and connection errors retry,
never before ``Retry-After``; a 4xx that judges the event dead-letters it; 401/403 after
one credential refresh, redirects and unexpected answers fault the sink and keep the rows.

Modules: ``config`` (the config models, cheap to import), ``sink`` (planning and sending,
imported by the factory so aiohttp loads only when an http sink is used), ``request`` (what
a request carries and what its answer means), ``auth`` (credentials at run time),
``transport`` (one request and its whole answer over aiohttp, errors mapped for the policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.plugin import ComponentType
from edge.sinks.http.config import HttpSinkConfig, RouteConfig

if TYPE_CHECKING:
    from edge.plugin import ComponentContext
    from edge.sinks.http.sink import HttpSink

__all__ = ["COMPONENT", "HttpSinkConfig", "RouteConfig"]


def _factory(config: HttpSinkConfig, ctx: ComponentContext) -> HttpSink:
    from edge.sinks.http.sink import HttpSink  # aiohttp only when an http sink is used

    return HttpSink(config, ctx)


COMPONENT = ComponentType(
    kind="sink",
    type="http",
    config_model=HttpSinkConfig,
    factory=_factory,
    description="ERP/QMS REST API over HTTP(S)",
)
