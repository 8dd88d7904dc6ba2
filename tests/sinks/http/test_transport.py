"""The sink's transport against real loopback sockets that misbehave: every way a request
can end without a usable answer maps onto the response policy (retry, with the same
``Idempotency-Key`` on the next attempt), and the transport's fixed rules hold: no proxy
from the environment, at most ``max_connections`` connections, kept alive, the gateway's
User-Agent and configured headers on every request.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from edge.components import OutcomeKind
from edge.sinks.http.request import MAX_READ_BYTES
from edge.sinks.http.transport import Transport, TransportError, TransportTimeout, _mapped
from tests.sinks.http.support import OK, RawReceiver, event, open_sink, stored

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Misbehaving:
    """Reads each request (head and Content-Length body), keeps its headers, then lets
    ``answer(reader, writer, n)`` (``n``: the request's number, from 0) answer or not."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[dict[str, str]] = []
        self.connections = 0
        self.open_now = 0
        self.open_most = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Misbehaving:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/api/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.open_most = max(self.open_most, self.open_now)
        self._writers.add(writer)
        try:
            while await reader.readline():
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                n = len(self.requests)
                self.requests.append(headers)
                await self.answer(reader, writer, n)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            self._writers.discard(writer)
            writer.close()


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    writer.write(OK)
    await writer.drain()


def _one():
    return stored([event("inspection.result", "A", 0)])


async def test_an_answer_lost_mid_body_is_retried_with_the_same_idempotency_key():
    async def cut_then_ok(reader, writer, n):
        if n == 0:  # the head and part of the body, then the connection is gone
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\":")
            await writer.drain()
            writer.close()
        else:
            await ok(reader, writer, n)

    async with Misbehaving(cut_then_ok) as rx, open_sink(rx.url) as sink:
        lease = _one()
        [first] = await sink.send(lease)
        [second] = await sink.send(lease)  # the forwarder's next attempt of the same row
    assert first.kind is OutcomeKind.retry and first.reason.startswith("connection: ")
    assert "ClientPayloadError" in first.reason
    assert second.kind is OutcomeKind.delivered
    keys = [h["idempotency-key"] for h in rx.requests]
    assert keys == [lease[0].id, lease[0].id]


async def test_a_connection_closed_without_an_answer_is_retried():
    async def close(reader, writer, n):
        writer.close()

    async with Misbehaving(close) as rx, open_sink(rx.url) as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.retry
    assert outcome.reason.startswith("connection: ServerDisconnectedError")


async def test_a_reset_connection_is_retried():
    async def reset(reader, writer, n):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST instead of FIN

    async with Misbehaving(reset) as rx, open_sink(rx.url) as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.retry and outcome.reason.startswith("connection: ")


async def test_a_malformed_answer_is_retried_not_judged():
    async def garbage(reader, writer, n):
        writer.write(b"SPAM 200 nonsense\r\n\r\n")
        await writer.drain()

    async with Misbehaving(garbage) as rx, open_sink(rx.url) as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.retry and outcome.reason.startswith("connection: ")
    assert outcome.status is None


