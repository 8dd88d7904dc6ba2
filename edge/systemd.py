"""systemd integration without a dependency: ``sd_notify`` and the watchdog.

``notify("READY=1")`` sends to ``$NOTIFY_SOCKET`` when set (Type=notify units) and is a
no-op otherwise. ``start_watchdog(healthy)`` pings ``WATCHDOG=1`` at half of
``$WATCHDOG_USEC`` while ``healthy()`` is true, so a wedged event loop gets restarted.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

__all__ = ["notify", "start_watchdog"]


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def start_watchdog(healthy: Callable[[], bool]) -> asyncio.Task[None] | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    interval = int(usec) / 1e6 / 2

    async def ping() -> None:
        while True:
            if healthy():
                notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.create_task(ping(), name="systemd-watchdog")
