"""``kill -9`` of the gateway process while MQTT messages are in flight loses nothing.

The gateway runs as ``python -m edge run -c cfg.yaml``; the publisher, the broker and the
stand-in ERP live outside it. Every message the broker confirmed (PUBACK to the publisher)
must reach the ERP, and a message that arrives twice must arrive under the same event id
(the same Idempotency-Key): the broker redelivers what the killed gateway had stored but
not yet acked, and the outbox dedupe maps the copy to the first event.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge.sim.erp import ErpReceiver
from tests.fixtures.gateway_process import GatewayProcess
from tests.fixtures.mosquitto import Broker, inspection, message_ids, start_publisher
from tests.support import eventually, http_sink_yaml, mqtt_source_yaml

pytestmark = pytest.mark.mqtt



@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_kill_9_with_messages_in_flight_loses_nothing(
        protocol: str, mosquitto: Broker, erp: ErpReceiver, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"site: test-site\nstate_dir: {tmp_path / 'state'}\napi: {{enabled: false}}\n"
        "logging: {level: info}\n"
        + mqtt_source_yaml(mosquitto.url, protocol=protocol)
        + "sinks:\n" + http_sink_yaml(erp.url)
    )
    gw = GatewayProcess(cfg).start()
    try:
        gw.wait_line("MQTT connected")
        pub = await start_publisher(mosquitto.url, protocol=protocol, max_inflight=200)
        sent: list[str] = []
        stop = asyncio.Event()

        async def produce() -> None:
            while not stop.is_set():
                for _ in range(20):
                    i = f"c{len(sent):06d}"
                    sent.append(i)
                    pub.publish(*inspection(i, lot=f"L{len(sent) % 9}"), i)
                await asyncio.sleep(0.01)

        producer = asyncio.create_task(produce())
        # kill once the gateway is busy storing and delivering
        await erp.wait_for(lambda e: len(e.events) >= 300, 20)
        await asyncio.to_thread(gw.kill9)
        killed_at = len(sent)
        await asyncio.sleep(0.5)  # the broker queues for the dead session meanwhile
        mark = len(gw.lines)
        await asyncio.to_thread(gw.start)
        await asyncio.to_thread(gw.wait_line, "MQTT connected", 20.0, mark)
        await asyncio.sleep(0.5)
        stop.set()
        await producer
        assert await asyncio.to_thread(pub.wait_acked, 20)
        pub.stop()
        confirmed = set(pub.acked)
        assert len(confirmed) == len(sent) > killed_at

        await erp.wait_for(lambda e: confirmed <= set(message_ids(e.events)), 40)
        got = message_ids(erp.events)
        assert confirmed <= set(got)
        twice = {m: ids for m, ids in got.items() if len(ids) > 1}
        assert not twice, f"delivered under different event ids: {list(twice.items())[:3]}"
    finally:
        gw.stop()
    assert "Traceback" not in "\n".join(gw.lines)



# The gateway's CLI with PUBACKs switched off: every message is committed and never acked,
# so a kill -9 lands exactly between commit and PUBACK for all of them.
NO_ACK = ("import sys\n"
          "from edge.mqtt import connection as mqtt_conn\n"
          "mqtt_conn.Connection.ack = lambda self, mid: None\n"
          "mqtt_conn.Connection.ack_many = lambda self, mids: None\n"
          "from edge.cli.main import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_a_redelivery_after_a_crash_between_commit_and_puback_maps_to_the_first_id(
        protocol: str, mosquitto: Broker, erp: ErpReceiver, gateways: Any,
        tmp_path: Path) -> None:
    """Invariant 3: the broker resends (DUP) what was committed but not acked; each copy
    maps to its first event id. Payloads repeated on purpose stay separate events."""
    state = tmp_path / "state"
    body = mqtt_source_yaml(mosquitto.url, protocol=protocol) + "sinks:\n" + \
        http_sink_yaml(erp.url)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {state}\napi: {{enabled: false}}\n" + body)
    gw = GatewayProcess(cfg, python_args=("-c", NO_ACK)).start()
    try:
        gw.wait_line("MQTT connected")
        pub = await start_publisher(mosquitto.url, protocol=protocol)
        ids = [f"k{i:02d}" for i in range(10)]
        for i in ids:
            pub.publish(*inspection(i), i)
        for n in range(3):  # the same reading three times, on purpose (no DUP)
            pub.publish(*inspection("rep"), f"rep-{n}")
        assert await asyncio.to_thread(pub.wait_acked, 15)
        pub.stop()
        # every message committed (the ERP got it from the outbox), none acked
        await erp.wait_for(lambda e: sum(len(v) for v in message_ids(e.events).values()) == 13,
                           20)
        await asyncio.to_thread(gw.kill9)
    finally:
        gw.stop()
    assert "Traceback" not in "\n".join(gw.lines)
    before = message_ids(erp.events)
    assert len(before["rep"]) == 3

    gw2 = await gateways(body, state_dir=state)
    src = gw2.sources["line1"]
    await eventually(lambda: src.status()["acked"] == 13, timeout=20,
                     what="the redelivered copies acked")
    # nothing was stored again, so nothing can reach the ERP under a second id
    assert src.counts["duplicates"] == 13 and src.counts["stored"] == 0
    assert message_ids(erp.events) == before
