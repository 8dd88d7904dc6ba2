"""Config model of the ``mqtt`` source: broker connection, subscriptions and their mapping."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edge.mqtt.config import MqttConnectionConfig
from edge.mqtt.topics import TopicTemplate
from edge.plugin import MappingConfig, SourceConfigBase, template_fields

__all__ = ["MqttSourceConfig", "SubscriptionConfig"]

# Names a ``{...}`` template may use besides data fields: see ``Mapper.map``.
_TEMPLATE_BUILTINS = {"site", "source"}


class SubscriptionConfig(MappingConfig):
    """One topic template and how its payloads map to events (see ``MappingConfig``)."""

    topic: str = Field(description="template, e.g. plant/{site}/line/{line}/station/{station}/x")
    qos: int = Field(1, description="0 (may lose messages) or 1 (acked after commit)")

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
    def _template_names(self) -> SubscriptionConfig:
        """With ``fields``, every template name must be a field, capture or static key."""
        if not self.fields:
            return self
        known = (set(self.fields) | set(self.static) | _TEMPLATE_BUILTINS
                 | set(TopicTemplate.parse(self.topic).captures))
        for key in ("ordering_key", "dedupe_key"):
            template = getattr(self, key)
            for name in template_fields(template) if template else []:
                root = name.split(".")[0].split("[")[0]
                if root not in known and root != "data":
                    allowed = ", ".join(sorted(known))
                    raise ValueError(
                        f"{key} uses {{{name}}}, which is neither a mapped field, a topic "
                        f"capture nor a static field (one of {allowed})"
                    )
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
