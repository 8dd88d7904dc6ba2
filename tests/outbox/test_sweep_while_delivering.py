"""Deferred delete under load: deliveries recorded while a sweep runs are swept later.

What a user relies on: every delivered event leaves the outbox file soon, also when it was
delivered while a sweep (the disk budget's, the maintenance's) was running. Before, such
rows stayed until the next delivery: an outbox refusing events (backpressure) gets no new
deliveries, so it stayed full of delivered events and never accepted again.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from edge.outbox import Outbox, Resolution
from tests.support import eventually, sub


def _events(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


async def _delivered(ob: Outbox, n: int) -> list[Resolution]:
    return [Resolution(e.seq, e.id, "delivered", status=200) for e in await ob.lease("erp", n)]


async def test_rows_delivered_while_a_full_sweep_runs_leave_with_the_next_sweep(tmp_path: Path):
    async with Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=0.05) as ob:
        await ob.submit([sub(key=f"lot:{i}", n=i) for i in range(10)])
        await ob.complete("erp", await _delivered(ob, 5))
        late = await _delivered(ob, 5)
        # the budget's full sweep is under way when the last deliveries are recorded
        await asyncio.gather(ob.sweep(), ob.complete("erp", late))
        await eventually(lambda: _events(ob.path) == 0, timeout=15,
                         what="every delivered event swept")

