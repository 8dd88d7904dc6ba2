"""The ``mqtt`` sink at run time; see ``README.md`` beside this file for the contract."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import orjson

from edge.mqtt.connection import ConnectError, Connection
from edge.mqtt.supervisor import Supervisor, broker_target
from edge.plugin import (
    AdaptiveConcurrency,
    ComponentContext,
    InputError,
    Outcome,
    StoredEvent,
    get_path,
    held_back,
    log_event,
    render_template,
    send_in_key_order,
    template_fields,
)
from edge.sinks.mqtt.config import MAX_TOPIC_BYTES, MqttSinkConfig

__all__ = ["MqttSink"]

log = logging.getLogger("edge.sinks.mqtt")
_UNSAFE_TOPIC_VALUE = re.compile(r"[/+#\x00]")


class MqttSink:
    def __init__(self, config: MqttSinkConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.id = config.id
        self.ctx = ctx
        self.client_id = config.client_id_for(ctx.site, config.id)
        self._link: Supervisor | None = None  # made by start(), once the secrets are read
        self._stopping = False
        # publishes awaiting their PUBACK, sink-wide: adapted up to max_in_flight_requests
        self.concurrency = AdaptiveConcurrency(config.max_in_flight_requests,
                                               adaptive=config.adaptive_concurrency)

    def accepts(self, event_type: str) -> bool:
        return any(r.matches(event_type) for r in self.config.routes)

    async def start(self) -> None:
        """Read secrets and certificates now: a bad file is a clear start-up error
        (FatalStartupError). Connecting waits for the first ``send``."""
        cfg = self.config
        target = await broker_target(
            cfg, who=f"sink {self.id!r}", client_id=self.client_id, session_expiry_s=0,
            receive_maximum=max(1, cfg.max_in_flight_requests))
        self._link = Supervisor(target)

    def stop_new_requests(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()

    def _connected(self, conn: Connection) -> None:
        log_event(log, logging.INFO, "MQTT sink connected", sink=self.id,
                  broker=conn.target.address, client_id=self.client_id)

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        assert self._link is not None, "send before start"
        now = time.time()  # scheduled routes: periods are on the wall clock, like received_at
        held = {ev.seq: o for ev in batch if (o := self._held_back(ev, now)) is not None}
        if len(held) == len(batch):  # nothing due: no connection needed
            return [held[ev.seq] for ev in batch]
        try:
            conn = await self._link.ensure(self._connected)
        except ConnectError as err:
            if err.code == "auth":  # the broker refuses the gateway, not the events
                failed = Outcome.sink_fault(f"auth: {err.message}")
            else:
                failed = Outcome.retry(f"connection: {err.message}")
            return [held.get(ev.seq) or failed for ev in batch]

        async def publish(events: list[StoredEvent]) -> list[Outcome]:
            ev = events[0]
            return [held.get(ev.seq) or await self._publish(conn, ev)]

        by_seq = await send_in_key_order(
            [[ev] for ev in batch], publish, self.concurrency,
            stopping=lambda: self._stopping,
            dead_letter_blocks=self.config.on_dead_letter != "continue")
        return [by_seq[ev.seq] for ev in batch]

    def _held_back(self, ev: StoredEvent, now: float) -> Outcome | None:
        """The deferral of an event whose route publishes once per period, not yet due."""
        route = next((r for r in self.config.routes if r.matches(ev.type)), None)
        return held_back(route.delivery, ev, now) if route is not None else None

    async def _publish(self, conn: Connection, ev: StoredEvent) -> Outcome:
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
