"""Support for the ``http`` sink tests: one sink driven directly, events as a lease hands
them over, and a bare HTTP/1.1 receiver.

``open_sink`` builds and starts an ``HttpSink`` through the config loader (no outbox, no
forwarder), so a test sees exactly what one ``send`` did. ``RawReceiver`` records each
request target byte for byte, as it came off the socket (a framework would decode ``%2F``
before a test could look), and answers every request with one raw response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edge.components import ComponentContext, StoredEvent
from edge.config import load_config_text
from edge.events import Event, make_event
from edge.sinks.http.sink import HttpSink
from edge.telemetry import Metrics
from tests.support import sink_yaml

__all__ = ["OK", "RawReceiver", "event", "open_sink", "stored"]


@asynccontextmanager
async def open_sink(url: str, *, routes: str | None = None, max_batch: int = 1,
                    extra: str = "", base_dir: Path | None = None, check_files: bool = True
                    ) -> AsyncIterator[HttpSink]:
    """A started ``HttpSink`` built from a config block through the config loader."""
    text = "site: test-site\n" + sink_yaml(url, max_batch=max_batch, routes=routes, extra=extra)
    cfg = load_config_text(text, base_dir=base_dir, check_files=check_files)
    sink = HttpSink(cfg.sinks[0], ComponentContext(site="test-site", state_dir=".",
                                                   metrics=Metrics()))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def stored(events: Sequence[Event], first_seq: int = 1) -> list[StoredEvent]:
    """Events as a lease hands them to a sink: in outbox order, seq ascending."""
    return [StoredEvent(first_seq + i, ev.id, ev.type, ev.event_class, ev.ordering_key, 0,
                        ev.to_json()) for i, ev in enumerate(events)]


def event(type_: str, lot: str | None, n: int, **data: Any) -> Event:
    """An event numbered ``n`` (``data.n``); with a lot, ordering key ``lot:<lot>``."""
    body = {"n": n, **data}
    if lot is not None:
        body.setdefault("lot_id", lot)
    return make_event(type=type_, site="test-site", source="line1", data=body,
                      ordering_key=f"lot:{lot}" if lot is not None else None)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawReceiver:
    """Gives every request the same raw ``response`` (default 200) and records
    ``(method, raw target)`` in arrival order.

    ``trickle_s``: instead of ``response``, answer 200 with a body announced as large and
    sent one byte every ``trickle_s`` seconds, never finishing (a receiver that keeps a
    connection alive without ever answering in full).
    """

    def __init__(self, response: bytes = OK, *, trickle_s: float | None = None) -> None:
        self.response = response
        self.trickle_s = trickle_s
        self.seen: list[tuple[str, str]] = []
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> RawReceiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/api/v1"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._handlers.values():
                writer.close()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            while line := await reader.readline():
                method, target, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.seen.append((method, target))
                if self.trickle_s is not None:
                    await self._trickle(reader, writer, self.trickle_s)
                writer.write(self.response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.pop(task, None)

    @staticmethod
    async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       every_s: float) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        while not reader.at_eof():  # until the client gives up and closes, or stop()
            await writer.drain()
            await asyncio.sleep(every_s)
            writer.write(b" ")
        raise ConnectionResetError("the client closed the connection")
