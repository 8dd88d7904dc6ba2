"""The ``relay:`` section of a relay's config file (``edge relay -c FILE``).

A relay's file is a gateway config without sources: ``site``, ``state_dir``, ``sinks``
(the same sink types, routes, response policy and ``on_dead_letter`` as a gateway) and
this section, which says where the JetStream stream is and how the relays share it.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from edge.config import GatewayConfigBase
from edge.nats.config import NatsConnection
from edge.nats.subjects import DEFAULT_FILTER

__all__ = ["RelayConfig", "RelayFileConfigBase"]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class RelayConfig(NatsConnection):
    """Which stream to consume and how relays share its partitions."""

    stream: str = Field("EDGE_EVENTS", description="the JetStream stream the gateways' nats "
                        "sinks publish to (retention: limits)")
    partitions: int = Field(16, ge=1, le=4096, description="number of partitions; must equal "
                            "the gateways' nats sink `partitions`")
    filter: str = Field(DEFAULT_FILTER, description="subject filter of one partition, with "
                        "{partition}; must match the gateways' nats sink `subject`")
    consumer_prefix: str = Field("edge-relay", description="durable consumers are named "
                                 "<prefix>-<sink>-p<partition>-e<lease revision>")
    owners_bucket: str = Field("EDGE_RELAY_OWNERS", description="KV bucket of partition "
                               "leases and relay heartbeats (created when missing)")
    parked_bucket: str = Field("EDGE_RELAY_PARKED", description="KV bucket of parked keys "
                               "(created when missing)")
    dlq_stream: str = Field("EDGE_RELAY_DLQ", description="stream of dead letters and parked "
                            "events (created when missing)")
    dlq_subject: str = Field("edge.relay.dlq", description="subject prefix of the dead-letter "
                             "stream: <prefix>.<sink>.<key hash>")
    relay_id: str | None = Field(None, description="this relay's name in the owners bucket; "
                                 "default <hostname>-<pid>")
    listen: str | None = Field("127.0.0.1:8081", description="host:port of the relay's "
                               "/healthz, /readyz, /status and /metrics (read-only); null: "
                               "none")
    lease_ttl_s: float = Field(10.0, ge=2, le=600, description="a partition whose owner has "
                               "not renewed its lease for this long is taken over")
    fetch_batch: int = Field(200, ge=1, le=10_000, description="messages per fetch request")
    max_pending: int = Field(2000, ge=10, le=1_000_000, description="events held per sink "
                             "and partition (fetched, not yet acknowledged)")
    ack_wait_s: float = Field(3600.0, ge=30, description="JetStream ack wait of the "
                              "consumers; events are held while retried, so keep it long")

    @field_validator("stream", "dlq_stream", "owners_bucket", "parked_bucket",
                     "consumer_prefix")
    @classmethod
    def _names(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("letters, digits, '-' and '_' only")
        return v

    @field_validator("filter")
    @classmethod
    def _has_partition(cls, v: str) -> str:
        if "{partition}" not in v:
            raise ValueError("the filter must name {partition}, e.g. plant.*.p{partition}.>")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("host:port, e.g. 127.0.0.1:8081 (port 0: any free port)")
        return v

    @field_validator("relay_id")
    @classmethod
    def _relay_id(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("letters, digits, '-' and '_' only")
        return v


class RelayFileConfigBase(GatewayConfigBase):
    """A relay's config file: the gateway's keys (``site``, ``state_dir``, ``sinks``,
    ``logging``) plus ``relay``; no sources and no rules (they run on the gateways)."""

    relay: RelayConfig = Field(description="the JetStream stream and how relays share it")

    @model_validator(mode="after")
    def _relay_only(self) -> RelayFileConfigBase:
        if self.sources:
            raise ValueError("a relay consumes the JetStream stream: remove `sources` "
                             "(they belong in a gateway's config)")
        if self.rules:
            raise ValueError("quality rules run on the gateways: remove `rules`")
        bad = [s.id for s in self.sinks if not _NAME.match(s.id)]
        if bad:
            raise ValueError(f"relay sink ids name JetStream consumers: letters, digits, "
                             f"'-' and '_' only (not {', '.join(bad)})")
        if not self.sinks:
            raise ValueError("a relay needs at least one sink")
        return self
