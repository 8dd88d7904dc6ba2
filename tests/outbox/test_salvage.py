"""``edge outbox salvage FILE``: what a moved-aside (corrupt) outbox still holds comes back
into the live outbox under its own ids, keys, classes and order; what cannot be read is
named (seq ranges, event ids), never dropped silently. Real damaged SQLite files: a page of
garbage in the middle of the events table, a truncated file, a destroyed header."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge.cli.main import main
from edge.components import Submission
from edge.outbox import Outbox
from edge.outbox.integrity import BackgroundCheck
from edge.outbox.store import Resolution
from tests.support import sub

PAGE = 4096
KEYS = 7


def _config(tmp: Path) -> Path:
    cfg = tmp / "edge.yaml"
    cfg.write_text(
        f"site: s\nstate_dir: {tmp}\napi: {{enabled: false}}\nsinks:\n"
        "  - {id: erp, type: http, url: 'http://127.0.0.1:9', "
        "routes: [{events: ['*'], path: /e}]}\n")
    return cfg


async def _fill(tmp: Path, n: int = 1200, *, delivered: int = 0, dead: int = 0) -> None:
    """An outbox with ``n`` events over ``KEYS`` keys, of which the first ``delivered`` were
    delivered and the next ``dead`` dead-lettered."""
    async with Outbox(tmp, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        for i in range(0, n, 300):
            await ob.submit([sub(key=f"lot:{j % KEYS}", pad="p" * 300, n=j, dedupe=f"m{j}")
                             for j in range(i, min(n, i + 300))])
        if delivered or dead:
            rows = await ob.lease("erp", delivered + dead, park=False)
            res = [Resolution(r.seq, r.id, "delivered") for r in rows[:delivered]]
            res += [Resolution(r.seq, r.id, "dead_letter", status=422, reason="bad lot",
                               body='{"error": "bad lot"}')
                    for r in rows[delivered:delivered + dead]]
            await ob.complete("erp", res)


def _queued(db: Path) -> dict[int, tuple[str, str, int, str | None, bytes]]:
    """seq → (id, sha256, class, key, body) of every event still stored (queued or dead);
    a delivered event waiting for the sweep is not (its rows are marked done)."""
    conn = sqlite3.connect(db)
    try:
        return {r[0]: tuple(r[1:]) for r in conn.execute(  # type: ignore[misc]
            "SELECT seq, id, sha256, class, ordering_key, body FROM events e WHERE EXISTS "
            "(SELECT 1 FROM deliveries d WHERE d.seq = e.seq AND d.done = 0) OR EXISTS "
            "(SELECT 1 FROM dead_letters x WHERE x.seq = e.seq) ORDER BY seq")}
    finally:
        conn.close()


def _leaf_pages(db: Path, table: str = "events") -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (table,))]
    finally:
        conn.close()


def _scribble(db: Path, pageno: int) -> None:
    with open(db, "r+b") as f:
        f.seek((pageno - 1) * PAGE)
        f.write(os.urandom(PAGE))


async def _restart(tmp: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Run the full integrity check as a running gateway does in the background (its
    verdict is recorded), then start the outbox: the start moves the file aside."""
    _found_corrupt_while_running(tmp / "outbox.db")
    async with Outbox(tmp, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        alarms = ob.alarms
    [moved] = [p for p in tmp.glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal",
                                                                                     "-shm"))]
    return moved, alarms


def _found_corrupt_while_running(db: Path) -> None:
    """The background integrity check of a running gateway judges ``db`` corrupt (and
    records the verdict for the next start)."""
    check = BackgroundCheck(str(db))
    check.start()
    assert check.join(60) and check.state == "failed", check.snapshot()


