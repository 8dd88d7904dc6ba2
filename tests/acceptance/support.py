"""Support of the acceptance tests: an observer on the plant broker.

``Watcher`` subscribes (QoS 1, paho on its own thread) and keeps every message with its
QoS, retain flag and arrival time, as a line controller subscribed to the hold topics
would see them. A new ``Watcher`` on a topic receives the broker's retained message first,
with ``retain`` set: that is how a controller that restarts learns the current hold.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson


@dataclass(frozen=True)
class Seen:
    topic: str
    doc: Any  # the payload as JSON (None when it is not JSON)
    qos: int
    retain: bool
    mono: float = field(default_factory=time.monotonic)


class Watcher:
    """A QoS 1 subscriber of ``topic`` on the broker at ``url`` (mqtt://host:port)."""

    def __init__(self, url: str, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.topic = topic
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"acceptance-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            doc = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            doc = None
        with self._lock:
            self._seen.append(Seen(msg.topic, doc, msg.qos, bool(msg.retain)))

    def start(self, timeout: float = 10.0) -> Watcher:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.stop()
            raise ConnectionError(f"no SUBACK from {self.host}:{self.port} within {timeout} s")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def of_type(self, type_: str) -> list[Seen]:
        return [s for s in self.seen if isinstance(s.doc, dict) and s.doc.get("type") == type_]
