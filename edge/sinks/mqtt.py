"""``type: mqtt`` — publish events to an MQTT broker (e.g. holds for the line, locally).

The typical use is the local half of an edge quality decision: route ``quality.hold`` (from
``edge.rules``) to a topic the line controller or an andon board subscribes to, so the lot
stops even while the ERP is unreachable::

    sinks:
      - id: line-holds
        type: mqtt
        url: mqtt://127.0.0.1:1883
        client_id: edge-plant-01-holds
        routes:
          - {events: [quality.hold, quality.release], topic: "plant/{site}/lot/{data.lot_id}/hold",
             qos: 1, retain: true}

Contract: an event counts as delivered when the broker acknowledged it (PUBACK, QoS 1) or,
with ``qos: 0``, when it was written to the socket. Payload: the canonical envelope (or
only its ``data`` with ``body: data``). Routes and topic templates apply at send time. A
broker that is down makes every event of the batch ``retry`` (the circuit breaker then
probes); a broker that refuses the gateway's credentials makes it ``sink_fault`` (the
events are kept, never dead-lettered by ``retry.max_attempts``; the sink alarms). A topic
template that cannot be filled dead-letters the event, and so does a value rendered into
the topic that is empty or contains ``/``, ``+``, ``#`` or NUL (reason "unsafe topic
value: …"; it would change the topic's levels or be refused by the broker): such an event
is never published. A message the broker refuses (PUBACK reason code) is a dead letter.
Per-key order holds (one request per event, keys in parallel, in order within a key; a
dead letter holds its key unless ``on_dead_letter: continue``). Delivery is at-least-once:
a PUBACK lost with the connection means a resend.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import Field, field_validator

from edge.components import ComponentContext, Outcome, StoredEvent
from edge.config import SinkConfigBase, StrictModel, read_secret
from edge.errors import ConfigError, FatalStartupError, InputError
from edge.forwarder import send_in_key_order
from edge.registry import ComponentType
from edge.sources.mqtt import MqttConnectionConfig, mqtt_ssl_context
from edge.telemetry import log_event
from edge.transforms.map import get_path, render_template, template_fields

if TYPE_CHECKING:
    from edge.sources.mqtt_conn import Connection

__all__ = ["COMPONENT", "MqttRouteConfig", "MqttSink", "MqttSinkConfig"]

log = logging.getLogger(__name__)

_TEMPLATE_ROOTS = {"id", "type", "site", "source", "ordering_key", "class", "correlation_id",
                   "data"}
_UNSAFE_TOPIC_VALUE = re.compile(r"[/+#\x00]")
MAX_TOPIC_BYTES = 65_535  # an MQTT string is at most this long


class MqttRouteConfig(StrictModel):
    events: list[str] = Field(min_length=1, description="event types; '*' all, 'a.*' prefix")
    topic: str = Field(description="template, e.g. plant/{site}/lot/{data.lot_id}/hold")
    qos: int = Field(1, description="1: delivered on PUBACK; 0: once written")
    retain: bool = Field(False, description="the broker keeps the last message per topic")
    body: Literal["envelope", "data"] = "envelope"

    @field_validator("qos")
    @classmethod
    def _qos(cls, v: int) -> int:
        if v not in (0, 1):
            raise ValueError(f"must be 0 or 1, got {v}")
        return v

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v or re.search(r"[+#\x00]", v):
            raise ValueError(f"must be a topic without wildcards, got {v!r}")
        for name in template_fields(v):
            if name.split(".")[0] not in _TEMPLATE_ROOTS:
                raise ValueError(f"unknown template field {{{name}}}; use data.<field>, "
                                 f"{', '.join(sorted(_TEMPLATE_ROOTS - {'data'}))}")
        return v

    def matches(self, event_type: str) -> bool:
        return any(p == "*" or p == event_type or (p.endswith(".*") and
                                                   event_type.startswith(p[:-1]))
                   for p in self.events)


class MqttSinkConfig(SinkConfigBase, MqttConnectionConfig):
    type: Literal["mqtt"]
    routes: list[MqttRouteConfig] = Field(min_length=1)
    publish_timeout_s: float = Field(10.0, gt=0, description="wait for PUBACK at most")
    max_concurrent_requests: int = Field(8, ge=1, le=256, description="publishes per batch")


class MqttSink:
    def __init__(self, config: MqttSinkConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.id = config.id
        self.ctx = ctx
        self.client_id = config.client_id or f"edge-{ctx.site}-{config.id}"
        self._conn: Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._stopping = False
        self._password: str | None = None
        self._ssl: Any = None

    def accepts(self, event_type: str) -> bool:
        return any(r.matches(event_type) for r in self.config.routes)

    async def start(self) -> None:
        # secrets and certificates are read now: a bad file is a clear start-up error
        try:
            self._password = await asyncio.to_thread(read_secret, self.config.password_file)
            self._ssl = await asyncio.to_thread(mqtt_ssl_context, self.config,
                                                f"sink {self.id!r}")
        except ConfigError as err:
            raise FatalStartupError(str(err)) from err

    def stop_new_requests(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _connection(self) -> Connection:
        """The current connection, (re)connecting on demand; raises ConnectError."""
        from edge.sources.mqtt_conn import BrokerTarget, Connection

        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.connected:
                return conn
            cfg = self.config
            target = BrokerTarget(
                host=cfg.host, port=cfg.port, protocol=cfg.protocol, client_id=self.client_id,
                keepalive_s=cfg.keepalive_s, connect_timeout_s=cfg.connect_timeout_s,
                session_expiry_s=0, receive_maximum=max(1, cfg.max_concurrent_requests),
                ssl_context=self._ssl, username=cfg.username, password=self._password,
            )
            conn = Connection(target, lambda _c, _m: None)
            await conn.open()
            self._conn = conn
            log_event(log, logging.INFO, "MQTT sink connected", sink=self.id,
                      broker=target.address, client_id=self.client_id)
            return conn

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        from edge.sources.mqtt_conn import ConnectError

        try:
            conn = await self._connection()
        except ConnectError as err:
            if err.code == "auth":  # the broker refuses the gateway, not the events
                return [Outcome.sink_fault(f"auth: {err.message}")] * len(batch)
            return [Outcome.retry(f"connection: {err.message}")] * len(batch)

        async def publish(events: list[StoredEvent]) -> list[Outcome]:
            return [await self._publish(conn, events[0])]

        by_seq = await send_in_key_order(
            [[ev] for ev in batch], publish, self.config.max_concurrent_requests,
            stopping=lambda: self._stopping,
            dead_letter_blocks=self.config.on_dead_letter != "continue")
        return [by_seq[ev.seq] for ev in batch]

    async def _publish(self, conn: Connection, ev: StoredEvent) -> Outcome:
        from edge.sources.mqtt_conn import ConnectError

        route = next((r for r in self.config.routes if r.matches(ev.type)), None)
        if route is None:
            return Outcome.unrouted(f"no route of sink {self.id} matches {ev.type}")
        try:
            topic = _render_topic(route.topic, {**ev.doc, "data": ev.data})
        except InputError as err:
            if err.reason == "unsafe_topic_value":
                return Outcome.dead_letter(f"unsafe topic value: {err.detail}")
            return Outcome.dead_letter(f"route topic: {err.detail}")
        payload = orjson.dumps(ev.data) if route.body == "data" else ev.body
        try:
            async with asyncio.timeout(self.config.publish_timeout_s):
                await conn.publish(topic, payload, qos=route.qos, retain=route.retain)
        except TimeoutError:
            return Outcome.retry(f"no PUBACK within {self.config.publish_timeout_s:g} s")
        except ConnectError as err:
            if err.code == "refused":  # e.g. not authorised for this topic: fix and replay
                return Outcome.dead_letter(err.message)
            return Outcome.retry(f"connection: {err.message}")
        return Outcome.delivered()


@functools.lru_cache(maxsize=256)  # templates come from config: a handful
def _fields(template: str) -> tuple[str, ...]:
    return tuple(template_fields(template))


def _render_topic(template: str, values: dict[str, Any]) -> str:
    """The topic for one event. Every rendered value must be one non-empty topic level:
    InputError ``unsafe_topic_value`` for an empty value or one with ``/ + #`` or NUL (the
    template's own text was checked at load), ``missing_field`` for a missing one."""
    for name in _fields(template):
        value = get_path(values, name)
        if value is not None and str(value) == "":
            raise InputError("unsafe_topic_value", f"{{{name}}} is empty")

    def level(value: str, safe: str = "") -> str:
        bad = _UNSAFE_TOPIC_VALUE.search(value)
        if bad:
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise InputError("unsafe_topic_value",
                             f"{shown!r} contains {bad.group()!r} (one topic level may not "
                             "contain / + # or NUL)")
        return value

    topic = render_template(template, values, quote=level)
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise InputError("unsafe_topic_value", "the topic is not valid UTF-8") from err
    if size > MAX_TOPIC_BYTES:
        raise InputError("unsafe_topic_value", f"the topic is longer than {MAX_TOPIC_BYTES} bytes")
    return topic


def _factory(config: MqttSinkConfig, ctx: ComponentContext) -> MqttSink:
    return MqttSink(config, ctx)


COMPONENT = ComponentType(
    kind="sink",
    type="mqtt",
    config_model=MqttSinkConfig,
    factory=_factory,
    description="publish events to an MQTT broker (local hold publication, bridges)",
)
