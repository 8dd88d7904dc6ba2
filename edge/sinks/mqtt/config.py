"""Config model of the ``mqtt`` sink: broker connection and routes (topic templates)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from edge.mqtt.config import MqttConnectionConfig
from edge.plugin import (
    DeliveryMode,
    SinkConfigBase,
    StrictModel,
    event_matches,
    template_fields,
)

__all__ = ["MAX_TOPIC_BYTES", "MqttRouteConfig", "MqttSinkConfig"]

_TEMPLATE_ROOTS = {"id", "type", "site", "source", "ordering_key", "class", "correlation_id",
                   "data"}
MAX_TOPIC_BYTES = 65_535  # an MQTT string is at most this long


class MqttRouteConfig(StrictModel):
    events: list[str] = Field(min_length=1, description="event types; '*' all, 'a.*' prefix")
    topic: str = Field(description="template, e.g. plant/{site}/lot/{data.lot_id}/hold")
    qos: int = Field(1, description="1: delivered on PUBACK; 0: once written")
    retain: bool = Field(False, description="the broker keeps the last message per topic")
    delivery: DeliveryMode = Field(
        "realtime", description="realtime, or {scheduled: {every_s: N}}: published together "
                                "once per period (trend data)")
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
        return event_matches(self.events, event_type)


class MqttSinkConfig(SinkConfigBase, MqttConnectionConfig):
    renamed_keys = {"max_concurrent_requests": "max_in_flight_requests"}

    type: Literal["mqtt"]
    routes: list[MqttRouteConfig] = Field(min_length=1)
    publish_timeout_s: float = Field(10.0, gt=0, description="wait for PUBACK at most")
    max_in_flight_requests: int = Field(
        20, ge=1, le=256, description="publishes awaiting their PUBACK for the whole sink at "
        "most: the ceiling of adaptive_concurrency; also the sink's in-flight window (keep "
        "it <= the broker's Receive Maximum, mosquitto's max_inflight_messages, default 20)")
