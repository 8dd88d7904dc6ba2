"""Suite-wide set-up: a NATS JetStream server for the tests that use "the machine's".

The machine normally runs one on 127.0.0.1:4222. Where it does not (a laptop, a fresh CI
runner), a private ``nats-server -js`` is started on a free loopback port for the whole
run and ``EDGE_TEST_NATS_URL`` names it (``tests.nats.support.MACHINE_NATS`` reads it), so
the JetStream tests run everywhere ``make test`` installed nats-server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

_private: dict[str, Any] = {}


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def pytest_configure(config: Any) -> None:
    if os.environ.get("EDGE_TEST_NATS_URL") or _listening(4222):
        return
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(exe).exists():
        return  # the NATS tests skip with "nats-server is not installed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tempfile.mkdtemp(prefix="edge-test-nats-")
    proc = subprocess.Popen([exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _listening(port):
        time.sleep(0.05)
    os.environ["EDGE_TEST_NATS_URL"] = f"nats://127.0.0.1:{port}"
    _private.update(proc=proc, store=store)


def pytest_unconfigure(config: Any) -> None:
    proc = _private.pop("proc", None)
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(_private.pop("store"), ignore_errors=True)
