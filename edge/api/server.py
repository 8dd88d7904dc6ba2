"""The local health/API server: starlette + plain uvicorn, as a task in the gateway's loop.

Endpoints (DESIGN contracts; JSON unless noted)::

    GET  /healthz                 200 {"status": "alive"} while the event loop runs, from the
                                  start of start-up (no token)
    GET  /readyz                  200 when started (the cheap outbox check passed, the outbox
                                  open), the outbox is writable, not found corrupt by the
                                  background check, and sinks are configured,
                                  else 503 {"status": "not ready", "reasons": [{code, message}]}
    GET  /status                  Gateway.status_report() (``outbox.integrity``: the background
                                  check, running / passed / failed with its times)
    GET  /metrics                 Prometheus text of the gateway's registry
    GET  /                        HTML status page for plant IT (edge.api.page)
    GET  /dlq?sink=&limit=        dead letters, oldest first
    GET  /dlq/{id or event id}    one dead letter with its response body and stored event
    POST /dlq/replay|discard      {"ids": [..]} or {"sink": ".."} + required "reason";
                                  audited with the token's actor ("api" or "api:<name>")
    POST /sinks/{id}/resume       {"reason": "..", "by": ".."}: resume a paused sink
                                  (Gateway.resume_sink); 404 unknown sink, 501 unsupported
    GET  /lots?state=&limit=      lots (state, episode, supplier, last event), newest first
    POST /lots/{lot_id}/release   {"reason": "..", "by": ".."}: release a lot (end its hold
                                  episode; Gateway.release_lot); 404 unknown lot, 409
                                  released already
    GET  /trace/{event_id}        lineage of one event (edge.api.lineage)
    GET  /trace?key=lot:L1        lineage of every event of an ordering key

Every response carries the security headers of ``edge.api.headers`` (CSP, nosniff, no
framing, no referrer, no-store), refusals, 404s and 500s included.
Every request passes ``edge.api.guard.BrowserGuard`` first (Host names this API; actions
only as same-origin JSON), then, with ``api.token_file`` set, the token guard: every
endpoint but /healthz needs the token, actions as a Bearer header (edge.api.auth).

Contract: ``bind()`` (optional, early) or ``serve()`` binds ``api.listen`` itself (so a
taken port is a clear ``FatalStartupError``, not uvicorn's ``sys.exit``); ``serve()``
serves until ``shutdown()``;
``started()`` returns once the socket listens or raises what ``serve()`` failed with.
SIGTERM/SIGINT stay with the gateway: uvicorn's signal capture is disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Any

import uvicorn
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.api import page, routes
from edge.api.auth import TokenGuard, load_tokens
from edge.api.guard import BrowserGuard, Refusals
from edge.api.headers import SecurityHeaders
from edge.api.history import History, sample_forever
from edge.errors import FatalStartupError, OutboxError
from edge.httpserver import EmbeddedServer
from edge.telemetry import log_event

__all__ = ["ApiServer", "build_app"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
SHUTDOWN_GRACE_S = 3
MAX_CONNECTIONS = 64  # beyond this uvicorn answers 503: a local API, not a public one


class _AsgiEndpoint:
    """Wraps an ASGI function so starlette's Route serves it as an app, not as a handler."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def _outbox_unavailable(request: Request, exc: Exception) -> Response:
    return routes.error(503, f"outbox unavailable: {exc}")


