"""Sparkplug B decoding and state without a broker: values by datatype, aliases, ``seq``
and ``bdSeq`` bookkeeping, hostile input, config errors, and the dedupe keys through a
real outbox (a redelivered copy maps to the stored events)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.components import ComponentContext
from edge.config import load_config_text
from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.sources.mqtt.config import SubscriptionConfig
from edge.sources.mqtt.source import MqttSource, _Inbound
from edge.sources.mqtt.sparkplug import Decoded, SparkplugMapping, SparkplugState
from edge.sources.mqtt.sparkplug_b_pb2 import Payload
from edge.telemetry import Metrics
from tests.support import mqtt_source_yaml

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


def mapping(**options: Any) -> SparkplugMapping:
    sub = SubscriptionConfig.model_validate(
        {"topic": "spBv1.0/{group}/#", "format": "sparkplug_b", **options})
    return SparkplugMapping(sub, site="s1", source="spb")


def payload(*metrics: dict[str, Any], seq: int | None = None, ts: int | None = T0,
            ) -> bytes:
    p = Payload()
    if ts is not None:
        p.timestamp = ts
    if seq is not None:
        p.seq = seq
    for m in metrics:
        metric = p.metrics.add()
        props = m.pop("properties", None)
        for k, v in m.items():
            setattr(metric, k, v)
        for key, (ptype, field, value) in (props or {}).items():
            metric.properties.keys.append(key)
            pv = metric.properties.values.add(type=ptype)
            setattr(pv, field, value)
    return bytes(p.SerializeToString())


class Node:
    """Feeds one state as an edge node would, ``seq`` counted here."""

    def __init__(self, state: SparkplugState | None = None, m: SparkplugMapping | None = None
                 ) -> None:
        self.state = state or SparkplugState()
        self.mapping = m or mapping()
        self.seq = 0
        self.now = 1000.0

    def send(self, mtype: str, *metrics: dict[str, Any], device: str | None = None,
             redelivered: bool = False, seq: int | None = None, **kw: Any) -> Decoded:
        if mtype == "NBIRTH":
            self.seq = 0
        if seq is None and mtype != "NDEATH":
            seq, self.seq = self.seq, (self.seq + 1) % 256
        topic = f"spBv1.0/g1/{mtype}/n1" + (f"/{device}" if device else "")
        self.now += 1
        return self.state.handle(self.mapping, topic, payload(*metrics, seq=seq, **kw),
                                 {"group": "g1"}, redelivered=redelivered, now=self.now)

    def birth(self, bd_seq: int = 0) -> Decoded:
        return self.send("NBIRTH", {"name": "bdSeq", "datatype": 4, "long_value": bd_seq},
                         {"name": "Node Control/Rebirth", "datatype": 11,
                          "boolean_value": False},
                         {"name": "Temp", "alias": 1, "datatype": 10, "double_value": 20.5,
                          "properties": {"engUnit": (12, "string_value", "C")}})


def values(d: Decoded) -> dict[str, Any]:
    return {r.event.data["metric"]: r.event.data["value"] for r in d.readings}


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(("datatype", "field", "raw", "expected"), [
    (1, "int_value", 0xFFFFFFFB, -5),             # Int8, two's complement in 32 bits
    (2, "int_value", 0xFFFF8000, -32768),        # Int16
    (3, "int_value", 0x7FFFFFFF, 2**31 - 1),     # Int32
    (4, "long_value", 2**64 - 7, -7),            # Int64
    (7, "int_value", 0xFFFFFFFF, 2**32 - 1),     # UInt32 stays unsigned
    (8, "long_value", 2**64 - 1, 2**64 - 1),     # UInt64
    (9, "float_value", 0.1, 0.1),                # Float: the shortest 32-bit decimal
    (10, "double_value", 0.1, 0.1),
    (11, "boolean_value", True, True),
    (12, "string_value", "héllo", "héllo"),
    (13, "long_value", T0, "2026-01-01T00:00:00Z"),  # DateTime
    (17, "bytes_value", b"\x00\xff", "AP8="),      # Bytes as base64
])
def test_values_by_datatype(datatype: int, field: str, raw: Any, expected: Any) -> None:
    node = Node()
    node.birth()
    d = node.send("NDATA", {"name": "x", "datatype": datatype, field: raw})
    assert values(d) == {"x": expected}
    assert not d.rejects


def test_null_quality_and_unit() -> None:
    node = Node()
    node.birth()
    d = node.send("NDATA",
                  {"alias": 1, "is_null": True},
                  {"name": "q", "datatype": 10, "double_value": 1.0,
                   "properties": {"Quality": (3, "int_value", 0)}},
                  {"name": "good", "datatype": 10, "double_value": 2.0,
                   "properties": {"Quality": (3, "int_value", 192)}},
                  {"name": "nan", "datatype": 10, "double_value": math.nan})
    data = {r.event.data["metric"]: r.event.data for r in d.readings}
    assert data["Temp"]["value"] is None and data["Temp"]["status"] == "BadNoData"
    assert data["Temp"]["unit"] == "C"  # from the birth: data does not repeat it
    assert data["q"]["status"] == "Bad" and data["q"]["quality"] == 0
    assert data["good"]["status"] == "Good"
    assert data["nan"]["value"] is None and data["nan"]["status"] == "BadOutOfRange"


def test_dataset_values_are_quarantined_the_rest_stored() -> None:
    node = Node()
    node.birth()
    p = Payload.FromString(payload({"alias": 1, "double_value": 3.0}, seq=1))
    ds = p.metrics.add(name="table", datatype=16)
    ds.dataset_value.num_of_columns = 1
    d = node.state.handle(node.mapping, "spBv1.0/g1/NDATA/n1", p.SerializeToString(), {},
                          redelivered=False, now=0)
    assert values(d) == {"Temp": 3.0}
    assert [r.reason for r in d.rejects] == ["unsupported_datatype"]


# --------------------------------------------------------------------------- state


def test_births_define_aliases_and_control_metrics_are_not_readings() -> None:
    node = Node()
    d = node.birth()
    assert values(d) == {"Temp": 20.5}
    dev = node.send("DBIRTH", {"name": "Speed", "alias": 7, "datatype": 3, "int_value": 5},
                    device="d1")
    assert values(dev) == {"Speed": 5}
    data = node.send("DDATA", {"alias": 7, "int_value": 6}, {"alias": 1, "double_value": 21.0},
                     device="d1")
    assert values(data) == {"Speed": 6, "Temp": 21.0}  # device table, then the node's
    ev = data.readings[0].event
    assert ev.data["signal"] == "n1/d1/Speed" and ev.ordering_key == "spb:g1/n1/d1"
    assert ev.source_ts is not None
    assert data.readings[1].event.data["signal"] == "n1/d1/Temp"
    assert node.birth().readings[0].event.data["signal"] == "n1/Temp"
    # a new NBIRTH drops the device tables: the device must be born again
    after = node.send("DDATA", {"alias": 7, "int_value": 8}, device="d1")
    assert [r.reason for r in after.rejects] == ["unknown_alias"]
    assert after.rebirth == ("g1", "n1", "unknown_alias")


def test_unknown_alias_asks_for_a_rebirth_once_per_interval() -> None:
    node = Node(m=mapping(sparkplug={"rebirth_interval_s": 100}))
    first = node.send("NDATA", {"alias": 1, "double_value": 1.0},
                      {"name": "named", "datatype": 10, "double_value": 2.0})
    assert values(first) == {"named": 2.0}  # a metric with a name needs no birth
    [rej] = first.rejects
    assert rej.reason == "unknown_alias" and rej.meta["sparkplug"]["metrics"] == [{"alias": 1}]
    assert first.rebirth == ("g1", "n1", "unknown_alias")
    second = node.send("NDATA", {"alias": 1, "double_value": 1.0})
    assert second.rejects and second.rebirth is None  # rate-limited
    node.now += 100
    assert node.send("NDATA", {"alias": 1, "double_value": 1.0}).rebirth is not None
    off = Node(m=mapping(sparkplug={"rebirth": False}))
    assert off.send("NDATA", {"alias": 1, "double_value": 1.0}).rebirth is None


def test_seq_gaps_wrap_and_redeliveries() -> None:
    node = Node()
    node.birth()
    for _ in range(300):  # wraps 255 → 0 without a gap
        assert not node.send("NDATA", {"alias": 1, "double_value": 1.0}).audits
    node.seq = (node.seq + 2) % 256
    gap = node.send("NDATA", {"alias": 1, "double_value": 1.0})
    [(state, reason, detail)] = gap.audits
    assert (state, reason) == ("gap", "sparkplug_seq_gap")
    assert detail["seq"] == (detail["expected_seq"] + 2) % 256
    assert gap.rebirth == ("g1", "n1", "sequence_gap")
    # a copy the broker resends is not a gap, however old its seq
    again = node.send("NDATA", {"alias": 1, "double_value": 1.0}, seq=3, redelivered=True)
    assert not again.audits
    assert node.state.counts["seq_gaps"] == 1


def test_ndeath_of_the_current_birth_is_a_gap_an_old_will_is_ignored() -> None:
    node = Node()
    node.birth(bd_seq=4)
    stale = node.send("NDEATH", {"name": "bdSeq", "datatype": 4, "long_value": 3})
    assert not stale.audits and stale.notes
    assert node.state.status()["edge_nodes_online"] == 1
    death = node.send("NDEATH", {"name": "bdSeq", "datatype": 4, "long_value": 4})
    assert death.audits == [("gap", "sparkplug_node_death",
                              {"group": "g1", "edge_node": "n1", "bdSeq": 4})]
    assert death.conditions[0][0] == "sparkplug_offline:g1/n1" and death.conditions[0][1]
    assert node.state.status()["edge_nodes_online"] == 0
    back = node.birth(bd_seq=5)
    assert ("sparkplug_offline:g1/n1", None) in back.conditions
    assert [a[:2] for a in back.audits] == [("reconnected", "sparkplug_node_birth")]
    ddeath = node.send("DDEATH", device="d1")
    assert [a[:2] for a in ddeath.audits] == [("gap", "sparkplug_device_death")]


def test_topics_that_are_not_sparkplug() -> None:
    state, m = SparkplugState(), mapping()

    def reasons(topic: str, raw: bytes = b"") -> list[str] | str:
        d = state.handle(m, topic, raw, {}, redelivered=False, now=0)
        return d.ignored or [r.reason for r in d.rejects]

    assert reasons("spBv1.0/STATE/host1", b'{"online": true}') == "STATE"
    assert reasons("spBv1.0/g1/NCMD/n1") == "NCMD"
    assert reasons("spBv1.0/g1/DCMD/n1/d1") == "DCMD"
    assert reasons("spBv1.0/g1/NDATA") == ["not_sparkplug"]
    assert reasons("spBv1.0/g1/DDATA/n1") == ["not_sparkplug"]
    assert reasons("spBv1.0/g1/NDATA/n1/d1") == ["not_sparkplug"]
    assert reasons("spBv1.0/g1/XDATA/n1") == ["not_sparkplug"]
    assert reasons("spBv1.0/g1/NDATA/n1", b"\xff\xff\xff") == ["not_protobuf"]


@settings(max_examples=300, deadline=None)
@given(mtype=st.sampled_from(["NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH"]),
       raw=st.binary(max_size=200), dup=st.booleans())
def test_hostile_payloads_never_raise(mtype: str, raw: bytes, dup: bool) -> None:
    state = SparkplugState()
    topic = f"spBv1.0/g/{mtype}/n" + ("/d" if mtype.startswith("D") else "")
    d = state.handle(mapping(), topic, raw, {}, redelivered=dup, now=0)
    for r in d.readings:
        assert r.event.integrity_ok()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("options", "message"), [
    ({"fields": {"a": "b"}}, "fields does not apply"),
    ({"source_ts": "ts"}, "source_ts does not apply"),
    ({"ordering_key": "{lot}"}, "uses {lot}"),
    ({"sparkplug": {"signal": "{a.b}"}}, "plain names"),
    ({"sparkplug": {"rebirth_interval_s": -1}}, "greater than or equal"),
    ({"sparkplug": {"rebirth": True, "colour": 1}}, "Extra inputs"),
])
def test_config_errors_name_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SubscriptionConfig.model_validate(
            {"topic": "spBv1.0/{group}/#", "format": "sparkplug_b", **options})
    with pytest.raises(ValidationError, match="need format: sparkplug_b"):
        SubscriptionConfig.model_validate({"topic": "a/b", "event": "x.y", "sparkplug": {}})


def test_templates_use_captures_and_static() -> None:
    m = mapping(static={"area": "press"}, ordering_key="{area}:{edge_node}",
                dedupe_key="{edge_node}:{timestamp}:{seq}:{index}",
                sparkplug={"signal": "{group}.{metric}"})
    node = Node(m=m)
    [r] = node.birth().readings
    assert r.event.data["signal"] == "g1.Temp" and r.event.data["area"] == "press"
    assert r.event.ordering_key == "press:n1"
    assert r.dedupe_key == f"n1:{T0}:0:2" and not r.redelivery_only


# --------------------------------------------------------------------------- dedupe


@pytest.fixture
async def source(tmp_path: Path) -> Any:
    cfg = load_config_text(
        f"site: s1\nstate_dir: {tmp_path}\n"
        + mqtt_source_yaml("mqtt://127.0.0.1:1", subscriptions=(
            "- topic: spBv1.0/{group}/#\n  format: sparkplug_b\n")))
    metrics = Metrics()
    outbox = Outbox(tmp_path, cfg.outbox, metrics)
    await outbox.open()
    ctx = ComponentContext(site="s1", state_dir=str(tmp_path), metrics=metrics,
                           ingest=Pipeline(outbox))
    yield MqttSource(cfg.sources[0], ctx)
    await outbox.close()


def _message(topic: str, raw: bytes, dup: bool = False) -> Any:
    import paho.mqtt.client as mqtt

    msg = mqtt.MQTTMessage(mid=1, topic=topic.encode())
    msg.payload, msg.qos, msg.dup = raw, 1, dup
    return msg


async def _store(source: MqttSource, msg: Any) -> list[str]:
    records = source._records(source._prepare(_Inbound(None, msg, 0)))  # type: ignore[arg-type]
    subs = [r.submission for r in records if r.submission is not None]
    return await source.ingest.submit(subs, chain=source.id)


@pytest.mark.parametrize("with_timestamp", [True, False])
async def test_a_redelivered_message_maps_to_the_stored_events(
        source: MqttSource, with_timestamp: bool) -> None:
    ts = T0 if with_timestamp else None
    birth = payload({"name": "a", "alias": 1, "datatype": 10, "double_value": 1.0},
                    {"name": "b", "alias": 2, "datatype": 10, "double_value": 2.0},
                    seq=0, ts=ts)
    first = await _store(source, _message("spBv1.0/g/NBIRTH/n", birth))
    copy = await _store(source, _message("spBv1.0/g/NBIRTH/n", birth, dup=True))
    assert len(first) == 2 and copy == first
    unflagged = await _store(source, _message("spBv1.0/g/NBIRTH/n", birth))
    # with the node's timestamp the bytes identify the message: any copy is the same one;
    # without it only a copy the broker flags is matched (like JSON)
    assert (unflagged == first) is with_timestamp


def test_a_snapshot_is_trusted_only_while_seq_continues() -> None:
    node = Node()
    node.birth()
    node.send("DBIRTH", {"name": "Speed", "alias": 7, "datatype": 3, "int_value": 5,
                         "properties": {"engUnit": (12, "string_value", "rpm")}}, device="d1")
    doc = node.state.snapshot()
    assert not node.state.dirty

    later = Node(SparkplugState())
    assert later.state.restore(doc) == 1
    later.seq = node.seq  # the seq continues: nothing was missed
    d = later.send("DDATA", {"alias": 7, "int_value": 6}, device="d1")
    assert values(d) == {"Speed": 6} and d.readings[0].event.data["unit"] == "rpm"
    assert not d.audits and d.rebirth is None

    missed = Node(SparkplugState())
    missed.state.restore(doc)
    missed.seq = node.seq + 5  # five messages (a birth among them?) never arrived
    d = missed.send("DDATA", {"alias": 7, "int_value": 6}, device="d1")
    assert [r.reason for r in d.rejects] == ["unknown_alias"]
    assert [a[:2] for a in d.audits] == [("gap", "sparkplug_seq_gap")]
    assert d.rebirth is not None and d.notes
    assert SparkplugState().restore({"version": 2}) == 0
    assert SparkplugState().restore({"version": 1, "nodes": [{"group": 1}]}) == 0


def test_rebirth_all_asks_every_known_node() -> None:
    node = Node()
    node.birth()
    assert node.state.rebirth_all(node.now, "session_lost") == [("g1", "n1", "session_lost")]
    # and the rate limit counts it
    assert node.send("NDATA", {"alias": 99, "double_value": 1.0}).rebirth is None
