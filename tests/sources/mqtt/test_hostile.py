"""Hostile input never stops the MQTT source (hypothesis).

Two levels: ``MqttSource._prepare`` (topic match → JSON → mapping) fed with arbitrary
topics (including bytes that are not UTF-8, which a broker would refuse) and payloads; and
the whole path through a real mosquitto, where every message must end up stored or
quarantined, be acked, and leave the source connected and never restarted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edge.components import ComponentContext
from edge.config import load_config_text
from edge.events import Event
from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.sim.erp import ErpReceiver
from edge.sources.mqtt.source import MqttSource, _Inbound
from edge.telemetry import Metrics
from tests.fixtures.mosquitto import Broker, start_publisher, wait_connected
from tests.support import eventually, http_sink_yaml, mqtt_source_yaml

pytestmark = pytest.mark.mqtt

SUBSCRIPTIONS = """\
- topic: fuzz/{device}/#
  event: machine.reading
  source_ts: ts
- topic: insp/{line}/{station}
  event: inspection.result
  ordering_key: "lot:{lot_id}"
  source_ts: ts
  fields: {lot_id: lot, serial: sn, result: result, measured: "values[0]", note: "a.b[2].c"}
- topic: keyed/{station}
  event: production.count
  dedupe_key: "{station}:{serial}"
  fields: {count: n, serial: sn}