def build_app(gateway: Any, tokens: list[Any] | None = None,
              history: History | None = None) -> SecurityHeaders:
    """The API app for ``gateway`` (one per gateway: it registers a counter in its metrics).

    ``history`` (the page's chart) is sampled by ``ApiServer``; without it the page says it
    has no history. Outermost first: the security headers (outside starlette's own error handling, so a
    500 carries them too), the browser guard for every app, the token guard when
    ``tokens`` is given.
    """
    api = gateway.config.api
    refusals = Refusals(gateway.metrics.registry)
    middleware = [Middleware(BrowserGuard, listen=api.listen, hosts=api.hosts,
                             refusals=refusals)]
    if tokens:
        middleware.append(Middleware(TokenGuard, tokens=tokens, refusals=refusals))
    app = Starlette(
        routes=[
            Route("/", routes.index),
            Route("/healthz", routes.healthz),
            Route("/readyz", routes.readyz),
            Route("/status", routes.status),
            Route("/metrics", _AsgiEndpoint(make_asgi_app(registry=gateway.metrics.registry)),
                  methods=["GET"]),
            Route("/dlq", routes.dlq_list),
            Route("/dlq/replay", routes.dlq_replay, methods=["POST"],
                  max_body_size=MAX_BODY_BYTES),
            Route("/dlq/discard", routes.dlq_discard, methods=["POST"],
                  max_body_size=MAX_BODY_BYTES),
            Route("/dlq/{ref:str}", routes.dlq_show),
            Route("/sinks/{sink_id:str}/resume", routes.sink_resume, methods=["POST"],
                  max_body_size=MAX_BODY_BYTES),
            Route("/lots", routes.lots_list),
            # path: a lot id may hold a "/" (sent percent-encoded)
            Route("/lots/{lot_id:path}/release", routes.lot_release, methods=["POST"],
                  max_body_size=MAX_BODY_BYTES),
            Route("/trace", routes.trace),
            Route("/trace/{event_id:str}", routes.trace),
        ],
        middleware=middleware,
        exception_handlers={OutboxError: _outbox_unavailable},
    )
    app.state.gateway = gateway
    app.state.history = history
    return SecurityHeaders(app, style_hashes=[page.STYLE_HASH])


class ApiServer:
    def __init__(self, gateway: Any) -> None:
        cfg = gateway.config.api
        self.listen: str = cfg.listen
        self.host: str = cfg.host
        self.port: int = cfg.port
        tokens = load_tokens(cfg.token_file) if cfg.token_file else None
        self.auth = tokens is not None
        self.gateway = gateway
        self.history = History()
        self.app = build_app(gateway, tokens, self.history)
        self._server = EmbeddedServer(uvicorn.Config(
            self.app, loop="none", lifespan="off", access_log=False, log_config=None,
            proxy_headers=False, server_header=False, limit_concurrency=MAX_CONNECTIONS,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        ))
        self._sock: socket.socket | None = None
        self._failed: BaseException | None = None
        self._done = asyncio.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bind(self) -> None:
        """Take the listening socket now (optional; ``serve()`` binds when not done yet).

        Lets the gateway fail on a taken port before it opens the outbox or starts sending.
        Raises ``FatalStartupError``.
        """
        if self._sock is None:
            self._sock = self._bind()
            self.port = self._sock.getsockname()[1]

    async def serve(self) -> None:
        """Bind ``api.listen`` (unless ``bind()`` did) and serve until ``shutdown()``;
        meanwhile sample the page's history (``edge.api.history``)."""
        sampler = asyncio.create_task(sample_forever(self.history, self.gateway),
                                      name="api-history")
        try:
            self.bind()
            assert self._sock is not None
            await self._server.serve(sockets=[self._sock])
        except BaseException as err:
            self._failed = err
            raise
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            self._done.set()

    async def started(self) -> None:
        """Return once the socket listens; raise what ``serve()`` failed with."""
        listening = asyncio.ensure_future(self._server.listening.wait())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({listening, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            done.cancel()
        if self._failed is not None:
            raise self._failed
        if not self._server.listening.is_set():
            raise FatalStartupError(f"api.listen {self.listen}: the server stopped at start")
        log_event(log, logging.INFO, "local API listening", url=self.url,
                  token_required=self.auth)

    async def shutdown(self) -> None:
        """Stop accepting, let open requests finish (bounded), return when stopped."""
        self._server.should_exit = True
        if self._done.is_set() or not self._server.listening.is_set():
            if self._sock is not None and not self._server.listening.is_set():
                self._sock.close()  # bound but never served
            return
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE_S + 2):
                await self._done.wait()
        except TimeoutError:
            self._server.force_exit = True

    def _bind(self) -> socket.socket:
        host = "127.0.0.1" if self.host == "localhost" else self.host
        try:
            family, type_, proto, _, addr = socket.getaddrinfo(
                host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, type_, proto)
        except (OSError, IndexError) as err:
            raise FatalStartupError(f"api.listen {self.listen}: cannot resolve {host}: {err}"
                                    ) from err
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # quick restarts
            sock.bind(addr)
            sock.listen(128)
        except OSError as err:
            sock.close()
            what = ("address already in use" if err.errno == errno.EADDRINUSE
                    else f"cannot listen: {err.strerror or err}")
            raise FatalStartupError(f"api.listen {self.listen}: {what}") from err
        sock.setblocking(False)
        return sock
