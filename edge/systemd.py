"""systemd integration without a dependency: ``sd_notify`` and the watchdog.

``notify("READY=1")`` sends to ``$NOTIFY_SOCKET`` when set (Type=notify units) and is a
no-op otherwise. ``start_watchdog(healthy)`` pings ``WATCHDOG=1`` at half of
``$WATCHDOG_USEC`` while ``healthy()`` is true, so a wedged event loop gets restarted.

``begin_startup(status)`` keeps extending the unit's start timeout (``EXTEND_TIMEOUT_USEC``)
from a thread until ``ready()``: the integrity check of a large outbox on a slow disk (or a
schema migration) may take longer than ``TimeoutStartSec`` (90 s by default), and a start
killed by that timeout would restart the check from the beginning, forever.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable

__all__ = ["begin_startup", "notify", "ready", "start_watchdog"]

STARTUP_STEP_S = 10.0  # re-send the extension this often; each one grants 3 steps


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


class _StartupExtender:
    def __init__(self, step_s: float) -> None:
        self._step_s = step_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-startup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            notify(f"EXTEND_TIMEOUT_USEC={int(self._step_s * 3 * 1e6)}")
            self._done.wait(self._step_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


_startup: _StartupExtender | None = None


def begin_startup(status: str, step_s: float = STARTUP_STEP_S) -> bool:
    """Say what the daemon is doing (``systemctl status``) and keep extending the start
    timeout until ``ready()``. No-op outside a Type=notify unit."""
    global _startup
    if not notify(f"STATUS={status}"):
        return False
    if _startup is None:
        _startup = _StartupExtender(step_s)
    return True


def ready(status: str = "running") -> None:
    """Start-up is complete: stop extending the start timeout, then READY=1."""
    global _startup
    if _startup is not None:
        _startup.stop()
        _startup = None
    notify(f"READY=1\nSTATUS={status}")
