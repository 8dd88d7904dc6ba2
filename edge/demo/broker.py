"""The demo's own MQTT broker: a mosquitto child process, or an embedded pure-Python one.

``start_broker(kind, workdir)`` returns a started ``DemoBroker`` on a free loopback port:

- ``mosquitto``: the ``mosquitto`` executable (PATH, or Debian's ``/usr/sbin``) with a
  generated config in ``workdir`` (queues large enough that nothing is dropped, window
  1000). MQTT 5.
- ``embedded``: amqtt (``pip install edge-gateway[demo]``) in this process. It speaks
  MQTT 3.1.1 only.
- ``auto``: mosquitto when installed, else embedded.

``BrokerUnavailable`` says what to install when neither can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Protocol

__all__ = ["BrokerUnavailable", "DemoBroker", "find_mosquitto", "free_port", "start_broker"]


class BrokerUnavailable(RuntimeError):
    """No broker can be started here; the message says what to install."""


class DemoBroker(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def protocol(self) -> str:  # "3.1.1" | "5"
        ...

    async def stop(self) -> None: ...


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_port(port: int, proc: asyncio.subprocess.Process) -> bool:
    """True once ``port`` accepts connections; False if ``proc`` exits first."""
    while proc.returncode is None:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        await asyncio.sleep(0.05)
    return False


class MosquittoBroker:
    name = "mosquitto"
    protocol = "5"

    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe = exe
        self.workdir = workdir
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> MosquittoBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        log_path = self.workdir / "mosquitto.log"
        for _ in range(3):
            self.port = free_port()
            lines = [
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "max_inflight_messages 1000",
                "max_queued_messages 1000000",
                f"log_dest file {log_path}",
            ]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                lines.append("user root")  # keep write access to workdir
            conf.write_text("\n".join(lines) + "\n")
            # Own session: Ctrl-C in the terminal reaches the whole foreground process
            # group; the broker must outlive it until the demo has drained and judged.
            self.proc = await asyncio.create_subprocess_exec(
                self.exe, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    if await _wait_port(self.port, self.proc):
                        return self
            await self.stop()
        tail = log_path.read_text(errors="replace")[-500:] if log_path.exists() else ""
        raise BrokerUnavailable(f"mosquitto did not start: {tail or 'no log'}")

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


class EmbeddedBroker:
    """amqtt's broker in this event loop (MQTT 3.1.1)."""

    name = "embedded amqtt"
    protocol = "3.1.1"

    def __init__(self) -> None:
        self.port = 0
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as err:
            raise BrokerUnavailable(
                "no MQTT broker available: install mosquitto (apt install mosquitto) or the "
                "embedded one (pip install 'edge-gateway[demo]')") from err
        for name in ("amqtt", "transitions"):  # amqtt logs every closed probe at ERROR
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.port = free_port()
        self._broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        })
        await self._broker.start()  # listening once this returns
        return self

    async def stop(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.shutdown()
            self._broker = None


async def start_broker(kind: str, workdir: Path) -> DemoBroker:
    """Start the broker ``kind`` (auto | mosquitto | embedded); see module doc."""
    if kind not in ("auto", "mosquitto", "embedded"):
        raise ValueError(f"broker must be auto, mosquitto or embedded, got {kind!r}")
    if kind in ("auto", "mosquitto"):
        exe = find_mosquitto()
        if exe is not None:
            return await MosquittoBroker(exe, workdir / "mosquitto").start()
        if kind == "mosquitto":
            raise BrokerUnavailable("mosquitto is not installed (apt install mosquitto)")
    return await EmbeddedBroker().start()
