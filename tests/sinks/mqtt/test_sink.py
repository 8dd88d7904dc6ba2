"""MQTT sink: an edge hold reaches the line's broker while the ERP is down."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.components import Submission
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.events import make_event
from edge.outbox import queries
from tests.support import eventually, metric, reading, sink_yaml

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
    await eventually(lambda: gw.forwarders["line"].last_error is not None, what="a failure")
    assert gw.forwarders["line"].last_error.startswith("connection")
    broker.start()
    await eventually(lambda: metric(gw.metrics.events_delivered, "line") == 1,
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


class Everything:
    """Collects every message on the broker (``#``), raw, from its own thread."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="everything")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe("#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _hold(lot: str) -> Submission:
    return Submission(make_event(type="quality.hold", site="test-site", source="qc",
                                 data={"lot_id": lot, "reason": "SPC rule 1"},
                                 ordering_key=f"lot:{lot}"))


async def test_unsafe_topic_values_are_dead_lettered_and_never_published(gateways, mosquitto):
    """A lot id that is empty or holds ``/``, ``+``, ``#`` or NUL would change the topic's
    levels (``a/b`` published to ``.../lot/a/b/hold``) or be refused by the broker. Before,
    ``a/b`` was published to the wrong topic and the others were dead-lettered with
    reasons that did not say which value was unsafe."""
    everything = Everything(mosquitto.port)
    try:
        gw = await gateways("sinks:\n" + _hold_sink(mosquitto.url))
        unsafe = ["a/b", "+", "#", "", "x\x00y", "L/+/#"]
        ids = await gw.pipeline.submit([_hold(v) for v in unsafe])
        [safe] = await gw.pipeline.submit([_hold("L1")])
        await eventually(lambda: any(b"L1" in p for _, p in everything.messages),
                         what="the safe hold")
        dead = await eventually(lambda: _all_dead(gw, len(unsafe)))
        # A hold sent after every unsafe one was judged: anything wrongly published went
        # through the broker before it (one connection, in order), so it arrives first.
        await gw.pipeline.submit([_hold("L2")])
        await eventually(lambda: any(b"L2" in p for _, p in everything.messages),
                         what="the hold after them")
        assert [t for t, _ in everything.messages] == ["plant/test-site/lot/L1/hold",
                                                       "plant/test-site/lot/L2/hold"]
        by_id = {d["event_id"]: d["reason"] for d in dead}
        assert set(by_id) == set(ids) and safe not in by_id
        for event_id in ids:
            assert by_id[event_id].startswith("unsafe topic value: "), by_id[event_id]
        assert "'a/b' contains '/'" in by_id[ids[0]]
        assert "{data.lot_id} is empty" in by_id[ids[3]]
    finally:
        everything.close()


async def _all_dead(gw, n: int) -> list[dict[str, Any]] | None:
    dead = await gw.outbox.read(lambda c: queries.dlq_list(c, limit=100))
    return dead if len(dead) == n else None


async def test_a_broker_that_refuses_the_credentials_faults_the_sink_not_the_events(
        gateways, mosquitto_factory, tmp_path):
    """Wrong password: every event stays queued (even with ``max_attempts: 1``) and the sink
    raises a ``sink_fault`` alarm. Before, each try was a plain retry, so ``max_attempts``
    dead-lettered the events for a fault of the gateway's own configuration."""
    broker = mosquitto_factory(users={"gateway": "right"})
    (tmp_path / "mqtt.pw").write_text("wrong\n")
    sink = _hold_sink(broker.url).replace(
        "retry: {initial_backoff_s: 0.05, max_backoff_s: 0.3}",
        "retry: {initial_backoff_s: 0.05, max_backoff_s: 0.3, max_attempts: 1}\n"
        "    username: gateway\n    password_file: mqtt.pw")
    gw = await gateways("sinks:\n" + sink)
    await gw.pipeline.submit([_hold("L1"), _hold("L2")])
    fwd = gw.forwarders["line"]
    await eventually(lambda: fwd.status()["alarm"] is not None, what="the alarm")
    assert fwd.status()["alarm"]["code"] == "sink_fault"
    assert "refused the connection" in fwd.status()["alarm"]["message"]
    # two rounds for both events: a plain retry would have dead-lettered them after one
    await eventually(lambda: metric(gw.metrics.delivery_attempts, "line", "sink_fault") >= 4,
                     what="a second round of attempts")
    st = await gw.outbox.stats()
    assert st["dead_letters"] == 0 and st["events"] == 2


async def test_on_dead_letter_continue_lets_the_key_flow_on_and_park_holds_it(
        gateways, mosquitto, tmp_path):
    """Two holds with one ordering key, the first one a dead letter. ``continue``: the
    second is published; ``park`` (default): it waits behind the dead letter."""
    def same_key(lot: str) -> Submission:
        return Submission(make_event(type="quality.hold", site="test-site", source="qc",
                                     data={"lot_id": lot, "reason": "SPC"},
                                     ordering_key="lot:K"))

    everything = Everything(mosquitto.port)
    try:
        flowing = await gateways("sinks:\n" + _hold_sink(mosquitto.url).replace(
            "    routes:", "    on_dead_letter: continue\n    routes:"))
        await flowing.pipeline.submit([same_key("+"), same_key("K2")])
        await eventually(lambda: any(t.endswith("/K2/hold") for t, _ in everything.messages),
                         what="the second hold")
        # one lane, one publish at a time: events go out in outbox order
        parking = await gateways("sinks:\n" + _hold_sink(mosquitto.url).replace(
            "edge-test-holds", "edge-test-holds-2").replace(
            "    routes:", "    max_in_flight: 1\n    max_in_flight_requests: 1\n    routes:"),
            state_dir=tmp_path / "state-2")
        await parking.pipeline.submit([same_key("#"), same_key("K3")])
        await eventually(lambda: _all_dead(parking, 1))
        # A hold of another lot, stored after K3: had K3 not been parked it would be
        # published first, so once this one is in, K3 would be too.
        await parking.pipeline.submit([_hold("M1")])
        await eventually(lambda: any(t.endswith("/M1/hold") for t, _ in everything.messages),
                         what="the other lot's hold")
        assert not any(t.endswith("/K3/hold") for t, _ in everything.messages)
    finally:
        everything.close()


async def test_a_scheduled_route_publishes_its_period_together_and_holds_do_not_wait(
        gateways, erp, mosquitto):
    """Trend data on ``delivery: {scheduled: …}`` waits for the end of its period and is
    then published together; a hold on a realtime route of the same sink goes at once."""
    every_s = 2
    routes = f"""\
sinks:
  - id: line
    type: mqtt
    url: {mosquitto.url}
    client_id: edge-test-trend
    routes:
      - {{events: [machine.reading], topic: "plant/{{site}}/trend",
         delivery: {{scheduled: {{every_s: {every_s}}}}}}}
      - {{events: [quality.hold], topic: "plant/{{site}}/lot/{{data.lot_id}}/hold", retain: true}}
"""
    sub = Subscriber("127.0.0.1", mosquitto.port, "plant/test-site/#")
    try:
        gw = await gateways(routes)
        # stored early in a period, so the period cannot end between the two submits
        await eventually(lambda: time.time() % every_s < every_s / 2, timeout=every_s * 2)
        await gw.pipeline.submit([reading(n) for n in range(3)])
        due = (time.time() // every_s + 1) * every_s
        await gw.pipeline.submit([Submission(make_event(
            type="quality.hold", site="test-site", source="qc",
            data={"lot_id": "L1", "reason": "out of spec"}, ordering_key="lot:L1"))])
        got = [await sub.get() for _ in range(4)]
        arrived = time.time()
    finally:
        sub.close()
    assert got[0][0] == "plant/test-site/lot/L1/hold"  # the hold did not wait
    assert [doc["data"]["n"] for topic, doc, _ in got[1:]] == [0, 1, 2]
    assert arrived >= due  # never before the period ended
