"""Bookkeeping never stops a healthy stream (DESIGN invariant 2), measured from outside.

The field report: with ``outbox.max_size_mb: 8`` and the ERP up, the gateway stopped
acking after 43,355 messages and stayed in backpressure with 0 events queued — every
message had written a dedupe row kept for a week. Here a real mosquitto, a real gateway
with a 4 MiB budget and the stand-in ERP up and keeping up: 30,000 messages (payloads a
device repeats) must all be acknowledged and delivered, with no backpressure, no expiry
and a dedupe table that stays small.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.sim.erp import ErpReceiver
from tests.fixtures.mosquitto import Broker, start_publisher, wait_connected
from tests.support import http_sink_yaml, mqtt_source_yaml, sample

pytestmark = pytest.mark.mqtt

MESSAGES = 30_000


async def test_a_small_budget_carries_a_long_stream_while_the_erp_is_up(
        mosquitto: Broker, erp: ErpReceiver, gateways: Callable[..., Any],
        tmp_path: Path) -> None:
    erp.record = False  # 30,000 events: count them, do not keep them
    gw = await gateways("outbox: {max_size_mb: 4}\n" + mqtt_source_yaml(mosquitto.url)
                        + "sinks:\n" + http_sink_yaml(erp.url))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    states = ("running", "idle", "setup", "running", "running")  # repeats on purpose
    for i in range(MESSAGES):
        pub.publish(f"raw/press{i % 5}", orjson.dumps({"value": states[i % 5]}), f"m{i}")
        if i % 500 == 499:  # a stream the ERP keeps up with: a few hundred queued at most
            assert await asyncio.to_thread(pub.wait_acked, 60), "broker did not confirm"
            await erp.wait_for(lambda r, n=i: r.accepted_count >= n - 100, 60)
    assert await asyncio.to_thread(pub.wait_acked, 60), "broker did not confirm"
    await erp.wait_for(lambda r: r.accepted_count >= MESSAGES, 120)
    assert erp.accepted_count == MESSAGES  # every message once: repeats are events too
    assert sample(gw, "edge_events_quarantined_total", source="line1",
                  reason="invalid_data") == 0
    assert sample(gw, "edge_outbox_backpressure") == 0
    assert sample(gw, "edge_events_expired_total", **{"class": "low"}) == 0
    db = sqlite3.connect(Path(gw.config.state_dir) / "outbox.db")
    try:
        dedupe_rows = db.execute("SELECT COUNT(*) FROM dedupe").fetchone()[0]
    finally:
        db.close()
    assert dedupe_rows < MESSAGES // 3  # the redelivery horizon, not a week of history
