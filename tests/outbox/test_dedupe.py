"""Dedupe matches redeliveries only and stays bounded (DESIGN invariants 2 and 3).

Content hashes (an MQTT message without a station id) are matched only for a copy the
source flags as redelivered, and only the newest ``redelivery_horizon`` of them are kept;
identity keys (station message ids) are matched within ``dedupe_window_s``. A small disk
budget carries an endless stream while the sinks keep up: bookkeeping never causes
backpressure.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from edge.components import Submission
from edge.config import OutboxConfig
from edge.errors import OutboxFullError
from edge.outbox import Outbox, Resolution
from tests.support import eventually, metric, sub


def message(payload: str, *, dup: bool = False, horizon: int = 100) -> Submission:
    """What the MQTT source submits for a message without a configured dedupe_key."""
    item = sub("machine.state", state=payload)
    item.dedupe_key = hashlib.sha256(payload.encode()).hexdigest()
    item.redelivery_only, item.redelivered, item.redelivery_horizon = True, dup, horizon
    return item


async def _count(ob: Outbox, sql: str) -> int:
    return int(await ob.read(lambda c: c.execute(sql).fetchone()[0]))


@pytest.fixture
def outbox(erp_outbox: Outbox) -> Outbox:
    return erp_outbox


async def test_a_device_repeating_the_same_payload_gets_every_event_stored(outbox: Outbox):
    ids = [(await outbox.submit([message('{"state":"running"}')]))[0] for _ in range(3)]
    assert len(set(ids)) == 3
    assert await _count(outbox, "SELECT COUNT(*) FROM events") == 3


async def test_a_redelivered_copy_maps_to_the_stored_event(outbox: Outbox):
    [first] = await outbox.submit([message('{"state":"running"}')])
    assert await outbox.submit([message('{"state":"running"}', dup=True)]) == [first]
    assert await _count(outbox, "SELECT COUNT(*) FROM events") == 1


async def test_an_identity_key_matches_any_later_copy_within_the_window(outbox: Outbox):
    a = sub(dedupe="station7:msg-41")
    [first] = await outbox.submit([a])
    again = sub(dedupe="station7:msg-41")  # not flagged as redelivered: still the same id
    assert await outbox.submit([again]) == [first]


async def test_only_the_newest_redelivery_horizon_of_content_keys_is_kept(outbox: Outbox):
    ids = [(await outbox.submit([message(f'{{"n":{i}}}', horizon=20)]))[0]
           for i in range(50)]
    assert await _count(outbox, "SELECT COUNT(*) FROM dedupe") == 50
    await outbox.prune_redelivery_horizon()
    assert await _count(outbox, "SELECT COUNT(*) FROM dedupe") == 20  # the horizon
    # the newest still match a redelivery; the oldest no longer can (long acknowledged)
    newest = await outbox.submit([message('{"n":49}', dup=True, horizon=20)])
    assert await _count(outbox, "SELECT COUNT(*) FROM events") == 50
    assert newest != []
    assert newest == [ids[49]]
    oldest = await outbox.submit([message('{"n":0}', dup=True, horizon=20)])
    assert oldest != [ids[0]]  # beyond the horizon: stored as a new event
    assert await _count(outbox, "SELECT COUNT(*) FROM events") == 51


async def test_a_derived_event_follows_its_cause(outbox: Outbox):
    """Stored right after its cause; dropped with it when the cause is a redelivery."""
    def with_hold(payload: str, dup: bool) -> list[Submission]:
        cause = message(payload, dup=dup)
        hold = sub("nonconformance", lot_id="L1", reason="out of spec")
        hold.derived = True
        return [cause, hold]

    first = await outbox.submit(with_hold('{"measured":11}', dup=False))
    assert len(set(first)) == 2
    again = await outbox.submit(with_hold('{"measured":11}', dup=True))
    assert again[0] == first[0] and again[1] == ""  # the redelivery and its derived event
    assert await _count(outbox, "SELECT COUNT(*) FROM events") == 2
    repeat = await outbox.submit(with_hold('{"measured":11}', dup=False))  # a new failure
    assert repeat[0] not in first and repeat[1] not in ("", *first)
    types = await outbox.read(lambda c: [r[0] for r in c.execute(
        "SELECT type FROM events ORDER BY seq")])
    assert types == ["machine.state", "nonconformance"] * 2


async def test_a_small_budget_carries_an_endless_stream_while_the_sink_keeps_up(
        tmp_path: Path):
    """2 MiB budget, 20,000 low-class events with content keys and audit rows, a sink that keeps
    up: never backpressure (before, dedupe rows kept for a week filled the budget and the
    gateway stopped accepting with nothing queued)."""
    cfg = OutboxConfig(max_size_mb=2, alarm_at_percent=70, expire_at_percent=80)
    ob = Outbox(tmp_path, cfg, router=lambda ev: ["erp"], maintenance_interval_s=0.05)
    await ob.open()
    delivered = 0

    async def sink() -> None:
        nonlocal delivered
        while True:
            batch = await ob.lease("erp", 500)
            if not batch:
                await asyncio.sleep(0.01)
                continue
            await ob.complete("erp", [Resolution(e.seq, e.id, "delivered", 200) for e in batch])
            delivered += len(batch)

    forwarder = asyncio.create_task(sink())
    try:
        for i in range(200):
            batch = [message(f'{{"n":{i * 100 + j},"pad":"{"x" * 40}"}}', horizon=200)
                     for j in range(100)]
            try:
                await ob.submit(batch)
            except OutboxFullError:
                pytest.fail(f"backpressure after {i * 100} events with the sink keeping up")
            # a stream the sink keeps up with: <= 500 queued
            await eventually(lambda: delivered >= (i + 1) * 100 - 500,  # noqa: B023
                             timeout=30, interval=0.005)
        await eventually(lambda: delivered >= 20_000, timeout=30)
        assert metric(ob.metrics.outbox_backpressure) == 0
        assert metric(ob.metrics.events_expired, "low") == 0  # none given up
        assert await _count(ob, "SELECT COUNT(*) FROM dedupe") <= 20_000 // 4
    finally:
        forwarder.cancel()
        await asyncio.gather(forwarder, return_exceptions=True)
        await ob.close()
