"""``RecordingPublisher``: inspection results of numbered parts per lot, and which the broker
confirmed.

Each lot is published on its own station topic and ``seq`` numbers the parts of a lot from
1, in publish order. The broker receives a lot's parts in that order also across its
restarts: the publisher keeps at most one part per lot unconfirmed (``ordered`` mode of
``edge.sim.mqtt_station.Publisher``), so a part published while paho reconnects cannot
overtake the parts paho resends. The gateway promises the order the broker delivers;
this is what makes publish order that order. A part out of spec (measured above the
rule's upper limit) must make the gateway derive a nonconformance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import orjson

from edge.sim.mqtt_station import Publisher

__all__ = ["UPPER_LIMIT", "Part", "RecordingPublisher", "message_id", "subscription_yaml"]

UPPER_LIMIT = 10.05
SITE = "test-site"


@dataclass(frozen=True)
class Part:
    lot: str
    seq: int
    fails: bool

    @property
    def message_id(self) -> str:
        return message_id(self.lot, self.seq)


def message_id(lot: str, seq: int) -> str:
    return f"{lot}-{seq:07d}"


def topic(lot: str) -> str:
    return f"plant/{SITE}/line/1/station/{lot}/inspection"


def subscription_yaml() -> str:
    """The MQTT subscription the campaign's gateway uses (list item at column 0).

    ``dedupe_key`` is the station's message id: a message the publisher resends after a
    broker restart (PUBACK lost with the broker) is the same part, not a second one.
    """
    return (
        "- topic: plant/{site}/line/{line}/station/{station}/inspection\n"
        "  event: inspection.result\n"
        '  ordering_key: "lot:{lot_id}"\n'
        '  dedupe_key: "{message_id}"\n'
        "  fields: {lot_id: lot, serial: sn, result: result, measured: value,\n"
        "           message_id: msg_id}\n"
    )


class RecordingPublisher(Publisher):
    """A QoS 1 publisher that records every part it sent and which ones got a PUBACK;
    each lot's parts reach the broker in publish order (one unconfirmed part per lot)."""

    def __init__(self, url: str, **options: object) -> None:
        options.setdefault("ordered", True)
        super().__init__(url, **options)  # type: ignore[arg-type]
        self.parts: dict[str, Part] = {}  # message id → part, in publish order
        self._next: dict[str, int] = {}
        self._parts_lock = threading.Lock()

    def publish_part(self, lot: str, *, fails: bool) -> Part:
        with self._parts_lock:
            seq = self._next.get(lot, 0) + 1
            self._next[lot] = seq
            part = Part(lot, seq, fails)
            self.parts[part.message_id] = part
        value = UPPER_LIMIT + 0.1 if fails else 10.0
        doc = {"msg_id": part.message_id, "lot": lot, "sn": f"SN-{part.message_id}",
               "result": "NOK" if fails else "OK", "value": value}
        self.publish(topic(lot), orjson.dumps(doc), part.message_id)
        return part

    def acked_parts(self) -> list[tuple[str, int]]:
        """(lot, seq) of every part the broker confirmed."""
        with self._lock:
            acked = set(self.acked)
        return sorted((p.lot, p.seq) for mid, p in self.parts.items() if mid in acked)
