"""The MQTT source's receive path: remembered topic matches and buffered socket reads.

- A topic's subscription match is remembered (one regular expression per subscription
  per message otherwise); the memory stays bounded however many topics arrive, and every
  message still gets its own topic's captures.
- The connection reads the socket in large chunks; bytes it holds while reading is paused
  (the inbox is full) are not announced by the event loop again, so resuming must go on
  with them: a burst through a tiny inbox is stored and acked completely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest

from edge.components import ComponentContext
from edge.config import load_config_text
from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.sim.erp import ErpReceiver
from edge.sources.mqtt import source as source_module
from edge.sources.mqtt.source import MqttSource, _Inbound
from edge.telemetry import Metrics
from tests.fixtures.mosquitto import Broker, inspection, start_publisher, wait_connected
from tests.sources.mqtt.test_source import config, delivered, publish
from tests.support import eventually, mqtt_source_yaml


def _source(tmp: Path) -> MqttSource:
    cfg = load_config_text(f"site: s1\nstate_dir: {tmp}\n"
                           + mqtt_source_yaml("mqtt://127.0.0.1:1"))
    metrics = Metrics()
    ctx = ComponentContext(site="s1", state_dir=str(tmp), metrics=metrics,
                           ingest=Pipeline(Outbox(tmp, cfg.outbox, metrics)))
    return MqttSource(cfg.sources[0], ctx)  # type: ignore[arg-type]


def _message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=1, topic=topic.encode())
    msg.payload = payload
    msg.qos = 1
    return msg


def test_remembered_topic_matches_stay_bounded_and_right(tmp_path: Path,
                                                         monkeypatch: Any) -> None:
    monkeypatch.setattr(source_module, "_TOPIC_MATCHES_MAX", 50)
    src = _source(tmp_path)
    payload = orjson.dumps({"lot": "L1", "sn": "S1", "result": "OK", "value": 1.0})
    seen: dict[str, str] = {}
    for round_ in range(2):  # the second round meets topics forgotten in between
        for i in range(120):
            station = f"st{i}"
            prepared = src._prepare(_Inbound(None, _message(  # type: ignore[arg-type]
                f"plant/s1/line/{i % 3}/station/{station}/inspection", payload), 0.0))
            assert prepared.submission is not None, prepared.reason
            data = prepared.submission.event.data
            assert (data["station"], data["line"]) == (station, str(i % 3))
            seen.setdefault(station, prepared.subscription)
            assert len(src._topic_matches) <= 50
        unmatched = src._prepare(_Inbound(None, _message(  # type: ignore[arg-type]
            f"plant/other/line/1/station/x{round_}/inspection", payload), 0.0))
        assert unmatched.submission is None and unmatched.reason == "unmatched_topic"
    assert set(seen.values()) == {"plant/s1/line/+/station/+/inspection"}


@pytest.mark.mqtt
async def test_a_burst_through_a_tiny_inbox_is_stored_and_acked(
        mosquitto: Broker, erp: ErpReceiver, gateways: Any, monkeypatch: Any) -> None:
    # An inbox of 4 messages, and a broker window of 1000 (MQTT 3.1.1 does not tell the
    # broker the client's window): reading pauses within most socket reads.
    gw = await gateways(config(mosquitto.url, erp, protocol="3.1.1",
                               extra="max_batch: 1\nmax_inflight_messages: 2\n"))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    paused = 0
    conn_type = type(gw.sources["line1"]._conn)
    original = conn_type.pause_reading

    def counting(self: Any) -> None:
        nonlocal paused
        paused += 1
        original(self)

    monkeypatch.setattr(conn_type, "pause_reading", counting)
    ids = [f"t{i:04d}" for i in range(400)]
    await publish(pub, [inspection(i, lot=f"L{n % 5}") for n, i in enumerate(ids)], ids)
    pub.stop()
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["acked"] == len(ids), timeout=20,
                     what="every message acked")
    await delivered(erp, set(ids))
    assert src.status()["unacked"] == 0
    assert paused > 0, "reading never paused: the test did not test the resume"
