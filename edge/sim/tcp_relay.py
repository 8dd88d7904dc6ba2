"""A TCP relay on loopback that a test can cut and restore, as a flaky plant network would.

``await TcpRelay.start(target_port)`` listens on a free loopback port and forwards every
connection to ``127.0.0.1:target_port``. ``cut("reset")`` closes every open connection and
stops listening, so new ones are refused (the far end rebooting); ``cut("blackhole")``
keeps the sockets open but forwards nothing, and accepts new connections that then hear
nothing (a link down behind a router: the slow kind). ``restore()`` ends the cut: new
connections are forwarded again (blackholed ones stay dead, as they would).

Faults per exchange, each a share (0–1) of the chunks it sees, drawn from ``rng``:
``reset_share`` resets a connection when the client sends (the request never reaches the
server); ``lose_response_share`` discards what the server answers and then resets the
connection (the server did the work, the client never hears of it). ``http_url()`` is the
relay's address for an HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Literal

__all__ = ["TcpRelay"]


class TcpRelay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode: Literal["up", "reset", "blackhole"] = "up"
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        # while True, what the server sends is discarded and what the client sends still
        # passes: responses lost on the way back (the client times out, the server thinks
        # it answered)
        self.drop_downstream = False
        # while True, what the client sends is discarded and the server's data still
        # passes: a link failing one way (a notification arrives, the Read after it not)
        self.drop_upstream = False
        self.reset_share = 0.0
        self.lose_response_share = 0.0
        self.rng = random.Random()

    @classmethod
    async def start(cls, target_port: int) -> TcpRelay:
        relay = cls(target_port)
        relay._server = await asyncio.start_server(relay._accept, "127.0.0.1", 0)
        relay.port = relay._server.sockets[0].getsockname()[1]
        return relay

    def url(self, path: str = "") -> str:
        return f"opc.tcp://127.0.0.1:{self.port}{path}"

    def http_url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self.mode == "reset":
            writer.transport.abort()
            self._writers.discard(writer)
            return
        if self.mode == "blackhole":
            return  # keep it open, say nothing
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        for src, dst, back, down in ((reader, up_writer, writer, False),
                                     (up_reader, writer, up_writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, down, back))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    downstream: bool, back: asyncio.StreamWriter | None = None) -> None:
        try:
            while data := await src.read(65536):
                if self.mode != "up":
                    return  # a cut: nothing more passes this pipe
                if self.drop_downstream if downstream else self.drop_upstream:
                    continue
                share = self.lose_response_share if downstream else self.reset_share
                if share and self.rng.random() < share:
                    if back is not None:
                        back.transport.abort()
                    return  # the finally block resets dst
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if self.mode != "blackhole":
                dst.transport.abort()

    async def cut(self, mode: Literal["reset", "blackhole"] = "reset") -> None:
        self.mode = mode
        if mode == "reset":
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()

    async def restore(self) -> None:
        """End a cut and any one-way drop."""
        self.mode = "up"
        self.drop_downstream = self.drop_upstream = False
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)

    async def close(self) -> None:
        self.mode = "reset"
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._pipes):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._pipes, return_exceptions=True)
