"""``type: http`` — deliver events to an ERP/QMS REST API.

Routes are matched at send time (first match wins), so a stored backlog follows a changed
API version after a restart. What each request carries (body, ``Idempotency-Key``,
``X-Correlation-ID``, ``traceparent``) is in ``edge.sinks.http_request``.

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
  401 / 403 after one credential refresh (``edge.sinks.auth``) → sink fault (the rows stay;
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

import logging
import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import Field, ValidationInfo, field_validator, model_validator

from edge.components import ComponentContext, Outcome, StoredEvent
from edge.config import SinkConfigBase, StrictModel
from edge.errors import InputError
from edge.forwarder import blocks_key, send_in_key_order
from edge.registry import ComponentType
from edge.sinks.auth import (
    AuthConfig,
    NoAuth,
    TlsConfig,
    build_auth,
    build_ssl_context,
    check_headers,
    check_http_url,
    check_url,
)
from edge.sinks.http_request import (
    RESERVED_HEADERS,
    judge_error,
    judge_response,
    request_body,
    request_headers,
    should_split,
)
from edge.transforms.map import render_template, template_fields

__all__ = ["COMPONENT", "HttpSink", "HttpSinkConfig", "RouteConfig"]

log = logging.getLogger(__name__)

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
        path, _, query = v.partition("?")
        if query:
            check_url("/?" + query)  # first: the messages below repeat the path
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        for name in template_fields(v):
            if name.split(".")[0] not in _TEMPLATE_ROOTS:
                allowed = ", ".join(sorted(_TEMPLATE_ROOTS))
                raise ValueError(f"unknown template field {{{name}}}; use {allowed} or data.<field>")
        # the template's own segments (each value is one more, checked per event at send)
        filled = "".join(literal + ("x" if name else "")
                         for literal, name, _, _ in string.Formatter().parse(path))
        segments = filled.split("/")[1:]
        if any(seg in (".", "..") for seg in segments) or "" in segments[:-1]:
            raise ValueError(f"must not have '.', '..' or empty segments, got {v!r}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        _check_headers(v)
        return v

    @field_validator("body")
    @classmethod
    def _batch_body(cls, v: str, info: ValidationInfo) -> str:
        if v == "data" and info.data.get("batch_max", 1) > 1:
            raise ValueError("a batched route (batch_max > 1) must send the envelope so every "
                             "element carries its id")
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
        return check_http_url(v).rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        _check_headers(v)
        return v


def _check_headers(headers: dict[str, str]) -> None:
    """Not the headers the sink sets on every request itself, and no inline secrets."""
    for name in headers:
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"{name}: set by the gateway on every request; remove it")
    check_headers(headers)


@dataclass(slots=True)
class _Plan:
    """What one ``send`` will do, decided in outbox order before anything is sent."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)  # by seq: decided unsent
    requests: list[list[StoredEvent]] = field(default_factory=list)  # in creation order
    targets: dict[int, tuple[RouteConfig, str]] = field(default_factory=dict)  # seq → route, path


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

    @property
    def dead_letter_blocks(self) -> bool:
        """A dead letter holds the later events of its key (``on_dead_letter: park``)."""
        return self.config.on_dead_letter == "park"

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        """One Outcome per event of ``batch`` (sorted by seq); see the module docstring."""
        plan = self._plan(batch)

        async def send_request(events: list[StoredEvent]) -> list[Outcome]:
            route, path = plan.targets[events[0].seq]
            return await self._send_split(route, path, events)

        plan.outcomes.update(await send_in_key_order(
            plan.requests, send_request, self.config.max_concurrent_requests,
            stopping=lambda: self._stopping, dead_letter_blocks=self.dead_letter_blocks,
        ))
        return [plan.outcomes[ev.seq] for ev in batch]

    def _plan(self, batch: Sequence[StoredEvent]) -> _Plan:
        """Cut ``batch`` into requests, keeping every key's events in seq order across them.

        Batches are built per group of keys so batches of different groups share no key
        and can be sent in parallel. Only as many groups as full batches: a small live
        batch stays one request.
        """
        plan = _Plan()
        blocked: set[str] = set()  # keys with an event decided undeliverable here
        newest: dict[str, int] = {}  # key → index of the newest request carrying it
        open_batches: dict[tuple[int, str, int], int] = {}  # (route, path, group) → index
        largest = max(r.batch_max for r in self.config.routes)
        groups = max(1, min(self.config.max_concurrent_requests, -(-len(batch) // largest)))
        unkeyed = 0
        for ev in batch:
            key = ev.ordering_key
            if key is not None and key in blocked:
                plan.outcomes[ev.seq] = Outcome.not_attempted()
                continue
            target = self._target(ev)
            if isinstance(target, Outcome):
                plan.outcomes[ev.seq] = target
                if key is not None and blocks_key(target, self.dead_letter_blocks):
                    blocked.add(key)
                continue
            plan.targets[ev.seq] = target
            route, path = target
            index = -1  # a new request, unless the event may join an open batch
            if route.batch_max > 1:
                if key is None:
                    group, unkeyed = unkeyed % groups, unkeyed + 1
                else:
                    group = zlib.crc32(key.encode()) % groups
                slot = (id(route), path, group)
                index = open_batches.get(slot, -1)
                if index >= 0 and (len(plan.requests[index]) >= route.batch_max or (
                        key is not None and newest.get(key, -1) > index)):
                    index = -1  # full, or a later request already carries this key
                if index < 0:
                    open_batches[slot] = len(plan.requests)
            if index < 0:
                index = len(plan.requests)
                plan.requests.append([])
            plan.requests[index].append(ev)
            if key is not None:
                newest[key] = index
        return plan

    def _target(self, ev: StoredEvent) -> tuple[RouteConfig, str] | Outcome:
        """The route and rendered path of ``ev``, or the Outcome that keeps it unsent."""
        route = self.route_for(ev.type)
        if route is None:
            return Outcome.unrouted(f"no route of sink {self.id} matches {ev.type}")
        try:
            path = render_template(route.path, {**ev.doc, "data": ev.data}, path_segment=True)
        except InputError as err:
            return Outcome.dead_letter(f"unsafe path value: {err.detail}")
        return route, path

    async def _send_split(self, route: RouteConfig, path: str, events: list[StoredEvent]
                          ) -> list[Outcome]:
        """Send ``events`` as one request. A batch the receiver judged (``should_split``) is
        sent again in halves, in order, until the judged events stand alone; once an event
        of a key is not delivered, the later events of that key are not sent."""
        if self._stopping:
            return [Outcome.not_attempted("gateway stopping")] * len(events)
        outcome = await self._request(route, path, events)
        if not should_split(outcome, len(events)):
            return [outcome] * len(events)
        mid = len(events) // 2
        first = await self._send_split(route, path, events[:mid])
        blocked = {ev.ordering_key for ev, o in zip(events[:mid], first, strict=True)
                   if ev.ordering_key is not None and blocks_key(o, self.dead_letter_blocks)}
        rest = events[mid:]
        keep = [ev for ev in rest if ev.ordering_key not in blocked]
        second = await self._send_split(route, path, keep) if keep else []
        by_seq = {ev.seq: o for ev, o in zip(keep, second, strict=True)}
        return first + [by_seq.get(ev.seq) or Outcome.not_attempted() for ev in rest]

    async def _request(self, route: RouteConfig, path: str, events: list[StoredEvent]
                       ) -> Outcome:
        assert self._client is not None, "sink not started"
        try:
            resp = await self._client.request(
                route.method, path, content=request_body(route, events),
                headers=request_headers(route, events),
            )
        except (httpx.HTTPError, OSError) as err:
            return judge_error(err)
        return judge_response(resp, self.config.duplicate_statuses)


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
