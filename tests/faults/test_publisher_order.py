"""The campaign's publisher keeps each lot's order across a broker restart.

paho-mqtt (2.2) resends the unconfirmed QoS 1 messages of a session after a reconnect, but
only once the CONNACK has arrived; a message published between its CONNECT and that
CONNACK goes out at once, ahead of the resends. The broker, and every subscriber behind
it, then sees a lot's parts out of publish order: a station's reordering that no gateway
can undo. The campaign judges the gateway against the publisher's order, so its publisher
must not reorder (see this folder's README).

The window is made wide and certain here: the restarted broker is frozen (SIGSTOP) while
the publisher reconnects, so its CONNECT waits in the socket, a part is published, and
only then does the broker run on.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults.publisher import RecordingPublisher, topic
from tests.fixtures.mosquitto import Broker, find_mosquitto
from tests.support import eventually

pytestmark = pytest.mark.mqtt


class Subscriber:
    """A plain paho subscriber that records the msg_id of every message, in arrival order."""

    def __init__(self, url_port: int, topic_filter: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.received: list[str] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="order-watcher",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self.client.connect("127.0.0.1", url_port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received.append(orjson.loads(msg.payload)["msg_id"])

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_part_published_while_the_publisher_reconnects_waits_for_the_resent_ones(
        tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    broker = await asyncio.to_thread(Broker(tmp_path / "mosquitto").start)
    pub = RecordingPublisher(broker.url, protocol="5")
    connect_sent = threading.Event()
    pub.client.on_log = (lambda c, u, level, buf:
                         connect_sent.set() if buf.startswith("Sending CONNECT") else None)
    watcher: Subscriber | None = None
    try:
        await asyncio.to_thread(pub.start)
        lot = "L1-0"
        for _ in range(3):
            pub.publish_part(lot, fails=False)
        assert await asyncio.to_thread(pub.wait_acked, 10)

        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)  # parts #4-#6 reach the socket, never a PUBACK
        for _ in range(3):
            pub.publish_part(lot, fails=False)
        await asyncio.to_thread(broker.kill)  # the broker dies with them unconfirmed
        await eventually(lambda: not pub.connected.is_set(), timeout=10,
                         what="the publisher to notice")
        await asyncio.to_thread(broker.start)  # same port, nothing of the old state
        watcher = Subscriber(broker.port, topic(lot))
        await eventually(watcher.subscribed.is_set, timeout=10, what="the subscription")

        connect_sent.clear()
        broker.proc.send_signal(signal.SIGSTOP)
        await eventually(connect_sent.is_set, timeout=10, what="the publisher's CONNECT")
        pub.publish_part(lot, fails=False)  # #7: between CONNECT and CONNACK
        broker.proc.send_signal(signal.SIGCONT)

        assert await asyncio.to_thread(pub.wait_acked, 10)
        await eventually(lambda: len(set(watcher.received)) >= 4, timeout=10,
                         what="parts #4-#7")
        seqs = [int(mid.rsplit("-", 1)[1]) for mid in watcher.received]
        first = sorted(set(seqs), key=seqs.index)  # first arrival of each part
        assert first == [4, 5, 6, 7], f"the broker received the lot's parts as {seqs}"
    finally:
        if watcher is not None:
            watcher.stop()
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(pub.stop)
        await asyncio.to_thread(broker.kill)
