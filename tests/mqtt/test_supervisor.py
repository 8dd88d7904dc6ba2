"""The MQTT connection supervisor (``edge.mqtt.supervisor``) against a real mosquitto.

One attempt at a time with a named reason when it fails, the newest connection visible
while it opens, on-demand connecting shared by concurrent callers (the sink), a reconnect
loop with capped, jittered backoff that reports every failure and loss (the source).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from edge.config import load_config_text
from edge.errors import FatalStartupError
from edge.mqtt.connection import BrokerTarget, ConnectError, Connection
from edge.mqtt.supervisor import (
    CONNECTION_LOST,
    Backoff,
    Failure,
    Supervisor,
    broker_target,
)
from tests.fixtures.mosquitto import Broker
from tests.support import eventually, free_port

pytestmark = pytest.mark.mqtt


def target(port: int, *, client_id: str = "edge-test-supervisor") -> BrokerTarget:
    return BrokerTarget(host="127.0.0.1", port=port, protocol="5", client_id=client_id,
                        keepalive_s=30, connect_timeout_s=5, session_expiry_s=0,
                        receive_maximum=10)


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(("draw", "expected"), [
    (1.0, [1, 2, 4, 8, 8, 8]),  # the full delay: doubling, capped
    (0.0, [0.5, 1, 2, 4, 4, 4]),  # never less than half of it
])
def test_backoff_doubles_up_to_its_cap_with_jitter(draw: float, expected: list[float]) -> None:
    backoff = Backoff(1, 8, rng=lambda: draw)
    assert [backoff.next_delay() for _ in expected] == expected
    assert backoff.attempt == len(expected)


def test_backoff_starts_over_only_after_a_connection_that_lived_long_enough() -> None:
    now = [0.0]
    backoff = Backoff(1, 60, stable_s=10, rng=lambda: 1.0, clock=lambda: now[0])
    backoff.next_delay()
    backoff.next_delay()
    backoff.up()
    now[0] = 9.0
    backoff.down()  # dropped after 9 s: a broker that accepts and drops keeps backing off
    assert backoff.next_delay() == 4
    backoff.up()
    now[0] = 19.0
    backoff.down()
    assert backoff.next_delay() == 1


# --------------------------------------------------------------------------- one attempt


async def test_a_failed_attempt_names_the_reason_and_keeps_nothing_open() -> None:
    sup = Supervisor(target(free_port()))
    with pytest.raises(ConnectError) as info:
        await sup.connect()
    assert info.value.code == "refused"
    assert sup.last_error is not None and "connection refused" in sup.last_error
    assert sup.conn is not None and sup.conn.lost.done() and not sup.connected


async def test_connect_subscribes_and_the_connection_is_visible_while_it_opens(
        mosquitto: Broker) -> None:
    """Messages the broker resends right after CONNACK arrive before the SUBACK: they
    belong to the connection being opened, so it must be ``conn`` from the start."""
    sup = Supervisor(target(mosquitto.port), filters=[("a/+", 1), ("b/#", 0)])
    attempt = asyncio.create_task(sup.connect())
    await asyncio.sleep(0)  # the attempt runs up to its first wait (TCP connect)
    opening = sup.conn
    assert opening is not None and not opening.connected
    conn = await attempt
    try:
        assert conn is opening and sup.connected
        assert sup.granted == [1, 0] and sup.last_error is None
    finally:
        sup.close()
    assert not sup.connected


class RefusingBroker:
    """A minimal MQTT 3.1.1 broker on loopback that accepts the connection and refuses
    every subscription to ``denied/...`` (SUBACK 0x80), granting QoS 1 to the rest.

    A fake, because mosquitto 2.0 grants every subscription and applies its ACL only when
    it delivers; a broker with a subscribe ACL (others do) answers like this one.
    """

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RefusingBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind = (await reader.readexactly(1))[0] >> 4
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                if kind == 1:  # CONNECT → CONNACK, accepted, no session
                    writer.write(bytes([0x20, 2, 0, 0]))
                elif kind == 8:  # SUBSCRIBE → SUBACK
                    codes, i = [], 2
                    while i < len(body):
                        n = int.from_bytes(body[i:i + 2], "big")
                        topic = body[i + 2:i + 2 + n].decode()
                        codes.append(0x80 if topic.startswith("denied/") else 1)
                        i += 2 + n + 1
                    writer.write(bytes([0x90, 2 + len(codes)]) + body[:2] + bytes(codes))
                await writer.drain()
        writer.close()


async def test_a_broker_that_refuses_every_subscription_fails_the_attempt() -> None:
    async with RefusingBroker() as broker:
        tgt = dataclasses.replace(target(broker.port), protocol="3.1.1")
        sup = Supervisor(tgt, filters=[("denied/x", 1)])
        with pytest.raises(ConnectError) as info:
            await sup.connect()
        assert info.value.code == "subscribe_refused"
        assert "refused every subscription" in (sup.last_error or "")
        assert not sup.connected and sup.conn is not None and sup.conn.lost.done()
        # one granted filter is enough: the refused one is reported through ``granted``
        sup = Supervisor(tgt, filters=[("denied/x", 1), ("allowed/x", 1)])
        await sup.connect()
        try:
            assert sup.granted == [None, 1]
        finally:
            sup.close()


# --------------------------------------------------------------------------- on demand


async def test_ensure_shares_one_attempt_and_reconnects_after_a_loss(mosquitto: Broker) -> None:
    sup = Supervisor(target(mosquitto.port))
    ups: list[Connection] = []
    try:
        conns = await asyncio.gather(*(sup.ensure(ups.append) for _ in range(5)))
        assert len(ups) == 1 and all(c is ups[0] for c in conns)
        assert await sup.ensure(ups.append) is ups[0]  # up: no new attempt
        ups[0].abort()
        fresh = await sup.ensure(ups.append)
        assert len(ups) == 2 and fresh is ups[1] is not ups[0] and fresh.connected
    finally:
        sup.close()


# --------------------------------------------------------------------------- reconnect loop


class Recorder:
    def __init__(self) -> None:
        self.ups: list[Connection] = []
        self.downs: list[Failure] = []

    async def up(self, conn: Connection) -> None:
        self.ups.append(conn)

    def down(self, failure: Failure) -> None:
        self.downs.append(failure)


@contextlib.asynccontextmanager
async def running(sup: Supervisor, backoff: Backoff, rec: Recorder) -> Any:
    task = asyncio.create_task(sup.run(backoff, rec.up, rec.down))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sup.close()


async def test_run_backs_off_while_the_broker_is_unreachable() -> None:
    sup, rec = Supervisor(target(free_port())), Recorder()
    async with running(sup, Backoff(0.01, 0.04), rec) as task:
        await eventually(lambda: len(rec.downs) >= 5, what="five failed attempts")
        assert not task.done() and rec.ups == []
    downs = rec.downs[:5]
    assert [f.code for f in downs] == ["refused"] * 5 and not any(f.lost for f in downs)
    assert [f.attempt for f in downs] == [1, 2, 3, 4, 5]
    caps = [0.01, 0.02, 0.04, 0.04, 0.04]
    assert all(cap / 2 <= f.retry_in_s <= cap for f, cap in zip(downs, caps, strict=True))
    assert "connection refused" in (sup.last_error or "")


async def test_run_reconnects_after_the_broker_restarts_and_reports_the_loss(
        mosquitto: Broker) -> None:
    sup, rec = Supervisor(target(mosquitto.port), filters=[("a/#", 1)]), Recorder()
    async with running(sup, Backoff(0.05, 0.2), rec):
        await eventually(lambda: rec.ups, what="the first connection")
        await asyncio.to_thread(mosquitto.restart)
        await eventually(lambda: len(rec.ups) == 2 and sup.connected, what="a reconnect")
        lost = [f for f in rec.downs if f.lost]
        assert len(lost) == 1 and lost[0].code == CONNECTION_LOST
        assert lost[0].message.startswith("MQTT connection lost: ")
        assert sup.reconnects == 1 and sup.last_error is None
        assert rec.ups[1] is not rec.ups[0] and rec.ups[1] is sup.conn
        assert sup.granted == [1]


# --------------------------------------------------------------------------- credentials


def _connection_config(tmp_path: Path, password_file: Path) -> Any:
    cfg = load_config_text(
        f"site: s\nstate_dir: {tmp_path / 'state'}\napi: {{enabled: false}}\nsources:\n"
        "  - {id: line1, type: mqtt, url: 'mqtt://127.0.0.1:1883', username: gw,\n"
        f"     password_file: {password_file}, subscriptions: [{{topic: a, event: x.y}}]}}\n")
    return cfg.sources[0]


async def test_broker_target_reads_the_password_at_start(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    cfg = _connection_config(tmp_path, secret)
    tgt = await broker_target(cfg, who="source 'line1'", client_id="edge-s-line1",
                              session_expiry_s=60, receive_maximum=5)
    assert (tgt.password, tgt.username, tgt.address) == ("s3cret", "gw", "mqtt://127.0.0.1:1883")
    secret.unlink()  # valid at load, gone at start: the component stops, clearly
    with pytest.raises(FatalStartupError, match="cannot read secret file"):
        await broker_target(cfg, who="source 'line1'", client_id="edge-s-line1",
                            session_expiry_s=60, receive_maximum=5)
