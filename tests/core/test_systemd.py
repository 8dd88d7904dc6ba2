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

import pytest

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
    # `edge run` exits 2 on bad config; 243 is systemd's own for a missing credential file
    assert set(svc["RestartPreventExitStatus"].split()) == {"2", "243"}
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


def _unit_text(name: str = "edge-gateway.service") -> str:
    return (ROOT / "systemd" / name).read_text()


UNITS = {"edge-gateway.service": "plant.example.yaml", "edge-relay.service": "relay.example.yaml"}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_a_bad_config_or_a_missing_credential_cannot_become_a_restart_loop(name: str):
    """A failing ExecStartPre never sets the main exit status, so a check-config there
    would make RestartPreventExitStatus=2 useless and Restart=on-failure restart every 5 s
    forever: the unit has none (``edge run`` checks the config and exits 2 itself), and a
    start limit ends any other loop."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(_unit_text(name))
    assert not any(k.startswith("ExecStartPre") for k in unit["Service"])
    assert set(unit["Service"]["RestartPreventExitStatus"].split()) == {"2", "243"}
    assert unit["Service"]["Restart"] == "on-failure"
    assert int(unit["Unit"]["StartLimitBurst"]) <= 10
    assert int(unit["Unit"]["StartLimitIntervalSec"]) >= 10 * int(unit["Service"]["RestartSec"])


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_unit_loads_every_credential_the_example_config_names_and_no_other(name: str):
    """One LoadCredential= per ${CREDENTIALS_DIRECTORY}/<name> of plant.example.yaml: a
    name the unit does not load is a config error at start, a file the unit loads that
    does not exist fails the start (243)."""
    import re

    example = (ROOT / "config" / UNITS[name]).read_text()
    named = set(re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([A-Za-z0-9_.-]+)", example))
    loaded = set(re.findall(r"^LoadCredential=([^:]+):", _unit_text(name), flags=re.M))
    assert named and named == loaded


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify_finds_nothing_to_say_about_the_unit(tmp_path: Path,
                                                                    name: str):
    """systemd's own reading of the unit (unknown keys, bad values, missing binaries): the
    installed path of ``edge`` is replaced by this checkout's for the check."""
    import shutil

    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    edge_bin = Path(sys.executable).parent / "edge"
    unit = tmp_path / name
    unit.write_text(_unit_text(name).replace("/opt/edge-gateway/bin/edge", str(edge_bin)))
    proc = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", (
        proc.stdout + proc.stderr)
