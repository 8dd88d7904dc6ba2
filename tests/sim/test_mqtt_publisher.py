"""The station simulator's publisher against a real mosquitto: what it reports as published
is what the broker confirms, also past paho's limit of 65,535 unconfirmed messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from edge.sim.mqtt_station import Publisher
from tests.fixtures.mosquitto import Broker

PAHO_PACKET_IDS = 65_535


def test_publisher_counts_refusals_past_the_packet_id_space(
    mosquitto_factory: Callable[..., Any],
) -> None:
    broker: Broker = mosquitto_factory(persistence=False)
    pub = Publisher(broker.url, max_inflight=1000).start()
    try:
        broker.stop()  # a long outage: paho keeps every QoS 1 message for the resend
        extra = 50
        for i in range(PAHO_PACKET_IDS + extra):
            pub.publish("plant/p/line/1/station/st01/inspection", b"{}", str(i))
        assert pub.published == PAHO_PACKET_IDS
        assert pub.refused == extra
        broker.start()
        deadline = time.monotonic() + 60
        while len(pub.acked) < pub.published and time.monotonic() < deadline:
            time.sleep(0.1)
        # everything counted as published reached the broker; the refused ones are not in it
        assert len(pub.acked) == PAHO_PACKET_IDS
        assert pub.unacked == 0
        assert str(PAHO_PACKET_IDS) not in pub.acked
    finally:
        pub.stop()
