"""The relay's local HTTP endpoints (``relay.listen``, default ``127.0.0.1:8081``):

- ``GET /healthz`` 200 while the process runs; ``{"status": "ok" | "degraded", "reasons"}``
  (degraded: NATS disconnected, a sink alarm or pause, no partition owned while other
  relays are known).
- ``GET /readyz`` 200 once started and connected to NATS, else 503.
- ``GET /status`` JSON: relay id, members, owned partitions, messages fetched and
  acknowledged, events held per sink,
  forwarders (circuit, pause, alarm, last delivery, delivered).
- ``GET /metrics`` Prometheus text (the forwarders' ``edge_`` metrics and
  ``edge_relay_partitions_owned``, ``edge_relay_events_held{sink}``).

Read-only: nothing here changes the relay. Every response carries the security headers of
``edge.api.headers`` (CSP without any source, nosniff, no framing, no referrer, no-store).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.api.headers import SecurityHeaders
from edge.errors import FatalStartupError
from edge.httpserver import EmbeddedServer

__all__ = ["RelayApi"]


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type="application/json")


class RelayApi:
    def __init__(self, relay: Any, listen: str) -> None:
        self.relay = relay
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        registry = relay.metrics.registry
        self.owned = Gauge("edge_relay_partitions_owned", "partitions this relay delivers",
                           registry=registry)
        self.held = Gauge("edge_relay_events_held", "events fetched and not yet "
                          "acknowledged, per sink", ["sink"], registry=registry)
        app = Starlette(routes=[
            Route("/healthz", self.healthz), Route("/readyz", self.readyz),
            Route("/status", self.status), Route("/metrics", self.metrics),
        ])
        self._server = EmbeddedServer(uvicorn.Config(
            SecurityHeaders(app), loop="none", lifespan="off", access_log=False, log_config=None,
            server_header=False))
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], info[1], info[2])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(64)
            sock.setblocking(False)
        except OSError as err:
            raise FatalStartupError(f"relay.listen {self.host}:{self.port}: "
                                    f"{err.strerror or err}") from err
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="relay-api")

    async def close(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._task

    def reasons(self) -> list[str]:
        r = self.relay
        out = []
        if r.nc is None or not r.nc.is_connected:
            out.append("not connected to NATS")
        for sid, fwd in r.forwarders.items():
            st = fwd.status()
            if st["alarm"]:
                out.append(f"sink {sid}: {st['alarm']['message']}")
            elif not st["up"]:
                out.append(f"sink {sid}: circuit {st['circuit']}")
        own = r.ownership
        if own is not None and own.members > 1 and not own.owned:
            out.append("owns no partition while other relays run")
        return out

    async def healthz(self, request: Request) -> Response:
        reasons = self.reasons()
        return _json({"status": "degraded" if reasons else "ok", "reasons": reasons})

    async def readyz(self, request: Request) -> Response:
        r = self.relay
        ready = r.started and r.nc is not None and r.nc.is_connected
        return _json({"ready": ready}, 200 if ready else 503)

    async def status(self, request: Request) -> Response:
        return _json(self.relay.status())

    async def metrics(self, request: Request) -> Response:
        r = self.relay
        self.owned.set(len(r.ownership.owned) if r.ownership else 0)
        if r.queue is not None:
            for sid in r.sinks:
                self.held.labels(sid).set(r.queue.held(sid))
        return Response(generate_latest(r.metrics.registry), media_type=CONTENT_TYPE_LATEST)
