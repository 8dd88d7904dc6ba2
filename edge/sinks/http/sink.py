"""The ``http`` sink at run time: plans requests in outbox order and sends them.

See ``README.md`` beside this file for the response policy and the send contract.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from edge.plugin import (
    ComponentContext,
    ConfigError,
    InputError,
    Outcome,
    StoredEvent,
    __version__,
    blocks_key,
    client_context,
    held_back,
    render_template,
    send_in_key_order,
)
from edge.sinks.http.auth import build_auth
from edge.sinks.http.config import HttpSinkConfig, RouteConfig
from edge.sinks.http.contract import PayloadSchema, SchemaFileError, load_schema
from edge.sinks.http.request import (
    judge_error,
    judge_response,
    read_body,
    request_body,
    request_headers,
    should_split,
)

__all__ = ["HttpSink"]


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
        self._client: httpx.AsyncClient | None = None
        self._stopping = False
        self._user_agent = f"edge-gateway/{__version__} ({ctx.site})"
        self._schemas: dict[int, PayloadSchema] = {}  # by id() of the route

    def accepts(self, event_type: str) -> bool:
        return any(r.matches(event_type) for r in self.config.routes)

    def route_for(self, event_type: str) -> RouteConfig | None:
        return next((r for r in self.config.routes if r.matches(event_type)), None)

    async def start(self) -> None:
        cfg = self.config
        for i, route in enumerate(cfg.routes):
            if route.schema_file is None:
                continue
            try:
                self._schemas[id(route)] = load_schema(route.schema_file)
            except SchemaFileError as err:
                raise ConfigError(str(err), location=f"sinks[{cfg.id}].routes[{i}].schema_file"
                                  ) from err
        verify = client_context(cfg.tls, f"sink {cfg.id!r}")
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

    async def get(self, path: str, *, timeout_s: float | None = None) -> httpx.Response:
        """A GET of ``path`` (relative to ``url``) with the sink's own auth (an OAuth2 token
        refreshed as for sends), TLS and headers: what a reader of the receiver's state
        (lot status reconciliation) uses. Raises ``httpx.HTTPError`` (also before
        ``start``: no connection)."""
        if self._client is None:
            raise httpx.ConnectError(f"sink {self.id!r} is not started")
        return await self._client.get(path, timeout=timeout_s if timeout_s is not None
                                      else self.config.timeout_s)

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
            plan.requests, send_request, self.config.max_in_flight_requests,
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
        now = time.time()  # scheduled routes: periods are on the wall clock, like received_at
        blocked: set[str] = set()  # keys with an event decided undeliverable here
        newest: dict[str, int] = {}  # key → index of the newest request carrying it
        open_batches: dict[tuple[int, str, int], int] = {}  # (route, path, group) → index
        largest = max(r.max_batch for r in self.config.routes)
        groups = max(1, min(self.config.max_in_flight_requests, -(-len(batch) // largest)))
        unkeyed = 0
        for ev in batch:
            key = ev.ordering_key
            if key is not None and key in blocked:
                plan.outcomes[ev.seq] = Outcome.not_attempted()
                continue
            target = self._target(ev, now)
            if isinstance(target, Outcome):
                plan.outcomes[ev.seq] = target
                if key is not None and blocks_key(target, self.dead_letter_blocks):
                    blocked.add(key)
                continue
            plan.targets[ev.seq] = target
            route, path = target
            index = -1  # a new request, unless the event may join an open batch
            if route.max_batch > 1:
                if key is None:
                    group, unkeyed = unkeyed % groups, unkeyed + 1
                else:
                    group = zlib.crc32(key.encode()) % groups
                slot = (id(route), path, group)
                index = open_batches.get(slot, -1)
                if index >= 0 and (len(plan.requests[index]) >= route.max_batch or (
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

    def _target(self, ev: StoredEvent, now: float) -> tuple[RouteConfig, str] | Outcome:
        """The route and rendered path of ``ev``, or the Outcome that keeps it unsent: no
        route, an unsafe path value or a body its route's schema refuses (dead letters),
        or a scheduled route's period that has not ended (deferred until it ends)."""
        route = self.route_for(ev.type)
        if route is None:
            return Outcome.unrouted(f"no route of sink {self.id} matches {ev.type}")
        try:
            path = render_template(route.path, {**ev.doc, "data": ev.data}, path_segment=True)
        except InputError as err:
            return Outcome.dead_letter(f"unsafe path value: {err.detail}")
        schema = self._schemas.get(id(route))
        if schema is not None:
            refused = _check_contract(schema, route, ev)
            if refused is not None:
                return refused
        # checked at first sight too: a body the schema refuses is a dead letter at once,
        # not a period later. An event without a storage time (never stored) is due.
        return held_back(route.delivery, ev, now) or (route, path)

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
        request = self._client.build_request(route.method, path,
                                             content=request_body(route, events),
                                             headers=request_headers(route, events))
        try:
            # httpx bounds each phase (connect, pool, every read); this bounds the whole
            # request, so a receiver that trickles its answer cannot hold a lane
            async with asyncio.timeout(self.config.timeout_s):
                resp = await self._client.send(request, stream=True)
                try:
                    body = await read_body(resp)  # bounded: a receiver cannot fill memory
                finally:
                    await resp.aclose()
        except (httpx.HTTPError, OSError) as err:  # OSError includes TimeoutError
            return judge_error(err)
        return judge_response(resp, self.config.duplicate_statuses, body)


def _check_contract(schema: PayloadSchema, route: RouteConfig, ev: StoredEvent
                    ) -> Outcome | None:
    """None when the body ``ev`` would be sent with satisfies the route's schema; else a
    dead letter with the schema error, or a sink fault when the schema cannot be applied
    (the route's config, not the event, is at fault: every row is kept)."""
    body = ev.data if route.body == "data" else ev.doc
    try:
        reason = schema.violation(body)
    except Exception as err:  # noqa: BLE001 - e.g. a $ref inside a nested resource
        return Outcome.sink_fault(f"schema {schema.name} cannot be applied: "
                                  f"{type(err).__name__}: {err}"[:500])
    return None if reason is None else Outcome.dead_letter(reason)

