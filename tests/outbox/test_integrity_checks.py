"""The outbox's two integrity checks (edge.outbox.integrity), on real damaged files.

Promise (invariant 7): the start reads only the header and first pages, yet moves aside a
file whose header or length is destroyed; damage deeper in the file is found by the full
check run beside intake, whose verdict is recorded so the next start moves that very file
aside — and never a file an operator put in its place. A check that cannot judge the file
(a lock) is no verdict: nothing is recorded, nothing is moved.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from edge.outbox import Outbox, integrity
from tests.support import eventually, hold_quick_check, scribble_middle_leaf, sub

PAGE = 4096


async def _fill(state: Path, n: int = 1200) -> None:
    async with Outbox(state, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        for i in range(0, n, 300):
            await ob.submit([sub(key=f"lot:{j % 5}", pad="p" * 300, n=j)
                             for j in range(i, i + 300)])


def _moved(state: Path) -> list[Path]:
    return [p for p in state.glob("outbox.db.corrupt-*")
            if not p.name.endswith(("-wal", "-shm"))]


def _run_check(db: Path) -> integrity.BackgroundCheck:
    check = integrity.BackgroundCheck(str(db))
    check.start()
    assert check.join(60)
    return check


async def test_damage_deep_in_the_file_is_found_by_the_full_check_and_moved_at_next_start(
        tmp_path: Path) -> None:
    await _fill(tmp_path)
    db = tmp_path / "outbox.db"
    scribble_middle_leaf(db)
    assert integrity.cheap_check(str(db)) is None  # the start alone does not see it
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        assert ob.alarms == []  # opened as it is: the damage is not on the start's path
    check = _run_check(db)
    assert check.state == "failed" and check.problem
    assert check.snapshot()["state"] == "failed"
    marker = Path(str(db) + integrity.MARKER_SUFFIX)
    assert marker.exists()
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        assert [a["code"] for a in ob.alarms] == ["outbox_corrupt"]
        assert await ob.submit([sub()])  # the fresh outbox works
    assert len(_moved(tmp_path)) == 1 and not marker.exists()
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:  # no loop
        assert ob.alarms == []
    assert len(_moved(tmp_path)) == 1


async def test_a_verdict_on_a_file_since_replaced_does_not_move_the_new_one(
        tmp_path: Path) -> None:
    await _fill(tmp_path, 300)
    db = tmp_path / "outbox.db"
    integrity.mark_corrupt(str(db), "a verdict on the old file")
    replacement = tmp_path / "restored.db"
    replacement.write_bytes(db.read_bytes())
    os.replace(replacement, db)  # an operator restored a copy: another inode
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        assert ob.alarms == []
    assert _moved(tmp_path) == []
    assert not Path(str(db) + integrity.MARKER_SUFFIX).exists()


async def test_a_destroyed_header_or_a_cut_file_is_moved_at_start(tmp_path: Path) -> None:
    for name, damage in (("page_size", lambda f: (f.seek(16), f.write(b"\x03\x00"))),
                         ("cut", lambda f: f.truncate(os.fstat(f.fileno()).st_size - 100))):
        state = tmp_path / name
        await _fill(state, 300)
        with open(state / "outbox.db", "r+b") as f:
            damage(f)
        assert integrity.cheap_check(str(state / "outbox.db")) is not None, name
        async with Outbox(state, router=lambda ev: ["erp"]) as ob:
            assert [a["code"] for a in ob.alarms] == ["outbox_corrupt"], name
        assert len(_moved(state)) == 1, name


async def test_a_check_that_cannot_read_the_file_is_no_verdict(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(integrity, "BUSY_TIMEOUT_MS", 200)
    await _fill(tmp_path, 300)
    db = tmp_path / "outbox.db"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO meta(key, value) VALUES ('held', 'by another process')")
        holder.execute("COMMIT")
        check = _run_check(db)  # the lock outlasts the check's busy timeout
        assert check.state == "error" and "not corruption" in (check.problem or "")
    finally:
        holder.close()
    assert not Path(str(db) + integrity.MARKER_SUFFIX).exists()
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        assert ob.alarms == []
    assert _moved(tmp_path) == []


async def test_a_check_gives_way_when_intake_grows_the_wal_it_holds(
        tmp_path: Path, monkeypatch) -> None:
    """While the check holds its snapshot, no checkpoint folds the WAL back: past its bound
    the check is deferred (no verdict, nothing recorded) and intake goes on."""
    await _fill(tmp_path, 300)
    db = tmp_path / "outbox.db"
    release = hold_quick_check(monkeypatch, timeout=30)
    async with Outbox(tmp_path, router=lambda ev: ["erp"]) as ob:
        check = integrity.BackgroundCheck(str(db), max_wal_growth=64 << 10, retry_s=3600,
                                          watch_s=0.02)
        check.start()
        wal = Path(str(db) + "-wal")
        grown_from = wal.stat().st_size if wal.exists() else 0
        while (wal.stat().st_size if wal.exists() else 0) <= grown_from + (64 << 10):
            await ob.submit([sub(pad="w" * 500) for _ in range(50)])  # intake goes on
        await eventually(lambda: check._deferring, what="the WAL guard to give way")
        release.set()
        await eventually(lambda: check.state == "deferred", what="the check deferred")
        snap = check.snapshot()
        assert snap["next_attempt_at"] and snap["problem"] is None and snap["attempts"] == 1
        check.stop()
        assert check.join(10) and check.state == "stopped"
    assert not Path(str(db) + integrity.MARKER_SUFFIX).exists()
