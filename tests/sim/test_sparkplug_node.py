"""The simulated Sparkplug B edge node: its own protobuf writer agrees with the generated
code of ``sparkplug_b.proto``, and ``edge simulate sparkplug`` behaves as an edge node on a
real mosquitto (births, data with a continuous ``seq``, a new birth on NCMD Rebirth,
NDEATH with the birth's ``bdSeq`` at the end)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.sim.sparkplug_node import (
    BOOLEAN,
    DOUBLE,
    FLOAT,
    INT32,
    INT64,
    STRING,
    UINT64,
    Metric,
    decode_payload,
    encode_payload,
)
from edge.sources.mqtt.sparkplug import rebirth_payload
from edge.sources.mqtt.sparkplug_b_pb2 import Payload
from tests.fixtures.mosquitto import Broker
from tests.support import eventually, run_edge

ROOT = Path(__file__).resolve().parents[2]


def test_the_writer_agrees_with_the_generated_code() -> None:
    raw = encode_payload([
        Metric("a", 1, INT32, -5, 123, unit="C", quality=192),
        Metric(None, 2, FLOAT, 0.5),
        Metric("s", None, STRING, "hé"),
        Metric("n", 3, DOUBLE, None),
        Metric("b", 4, BOOLEAN, True),
        Metric("l", 5, INT64, -7),
        Metric("u", 6, UINT64, 2**64 - 1),
    ], timestamp=1_700_000_000_000, seq=255)
    p = Payload.FromString(raw)
    assert (p.timestamp, p.seq) == (1_700_000_000_000, 255)
    a, f, s, n, b, lv, u = p.metrics
    assert (a.name, a.alias, a.timestamp, a.datatype, a.int_value) == ("a", 1, 123, 3, 2**32 - 5)
    assert list(a.properties.keys) == ["engUnit", "Quality"]
    assert a.properties.values[0].string_value == "C"
    assert a.properties.values[1].int_value == 192
    assert not f.name and f.alias == 2 and f.float_value == 0.5
    assert s.string_value == "hé" and n.is_null and b.boolean_value
    assert lv.long_value == 2**64 - 7 and u.long_value == 2**64 - 1
    # and reads what the gateway writes (the rebirth command)
    [m] = decode_payload(rebirth_payload(1))["metrics"]
    assert m == {"name": "Node Control/Rebirth", "datatype": 11, "value": True}


class Observer:
    """A plain paho subscriber that keeps every message of a group."""

    def __init__(self, broker: Broker, group: str) -> None:
        self.messages: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(f"spBv1.0/{group}/#", 1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, Payload.FromString(msg.payload)))

    def of(self, mtype: str) -> list[Any]:
        with self._lock:
            return [p for t, p in self.messages if t.split("/")[2] == mtype]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.mqtt
async def test_edge_simulate_sparkplug(mosquitto: Broker) -> None:
    obs = Observer(mosquitto, "simg")
    try:
        cli = asyncio.create_task(run_edge(
            "simulate", "sparkplug", "--broker", mosquitto.url, "--group", "simg",
            "--node", "n1", "--devices", "d1,d2", "--rate", "20", "--qos", "1",
            "--duration", "4", cwd=ROOT))
        await eventually(lambda: obs.of("DDATA"), what="data from the node")
        obs.client.publish("spBv1.0/simg/NCMD/n1", rebirth_payload(1), qos=1)
        await eventually(lambda: len(obs.of("NBIRTH")) == 2, what="the rebirth")
        code, out, err = await cli
        assert code == 0, err
        assert "2 NBIRTH, 1 rebirth requests answered" in out
        await eventually(lambda: obs.of("NDEATH"), what="NDEATH at the end")
    finally:
        obs.stop()
    births = obs.of("NBIRTH")
    assert [b.seq for b in births] == [0, 0]
    names = {m.name for m in births[0].metrics}
    assert {"bdSeq", "Node Control/Rebirth", "Cabinet/Temperature"} <= names
    assert all(m.HasField("alias") for m in births[0].metrics if m.name == "Cabinet/Temperature")
    [death] = obs.of("NDEATH")
    bd = [m.long_value for m in death.metrics if m.name == "bdSeq"]
    assert bd == [m.long_value for m in births[0].metrics if m.name == "bdSeq"]
    # one seq counter for the node and its devices, from each NBIRTH on, wrapping at 256
    seqs = [p.seq for t, p in obs.messages if t.split("/")[2] != "NDEATH"]
    for prev, cur in zip(seqs, seqs[1:], strict=False):
        assert cur == (prev + 1) % 256 or cur == 0, seqs
    data = obs.of("DDATA")
    assert data and all(not m.name and m.HasField("alias") for p in data for m in p.metrics)
