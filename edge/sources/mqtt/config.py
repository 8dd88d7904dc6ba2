"""Config model of the ``mqtt`` source: broker connection, subscriptions and their mapping."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edge.mqtt.config import MqttConnectionConfig
from edge.mqtt.topics import TopicTemplate
from edge.plugin import MappingConfig, SourceConfigBase, StrictModel, template_fields

__all__ = ["MqttSourceConfig", "SparkplugConfig", "SubscriptionConfig"]

# Names a ``{...}`` template may use besides data fields: see ``Mapper.map``.
# Names a Sparkplug B template (signal, ordering_key, dedupe_key) may use besides topic
# captures and static fields: see ``edge.sources.mqtt.sparkplug``.
SPARKPLUG_NAMES = {"site", "source", "group", "edge_node", "device", "metric", "message_type",
                   "seq", "timestamp", "index", "signal", "station", "datatype"}


class SparkplugConfig(StrictModel):
    """How Sparkplug B metrics become events (only with ``format: sparkplug_b``)."""

    signal: str = Field(
        "{edge_node}/{device}/{metric}",
        description="template of data.signal; an empty {device} (node metrics) drops with "
        "its separator")
    rebirth: bool = Field(
        True, description="publish NCMD 'Node Control/Rebirth' when data cannot be resolved "
        "(unknown alias, sequence gap, data before a birth)")
    rebirth_interval_s: float = Field(
        10.0, ge=0, le=3600, description="at most one rebirth request per edge node in this "
        "many seconds")

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str) -> str:
        check_sparkplug_template(v, None)
        return v


def check_sparkplug_template(template: str, extra: set[str] | None) -> None:
    """ValueError unless every ``{name}`` is a plain name Sparkplug templates know (the
    built-in names, or one of ``extra``); ``extra`` None: only the shape is checked."""
    for name in template_fields(template):
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"{{{name}}} in {template!r}: a Sparkplug B template takes plain "
                             "names like {edge_node}")
        if extra is not None and name not in SPARKPLUG_NAMES | extra:
            allowed = ", ".join(sorted(SPARKPLUG_NAMES | extra))
            raise ValueError(f"{template!r} uses {{{name}}}, which is not one of {allowed}")


class SubscriptionConfig(MappingConfig):
    """One topic template and how its payloads map to events (see ``MappingConfig``)."""

    topic: str = Field(description="template, e.g. plant/{site}/line/{line}/station/{station}/x")
    qos: int = Field(1, description="0 (may lose messages) or 1 (acked after commit)")
    format: Literal["json", "sparkplug_b"] = Field(
        "json", description="payload format: json (mapped by fields) or sparkplug_b "
        "(Sparkplug B protobuf, one event per metric)")
    sparkplug: SparkplugConfig | None = Field(
        None, description="Sparkplug B options (only with format: sparkplug_b)")

    @model_validator(mode="before")
    @classmethod
    def _sparkplug_defaults(cls, data: Any) -> Any:
        """A Sparkplug B subscription emits machine.reading events unless told otherwise."""
        if isinstance(data, dict) and data.get("format") == "sparkplug_b" and "event" not in data:
            data = {**data, "event": "machine.reading"}
        return data

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        TopicTemplate.parse(v)
        return v

    @field_validator("qos", mode="before")
    @classmethod
    def _qos(cls, v: Any) -> Any:
        if isinstance(v, bool) or v not in (0, 1, "0", "1"):
            raise ValueError(
                f"must be 0 or 1, got {v!r} (QoS 2 state lives only in the client's memory "
                "and is lost on a crash; QoS 1 with the outbox dedupe gives exactly-once "
                "storage)"
            )
        return int(v)

    @model_validator(mode="after")
    def _sparkplug_options(self) -> SubscriptionConfig:
        if self.format != "sparkplug_b":
            if self.sparkplug is not None:
                raise ValueError("sparkplug options need format: sparkplug_b")
            return self
        for key in ("fields", "source_ts"):
            if getattr(self, key):
                raise ValueError(
                    f"{key} does not apply to format: sparkplug_b (each metric becomes an "
                    "event with signal, value, status, unit and the metric's timestamp)")
        if self.sparkplug is None:
            self.sparkplug = SparkplugConfig()
        known = set(TopicTemplate.parse(self.topic).captures) | set(self.static)
        for key, template in (("sparkplug.signal", self.sparkplug.signal),
                              ("ordering_key", self.ordering_key),
                              ("dedupe_key", self.dedupe_key)):
            if template is not None:
                try:
                    check_sparkplug_template(template, known)
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None
        return self

    @model_validator(mode="after")
    def _template_names(self) -> SubscriptionConfig:
        self.check_template_names(set(TopicTemplate.parse(self.topic).captures),
                                  "topic capture")
        return self


class MqttSourceConfig(SourceConfigBase, MqttConnectionConfig):
    type: Literal["mqtt"]
    reconnect_initial_s: float = Field(1.0, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(60.0, gt=0, description="cap of the reconnect backoff")
    session_expiry_s: int = Field(
        7 * 86400, ge=1, le=0xFFFFFFFF,
        description="MQTT 5: how long the broker keeps the session while disconnected")
    max_inflight_messages: int = Field(
        1000, ge=1, le=65535,
        description="unacked QoS 1 window (MQTT 5 Receive Maximum; for 3.1.1 the broker's "
        "max_inflight_messages applies)")
    max_batch: int = Field(500, ge=1, le=10_000, description="messages per outbox commit")
    max_payload_bytes: int = Field(
        256 * 1024, ge=1, le=256 * 1024 * 1024, description="larger payloads are quarantined")
    subscriptions: list[SubscriptionConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> MqttSourceConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        seen: dict[str, int] = {}
        for i, sub in enumerate(self.subscriptions):
            if sub.topic in seen:
                raise ValueError(
                    f"subscriptions[{i}].topic {sub.topic!r} repeats subscriptions[{seen[sub.topic]}]"
                )
            seen[sub.topic] = i
        return self
