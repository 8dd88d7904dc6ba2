"""``logging.format: auto`` (the default): JSON lines when stderr is a pipe (journald,
Docker), text when it is a terminal; JSON records are one object per line, always."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from edge.telemetry import _JsonFormatter, _TextFormatter, log_event
from tests.support import sink_yaml, stop_process

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: s\nstate_dir: {tmp_path / 'state'}\napi: {{enabled: false}}\n"
                   + extra + sink_yaml("http://127.0.0.1:9/erp"))
    return cfg


def _read_until(read_chunk, text: str, timeout: float = 30.0) -> str:
    """Collect output until ``text`` appears (or the deadline: the caller asserts)."""
    out = ""
    deadline = time.monotonic() + timeout
    while text not in out and time.monotonic() < deadline:
        chunk = read_chunk(deadline - time.monotonic())
        if chunk is None:
            break
        out += chunk
    return out


def _stderr_of_a_start(cfg: Path, *args: str) -> str:
    """What ``edge run`` writes to stderr (a pipe) until it has started, and on its stop."""
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(cfg), *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    try:
        out = _read_until(lambda _t: proc.stderr.readline() or None, "gateway started")
    finally:
        stop_process(proc)
    return out + proc.stderr.read()


def test_auto_writes_json_lines_when_stderr_is_a_pipe(tmp_path: Path):
    out = _stderr_of_a_start(_config(tmp_path))
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "edge run logged nothing"
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    started = next(d for d in docs if d["msg"] == "gateway started")
    assert {"ts", "level", "logger", "msg"} <= started.keys()
    assert started["level"] == "info" and started["logger"] == "edge.app"
    assert started["site"] == "s"  # the event's fields are fields, not text in msg
    assert started["ts"].endswith("Z")


def test_auto_writes_text_lines_on_a_terminal(tmp_path: Path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(_config(tmp_path))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)

    def read_chunk(timeout: float) -> str | None:
        ready, _, _ = select.select([master], [], [], max(timeout, 0))
        if not ready:
            return None
        try:
            return os.read(master, 65536).decode(errors="replace")
        except OSError:  # the child closed the terminal
            return None

    try:
        out = _read_until(read_chunk, "gateway started")
    finally:
        stop_process(proc)
        os.close(master)
    line = next(line for line in out.splitlines() if "gateway started" in line)
    assert not line.lstrip().startswith("{"), line
    assert " INFO " in line and "edge.app: gateway started" in line and "site=s" in line


def test_log_format_flag_overrides_the_config(tmp_path: Path):
    cfg = _config(tmp_path, "logging: {format: json}\n")
    out = _stderr_of_a_start(cfg, "--log-format", "text")
    line = next(line for line in out.splitlines() if "gateway started" in line)
    assert "edge.app: gateway started" in line and not line.startswith("{"), line


def _record(formatter: logging.Formatter, **fields: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("edge.test.format")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        try:
            raise ValueError("first line\nsecond line")
        except ValueError:
            logger.error("delivery failed\nfor this lot", exc_info=True,
                         extra={"fields": fields})
        log_event(logger, logging.WARNING, "plain", **fields)
    finally:
        logger.handlers.clear()
    return stream.getvalue()


def test_a_json_record_is_one_line_with_the_exception_as_a_field():
    out = _record(_JsonFormatter(), event_id="e-1", body="a\nb", msg="shadowed", path=Path("/x"))
    lines = out.splitlines()
    assert len(lines) == 2, out  # a traceback, a message and a value with line breaks
    doc = json.loads(lines[0])
    assert doc["msg"] == "delivery failed\nfor this lot" and doc["level"] == "error"
    assert doc["exc_type"] == "ValueError" and "Traceback" in doc["exc"]
    assert "second line" in doc["exc"]
    assert doc["event_id"] == "e-1" and doc["body"] == "a\nb" and doc["path"] == "/x"
    assert doc["field_msg"] == "shadowed"  # a field cannot overwrite the record's own keys
    assert json.loads(lines[1])["msg"] == "plain"


def test_a_text_value_cannot_fake_a_log_line():
    out = _record(_TextFormatter(), reason="ok\n2026-01-01T00:00:00.000Z ERROR edge: forged")
    plain = out.splitlines()[-1]
    assert "plain" in plain and 'reason="ok\\n2026' in plain, out
