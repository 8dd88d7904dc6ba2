"""MQTT source against a real mosquitto on loopback: MQTT → outbox → HTTP receiver.

Every test uses its own broker (``mosquitto`` fixture), a real gateway (``gateways``) and
the stand-in ERP (``erp``). Messages carry a ``msg_id``; the receiver's events carry it as
``data.message_id``, so "nothing lost" is checked message by message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.sim.erp import ErpReceiver
from tests.fixtures.mosquitto import (
    Broker,
    inspection,
    message_ids,
    start_publisher,
    wait_connected,
)
from tests.support import eventually, http_sink_yaml, mqtt_source_yaml, sample

pytestmark = pytest.mark.mqtt

Gateways = Callable[..., Any]


def config(broker_url: str, erp: ErpReceiver, **source: Any) -> str:
    return mqtt_source_yaml(broker_url, **source) + "sinks:\n" + http_sink_yaml(erp.url)


async def publish(pub: Any, messages: list[tuple[str, bytes]], keys: list[str] | None = None,
                  timeout: float = 15.0) -> None:
    for i, (topic, payload) in enumerate(messages):
        pub.publish(topic, payload, keys[i] if keys else f"k{i}-{id(payload)}")
    assert await asyncio.to_thread(pub.wait_acked, timeout), "broker did not confirm"


async def delivered(erp: ErpReceiver, ids: set[str], timeout: float = 20.0) -> None:
    await erp.wait_for(lambda e: ids <= set(message_ids(e.events)), timeout)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_end_to_end_every_confirmed_message_is_delivered_once(
        protocol: str, mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(mosquitto.url, erp, protocol=protocol))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url, protocol=protocol)
    ids = [f"m{i:04d}" for i in range(300)]
    await publish(pub, [inspection(i, lot=f"L{n % 7}", station=f"st{n % 3}")
                        for n, i in enumerate(ids)], ids)
    pub.stop()
    await delivered(erp, set(ids))

    got = message_ids(erp.events)
    assert set(got) == set(ids)
    assert all(len(v) == 1 for v in got.values())
    first = next(e for e in erp.events if e["data"]["message_id"] == "m0001")
    assert first["type"] == "inspection.result" and first["class"] == "high"
    assert first["ordering_key"] == "lot:L1"
    assert first["data"] == {"lot_id": "L1", "serial": "SN-m0001", "result": "pass",
                             "measured": 10.01, "message_id": "m0001", "line": "1",
                             "station": "st1"}
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["acked"] == 300, what="all acked")
    st = src.status()
    assert st["connected"] and st["unacked"] == 0 and st["protocol"] == protocol
    assert st["subscriptions"][0]["filter"] == "plant/test-site/line/+/station/+/inspection"
    assert sample(gw, "edge_events_received_total", source="line1") == 300


async def test_per_lot_order_is_kept(mosquitto: Broker, erp: ErpReceiver,
                                     gateways: Gateways) -> None:
    gw = await gateways(config(mosquitto.url, erp))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    ids = [f"o{i:04d}" for i in range(200)]
    await publish(pub, [inspection(i, lot=f"L{n % 4}") for n, i in enumerate(ids)], ids)
    pub.stop()
    await delivered(erp, set(ids))
    for lot in ("L0", "L1", "L2", "L3"):
        seen = [e["data"]["message_id"] for e in erp.events if e["data"]["lot_id"] == lot]
        assert seen == sorted(seen)


async def test_poison_messages_are_quarantined_acked_and_the_session_keeps_flowing(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge.sources.mqtt")
    body = config(mosquitto.url, erp, extra="max_payload_bytes: 2048\n")
    gw = await gateways(body, state_dir=tmp_path / "state")
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    topic = inspection("x")[0]
    poison = [
        (topic, b"not json at all"),
        (topic, b"{\"lot\": "),
        (topic, b""),
        (topic, b"\xff\xfe\x00garbage"),
        (topic, orjson.dumps({"msg_id": "big", "lot": "L1", "result": "OK", "pad": "x" * 4096})),
        (topic, orjson.dumps({"msg_id": "nolot", "result": "OK"})),
        (topic, orjson.dumps({"msg_id": "badresult", "lot": "L1", "result": "maybe"})),
        (topic, b"[1, 2, 3]"),
        ("raw/dev1", orjson.dumps({"unit": "C"})),  # machine.reading needs a value
    ]
    good = [inspection(f"g{i:03d}") for i in range(50)]
    # poison first, interleaved with good ones, then the rest of the good ones
    mixed = [m for pair in zip(poison, good, strict=False) for m in pair] + good[len(poison):]
    await publish(pub, mixed)
    pub.stop()
    await delivered(erp, {f"g{i:03d}" for i in range(50)})
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["acked"] == len(mixed), what="every message acked")

    stats = await gw.outbox.stats()
    assert stats["quarantine"] == {"not_json": 4, "too_large": 1, "invalid_data": 4}
    assert sample(gw, "edge_events_quarantined_total", source="line1", reason="not_json") == 4
    assert gw.status["line1"].restarts == 0 and gw.status["line1"].state == "running"
    # one log line per (reason, topic) burst, not one per message
    lines = [r for r in caplog.records if r.getMessage() == "MQTT message quarantined and acked"]
    assert sorted((r.fields["reason"], r.fields["topic"]) for r in lines) == sorted([  # type: ignore[attr-defined]
        ("invalid_data", "raw/dev1"), ("invalid_data", topic), ("not_json", topic),
        ("too_large", topic)])
    await gw.stop()

    # Acked means gone from the broker: a restart with the same session gets nothing again.
    # The broker sends a resumed session's messages before newer ones, so once a message
    # published after the reconnect is in, anything left over would have come first.
    gw2 = await gateways(body, state_dir=tmp_path / "state")
    await wait_connected(gw2)
    pub = await start_publisher(mosquitto.url)
    await publish(pub, [inspection("after-restart")], ["after-restart"])
    pub.stop()
    await delivered(erp, {"after-restart"})
    assert gw2.sources["line1"].status()["received"] == 1
    assert (await gw2.outbox.stats())["quarantine"] == stats["quarantine"]


async def test_a_topic_no_template_matches_is_quarantined(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways, tmp_path: Path) -> None:
    """A persistent session can still hold a subscription the config no longer has."""
    old = config(mosquitto.url, erp)
    gw = await gateways(old, state_dir=tmp_path / "state")
    await wait_connected(gw)
    await gw.stop()
    pub = await start_publisher(mosquitto.url)
    await publish(pub, [("raw/dev9", b'{"value": 1}'), inspection("kept")])
    pub.stop()
    only_inspection = """\
        - topic: plant/{site}/line/{line}/station/{station}/inspection
          event: inspection.result
          fields: {lot_id: lot, result: result, message_id: msg_id}
        """
    import textwrap

    new = mqtt_source_yaml(mosquitto.url, subscriptions=textwrap.dedent(only_inspection)) \
        + "sinks:\n" + http_sink_yaml(erp.url)
    gw2 = await gateways(new, state_dir=tmp_path / "state")
    await delivered(erp, {"kept"})
    await eventually(lambda: gw2.sources["line1"].status()["quarantined"] == 1,
                     what="quarantine")
    assert (await gw2.outbox.stats())["quarantine"] == {"unmatched_topic": 1}


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_persistent_session_delivers_what_was_published_while_down(
        protocol: str, mosquitto: Broker, erp: ErpReceiver, gateways: Gateways,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    body = config(mosquitto.url, erp, protocol=protocol)
    gw = await gateways(body, state_dir=tmp_path / "state")
    await wait_connected(gw)
    assert gw.sources["line1"].status()["session_present"] is False
    await gw.stop()

    pub = await start_publisher(mosquitto.url, protocol=protocol)
    ids = [f"d{i:04d}" for i in range(200)]
    await publish(pub, [inspection(i) for i in ids], ids)
    pub.stop()

    caplog.set_level(logging.INFO, logger="edge.sources.mqtt")
    gw2 = await gateways(body, state_dir=tmp_path / "state")
    await delivered(erp, set(ids))
    assert gw2.sources["line1"].status()["session_present"] is True
    assert not any("session was not resumed" in r.getMessage() for r in caplog.records)
    assert sample(gw2, "edge_source_gaps_total", source="line1") == 0


async def test_a_lost_broker_session_is_reported_as_a_gap(
        mosquitto_factory: Callable[..., Broker], erp: ErpReceiver, gateways: Gateways,
        tmp_path: Path) -> None:
    broker = mosquitto_factory(persistence=False)
    body = config(broker.url, erp)
    gw = await gateways(body, state_dir=tmp_path / "state")
    await wait_connected(gw)
    await gw.stop()
    await asyncio.to_thread(broker.restart)  # no persistence: the session is gone
    gw2 = await gateways(body, state_dir=tmp_path / "state")
    await wait_connected(gw2)
    await eventually(lambda: sample(gw2, "edge_source_gaps_total", source="line1") == 1,
                     what="gap counted")


async def test_broker_restart_mid_stream_loses_nothing(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(mosquitto.url, erp))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    ids: list[str] = []

    async def produce(n: int) -> None:
        for _ in range(n):
            i = f"r{len(ids):05d}"
            ids.append(i)
            pub.publish(*inspection(i, lot=f"L{len(ids) % 5}"), i)
            await asyncio.sleep(0.002)

    await produce(300)
    await asyncio.to_thread(mosquitto.restart)
    await produce(300)
    assert await asyncio.to_thread(pub.wait_acked, 20)
    pub.stop()
    await delivered(erp, set(pub.acked), timeout=30)
    got = message_ids(erp.events)
    assert set(pub.acked) <= set(got)
    assert all(len(v) == 1 for v in got.values()), "a message arrived under two event ids"
    src = gw.sources["line1"].status()
    assert src["reconnects"] >= 1 and src["connected"]
    assert sample(gw, "edge_source_errors_total", source="line1", code="connection_lost") >= 1
    # the outage is in the audit trail: when it began, how long, whether the session held
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT detail FROM audit WHERE state = 'reconnected'").fetchall())
    notices = [orjson.loads(d) for (d,) in rows]
    assert notices and all(n["source"] == "line1" and n["session_present"] for n in notices)
    assert notices[0]["down_s"] >= 0 and notices[0]["lost_at"] and notices[0]["error"]


async def test_wrong_password_is_a_clear_error_retried_with_backoff(
        mosquitto_factory: Callable[..., Broker], erp: ErpReceiver, gateways: Gateways,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge.sources.mqtt")
    broker = mosquitto_factory(users={"gateway": "right"})
    (tmp_path / "wrong").write_text("wrong\n")
    (tmp_path / "right").write_text("right\n")
    auth = "username: gateway\npassword_file: {}\n"
    body = config(broker.url, erp, extra=auth.format("wrong"), reconnect_s=(0.2, 1.0))
    gw = await gateways(body, state_dir=tmp_path / "s1")

    await eventually(lambda: sample(gw, "edge_source_errors_total", source="line1",
                                    code="auth") >= 4, what="four refused attempts")
    refused = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    # each attempt announces its delay: doubling from 0.2 s up to the 1 s cap, jittered
    # between half and the full value (the attempt number says how far it has doubled)
    for r in refused[:4]:
        fields = r.fields  # type: ignore[attr-defined]
        cap = min(1.0, 0.2 * 2 ** (fields["attempt"] - 1))
        assert fields["code"] == "auth" and cap / 2 - 0.01 <= fields["retry_in_s"] <= cap + 0.01
    assert [r.fields["attempt"] for r in refused[:4]] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert refused and "bad user name or password" in refused[0].getMessage()
    assert refused[0].levelno == logging.ERROR
    assert "right" not in caplog.text and "wrong" not in refused[0].getMessage()
    st = gw.status["line1"]
    assert st.state == "running" and st.restarts == 0 and not st.connected
    assert "bad user name or password" in gw.sources["line1"].status()["last_error"]
    await gw.stop()

    gw2 = await gateways(config(broker.url, erp, extra=auth.format("right")),
                         state_dir=tmp_path / "s2")
    await wait_connected(gw2)


async def test_tls_with_a_private_ca_and_client_certificate(
        mosquitto_factory: Callable[..., Broker], erp: ErpReceiver, gateways: Gateways,
        tmp_path: Path) -> None:
    from tests.fixtures.mosquitto import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    broker = mosquitto_factory(tls=pki, require_client_cert=True)
    tls = (f"tls: {{ca_file: {pki.ca}, cert_file: {pki.client_cert}, "
           f"key_file: {pki.client_key}}}\n")
    gw = await gateways(config(broker.tls_url, erp, extra=tls))
    await wait_connected(gw)
    pub = await start_publisher(broker.url)  # plain listener of the same broker
    await publish(pub, [inspection("t1"), inspection("t2")], ["t1", "t2"])
    pub.stop()
    await delivered(erp, {"t1", "t2"})
    assert gw.sources["line1"].status()["broker"].startswith("mqtts://")


async def test_tls_verification_failure_is_clear_and_retried(
        mosquitto_factory: Callable[..., Broker], erp: ErpReceiver, gateways: Gateways,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.fixtures.mosquitto import make_test_pki

    caplog.set_level(logging.WARNING, logger="edge.sources.mqtt")
    pki = make_test_pki(tmp_path / "pki")
    broker = mosquitto_factory(tls=pki)
    gw = await gateways(config(broker.tls_url, erp, extra=f"tls: {{ca_file: {pki.rogue_ca}}}\n"))
    await eventually(lambda: sample(gw, "edge_source_errors_total", source="line1",
                                    code="tls_verify") >= 2, what="two TLS failures")
    msg = next(r.getMessage() for r in caplog.records if "TLS verification" in r.getMessage())
    assert any(reason in msg for reason in (
        "self-signed certificate", "unable to get local issuer", "certificate verify failed"))
    assert "tls.ca_file" in msg
    assert gw.status["line1"].state == "running" and gw.status["line1"].restarts == 0


async def test_missing_secret_file_stops_the_source_not_the_gateway(
        mosquitto: Broker, erp: ErpReceiver, tmp_path: Path) -> None:
    from edge.app import Gateway
    from edge.config import load_config_text

    secret = tmp_path / "pw"
    secret.write_text("x")
    body = config(mosquitto.url, erp, extra=f"username: u\npassword_file: {secret}\n")
    cfg = load_config_text(f"site: s\nstate_dir: {tmp_path / 'state'}\napi: {{enabled: false}}\n"
                           + body)
    secret.unlink()  # valid at load, gone when the source starts
    gw = Gateway(cfg)
    try:
        await gw.start()
        await eventually(lambda: gw.status["line1"].state == "failed", what="source failed")
        assert "cannot read secret file" in (gw.status["line1"].error or "")
        assert gw.ready.is_set() and gw.status["erp"].state == "running"
    finally:
        await gw.stop()


async def test_outbox_full_stops_acking_and_resumes_without_loss(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    """Invariant 6: with only protected rows left the outbox refuses events; the source
    must not ack (the broker keeps the messages) and must resume once there is room."""
    body = config(mosquitto.url, erp, extra="max_inflight_messages: 50\n") + \
        "outbox: {max_size_mb: 1, alarm_at_percent: 50, expire_at_percent: 60}\n"
    erp.outage(True)
    gw = await gateways(body)
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    ids: list[str] = []

    def send(n: int) -> None:
        for _ in range(n):
            i = f"b{len(ids):05d}"
            ids.append(i)
            pub.publish(*inspection(i, lot=f"L{i[-1]}", pad="x" * 600), i)

    while sample(gw, "edge_outbox_backpressure") == 0:  # fill the outbox
        send(100)
        await asyncio.sleep(0.05)
        assert len(ids) < 20_000, "the outbox never applied backpressure"
    send(300)  # these must stay on the broker, unacked
    assert await asyncio.to_thread(pub.wait_acked, 30)  # the broker has them all
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["unacked"] > 0, what="messages held unacked")
    held = src.status()
    assert 0 < held["unacked"] <= src.max_held  # bounded even if the broker over-sends
    assert held["acked"] < len(ids)
    assert gw.status["line1"].restarts == 0

    erp.outage(False)
    await delivered(erp, set(ids), timeout=10)
    got = message_ids(erp.events)
    assert set(got) == set(ids) and all(len(v) == 1 for v in got.values())
    pub.stop()


async def test_a_payload_repeated_on_purpose_is_stored_each_time(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    """Invariant 3: only redeliveries are matched. A device that publishes the same state
    three times (no DUP flag) gets three events."""
    gw = await gateways(config(mosquitto.url, erp))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    await publish(pub, [("raw/press1", b'{"value": 1, "state": "running"}')] * 3
                  + [inspection("same")] * 3)
    pub.stop()
    await erp.wait_for(lambda e: len(e.events) == 6)
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["acked"] == 6, what="all acked")
    assert len({e["id"] for e in erp.events}) == 6
    assert message_ids(erp.events)["same"] and len(message_ids(erp.events)["same"]) == 3
    assert src.counts["stored"] == 6 and src.counts["duplicates"] == 0
    assert sample(gw, "edge_events_deduplicated_total", source="line1") == 0


async def test_a_configured_dedupe_key_matches_a_repeat_without_dup(
        mosquitto: Broker, erp: ErpReceiver, gateways: Gateways) -> None:
    """A station-assigned message id (``dedupe_key``) is an identity: a second message
    with the same id is the same record, flag or not."""
    import textwrap

    subs = textwrap.dedent("""\
        - topic: plant/{site}/line/{line}/station/{station}/inspection
          event: inspection.result
          dedupe_key: "{station}:{message_id}"
          fields: {lot_id: lot, serial: sn, result: result, message_id: msg_id}
        """)
    gw = await gateways(mqtt_source_yaml(mosquitto.url, subscriptions=subs)
                        + "sinks:\n" + http_sink_yaml(erp.url))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    await publish(pub, [inspection("id1"), inspection("id1", result="NOK"), inspection("id2")])
    pub.stop()
    await delivered(erp, {"id1", "id2"})
    src = gw.sources["line1"]
    await eventually(lambda: src.status()["acked"] == 3, what="all acked")
    assert src.counts["stored"] == 2 and src.counts["duplicates"] == 1
    await eventually(lambda: gw.forwarders["erp"].delivered == 2, what="both events delivered")
    assert {k: len(v) for k, v in message_ids(erp.events).items()} == {"id1": 1, "id2": 1}
