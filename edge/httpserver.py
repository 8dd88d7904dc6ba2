"""uvicorn embedded in the gateway's own event loop (local API, stand-in ERP).

``EmbeddedServer`` leaves SIGTERM/SIGINT to the gateway (uvicorn's ``serve()`` would capture
them and re-raise them after shutdown) and sets ``listening`` once its sockets accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

__all__ = ["EmbeddedServer"]


class EmbeddedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the owner stops us through should_exit / shutdown()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()
