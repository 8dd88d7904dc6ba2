"""Lot state survives ``kill -9``: a child ``edge run`` holds a lot from a failing result
over MQTT, is killed, and after the restart still knows the episode; the release (through
the CLI) clears the line's retained hold topic, and the next failure opens episode 2,
which again survives a kill."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.sim.erp import ErpReceiver
from tests.fixtures.gateway_process import GatewayProcess
from tests.fixtures.mosquitto import Broker, inspection, start_publisher
from tests.quality.support import Subscriber
from tests.support import eventually, free_port, http_sink_yaml, mqtt_source_yaml, run_edge

pytestmark = pytest.mark.mqtt

HOLD_TOPIC = "plant/test-site/lot/L1/hold"


def _config(tmp_path: Path, broker: Broker, erp: ErpReceiver, port: int) -> Path:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        f"site: test-site\nstate_dir: {tmp_path / 'state'}\n"
        f'api: {{listen: "127.0.0.1:{port}"}}\nlogging: {{level: info}}\n'
        "rules:\n  - {type: spec_limits, field: measured, upper: 10.05}\n"
        + mqtt_source_yaml(broker.url)
        + "sinks:\n" + http_sink_yaml(erp.url)
        + f"""\
  - id: line
    type: mqtt
    url: {broker.url}
    client_id: edge-test-holds
    retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.3}}
    routes:
      - {{events: [quality.hold, quality.release], topic: "plant/{{site}}/lot/{{data.lot_id}}/hold",
         retain: true}}
""")
    return cfg


async def _lot(client: httpx.AsyncClient, lot: str) -> dict[str, Any] | None:
    try:
        lots = (await client.get("/lots")).json()["lots"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None  # not up yet
    return next((x for x in lots if x["lot_id"] == lot), None)


async def _restart(gw: GatewayProcess) -> None:
    await asyncio.to_thread(gw.kill9)
    mark = len(gw.lines)
    await asyncio.to_thread(gw.start)
    await gw.await_line("gateway started", 30, mark)


async def test_episode_state_survives_kill_9(mosquitto: Broker, erp: ErpReceiver,
                                             tmp_path: Path) -> None:
    port = free_port()
    cfg = _config(tmp_path, mosquitto, erp, port)
    gw = GatewayProcess(cfg).start()
    pub = None
    try:
        await gw.await_line("MQTT connected", 30)
        pub = await start_publisher(mosquitto.url)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            pub.publish(*inspection("m1", lot="L1", value=10.5), "m1")
            await eventually(lambda: _held(client, 1), what="L1 held in episode 1")
            await _restart(gw)
            lot = await eventually(lambda: _lot(client, "L1"))
            assert (lot["state"], lot["episode"], lot["failures"]) == ("hold", 1, 1)

            line = Subscriber(mosquitto.port, HOLD_TOPIC)
            try:
                _, held, _ = await line.get()  # retained, or resent after the kill
                assert held["type"] == "quality.hold"
                rc, out, err = await run_edge("lot", "release", "L1", "-c", str(cfg),
                                              "--reason", "sorted", "--by", "J. Doe",
                                              cwd=tmp_path)
                assert rc == 0, err
                while held["type"] == "quality.hold":
                    _, held, _ = await line.get()
                assert held["type"] == "quality.release"
            finally:
                line.close()
            late = Subscriber(mosquitto.port, HOLD_TOPIC, client_id="late-controller")
            try:  # a controller that connects now gets the release: the hold is cleared
                _, doc, retained = await late.get()
                assert (doc["type"], retained) == ("quality.release", True)
            finally:
                late.close()

            pub.publish(*inspection("m2", lot="L1", value=10.6), "m2")
            await eventually(lambda: _held(client, 2), what="L1 held in episode 2")
            await _restart(gw)
            lot = await eventually(lambda: _lot(client, "L1"))
            assert (lot["state"], lot["episode"]) == ("hold", 2)
        # one hold per episode (a kill may make the ERP see one twice, under its one id)
        await erp.wait_for(lambda e: sorted({x["id"]: x["data"]["episode"] for x in e.events
                                             if x["type"] == "quality.hold"}.values())
                           == [1, 2], within_s=20)
    finally:
        if pub is not None:
            pub.stop()
        gw.stop()
    assert "Traceback" not in "\n".join(gw.lines)


async def _held(client: httpx.AsyncClient, episode: int) -> bool:
    lot = await _lot(client, "L1")
    return lot is not None and lot["state"] == "hold" and lot["episode"] == episode