"""
REASONS = {"not_json", "too_large", "invalid_data", "missing_field", "invalid_timestamp",
           "invalid_topic", "unmatched_topic"}
MAX_PAYLOAD = 4096

# --------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["lot", "sn", "result", "values", "ts", "n", "a", "value", ""])
shaped = st.dictionaries(field_names, json_values, max_size=7)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN, Infinity, big ints: hostile


payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(dumps),
    shaped.map(dumps),
    st.just(b"[" * 3000 + b"]" * 3000),  # nesting deeper than any parser allows
    st.integers(min_value=MAX_PAYLOAD - 2, max_value=MAX_PAYLOAD + 2).map(lambda n: b"{" * n),
    st.builds(lambda lot, sn, r: dumps({"lot": lot, "sn": sn, "result": r}),
              json_values, json_values, st.sampled_from(["OK", "NOK", "maybe", 1, 0, True])),
)
# What a broker accepts in a topic (mosquitto refuses control characters, surrogates and
# non-characters and drops the publisher's connection): the source must cope with
# everything else. Non-UTF-8 topics are covered at the unit level above.
level = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn"),
                                       blacklist_characters="/+#\x00"), max_size=12)
# topics the source's subscriptions receive (the broker filters everything else)
topics = st.one_of(
    st.builds(lambda a, rest: f"fuzz/{a}/" + "/".join(rest), level, st.lists(level, max_size=3)),
    st.builds(lambda a, b: f"insp/{a}/{b}", level, level),
    st.builds(lambda a: f"keyed/{a}", level),
)


# --------------------------------------------------------------------------- unit level


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> MqttSource:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    cfg = load_config_text(
        f"site: s1\nstate_dir: {tmp}\n"
        + mqtt_source_yaml("mqtt://127.0.0.1:1", subscriptions=SUBSCRIPTIONS,
                           extra=f"max_payload_bytes: {MAX_PAYLOAD}\n"))
    metrics = Metrics()
    ctx = ComponentContext(site="s1", state_dir=str(tmp), metrics=metrics,
                           ingest=Pipeline(Outbox(tmp, cfg.outbox, metrics)))
    return MqttSource(cfg.sources[0], ctx)  # type: ignore[attr-defined]


def message(topic: bytes, payload: bytes, dup: bool = False) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=1, topic=topic)
    msg.payload = payload
    msg.qos = 1
    msg.dup = dup
    return msg


def check(source: MqttSource, topic: bytes, payload: bytes) -> str:
    prepared = source._prepare(_Inbound(None, message(topic, payload), time.time()))  # type: ignore[arg-type]
    if prepared.submission is not None:
        ev = prepared.submission.event
        assert Event.from_json(ev.to_json()) == ev
        assert ev.integrity_ok()
        assert prepared.submission.dedupe_key
        return "stored"
    assert prepared.reason in REASONS, (prepared.reason, prepared.detail)
    assert isinstance(prepared.raw, bytes) and len(prepared.raw) <= MAX_PAYLOAD
    orjson.dumps(prepared.meta, default=str)
    return prepared.reason


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=(topics | st.builds(lambda a: f"insp/{a}", level)).map(str.encode)
       | st.binary(max_size=40), payload=payloads)
def test_prepare_never_raises_on_hostile_input(source: MqttSource, topic: bytes,
                                                payload: bytes) -> None:
    check(source, topic, payload)


def test_prepare_outcomes_for_known_inputs(source: MqttSource) -> None:
    good = orjson.dumps({"lot": 7, "sn": 1, "result": "ok", "values": [1.5],
                         "ts": "2026-01-01T00:00:00Z"})
    assert check(source, b"insp/1/st1", good) == "stored"
    assert check(source, b"insp/1/st1", b"\xff") == "not_json"
    assert check(source, b"insp/1/st1", b"NaN") == "not_json"
    assert check(source, b"insp/1/st1", b"[" * 3000) == "not_json"
    assert check(source, b"insp/1/st1", b"{" * (MAX_PAYLOAD + 1)) == "too_large"
    assert check(source, b"insp/\xff/st1", good) == "invalid_topic"
    assert check(source, b"insp/1", good) == "unmatched_topic"
    assert check(source, b"insp/1/st1", b'{"lot": 1, "result": "maybe"}') == "invalid_data"
    assert check(source, b"insp/1/st1",
                 b'{"lot": 1, "result": "ok", "ts": 1e300}') == "invalid_timestamp"
    assert check(source, b"keyed/st1", b'{"n": 3}') == "missing_field"  # dedupe_key needs sn


def test_default_dedupe_key_identifies_a_redelivery(source: MqttSource) -> None:
    payload = orjson.dumps({"value": 1.5})
    first = source._prepare(_Inbound(None, message(b"fuzz/d1/x", payload), 0))  # type: ignore[arg-type]
    again = source._prepare(_Inbound(None, message(b"fuzz/d1/x", payload, dup=True), 0))  # type: ignore[arg-type]
    other = source._prepare(_Inbound(None, message(b"fuzz/d2/x", payload), 0))  # type: ignore[arg-type]
    assert first.submission and again.submission and other.submission
    assert first.submission.dedupe_key == again.submission.dedupe_key
    assert first.submission.dedupe_key != other.submission.dedupe_key
    assert first.submission.event.id != again.submission.event.id  # the outbox maps it back
    # a content hash is matched only for a copy flagged as a resend, within the horizon
    assert first.submission.redelivery_only and again.submission.redelivery_only
    assert (first.submission.redelivered, again.submission.redelivered) == (False, True)
    assert first.submission.redelivery_horizon == 2 * source.max_held > 0
    retained = message(b"fuzz/d1/x", payload)
    retained.retain = True  # a retained message replayed by a (re)subscription
    replay = source._prepare(_Inbound(None, retained, 0))  # type: ignore[arg-type]
    assert replay.submission and replay.submission.redelivered


def test_a_configured_dedupe_key_is_an_identity(source: MqttSource) -> None:
    keyed = source._prepare(_Inbound(None, message(b"keyed/st1", b'{"n": 3, "sn": "A1"}'), 0))  # type: ignore[arg-type]
    assert keyed.submission is not None
    assert keyed.submission.dedupe_key == "st1:A1"
    assert not keyed.submission.redelivery_only and not keyed.default_key


# --------------------------------------------------------------------------- through a broker


@pytest.fixture
async def running(mosquitto: Broker, erp: ErpReceiver,
                  gateways: Callable[..., Any]) -> Any:
    gw = await gateways(mqtt_source_yaml(mosquitto.url, subscriptions=SUBSCRIPTIONS,
                                         extra=f"max_payload_bytes: {MAX_PAYLOAD}\n")
                        + "sinks:\n" + http_sink_yaml(erp.url))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    yield gw, pub
    pub.stop()


# No shrinking: each example talks to a real broker, and the failing batch is in the message.
@settings(max_examples=40, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(topics, payloads), min_size=1, max_size=6))
async def test_hostile_messages_are_stored_or_quarantined_and_acked(
        running: Any, batch: list[tuple[str, bytes]]) -> None:
    gw, pub = running
    src = gw.sources["line1"]
    before = dict(src.counts)
    for topic, payload in batch:
        pub.publish(topic, payload, f"{time.monotonic_ns()}")
    await eventually(lambda: src.counts["acked"] >= before["acked"] + len(batch), timeout=15,
                     what=f"every message of {batch!r} acked")
    c = src.counts
    assert c["received"] == before["received"] + len(batch), batch
    assert (c["stored"] + c["duplicates"] + c["quarantined"]
            - before["stored"] - before["duplicates"] - before["quarantined"]) == len(batch)
    assert gw.status["line1"].connected and gw.status["line1"].restarts == 0