async def test_a_receiver_that_never_answers_is_a_timeout_retry():
    async def silent(reader, writer, n):
        await reader.read()  # until the client gives up

    async with Misbehaving(silent) as rx, open_sink(rx.url, extra="timeout_s: 0.3") as sink:
        async with asyncio.timeout(30):  # a guard against hanging, not a measurement
            [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.retry and outcome.reason.startswith("timeout: ")


async def test_the_read_limit_is_a_read_timeout_of_its_own():
    async def silent(reader, writer, n):
        await reader.read()

    async with Misbehaving(silent) as rx:
        transport = Transport(rx.url, ssl_context=None, max_connections=1,
                              connect_timeout_s=5, read_timeout_s=0.2)
        try:
            with pytest.raises(TransportTimeout) as caught:
                await transport.post("/events", b"{}", {}, timeout_s=30)
        finally:
            await transport.close()
    assert caught.value.phase == "read"


def test_connect_timeouts_and_read_timeouts_are_told_apart():
    """A connect timeout cannot be provoked on loopback: the mapping of the client's
    own exceptions is checked instead."""
    connect = _mapped(aiohttp.ConnectionTimeoutError("Connection timeout to host"))
    read = _mapped(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
    assert isinstance(connect, TransportTimeout) and connect.phase == "connect"
    assert isinstance(read, TransportTimeout) and read.phase == "read"
    assert isinstance(_mapped(aiohttp.ClientPayloadError("cut")), TransportError)


async def test_a_refused_connection_is_a_connection_retry():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with open_sink(f"http://127.0.0.1:{port}") as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.retry
    assert outcome.reason.startswith("connection: ClientConnectorError")


async def test_an_answer_longer_than_the_read_limit_is_cut_and_its_connection_not_reused():
    big = b"x" * (16 * MAX_READ_BYTES)

    async def huge_then_ok(reader, writer, n):
        if n == 0:
            writer.write(b"HTTP/1.1 422 Unprocessable\r\nContent-Length: %d\r\n\r\n" % len(big))
            writer.write(big)
            await writer.drain()
        else:
            await ok(reader, writer, n)

    async with Misbehaving(huge_then_ok) as rx, open_sink(rx.url) as sink:
        [first] = await sink.send(_one())
        [second] = await sink.send(stored([event("inspection.result", "B", 1)], 2))
    assert first.kind is OutcomeKind.dead_letter and first.status == 422
    assert f"[cut by the gateway: the answer had {len(big)} bytes;" in first.body
    assert second.kind is OutcomeKind.delivered
    assert rx.connections == 2  # the rest of the long answer was never read


async def test_connections_are_kept_alive_and_bounded_by_max_connections():
    async def slow_ok(reader, writer, n):
        await asyncio.sleep(0.05)
        await ok(reader, writer, n)

    lease = stored([event("inspection.result", f"L{i}", i) for i in range(12)])
    async with Misbehaving(slow_ok) as rx, open_sink(
            rx.url, extra="max_connections: 2\nmax_in_flight_requests: 8") as sink:
        outcomes = await sink.send(lease)
        outcomes += await sink.send(stored([event("inspection.result", "Z", 99)], 100))
    assert {o.kind for o in outcomes} == {OutcomeKind.delivered}
    assert rx.open_most <= 2
    assert rx.connections <= 2  # 13 requests, no new connection after the first two


async def test_proxies_from_the_environment_are_ignored(monkeypatch):
    proxy = await RawReceiver().start()
    try:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                     "all_proxy"):
            monkeypatch.setenv(name, proxy.url.removesuffix("/api/v1"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with Misbehaving(ok) as rx, open_sink(rx.url) as sink:
            [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.delivered
        assert len(rx.requests) == 1 and proxy.seen == []
    finally:
        await proxy.stop()


async def test_every_request_carries_the_user_agent_and_the_configured_headers():
    async with Misbehaving(ok) as rx, open_sink(
            rx.url, extra="headers: {X-Plant: Bremen}") as sink:
        await sink.send(_one())
    [headers] = rx.requests
    assert headers["user-agent"].startswith("edge-gateway/")
    assert headers["x-plant"] == "Bremen"
    assert headers["content-type"] == "application/json"


async def test_get_answers_with_status_and_json_and_raises_builtin_errors():
    """What lot status reconciliation relies on: ``status_code``/``json()`` of the answer,
    ``TimeoutError`` and ``ConnectionError`` (never the client library's own types)."""
    async def status(reader, writer, n):
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 19\r\n\r\n{\"status\":\"hold\"}  ")
            await writer.drain()
        else:
            await reader.read()

    async with Misbehaving(status) as rx, open_sink(rx.url) as sink:
        reply = await sink.get("/lots/A")
        assert reply.status_code == 200 and reply.json() == {"status": "hold"}
        with pytest.raises(TimeoutError):
            await sink.get("/lots/B", timeout_s=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with open_sink(f"http://127.0.0.1:{port}") as sink:
        with pytest.raises(ConnectionError):
            await sink.get("/lots/A")
