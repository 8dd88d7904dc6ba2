"""Soak: a long run through real components with the ERP and the broker misbehaving.

Marked slow: ``make soak`` (EDGE_SOAK=1) runs it for EDGE_SOAK_MINUTES (default 10) with
30-second phases; the default suite (CI) runs a half-minute form with 2.5-second phases: the
same cycle of ERP outages and the broker restart, compressed (three cycles).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.fixtures.mosquitto import (
    inspection,
    message_ids,
    start_publisher,
    wait_connected,
)
from tests.support import eventually, http_sink_yaml, metric, mqtt_source_yaml

LONG_RUN = os.environ.get("EDGE_SOAK") == "1"
MINUTES = float(os.environ.get("EDGE_SOAK_MINUTES", "10")) if LONG_RUN else 0.5

# the run itself plus up to 5 minutes for the final drain and the set-up
pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.timeout(MINUTES * 60 + 420)]


async def test_long_run_with_erp_outages_and_a_broker_restart_loses_nothing(
        gateways, erp, mosquitto):
    minutes = MINUTES
    phase_s = 30.0 if LONG_RUN else 2.5
    gw = await gateways(mqtt_source_yaml(mosquitto.url) + "sinks:\n" + http_sink_yaml(erp.url))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    started = time.monotonic()
    end = started + minutes * 60
    n = 0
    restarted = False
    try:
        while time.monotonic() < end:
            elapsed = time.monotonic() - started
            phase = int(elapsed // phase_s) % 4
            erp.outage(phase == 2)  # one phase in four without the ERP
            if not restarted and elapsed > minutes * 30:  # halfway: the broker restarts
                await asyncio.to_thread(mosquitto.restart, down_s=2.0)
                restarted = True
            for _ in range(20):  # ~50 messages/s
                topic, payload = inspection(f"m{n}", lot=f"L{n // 200}")
                pub.publish(topic, payload, f"m{n}")
                n += 1
            await asyncio.sleep(0.4)  # production's pace
        erp.outage(False)
        assert await asyncio.to_thread(pub.wait_acked, 60)
        acked = set(pub.acked)
        await eventually(lambda: acked <= set(message_ids(erp.events)), timeout=300,
                         what="every acknowledged message at the ERP")
    finally:
        await asyncio.to_thread(pub.stop)
    arrived = message_ids(erp.events)
    assert all(len(ids) == 1 for ids in arrived.values())  # repeats only under one id
    assert metric(gw.metrics.events_dead_lettered, "erp") == 0
