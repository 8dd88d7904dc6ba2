"""The ``http`` sink at run time: plans requests in outbox order and sends them.

See ``README.md`` beside this file for the response policy and the send contract.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edge.plugin import (
    AdaptiveConcurrency,
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
from edge.sinks.http.auth import REFRESH_STATUSES, Credential, TokenRefused, build_auth
from edge.sinks.http.config import HttpSinkConfig, RouteConfig
from edge.sinks.http.contract import PayloadSchema, SchemaFileError, load_schema
from edge.sinks.http.request import (
    MAX_READ_BYTES,
    judge_error,
    judge_response,
    read_body,
    request_body,
    request_headers,
    should_split,
)
from edge.sinks.http.transport import Reply, Transport, TransportError

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
        # requests in flight, sink-wide (all lanes): adapted up to max_in_flight_requests
        self.concurrency = AdaptiveConcurrency(config.max_in_flight_requests,
                                               adaptive=config.adaptive_concurrency)
        self._transport: Transport | None = None
        self._auth: Credential | None = None
        self._stopping = False
        self._user_agent = f"edge-gateway/{__version__} ({ctx.site})"
        self._schemas: dict[int, PayloadSchema] = {}  # by id() of the route
        self._routes: dict[str, RouteConfig | None] = {}  # route_for by event type

    def accepts(self, event_type: str) -> bool:
        return any(r.matches(event_type) for r in self.config.routes)

    def route_for(self, event_type: str) -> RouteConfig | None:
        """The first route matching ``event_type`` (remembered: routes are fixed)."""
        try:
            return self._routes[event_type]
        except KeyError:
            pass
        route = next((r for r in self.config.routes if r.matches(event_type)), None)
        if len(self._routes) >= 4096:  # event types are a catalogue: a handful in practice
            self._routes.clear()
        self._routes[event_type] = route
        return route

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
        self._auth = build_auth(cfg.auth, verify)
        self._transport = Transport(
            cfg.url, ssl_context=verify, max_connections=cfg.max_connections,
            connect_timeout_s=cfg.connect_timeout_s, read_timeout_s=cfg.timeout_s,
            headers={"User-Agent": self._user_agent, **cfg.headers},
            max_body=MAX_READ_BYTES,
        )

    def stop_new_requests(self) -> None:
        self._stopping = True

    async def get(self, path: str, *, timeout_s: float | None = None) -> Reply:
        """A GET of ``path`` (relative to ``url``) with the sink's own auth (an OAuth2 token
        refreshed as for sends), TLS and headers: what a reader of the receiver's state
        (lot status reconciliation) uses. The answer has ``status_code`` and ``json()``.
        Raises ``TimeoutError`` when no complete answer came within ``timeout_s`` (default:
        the sink's), else ``ConnectionError`` (also before ``start``, and when the token
        endpoint refuses the sink's credential)."""
        try:
            return await self._exchange("GET", path, None, None, timeout_s
                                        if timeout_s is not None else self.config.timeout_s)
        except TokenRefused as err:
            raise TransportError(f"auth: {err}") from err

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None

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
            plan.requests, send_request, self.concurrency,
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
        path = route.path
        if "{" in path or "}" in path:  # a template: filled from the event
            try:
                path = render_template(path, {**ev.doc, "data": ev.data}, path_segment=True)
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
        try:
            # the transport bounds each phase and the whole exchange (timeout_s), so a
            # receiver that trickles its answer cannot hold a lane; it reads at most
            # MAX_READ_BYTES of an answer (a receiver cannot fill memory)
            reply = await self._exchange(route.method, path, request_body(route, events),
                                         request_headers(route, events), self.config.timeout_s)
        except (TokenRefused, OSError) as err:  # OSError: the transport's errors, timeouts
            return judge_error(err)
        return judge_response(reply, self.config.duplicate_statuses, read_body(reply))

    async def _exchange(self, method: str, path: str, body: bytes | None,
                        headers: Mapping[str, str] | None, timeout_s: float) -> Reply:
        """One request with the sink's credential, all within ``timeout_s``: after a 401/403
        the credential is refreshed once and the request sent again when it changed
        (``auth``)."""
        transport = self._transport
        if transport is None:
            raise TransportError(f"sink {self.id!r} is not started")
        auth = self._auth
        if auth is None:
            return await transport.request(method, path, body, headers, timeout_s)
        async with asyncio.timeout(timeout_s):  # the refresh and its resend included
            used = await auth.value()
            reply = await transport.request(method, path, body,
                                            {**(headers or {}), auth.header: used}, timeout_s)
            if reply.status in REFRESH_STATUSES and await auth.refresh(used):
                reply = await transport.request(
                    method, path, body, {**(headers or {}), auth.header: await auth.value()},
                    timeout_s)
            return reply


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

