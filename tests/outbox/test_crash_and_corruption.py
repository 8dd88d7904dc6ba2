"""Invariant 7: kill -9 loses no committed row (and leaves the audit chain whole); a corrupt
file is quarantined, not looped on."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.outbox import Outbox, audit
from edge.outbox.dbthread import connect
from tests.support import stop_process, sub

ROOT = Path(__file__).resolve().parents[2]


def _ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        return {r[0] for r in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()


def test_kill_9_mid_commit_loses_no_committed_row(tmp_path: Path):
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.outbox.crash_writer", str(tmp_path)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        acked: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        target = 2000 + 1000 * round_
        while len(acked) < target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.strip())
        # the writer is busy committing more batches right now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(acked) >= target, "child produced too little before the deadline"
        stored = _ids(tmp_path / "outbox.db")
        missing = set(acked) - stored
        assert not missing, f"round {round_}: {len(missing)} committed ids lost"
        # the audit chain continues across every kill (the next run chains from the table)
        conn = connect(str(tmp_path / "outbox.db"), readonly=True)
        try:
            res = audit.verify_db(conn)
        finally:
            conn.close()
        assert res.ok and res.verified >= len(acked), res.message


async def test_file_that_is_not_a_database_is_moved_aside(tmp_path: Path):
    (tmp_path / "outbox.db").write_bytes(b"this is not sqlite" * 100)
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        assert [a["code"] for a in ob.alarms] == ["outbox_corrupt"]
        assert await ob.submit([sub()])  # a fresh outbox works
    moved = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not sqlite")
    conn = sqlite3.connect(tmp_path / "outbox.db")
    states = [r[0] for r in conn.execute("SELECT state FROM audit WHERE event_id IS NULL")]
    conn.close()
    assert "outbox_quarantined" in states


async def test_damaged_pages_fail_quick_check_and_start_fresh_without_a_crash_loop(
    tmp_path: Path,
):
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        await ob.submit([sub(pad="z" * 500) for _ in range(2000)])
    db = tmp_path / "outbox.db"
    size = db.stat().st_size
    with open(db, "r+b") as f:  # scribble over b-tree pages, keep the header intact
        for offset in range(8192, size - 4096, 16384):
            f.seek(offset)
            f.write(os.urandom(512))
    for _ in range(2):  # a second start must not find a problem again
        async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
            await ob.submit([sub()])
            codes = [a["code"] for a in ob.alarms]
        if codes:
            assert codes == ["outbox_corrupt"]
    moved = [p for p in tmp_path.glob("outbox.db.corrupt-*")
             if not p.name.endswith(("-wal", "-shm"))]  # its WAL and index move along
    assert len(moved) == 1


def test_edge_run_quarantines_a_corrupt_file_found_by_its_early_check(tmp_path: Path):
    """`edge run` starts the check before validating its config; the verdict still counts."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "outbox.db").write_bytes(b"garbage, not an outbox" * 50)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        "site: s\nstate_dir: state\napi: {enabled: false}\nsinks:\n"
        "  - {id: erp, type: http, url: 'http://127.0.0.1:9', "
        "routes: [{events: ['*'], path: /e}]}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge", "run", "-c", str(cfg)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        lines = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "gateway started" in line or not line:
                break
        assert any("outbox file is corrupt" in line for line in lines), lines
        assert len(list(state.glob("outbox.db.corrupt-*"))) == 1
    finally:
        assert stop_process(proc) == 0


def _hold_exclusive_lock(path: Path) -> sqlite3.Connection:
    """Another process's view: a connection in exclusive locking mode that has written,
    so nobody else can read the file until it closes (a backup tool, a stuck process)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO meta(key, value) VALUES ('held', 'by another process')")
    conn.execute("COMMIT")
    return conn


async def test_a_locked_outbox_is_a_clear_start_error_and_is_never_moved_aside(
        tmp_path: Path, monkeypatch):
    """Item 10: before, any error of the check counted as corruption and an intact outbox
    with its queued events was moved aside because another process held a lock."""
    from edge.errors import OutboxOpenError
    from edge.outbox import integrity

    monkeypatch.setattr(integrity, "BUSY_TIMEOUT_MS", 200)
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        [queued] = await ob.submit([sub(key="lot:A")])
    holder = _hold_exclusive_lock(tmp_path / "outbox.db")
    try:
        with pytest.raises(OutboxOpenError, match="not corruption"):
            await Outbox(tmp_path, router=lambda ev: ["erp"]).open()
    finally:
        holder.close()
    assert list(tmp_path.glob("outbox.db.corrupt-*")) == []
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:  # lock gone: all there
        assert [e.id for e in await ob.lease("erp", 10)] == [queued]


def test_edge_run_exits_2_on_a_locked_outbox_and_keeps_it(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "outbox.db")
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    conn.commit()
    conn.close()
    holder = _hold_exclusive_lock(state / "outbox.db")
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        "site: s\nstate_dir: state\napi: {enabled: false}\nsinks:\n"
        "  - {id: erp, type: http, url: 'http://127.0.0.1:9', "
        "routes: [{events: ['*'], path: /e}]}\n")
    try:
        proc = subprocess.run([sys.executable, "-m", "edge", "run", "-c", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot check the outbox file" in proc.stderr and "Traceback" not in proc.stderr
    assert list(state.glob("outbox.db.corrupt-*")) == []
