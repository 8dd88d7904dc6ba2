"""A payload bit-flipped on disk is caught by the SHA-256 check before send.

Promise (DESIGN invariants 2, 4 and 8): an event whose stored envelope no longer hashes to
the SHA-256 taken at ingest is never sent; it becomes a dead letter with an "integrity"
reason, its ordering key is parked (the lot's later events wait, listed in ``/status``)
until an operator discards it with a reason, and then the lot flows on, in order.
Everything else arrives: nothing lost beyond the damaged events, which the campaign
accounts for.

How the bit is flipped: the gateway is stopped with SIGTERM, so its outbox is closed and
the WAL checkpointed into ``outbox.db`` (checked: no ``-wal`` content is left). The
victims' exact stored bodies are read through SQLite (``immutable=1``: nothing written,
no checkpoint), and each body is found byte for byte in the file. A body is one cell of
an ``events`` leaf page (a few hundred bytes, far below the overflow threshold), so it
lies contiguous on disk. The flip is the lowest bit of the last digit of the part's serial
number inside that run of bytes: the JSON stays valid and the serial becomes a
neighbouring part's (``…0012`` → ``…0013``) — the most plausible damage, that only the
hash can tell. Stale copies of a body left in free space by page splits are flipped too
(harmless); reading back through SQLite afterwards proves the live cell changed and
``PRAGMA quick_check`` proves no b-tree structure was touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.harness import Campaign
from tests.faults.publisher import UPPER_LIMIT, Part
from tests.fixtures.gateway_process import REPO

pytestmark = pytest.mark.mqtt

VICTIMS = 3


async def edge_cli(c: Campaign, *args: str) -> str:
    """``edge ARGS -c CONFIG`` as an operator runs it; its output (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", *args, "-c", str(c.config_path), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"edge {' '.join(args)}: {err.decode()}"
    return out.decode()


async def erp_status(c: Campaign) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(f"http://127.0.0.1:{c.api_port}/status")
    return dict(resp.json()["sinks"]["erp"])


def choose_victims(c: Campaign, n: int) -> list[Part]:
    """``n`` confirmed parts in different lots, each with confirmed parts after it (so the
    parked lot has something to hold back) and none out of spec (no derived events)."""
    assert c.publisher is not None
    acked = set(c.publisher.acked)
    by_lot: dict[str, list[Part]] = {}
    for mid, part in c.publisher.parts.items():
        if mid in acked:
            by_lot.setdefault(part.lot, []).append(part)
    victims = []
    for parts in sorted(by_lot.values(), key=lambda ps: ps[0].lot):
        middle = [p for p in parts[2:-2] if not p.fails]
        if middle:
            victims.append(c.rng.choice(middle))
    assert len(victims) >= n, f"too few lots with confirmed parts: {sorted(by_lot)}"
    return c.rng.sample(victims, n)


def stored_bodies(db: Path, message_ids: list[str]) -> dict[str, tuple[str, str, bytes]]:
    """message id → (event id, stored sha256, body) of its inspection.result row."""
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        out = {}
        for eid, sha, body in conn.execute(
                "SELECT id, sha256, body FROM events WHERE type = 'inspection.result'"):
            mid = json.loads(body)["data"]["message_id"]
            if mid in message_ids:
                out[mid] = (eid, sha, bytes(body))
        return out
    finally:
        conn.close()


def flip_serial_bit(db: Path, body: bytes, serial: str) -> int:
    """Flip bit 0 of the serial's last digit in every on-disk copy of ``body``; returns how
    many copies were flipped."""
    needle = b'"serial":"' + serial.encode() + b'"'
    at = body.find(needle)
    assert at >= 0 and body.count(needle) == 1, f"serial {serial} not once in the body"
    offset = at + len(needle) - 2  # the serial's last digit
    data = bytearray(db.read_bytes())
    starts = []
    pos = data.find(body)
    while pos >= 0:
        starts.append(pos)
        pos = data.find(body, pos + 1)
    assert starts, "the stored body is not contiguous in the file"
    for start in starts:
        data[start + offset] ^= 0x01
    db.write_bytes(bytes(data))
    return len(starts)


async def test_a_bit_flipped_on_disk_is_dead_lettered_never_sent(tmp_path: Path) -> None:
    async with Campaign(tmp_path, lots=6, rate=150.0) as c:
        await c.erp.set_fault("down")  # a backlog builds up in the outbox
        await c.start_gateway()
        await c.publish_for(1.5)
        assert c.publisher is not None
        await asyncio.to_thread(c.publisher.wait_acked, 30.0)  # acked ⇒ committed
        await c.stop_gateway()

        db = c.state_dir / "outbox.db"
        wal = db.with_name(db.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, "WAL not checkpointed at stop"
        victims = choose_victims(c, VICTIMS)
        rows = stored_bodies(db, [p.message_id for p in victims])
        assert len(rows) == VICTIMS, "a confirmed part has no stored row"
        flipped: dict[str, str] = {}  # event id → message id
        for part in victims:
            eid, _sha, body = rows[part.message_id]
            copies = flip_serial_bit(db, body, f"SN-{part.message_id}")
            flipped[eid] = part.message_id
            c.accounted[part.message_id] = "integrity: bit flipped on disk"
            print(f"flipped a bit of {part.message_id} ({eid}) in {copies} on-disk cop"
                  f"{'y' if copies == 1 else 'ies'}")
        after = stored_bodies(db, [p.message_id for p in victims])
        for mid, (_eid, sha, body) in after.items():
            assert body != rows[mid][2] and hashlib.sha256(body).hexdigest() != sha, (
                f"the live cell of {mid} was not changed")
        check = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
        assert check.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        check.close()

        await c.start_gateway()
        await c.erp.clear()
        # the damaged events become dead letters; their lots are parked behind them
        parked_lots = {f"lot:{p.lot}" for p in victims}
        status: dict[str, Any] = {}
        for _ in range(150):  # until only the parked lots wait (30 s at most)
            status = await erp_status(c)
            parked = status.get("parked_keys") or []  # absent once nothing is queued
            waiting = sum(k["waiting"] for k in parked)
            if {k["key"] for k in parked} == parked_lots and status.get("total") == waiting:
                break
            await asyncio.sleep(0.2)
        assert {k["key"] for k in parked} == parked_lots, status
        assert all(k["waiting"] > 0 for k in parked), status
        assert {k["event_id"] for k in parked} == set(flipped), status
        dead = json.loads(await edge_cli(c, "dlq", "list", "--json"))
        assert {d["event_id"] for d in dead} == set(flipped), dead
        assert all(d["reason"].startswith("integrity") for d in dead), dead
        assert all(d["status"] is None for d in dead), dead  # no receiver judged them
        # nothing of a parked lot after its damaged event went out (the others drained)
        seq_of = {f"lot:{p.lot}": p.seq for p in victims}
        for ev in c.erp.applied:
            data = ev.get("data") or {}
            sent = c.publisher.parts.get(str(data.get("message_id")))
            if sent is not None and f"lot:{sent.lot}" in seq_of:
                assert sent.seq < seq_of[f"lot:{sent.lot}"], f"{sent} overtook a dead letter"

        await edge_cli(c, "dlq", "discard", *(str(d["id"]) for d in dead),
                       "--reason", "payload damaged on disk; re-sent from the station")
        report = await c.finish(60)
    print(report.summary())
    report.assert_clean()

    applied_ids = {str(ev.get("id")) for ev in c.erp.applied}
    assert not applied_ids & set(flipped), "a damaged event reached the ERP"
    sent_ids = {str(ev.get("id")) for r in c.erp.requests for ev in r.events}
    assert not sent_ids & set(flipped), "a damaged event was sent"
    # no applied body differs from what the station published
    results: set[str] = set()
    for ev in c.erp.applied:
        if ev.get("type") != "inspection.result":
            continue
        data = ev["data"]
        part = c.publisher.parts[data["message_id"]]
        assert part.message_id not in flipped.values()
        assert (data["lot_id"], data["serial"], data["result"], data["measured"]) == (
            part.lot, f"SN-{part.message_id}", "fail" if part.fails else "pass",
            UPPER_LIMIT + 0.1 if part.fails else 10.0), f"altered body applied: {ev}"
        results.add(part.message_id)
    assert len(results) == report.counts["required"]
    assert report.counts["accounted_for"] == {"integrity: bit flipped on disk": VICTIMS}
