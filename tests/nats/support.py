"""NATS for tests: a private ``nats-server`` with JetStream on a free loopback port (with a
generated config: users, tokens, TLS), and uniquely named streams on the machine's
JetStream at 127.0.0.1:4222 that are deleted afterwards.

``NatsServer.stop()`` / ``start()`` restart a private server on the same port with the
same store directory, so a stream and its messages survive the restart. Only servers made
here are ever stopped: the machine's shared server is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, stop_process

__all__ = ["MACHINE_NATS", "NatsServer", "machine_stream", "nats_server_exe", "unique"]

# the machine's JetStream, or the private one tests/conftest.py started where there is none
MACHINE_NATS = os.environ.get("EDGE_TEST_NATS_URL", "nats://127.0.0.1:4222")


def nats_server_exe() -> str:
    exe = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).exists()), None)
    if exe is None:
        pytest.skip("nats-server is not installed (make test installs it)")
    return exe


def unique(prefix: str = "T") -> str:
    """A name no other test uses: a stream name or a subject token."""
    return f"{prefix}{uuid.uuid4().hex[:12].upper()}"


@dataclass
class NatsServer:
    """One private ``nats-server -js`` with its config in ``directory``.

    ``conf``: extra server config text (``authorization { ... }``, ``tls { ... }``).
    """

    directory: Path
    conf: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        store = self.directory / "store"
        cfg = self.directory / "server.conf"
        cfg.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                       f'jetstream {{ store_dir: "{store}" }}\n' + self.conf)
        log = (self.directory / "server.log").open("ab")
        self.proc = subprocess.Popen([nats_server_exe(), "-c", str(cfg)],
                                     stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("nats-server exited:\n" + self.log())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nats-server did not listen:\n" + self.log())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20)
            self.proc = None

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def nats_servers(tmp_path: Path) -> Any:
    """``nats_servers(conf="")`` → a started private server; all stopped at teardown."""
    made: list[NatsServer] = []

    def make(conf: str = "", name: str = "nats") -> NatsServer:
        server = NatsServer(tmp_path / f"{name}{len(made)}", conf).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@asynccontextmanager
async def machine_stream(subjects: list[str], *, url: str = MACHINE_NATS,
                         duplicate_window_s: float = 120.0, **config: Any
                         ) -> AsyncIterator[tuple[Any, str]]:
    """A uniquely named stream on ``url`` (default: the machine's JetStream) taking
    ``subjects`` (``config``: more ``StreamConfig`` fields); yields ``(jetstream context,
    stream name)`` and deletes it afterwards."""
    import nats
    from nats.js.api import StreamConfig

    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as err:  # noqa: BLE001  any failure means no JetStream here
        pytest.skip(f"no NATS JetStream at {url}: {err!r}")
    js = nc.jetstream()
    name = unique("EDGE_TEST_")
    await js.add_stream(StreamConfig(name=name, subjects=subjects,
                                     duplicate_window=duplicate_window_s, **config))
    try:
        yield js, name
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await nc.close()
