"""``type: nats`` — publish events into a NATS JetStream stream (the JetStream tier).

The gateway's outbox stays the durable buffer at the edge; the stream is the plant's
shared log that ``edge relay`` (or any JetStream consumer) reads from::

    sinks:
      - id: jetstream
        type: nats
        servers: [nats://127.0.0.1:4222]
        stream: EDGE_EVENTS
        subject: "plant.{site}.p{partition}.{type}"
        partitions: 16

Contract: each event is published with its stored body as is and the headers
``Nats-Msg-Id`` (the event id: JetStream dedupes a resend within the stream's
``duplicate_window``), ``X-Correlation-ID``, ``Edge-Event-Type`` and, when it has one,
``Edge-Ordering-Key``. It counts as delivered only on the stream's PubAck (``duplicate``
when the PubAck says JetStream already had the id). Per-key order holds: one key's events
are published one after the other, each after the previous one's PubAck; keys go in
parallel. ``{partition}`` is ``edge.nats.subjects.partition_of`` (stable hash of the
ordering key). A timeout, no connection or a lost connection is a ``retry``; no stream for
the subject, a subject owned by another stream, a stream at its limits or refused
credentials are a ``sink_fault`` (the events are kept, the sink alarms with a reason that
names the subject and the stream); an event whose values do not make a valid subject is a
``dead_letter``.

Every option, the outcomes and stream advice: ``README.md`` beside this file; a complete
commented sink: ``sample.yaml``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.plugin import ComponentType
from edge.sinks.nats.config import CreateStreamConfig, NatsSinkConfig

if TYPE_CHECKING:
    from edge.plugin import ComponentContext
    from edge.sinks.nats.sink import NatsSink

__all__ = ["COMPONENT", "CreateStreamConfig", "NatsSinkConfig"]


def _factory(config: NatsSinkConfig, ctx: ComponentContext) -> NatsSink:
    from edge.sinks.nats.sink import NatsSink  # nats-py only when a nats sink is used

    return NatsSink(config, ctx)


COMPONENT = ComponentType(
    kind="sink",
    type="nats",
    config_model=NatsSinkConfig,
    factory=_factory,
    description="publish events into a NATS JetStream stream (the JetStream tier)",
)
