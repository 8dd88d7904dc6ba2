"""A full disk in the fault campaign: real traffic through a gateway child whose outbox
lives on a small file system filled at run time; it ends in the checker.

Promise (DESIGN invariants 1, 2, 7): the gateway stops acknowledging MQTT while it cannot
commit, says why (log, metric, ``/readyz``) and resumes once space returns; nothing
acknowledged is lost. The other storage faults have their own files:
``test_corruption_faults.py`` (outbox corrupted at start, then salvaged) and
``test_integrity_faults.py`` (a payload bit-flipped on disk).

Short forms run in ``make test``; ``EDGE_FAULT_CYCLES`` (``make faults``) lengthens them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

import httpx
import orjson
import pytest

from tests.faults.disk import SmallDisk
from tests.faults.harness import Campaign, fault_cycles

pytestmark = pytest.mark.mqtt


def _rounds(short: int) -> int:
    """Fault rounds: ``short`` in ``make test``, more in the long form."""
    return max(short, fault_cycles(short) // 20)


def _acked(c: Campaign) -> int:
    assert c.publisher is not None
    with c.publisher._lock:
        return len(c.publisher.acked)


async def _get(c: Campaign, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{c.api_port}{path}")


def _queued(db: Path) -> dict[str, tuple[str, str]]:
    """message id → (event id, ordering key) of every inspection result still queued in the
    outbox file (the gateway stopped)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT e.id, e.ordering_key, e.body FROM events e WHERE e.type = "
            "'inspection.result' AND EXISTS (SELECT 1 FROM deliveries d WHERE d.seq = e.seq)"
        ).fetchall()
    finally:
        conn.close()
    out = {}
    for eid, key, body in rows:
        mid = orjson.loads(body)["data"]["message_id"]
        out[mid] = (eid, key)
    return out


# ---------------------------------------------------------------------------- disk full


async def test_disk_full_stops_acks_says_why_and_loses_nothing(tmp_path: Path) -> None:
    with SmallDisk(tmp_path / "state", size_mb=16,
                   mode=os.environ.get("EDGE_FAULT_DISK_MODE") or None) as disk:
        async with Campaign(tmp_path, env=disk.env) as c:
            await c.start_gateway()
            await c.publish_for(1.0)
            for round_ in range(_rounds(1)):
                # the ERP is away too, so nothing leaves the outbox and every new event
                # needs new pages
                await c.erp.set_fault("down")
                c.start_publishing()
                mark = len(c.gateway.lines)
                keep_full = asyncio.create_task(_keep_full(disk))
                try:
                    await c.gateway.await_line("disk full", 30, mark)
                    await asyncio.sleep(0.3)  # commits that raced the fill are acked by now
                    before = await _stored(c)
                    published0 = c._published
                    await asyncio.sleep(1.5)
                    ready = await _get(c, "/readyz")
                    status = (await _get(c, "/status")).json()
                    metrics = (await _get(c, "/metrics")).text
                    after = await _stored(c)
                    published = c._published - published0
                finally:
                    keep_full.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keep_full
                disk.free()
                await c.erp.clear()
                print(f"disk full round {round_} ({disk.mode}): {published} published, "
                      f"{after - before:g} committed while full; /readyz "
                      f"{ready.status_code} {ready.text[:200]}")
                # refuses what it cannot commit, so acknowledges nothing it did not commit
                # (the checker at the end finds every acknowledged message at the ERP). Some
                # commits may still land: a page limit lets them reuse the file's free pages,
                # and on tmpfs a checkpoint that truncates the WAL frees space before the
                # ballast takes it back; they are real commits, acked after.
                assert published > 0 and after - before < published, (published, before, after)
                # says why: readiness, an alarm, a metric, the log
                assert ready.status_code == 503 and "disk full" in ready.text, ready.text
                assert "outbox_storage" in {a["code"] for a in status["alarms"]}, status
                assert 'edge_outbox_write_errors_total{reason="disk_full"}' in metrics
                # resumes once space returns: at the source's next retry of the refused
                # batch, whose backoff (0.5 s doubling, at most 30 s) grew while full
                deadline = asyncio.get_running_loop().time() + 40
                await c.publish_for(1.0)
                while await _stored(c) <= after:
                    assert asyncio.get_running_loop().time() < deadline, "never resumed"
                    await c.publish_for(0.5)
            report = await c.finish(60)
    print(report.summary())
    report.assert_clean()
    assert report.counts["acknowledged"] > 0


async def _stored(c: Campaign) -> float:
    """Events the MQTT source committed (it acks a message only after that commit)."""
    text = (await _get(c, "/metrics")).text
    for line in text.splitlines():
        if line.startswith('edge_events_received_total{source="line1"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _keep_full(disk: SmallDisk) -> None:
    """The disk stays full: space the gateway frees (a truncated WAL) is taken again."""
    while True:
        await asyncio.to_thread(disk.fill)
        await asyncio.sleep(0.1)
