"""A stand-in ERP/QMS receiver: a real HTTP server (starlette + uvicorn) on loopback.

Used by the demo (``edge demo``), the tests and the benchmarks in place of a cloud ERP.
It accepts any method/path, a JSON object (one event) or array (a batch), records what
arrived in order, and can be told to misbehave:

- ``outage(True)``            every request → 503 (optionally with ``Retry-After``)
- ``fail_next(n, status, retry_after=…, body=…)``   the next n requests get that status
- ``reject(predicate, status, times=None)``  events for which ``predicate(event)`` is
                                 true are refused (a batch containing one is refused as a
                                 whole, like a strict API would); ``times`` limits how often
- TLS: ``certfile``/``keyfile`` serve HTTPS; ``ca_file`` + ``require_client_cert`` demand mTLS
- auth: ``require_auth(headers) -> bool`` answers 401 when false; ``oauth_client=(id,
  secret)`` serves ``POST /oauth/token`` (client credentials) and accepts only the bearer
  tokens it issued (``expire_tokens()`` revokes them, as an ERP would at expiry)
- ``conflict_on_repeat``       a repeated ``Idempotency-Key`` gets 409 (an ERP that says
                                 "already exists")
- ``intercept``                an async ``(events, headers) -> Answer | None`` asked before
                                 the events are applied: an ``Answer`` is sent instead (not
                                 applied), None lets the request through (fault injection)
- ``lot_status``               ``GET /lots/{lot_id}/status`` answers from this dict (lot →
                                 a status word, or a JSON object such as ``{"status":
                                 "released", "decided_by": "QA"}``); 404 for a lot not in
                                 it. Outage, ``fail_next`` and auth apply to it too; every
                                 read is recorded in ``status_reads`` (not ``requests``).
                                 ``reflect_status=True`` sets the entry from every accepted
                                 ``lot.status`` event, as a real ERP would store it

Every request is recorded (``requests``) with its wall and monotonic arrival time, the
``Retry-After`` it was given and, as monotonic time, when that allows the next attempt
(``not_before_mono``), and whether its events were applied.

``record=False`` keeps only counters (for million-event benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from edge.httpserver import EmbeddedServer
from edge.retry import parse_retry_after

__all__ = ["Answer", "ErpReceiver", "RequestRecord"]


@dataclass
class RequestRecord:
    method: str
    path: str
    headers: dict[str, str]
    events: list[dict[str, Any]]
    status: int
    at: float = field(default_factory=time.time)
    mono: float = field(default_factory=time.monotonic)  # arrival, monotonic clock
    answered_mono: float = 0.0
    retry_after: str | None = None  # the header value given with the answer
    not_before_mono: float | None = None  # when that Retry-After allows the next attempt
    applied: bool = False
    fault: str = ""  # the injected fault that shaped the answer, if any


@dataclass
class Answer:
    """What ``intercept`` sends instead of applying the request."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    fault: str = ""


class ErpReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True,
                 conflict_on_repeat: bool = False, latency_s: float = 0.0,
                 certfile: str | None = None, keyfile: str | None = None,
                 ca_file: str | None = None, require_client_cert: bool = False,
                 require_auth: Callable[[dict[str, str]], bool] | None = None,
                 oauth_client: tuple[str, str] | None = None,
                 token_ttl_s: int = 3600, reflect_status: bool = False) -> None:
        self.require_auth = require_auth
        self.oauth_client = oauth_client
        self.token_ttl_s = token_ttl_s
        self.valid_tokens: set[str] = set()
        self.tokens_issued = 0
        self.tls: dict[str, Any] = {"ssl_certfile": certfile, "ssl_keyfile": keyfile, "ssl_ca_certs": ca_file}
        if require_client_cert:
            import ssl

            self.tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        self.host = host
        self.port = port
        self.record = record
        self.conflict_on_repeat = conflict_on_repeat
        self.latency_s = latency_s
        self.requests: list[RequestRecord] = []
        self.events: list[dict[str, Any]] = []  # accepted events in arrival order
        self.accepted_ids: Counter[str] = Counter()
        self.seen_keys: set[str] = set()
        self.accepted_count = 0
        self.request_count = 0
        self._outage: tuple[int, str | None] | None = None
        self._fail_queue: list[tuple[int, str | None, str]] = []
        self._rejects: list[list[Any]] = []  # [predicate, status, body, times_left|None]
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.intercept: Callable[[list[dict[str, Any]], dict[str, str]],
                                 Awaitable[Answer | None]] | None = None
        self.lot_status: dict[str, str | dict[str, Any]] = {}
        self.reflect_status = reflect_status
        self.status_reads: list[tuple[str, int]] = []  # (lot id, status answered)

    # ------------------------------------------------------------------ control

    def outage(self, on: bool, *, status: int = 503, retry_after: str | None = None) -> None:
        self._outage = (status, retry_after) if on else None

    def fail_next(self, n: int, status: int, *, retry_after: str | None = None,
                  body: str = "") -> None:
        self._fail_queue.extend([(status, retry_after, body)] * n)

    def reject(self, predicate: Callable[[dict[str, Any]], bool], status: int = 422,
               body: str = "", *, times: int | None = None,
               retry_after: str | None = None) -> None:
        self._rejects.append([predicate, status, body, times, retry_after])

    def clear_rejects(self) -> None:
        self._rejects.clear()

    def expire_tokens(self) -> None:
        self.valid_tokens.clear()

    async def _token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        if self.oauth_client is None or (form.get("client_id"), form.get("client_secret")) != \
                self.oauth_client or form.get("grant_type") != "client_credentials":
            return Response('{"error":"invalid_client"}', status_code=401,
                            media_type="application/json")
        self.tokens_issued += 1
        token = f"tok-{self.tokens_issued}"
        self.valid_tokens.add(token)
        return Response(orjson.dumps({"access_token": token, "token_type": "Bearer",
                                      "expires_in": self.token_ttl_s}),
                        media_type="application/json")

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.require_auth is not None and not self.require_auth(headers):
            return False
        if self.oauth_client is not None:
            auth = headers.get("authorization", "")
            return auth.startswith("Bearer ") and auth[7:] in self.valid_tokens
        return True

    @property
    def url(self) -> str:
        scheme = "https" if self.tls["ssl_certfile"] else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def ids(self) -> list[str]:
        return [e.get("id", "") for e in self.events]

    async def wait_for(self, predicate: Callable[[ErpReceiver], bool], within_s: float = 10.0
                       ) -> None:
        """Wait until ``predicate(self)`` holds (re-checked on every request); TimeoutError
        after ``within_s``."""
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    # ------------------------------------------------------------------ server

    async def _handle(self, request: Request) -> Response:
        arrived = time.time(), time.monotonic()
        try:
            raw = await request.body()
        except ClientDisconnect:  # the connection went before the body was complete
            return Response(status_code=400)
        self.request_count += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            doc = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return await self._done(request, headers, [], 400, None, "body is not JSON")
        events = doc if isinstance(doc, list) else [doc] if isinstance(doc, dict) else []
        if self.intercept is not None:
            answer = await self.intercept(events, headers)
            if answer is not None:
                return await self._done(request, headers, events, answer.status, None,
                                        answer.body, extra=answer.headers, fault=answer.fault,
                                        arrived=arrived)
        if not self._authorized(headers):
            return await self._done(request, headers, events, 401, None, "unauthorized")
        if self._outage is not None:
            status, retry_after = self._outage
            return await self._done(request, headers, events, status, retry_after, "outage")
        if self._fail_queue:
            status, retry_after, body = self._fail_queue.pop(0)
            return await self._done(request, headers, events, status, retry_after, body)
        for rule in self._rejects:
            predicate, status, body, times, retry_after = rule
            if times is not None and times <= 0:
                continue
            bad = [e for e in events if predicate(e)]
            if bad:
                if times is not None:
                    rule[3] = times - 1
                detail = body or orjson.dumps(
                    {"error": "validation failed", "ids": [e.get("id") for e in bad]}).decode()
                return await self._done(request, headers, events, status, retry_after, detail)
        key = headers.get("idempotency-key", "")
        if self.conflict_on_repeat and key and key in self.seen_keys:
            return await self._done(request, headers, events, 409, None, "already exists")
        if key:
            self.seen_keys.add(key)
        self.accepted_count += len(events)
        if self.reflect_status:
            for e in events:
                data = e.get("data") if isinstance(e, dict) else None
                if e.get("type") == "lot.status" and isinstance(data, dict) \
                        and data.get("lot_id") is not None:
                    self.lot_status[str(data["lot_id"])] = {
                        "status": data.get("status"), "decided_by": data.get("decided_by"),
                        "decided_at": e.get("received_ts")}
        if self.record:
            self.events.extend(events)
            for e in events:
                self.accepted_ids[e.get("id", "")] += 1
        return await self._done(request, headers, events, 200, None,
                                orjson.dumps({"accepted": len(events)}).decode(),
                                applied=True, arrived=arrived)

    async def _done(self, request: Request, headers: dict[str, str], events: list[Any],
                    status: int, retry_after: str | None, body: str, *,
                    extra: dict[str, str] | None = None, fault: str = "",
                    applied: bool = False,
                    arrived: tuple[float, float] | None = None) -> Response:
        extra = dict(extra or {})
        if retry_after:
            extra["Retry-After"] = retry_after
        if self.record:
            now_mono = time.monotonic()
            given = next((v for k, v in extra.items() if k.lower() == "retry-after"), None)
            delay = parse_retry_after(given)
            rec = RequestRecord(request.method, request.url.path, headers, events, status,
                                answered_mono=now_mono, retry_after=given,
                                not_before_mono=None if delay is None else now_mono + delay,
                                applied=applied, fault=fault)
            if arrived is not None:
                rec.at, rec.mono = arrived
            self.requests.append(rec)
        async with self._changed:
            self._changed.notify_all()
        return Response(body, status_code=status, headers=extra, media_type="application/json")

    async def _lot_status(self, request: Request) -> Response:
        lot_id = request.path_params["lot_id"]
        headers = {k.lower(): v for k, v in request.headers.items()}

        def answer(status: int, body: Any, extra: dict[str, str] | None = None) -> Response:
            self.status_reads.append((lot_id, status))
            return Response(orjson.dumps(body), status_code=status, headers=extra,
                            media_type="application/json")

        if not self._authorized(headers):
            return answer(401, {"error": "unauthorized"})
        if self._outage is not None:
            status, retry_after = self._outage
            return answer(status, {"error": "outage"},
                          {"Retry-After": retry_after} if retry_after else None)
        if self._fail_queue:
            status, retry_after, body = self._fail_queue.pop(0)
            return answer(status, {"error": body or "failure"},
                          {"Retry-After": retry_after} if retry_after else None)
        found = self.lot_status.get(lot_id)
        if found is None:
            return answer(404, {"error": f"no lot {lot_id}"})
        return answer(200, {"lot_id": lot_id, **(found if isinstance(found, dict)
                                                  else {"status": found})})

    async def start(self) -> ErpReceiver:
        app = Starlette(routes=[
            Route("/oauth/token", self._token, methods=["POST"]),
            Route("/lots/{lot_id}/status", self._lot_status, methods=["GET"]),
            Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ])
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                loop="none", timeout_keep_alive=30, timeout_graceful_shutdown=1,
                                **{k: v for k, v in self.tls.items() if v is not None})
        self._server = EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="erp-standin")
        while not self._server.listening.is_set():
            if self._task.done():
                await self._task
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = None
        self._task = None

    async def __aenter__(self) -> ErpReceiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
