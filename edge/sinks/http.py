"""``type: http`` — deliver events to an ERP/QMS REST API.

Routes are matched at send time (first match wins), so a stored backlog follows a changed
API version after a restart. Each request carries ``Idempotency-Key`` (the event id; for a
batch a stable hash of its event ids — receivers dedupe batches by each envelope's ``id``),
``X-Correlation-ID`` and a W3C ``traceparent`` whose trace id is the correlation id.

Response policy (DESIGN.md):
  2xx → delivered; 409 and ``duplicate_statuses`` → delivered (duplicate, noted);
  408 425 429 500 502 503 504, timeouts, connection errors → retry, never before
  ``Retry-After`` (seconds or HTTP-date); other 4xx → dead letter with status and body
  (401/403 only after the auth flow refreshed its credential once).
A failed batch with a permanent status is split in halves until the bad events are
isolated, so one bad event does not block the others.
"""

from __future__ import annotations

import hashlib
import logging
import random
import zlib
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson
from pydantic import Field, field_validator, model_validator

from edge.components import ComponentContext, Outcome, OutcomeKind, StoredEvent
from edge.config import SinkConfigBase, StrictModel
from edge.errors import InputError
from edge.forwarder import send_in_key_order
from edge.registry import ComponentType
from edge.retry import parse_retry_after
from edge.sinks.auth import AuthConfig, NoAuth, TlsConfig, build_auth, build_ssl_context
from edge.transforms.map import render_template, template_fields

__all__ = ["COMPONENT", "HttpSink", "HttpSinkConfig", "RouteConfig"]

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_ERROR_BODY = 65_536
_TEMPLATE_ROOTS = {"id", "type", "site", "source", "ordering_key", "class", "correlation_id",
                   "data"}


class RouteConfig(StrictModel):
    events: list[str] = Field(
        description="event types this route carries; '*' = all, 'inspection.*' = a prefix",
        min_length=1,
    )
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    path: str = Field(description="appended to url; template, e.g. /lots/{data.lot_id}/status")
    batch_max: int = Field(1, ge=1, le=10_000, description="> 1 sends JSON arrays")
    body: Literal["envelope", "data"] = Field(
        "envelope", description="send the whole canonical envelope or only its data"
    )
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("method", mode="before")
    @classmethod
    def _method_upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) and v.upper() in ("POST", "PUT", "PATCH") else v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        for name in template_fields(v):
            if name.split(".")[0] not in _TEMPLATE_ROOTS:
                allowed = ", ".join(sorted(_TEMPLATE_ROOTS))
                raise ValueError(f"unknown template field {{{name}}}; use {allowed} or data.<field>")
        return v

    @model_validator(mode="after")
    def _batch_path(self) -> RouteConfig:
        if self.batch_max > 1 and any(f.startswith("data") for f in template_fields(self.path)):
            raise ValueError("a batched route (batch_max > 1) needs a path without data fields")
        return self

    def matches(self, event_type: str) -> bool:
        for pattern in self.events:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False


