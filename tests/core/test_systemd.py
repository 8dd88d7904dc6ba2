"""systemd integration: Type=notify readiness, watchdog pings, STOPPING on SIGTERM."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge import systemd
from tests.support import sink_yaml, stop_process

ROOT = Path(__file__).resolve().parents[2]


def test_edge_run_notifies_ready_pings_the_watchdog_and_says_stopping(tmp_path: Path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: s\nstate_dir: {tmp_path / 'state'}\napi: {{enabled: false}}\n"
                   + sink_yaml("http://127.0.0.1:9/erp"))
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(cfg)], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE)
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 30
        while messages.count("WATCHDOG=1") < 2 and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("STATUS=starting")
        ready_at = messages.index("READY=1\nSTATUS=running")
        # until READY the start timeout is extended (a long integrity check is not killed)
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready_at])
        assert messages.count("WATCHDOG=1") >= 2
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert "STOPPING=1" in messages
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        sock.close()


def test_unit_is_notify_with_watchdog_and_does_not_restart_on_bad_config():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "systemd" / "edge-gateway.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["RestartPreventExitStatus"] == "2"  # `edge run` exits 2 on bad config
    assert "edge run -c" in svc["ExecStart"]
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"


def test_start_timeout_is_extended_until_ready_and_not_after(tmp_path: Path, monkeypatch):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)

    def received() -> list[str]:
        out = []
        try:
            while True:
                out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out

    def extensions_in(messages: list[str]) -> list[str]:
        return [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]

    try:
        assert systemd.begin_startup("checking", step_s=0.05)
        before = [sock.recv(4096).decode()]
        while len(extensions_in(before)) < 3:  # the extender keeps going until READY
            before.append(sock.recv(4096).decode())
        systemd.ready()
        before += received()
        assert before[0] == "STATUS=checking"
        assert extensions_in(before)[0] == "EXTEND_TIMEOUT_USEC=150000"
        assert before[-1] == "READY=1\nSTATUS=running"
        time.sleep(0.3)  # a window in which nothing more may arrive
        assert received() == []  # the extender stopped with READY
    finally:
        systemd.ready()
        sock.close()
