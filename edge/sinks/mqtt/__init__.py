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

Every option, the outcomes and an example: ``README.md`` beside this file; a complete
commented sink: ``sample.yaml``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.plugin import ComponentType
from edge.sinks.mqtt.config import MqttRouteConfig, MqttSinkConfig

if TYPE_CHECKING:
    from edge.plugin import ComponentContext
    from edge.sinks.mqtt.sink import MqttSink

__all__ = ["COMPONENT", "MqttRouteConfig", "MqttSinkConfig"]


def _factory(config: MqttSinkConfig, ctx: ComponentContext) -> MqttSink:
    from edge.sinks.mqtt.sink import MqttSink  # paho only when an mqtt sink is used

    return MqttSink(config, ctx)


COMPONENT = ComponentType(
    kind="sink",
    type="mqtt",
    config_model=MqttSinkConfig,
    factory=_factory,
    description="publish events to an MQTT broker (local hold publication, bridges)",
)