class HttpSinkConfig(SinkConfigBase):
    type: Literal["http"]
    url: str = Field(description="base URL, e.g. https://erp.example.com/api/v1")
    routes: list[RouteConfig] = Field(min_length=1)
    auth: AuthConfig = Field(default_factory=NoAuth)
    tls: TlsConfig | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="sent on every request")
    timeout_s: float = Field(10.0, gt=0, description="whole-request timeout")
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(8, ge=1, le=256)
    max_concurrent_requests: int = Field(8, ge=1, le=256, description="per leased batch")
    duplicate_statuses: list[int] = Field(
        default_factory=lambda: [409], description="statuses that mean 'already exists'"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _no_secret_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name.lower() in ("authorization", "x-api-key", "cookie"):
                raise ValueError(f"{name}: secrets are not allowed inline; use auth with a *_file")
        return v


def _traceparent(correlation_id: str) -> str:
    trace = correlation_id.replace("-", "").lower()
    if len(trace) != 32 or not all(c in "0123456789abcdef" for c in trace) or set(trace) == {"0"}:
        trace = hashlib.sha256(correlation_id.encode()).hexdigest()[:32]
    return f"00-{trace}-{random.getrandbits(64):016x}-01"


class HttpSink:
    def __init__(self, config: HttpSinkConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.id = config.id
        self.ctx = ctx
        self._client: httpx.AsyncClient | None = None
        self._stopping = False
        self._user_agent = f"edge-gateway/{_version()} ({ctx.site})"

    def accepts(self, event_type: str) -> bool:
        return any(r.matches(event_type) for r in self.config.routes)

    def route_for(self, event_type: str) -> RouteConfig | None:
        return next((r for r in self.config.routes if r.matches(event_type)), None)

    async def start(self) -> None:
        cfg = self.config
        verify = build_ssl_context(cfg.tls)
        self._client = httpx.AsyncClient(
            base_url=cfg.url,
            verify=verify,
            auth=build_auth(cfg.auth, verify),
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections),
            headers={"User-Agent": self._user_agent, **cfg.headers},
            follow_redirects=False,
            trust_env=False,
        )

    def stop_new_requests(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ sending

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        requests: list[list[StoredEvent]] = []
        plans: dict[int, tuple[RouteConfig, str]] = {}
        open_batches: dict[tuple[int, str, int], list[StoredEvent]] = {}
        # Batches are built per group of keys so batches of different groups share no key
        # and can be sent in parallel; within a group they go in outbox order. Only as many
        # groups as full batches: a small live batch stays one request.
        largest = max((r.batch_max for r in self.config.routes), default=1)
        groups = max(1, min(self.config.max_concurrent_requests, -(-len(batch) // largest)))
        unkeyed = 0
        for ev in batch:
            route = self.route_for(ev.type)
            if route is None:
                outcomes[ev.seq] = Outcome.unrouted(f"no route of sink {self.id} matches {ev.type}")
                continue
            try:
                path = render_template(route.path, {**ev.doc, "data": ev.data}, quote=quote)
            except InputError as err:
                outcomes[ev.seq] = Outcome.dead_letter(f"route path: {err.detail}")
                continue
            plans[ev.seq] = (route, path)
            if route.batch_max == 1:
                requests.append([ev])
                continue
            if ev.ordering_key is None:
                group, unkeyed = unkeyed % groups, unkeyed + 1
            else:
                group = zlib.crc32(ev.ordering_key.encode()) % groups
            key = (id(route), path, group)
            current = open_batches.get(key)
            if current is None or len(current) >= route.batch_max:
                current = []
                open_batches[key] = current
                requests.append(current)
            current.append(ev)

        async def send_request(events: list[StoredEvent]) -> list[Outcome]:
            route, path = plans[events[0].seq]
            return await self._send_split(route, path, events)

        outcomes.update(await send_in_key_order(
            requests, send_request, self.config.max_concurrent_requests,
            stopping=lambda: self._stopping,
        ))
        return [outcomes[ev.seq] for ev in batch]

    async def _send_split(self, route: RouteConfig, path: str, events: list[StoredEvent]
                          ) -> list[Outcome]:
        """One request; on a permanent failure of a batch, split it to isolate bad events."""
        outcome = await self._request(route, path, events)
        if len(events) == 1 or outcome.kind is not OutcomeKind.dead_letter or \
                outcome.status in (401, 403):
            return [outcome] * len(events)
        mid = len(events) // 2
        first = await self._send_split(route, path, events[:mid])
        blocked = {ev.ordering_key for ev, o in zip(events[:mid], first, strict=True)
                   if o.kind is OutcomeKind.retry and ev.ordering_key is not None}
        rest = events[mid:]
        keep = [ev for ev in rest if ev.ordering_key not in blocked]
        second = await self._send_split(route, path, keep) if keep else []
        by_seq = {ev.seq: o for ev, o in zip(keep, second, strict=True)}
        return first + [by_seq.get(ev.seq) or Outcome.not_attempted() for ev in rest]

    def _body(self, route: RouteConfig, events: list[StoredEvent]) -> bytes:
        if route.body == "data":
            items = [orjson.dumps(ev.data) for ev in events]
        else:
            items = [ev.body for ev in events]
        if route.batch_max == 1:
            return items[0]
        return b"[" + b",".join(items) + b"]"

    def _headers(self, route: RouteConfig, events: list[StoredEvent]) -> dict[str, str]:
        first = events[0]
        if len(events) == 1 and route.batch_max == 1:
            key = first.id
        else:
            key = "batch-" + hashlib.sha256(",".join(e.id for e in events).encode()).hexdigest()[:40]
        return {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-Correlation-ID": first.correlation_id,
            "traceparent": _traceparent(first.correlation_id),
            **route.headers,
        }

    async def _request(self, route: RouteConfig, path: str, events: list[StoredEvent]
                       ) -> Outcome:
        assert self._client is not None, "sink not started"
        try:
            resp = await self._client.request(
                route.method, path, content=self._body(route, events),
                headers=self._headers(route, events),
            )
        except httpx.TimeoutException as err:
            return Outcome.retry(f"timeout: {type(err).__name__}")
        except httpx.HTTPStatusError as err:  # raised by the OAuth2 token fetch
            return Outcome.retry(f"auth: {err}", err.response.status_code)
        except (httpx.TransportError, OSError) as err:
            return Outcome.retry(f"connection: {type(err).__name__}: {err}")
        status = resp.status_code
        if 200 <= status < 300:
            return Outcome.delivered(status)
        body = resp.text[:MAX_ERROR_BODY]
        if status in self.config.duplicate_statuses:
            if len(events) > 1:
                # which ones already existed is unknown: split to find out
                return Outcome.dead_letter("duplicate in batch; splitting", status, body)
            return Outcome.duplicate(status)
        if status in RETRYABLE_STATUSES:
            return Outcome.retry(
                f"HTTP {status}", status, body=body,
                retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
            )
        return Outcome.dead_letter(f"HTTP {status} {resp.reason_phrase}".strip(), status, body)


def _version() -> str:
    from edge import __version__

    return __version__


def _factory(config: HttpSinkConfig, ctx: ComponentContext) -> HttpSink:
    return HttpSink(config, ctx)


COMPONENT = ComponentType(
    kind="sink",
    type="http",
    config_model=HttpSinkConfig,
    factory=_factory,
    description="ERP/QMS REST API over HTTP(S)",
)
