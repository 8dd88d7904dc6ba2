"""MQTT sink: an edge hold reaches the line's broker while the ERP is down."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.components import Submission
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.events import make_event
from tests.fixtures.mosquitto import wait_until
from tests.sinks.helpers import sink_yaml

pytestmark = pytest.mark.mqtt


class Subscriber:
    """A plain paho subscriber on its own thread, as a line controller would be."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, dict[str, Any], bool]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="line-controller")
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, orjson.loads(m.payload), bool(m.retain)))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(host, port)
        self.client.loop_start()
        assert subscribed.wait(10)

    async def get(self, timeout: float = 15.0) -> tuple[str, dict[str, Any], bool]:
        return await asyncio.to_thread(self.messages.get, timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _hold_sink(url: str) -> str:
    return f"""\
  - id: line
    type: mqtt
    url: {url}
    client_id: edge-test-holds
    retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.3}}
    circuit_breaker: {{failure_threshold: 3, open_s: 0.2, max_open_s: 0.5}}
    routes:
      - {{events: [quality.hold], topic: "plant/{{site}}/lot/{{data.lot_id}}/hold",
         retain: true}}
"""


RULES = """\
rules:
  - {type: spec_limits, field: measured, lower: 9.9, upper: 10.1}
"""


def _inspection(lot: str, measured: float) -> Submission:
    return Submission(make_event(type="inspection.result", site="test-site", source="st7",
                                 data={"lot_id": lot, "result": "pass", "measured": measured},
                                 ordering_key=f"lot:{lot}"))


async def test_hold_reaches_the_line_while_the_erp_is_down(gateways, erp, mosquitto):
    erp.outage(True)
    sub = Subscriber("127.0.0.1", mosquitto.port, "plant/+/lot/+/hold")
    try:
        gw = await gateways(RULES + sink_yaml(erp.url) + _hold_sink(mosquitto.url))
        await gw.pipeline.submit([_inspection("L7", 10.5)])
        topic, doc, _ = await sub.get()
        assert topic == "plant/test-site/lot/L7/hold"
        assert doc["type"] == "quality.hold" and doc["data"]["lot_id"] == "L7"
        assert "above upper limit" in doc["data"]["reason"]
        assert erp.events == []  # the ERP still has nothing; the line already knows
    finally:
        sub.close()


async def test_hold_published_before_the_broker_came_up_is_retained(
        gateways, erp, mosquitto_factory):
    broker = mosquitto_factory()
    url = broker.url
    broker.stop()
    gw = await gateways(RULES + sink_yaml(erp.url) + _hold_sink(url))
    await gw.pipeline.submit([_inspection("L8", 9.0)])
    await wait_until(lambda: gw.forwarders["line"].last_error is not None, what="a failure")
    assert gw.forwarders["line"].last_error.startswith("connection")
    broker.start()
    await wait_until(lambda: gw.metrics.events_delivered.labels("line")._value.get() == 1,
                     timeout=30, what="the hold delivered")
    sub = Subscriber("127.0.0.1", broker.port, "plant/+/lot/+/hold")
    try:  # a controller that connects later still gets the hold (retained)
        topic, doc, retained = await sub.get()
        assert topic == "plant/test-site/lot/L8/hold" and retained
    finally:
        sub.close()


def test_topic_templates_and_qos_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config_text("site: p\n" + "sinks:\n" + _hold_sink("mqtt://127.0.0.1:1")
                         .replace("/hold\"", "/#\"").replace("retain: true", "qos: 2"))
    text = str(err.value)
    assert "sinks[0].routes[0].topic: must be a topic without wildcards" in text
    assert "sinks[0].routes[0].qos: must be 0 or 1, got 2" in text
