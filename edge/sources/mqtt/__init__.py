"""``type: mqtt`` — subscribe to an MQTT broker and store each message as a canonical event.

Contract (DESIGN invariants 1, 3 and 4):
- QoS 1 with manual acknowledgement: a message is PUBACKed only after the outbox COMMIT
  that stored its event (or its quarantine record), in arrival order. Events are stored
  in arrival order too, also when a write fails and is retried.
- Only redeliveries are matched. Without ``dedupe_key`` a message's key is the SHA-256 of
  topic and payload, matched only when the broker flags the copy as a resend (DUP, after a
  crash or a lost connection between commit and PUBACK) or replays a retained message, and
  only against the newest ``2 × max_held`` keys of the source (what can be unacked at a
  crash): the copy maps to the stored event's id. A device that publishes the same payload
  twice gets two events. A ``dedupe_key`` template is an identity (a station-assigned
  message id): any message with a key stored within ``outbox.dedupe_window_s`` maps to
  that event, flagged or not.
- A write that fails (budget full, storage fault) is never acked nor quarantined: the
  source retries with backoff and the broker keeps the messages.
- Persistent session: a stable ``client_id`` (default ``edge-<site>-<id>``), MQTT 3.1.1
  ``clean_session=False``, MQTT 5 ``clean_start=False`` with ``session_expiry_s`` > 0, so
  the broker keeps messages while the gateway is down.
- Unusable input (not JSON, larger than ``max_payload_bytes``, fails mapping or
  validation, a topic no subscription matches) is quarantined with a reason code, counted,
  logged once per (reason, topic) burst and acked once the quarantine record is committed:
  a poison message never blocks the session. The source never crashes on input. A record
  that makes storing fail by itself (a bug, not an outbox error) is quarantined as
  ``internal_error``; a quarantine record that cannot be written is retried, not dropped.
- Backpressure: when the outbox refuses events (budget full) nothing is acked; the source
  waits until it accepts again and retries the same messages. The broker stops sending
  once ``max_inflight_messages`` messages are unacked; reading pauses at ``max_held``.
- Connection failures (broker down, bad credentials, TLS verification) are logged with a
  clear reason and retried with capped exponential backoff and jitter inside ``run()``.

Topic templates: ``plant/{site}/line/{line}/station/{station}/inspection``. Each ``{name}``
is one whole topic level, subscribed as ``+`` and captured into the event's ``data``;
``+`` matches a level without capturing and a final ``#`` matches the rest. ``{site}`` is
not a wildcard: it is replaced by the gateway's ``site``, so gateways of several plants
can share a broker without reading each other's data (capture a plant level under any
other name, e.g. ``{plant}``).

``format: sparkplug_b`` subscriptions read Sparkplug B edge nodes (``spBv1.0/...``): one
event per metric, resolved through the births' alias tables; sequence gaps and deaths are
audited gaps; what cannot be resolved is quarantined and the node asked for a rebirth
(``edge.sources.mqtt.sparkplug``; protobuf is loaded only when such a subscription exists).

Every option, an example and the operator-facing guarantees: ``README.md`` beside this
file; a complete commented source: ``sample.yaml``. This module holds the config model
only (cheap to import); the client (paho-mqtt) is loaded by the factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.plugin import ComponentType
from edge.sources.mqtt.config import MqttSourceConfig, SubscriptionConfig

if TYPE_CHECKING:
    from edge.plugin import ComponentContext, Source

__all__ = ["COMPONENT", "MqttSourceConfig", "SubscriptionConfig"]


def _factory(cfg: MqttSourceConfig, ctx: ComponentContext) -> Source:
    from edge.sources.mqtt.source import MqttSource  # paho only when an mqtt source is used

    return MqttSource(cfg, ctx)


COMPONENT = ComponentType(
    kind="source",
    type="mqtt",
    config_model=MqttSourceConfig,
    factory=_factory,
    description="MQTT 3.1.1/5 subscriber (JSON or Sparkplug B), QoS 1 acked after the outbox "
                "commit",
)