def _salvage(moved: Path, cfg: Path | None, *extra: str) -> tuple[int, dict[str, Any], str]:
    """Run the CLI twice over: the JSON summary and the text an operator reads."""
    args = ["outbox", "salvage", str(moved), *(["-c", str(cfg)] if cfg else []), *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([*args, "--json"])
    return rc, json.loads(out.getvalue()) if rc == 0 else {}, out.getvalue()


def _live(tmp: Path) -> dict[str, tuple[int, str, int, str | None, bytes]]:
    """id → (seq, sha256, class, key, body) of the live outbox's events."""
    conn = sqlite3.connect(tmp / "outbox.db")
    try:
        return {r[0]: tuple(r[1:]) for r in conn.execute(  # type: ignore[misc]
            "SELECT id, seq, sha256, class, ordering_key, body FROM events")}
    finally:
        conn.close()


def _requeued_in_order(tmp: Path, before: dict[int, tuple[Any, ...]], lost: set[str]) -> None:
    """Every event of ``before`` not lost is in the live outbox, identical, in its order."""
    live = _live(tmp)
    expect = [(seq, v) for seq, v in sorted(before.items()) if v[0] not in lost]
    for seq, (eid, sha, cls, key, body) in expect:
        assert eid in live, f"event {eid} (seq {seq}) was not re-queued"
        assert live[eid][1:] == (sha, cls, key, body)
    order = [live[v[0]][0] for _, v in expect]
    assert order == sorted(order), "salvaged events changed their order"


async def test_a_page_of_garbage_in_the_events_table_costs_only_its_rows(tmp_path: Path):
    await _fill(tmp_path, delivered=40, dead=3)
    db = tmp_path / "outbox.db"
    before = _queued(db)
    pages = _leaf_pages(db)
    _scribble(db, pages[len(pages) // 2])
    moved, alarms = await _restart(tmp_path)
    # the alarm says what the file held and how to get it back
    [alarm] = alarms
    assert f"edge outbox salvage {moved}" in alarm["message"]
    assert f"it held {len(before) - 3} queued delivery row(s)" in alarm["message"]

    rc, rep, _ = _salvage(moved, _config(tmp_path))
    assert rc == 0
    lost = set(rep["unreadable"]["event_ids"])
    # a page holds a handful of these events: exactly those are lost, and named
    assert 0 < len(lost) <= 10 and rep["unreadable"]["count"] == len(lost)
    assert lost <= {v[0] for v in before.values()}
    [(first, last)] = rep["unreadable"]["seq_ranges"]
    assert all(first <= seq <= last for seq, v in before.items() if v[0] in lost)
    assert rep["requeued"] == len(before) - len(lost)
    # the 40 delivered events were still in the file (marked done, not swept yet):
    # read, and not queued again
    assert rep["rows_read"] == rep["requeued"] + rep["nothing_to_deliver"]
    assert rep["nothing_to_deliver"] == 40
    _requeued_in_order(tmp_path, before, lost)
    # the fresh outbox started above the moved file's seqs: salvaged events keep theirs
    live = _live(tmp_path)
    assert all(live[v[0]][0] == seq for seq, v in before.items() if v[0] not in lost)
    # dead letters are dead letters again (their keys park), the rest is deliverable
    conn = sqlite3.connect(tmp_path / "outbox.db")
    try:
        dead = conn.execute("SELECT count(*), min(status) FROM dead_letters").fetchone()
        queued = conn.execute("SELECT count(*) FROM deliveries WHERE done = 0").fetchone()[0]
        actors = {r[0] for r in conn.execute(
            "SELECT actor FROM audit WHERE state = 'salvaged' AND event_id IS NOT NULL")}
        summary = conn.execute("SELECT detail FROM audit WHERE state = 'salvaged' AND "
                               "event_id IS NULL").fetchone()[0]
    finally:
        conn.close()
    assert dead == (3, 422) and rep["dead_letters_requeued"] == 3
    assert queued == rep["deliveries"] == len(before) - 3 - len(lost)
    assert len(actors) == 1 and next(iter(actors)).startswith("cli")
    assert str(moved) in summary


async def test_a_truncated_file_names_every_event_it_cannot_give_back(tmp_path: Path):
    await _fill(tmp_path)
    db = tmp_path / "outbox.db"
    before = _queued(db)
    size = db.stat().st_size
    with open(db, "r+b") as f:  # the last third of the file never reached the disk
        f.truncate(size * 2 // 3 // PAGE * PAGE)
    moved, _ = await _restart(tmp_path)
    rc, rep, _ = _salvage(moved, _config(tmp_path))
    assert rc == 0 and rep["requeued"] > 0
    lost_seqs = [(a, b) for a, b in rep["unreadable"]["seq_ranges"]]
    live = _live(tmp_path)
    for seq, (eid, *_) in before.items():
        # nothing vanishes silently: re-queued, or inside a range the summary names
        assert eid in live or any(a <= seq <= b for a, b in lost_seqs), (seq, eid)
    assert len(live) == rep["requeued"] < len(before)
    _requeued_in_order(tmp_path, before, {v[0] for v in before.values()} - set(live))


async def test_a_destroyed_header_is_rebuilt_on_a_copy_and_nothing_is_lost(tmp_path: Path):
    await _fill(tmp_path, n=600)
    db = tmp_path / "outbox.db"
    before = _queued(db)
    with open(db, "r+b") as f:
        f.write(os.urandom(100))
    moved, alarms = await _restart(tmp_path)
    assert "unknown number" in alarms[0]["message"]  # nothing readable at start-up
    damaged = moved.read_bytes()
    rc, rep, _ = _salvage(moved, _config(tmp_path))
    assert rc == 0 and rep["header_rebuilt"]
    assert rep["requeued"] == len(before) and rep["unreadable"]["count"] == 0
    _requeued_in_order(tmp_path, before, set())
    assert moved.read_bytes() == damaged  # the kept file is evidence: never written


async def test_running_twice_stores_nothing_twice_even_after_delivery(tmp_path: Path):
    await _fill(tmp_path, n=600)
    db = tmp_path / "outbox.db"
    _scribble(db, _leaf_pages(db)[10])
    moved, _ = await _restart(tmp_path)
    cfg = _config(tmp_path)
    rc, first, _ = _salvage(moved, cfg, "--dry-run")
    assert rc == 0 and first["dry_run"] and _live(tmp_path) == {}  # a dry run changes nothing
    rc, first2, _ = _salvage(moved, cfg)
    assert rc == 0 and first2["requeued"] == first["requeued"] > 0
    # deliver half of them: they leave the live outbox
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        rows = await ob.lease("erp", first2["requeued"] // 2, park=False)
        await ob.complete("erp", [Resolution(r.seq, r.id, "delivered") for r in rows])
        left = len(_live(tmp_path))
    rc, second, text = _salvage(moved, cfg)
    assert rc == 0 and second["requeued"] == 0
    assert second["already_present"] == first2["requeued"]
    assert len(_live(tmp_path)) == left


async def test_a_redelivered_message_stored_again_after_the_restart_is_not_queued_twice(
        tmp_path: Path):
    def part_with_nonconformance() -> list[Submission]:
        return [sub(key="lot:X", n=5000, dedupe="x5000"),
                Submission(sub("nonconformance", key="lot:X", n=5000, source="rules").event,
                           derived=True)]

    await _fill(tmp_path, n=300)
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        await ob.submit(part_with_nonconformance())
        await ob.submit([sub(key="lot:X", n=5001, dedupe="x5001")])
    db = tmp_path / "outbox.db"
    _scribble(db, _leaf_pages(db)[3])
    moved, _ = await _restart(tmp_path)
    # the broker redelivers message x5000 after the crash: the fresh outbox stores it anew,
    # with the nonconformance the rule derives from it
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        again = await ob.submit(part_with_nonconformance())
    rc, rep, _ = _salvage(moved, _config(tmp_path))
    assert rc == 0 and rep["redelivered"] == 2
    conn = sqlite3.connect(tmp_path / "outbox.db")
    try:
        n5 = conn.execute("SELECT type, id FROM events WHERE json_extract(CAST(body AS TEXT), "
                          "'$.data.n') = 5000").fetchall()
    finally:
        conn.close()
    assert sorted(n5) == sorted(zip(["inspection.result", "nonconformance"], again,
                                    strict=True))
    # the part after it (same key, a dedupe key of its own) is back
    assert any(v[4] and b'"n":5001' in v[4] for v in _live(tmp_path).values())


async def test_a_body_that_no_longer_matches_its_digest_is_dead_lettered_not_sent(
        tmp_path: Path):
    await _fill(tmp_path, n=300)
    db = tmp_path / "outbox.db"
    conn = sqlite3.connect(db)
    [(seq, eid)] = conn.execute("SELECT seq, id FROM events WHERE seq = 17").fetchall()
    conn.execute("UPDATE events SET body = CAST(replace(body, 'ppp', 'ppq') AS BLOB) "
                 "WHERE seq = 17")
    conn.commit()
    conn.close()
    _scribble(db, _leaf_pages(db)[-1])
    moved, _ = await _restart(tmp_path)
    rc, rep, _ = _salvage(moved, _config(tmp_path))
    assert rc == 0 and rep["digest_mismatch"] == [eid]
    conn = sqlite3.connect(tmp_path / "outbox.db")
    try:
        assert conn.execute("SELECT count(*) FROM deliveries WHERE seq = ?", (seq,)
                            ).fetchone()[0] == 0
        [reason] = conn.execute("SELECT reason FROM dead_letters WHERE event_id = ?",
                                (eid,)).fetchone()
    finally:
        conn.close()
    assert reason.startswith("integrity")


async def test_salvage_while_the_gateway_runs_and_stores_new_events(tmp_path: Path):
    await _fill(tmp_path)
    db = tmp_path / "outbox.db"
    before = _queued(db)
    _scribble(db, _leaf_pages(db)[5])
    _found_corrupt_while_running(db)
    ob = Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=0.05)
    await ob.open()
    [moved] = [p for p in tmp_path.glob("outbox.db.corrupt-*")
               if not p.name.endswith(("-wal", "-shm"))]
    stop = asyncio.Event()
    stored: list[str] = []

    async def ingest() -> None:  # the daemon keeps committing while salvage writes
        n = 0
        while not stop.is_set():
            stored.extend(await ob.submit([sub(key=f"lot:{n % KEYS}", n=10_000 + n)]))
            n += 1
            await asyncio.sleep(0.002)

    task = asyncio.create_task(ingest())
    try:
        rc, rep, _ = await asyncio.to_thread(_salvage, moved, _config(tmp_path))
        await asyncio.sleep(0.1)  # ingest goes on a little after the salvage
        stop.set()
        await task
        # the forwarder's view: per key, the salvaged (older) events come first
        leased = await ob.lease("erp", 5000, park=False)
    finally:
        stop.set()
        await ob.close()
    assert rc == 0 and stored
    lost = set(rep["unreadable"]["event_ids"])
    assert rep["requeued"] == len(before) - len(lost)
    live = _live(tmp_path)
    assert set(stored) <= set(live) and len(live) == len(stored) + rep["requeued"]
    _requeued_in_order(tmp_path, before, lost)
    salvaged = {v[0] for v in before.values()}
    by_key: dict[str, list[bool]] = {}
    for row in leased:
        by_key.setdefault(row.ordering_key or "", []).append(row.id in salvaged)
    for key, flags in by_key.items():
        assert flags == sorted(flags, reverse=True), f"{key}: a new event went first"


def test_refuses_the_live_outbox_and_a_file_that_is_not_an_outbox(tmp_path: Path,
                                                                   capsys: Any):
    asyncio.run(_fill(tmp_path, n=10))
    cfg = _config(tmp_path)
    assert main(["outbox", "salvage", str(tmp_path / "outbox.db"), "-c", str(cfg)]) == 2
    assert "is the live outbox" in capsys.readouterr().err
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(8192))
    assert main(["outbox", "salvage", str(junk), "-c", str(cfg)]) == 1
    assert "nothing can be salvaged" in capsys.readouterr().err


@pytest.mark.parametrize("dry", [False, True])
async def test_the_summary_names_the_lost_rows_for_an_operator(tmp_path: Path, dry: bool):
    await _fill(tmp_path, n=300)
    db = tmp_path / "outbox.db"
    _scribble(db, _leaf_pages(db)[20])
    moved, _ = await _restart(tmp_path)
    args = ["outbox", "salvage", str(moved), "-c", str(_config(tmp_path))]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*args, *(["--dry-run"] if dry else [])]) == 0
    text = out.getvalue()
    assert ("would re-queue:" if dry else "re-queued:") in text
    assert "UNREADABLE:" in text and "lost event " in text


async def test_a_per_lot_key_of_another_part_does_not_hide_this_parts_hold(tmp_path: Path):
    """A hold's dedupe key names the lot: after the restart another failing part of the lot
    got a hold of its own in the fresh outbox; the moved file's hold (of the lot's first
    failing part) is still re-queued."""
    def hold(part: int) -> Submission:
        return Submission(sub("quality.hold", key="lot:X", lot_id="X", part=part,
                              source="rules").event, dedupe_key="hold:X", derived=True)

    await _fill(tmp_path, n=300)
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        [first] = await ob.submit([hold(1)])
    db = tmp_path / "outbox.db"
    _scribble(db, _leaf_pages(db)[3])
    moved, _ = await _restart(tmp_path)
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        [other] = await ob.submit([hold(2)])
    rc, rep, _ = _salvage(moved, _config(tmp_path))
    assert rc == 0 and rep["redelivered"] == 0
    assert {first, other} <= set(_live(tmp_path))
