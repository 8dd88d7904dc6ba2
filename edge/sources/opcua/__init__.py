"""``opcua`` source: OPC UA data changes and triggered reads → canonical events.

Registered as ``edge.sources.opcua:COMPONENT``. Importing this package is cheap (config
model only); asyncua is imported by the factory. The bundle:

- ``config``         config model, validated at load with located messages
- ``security``       secure channel, pinned / trusted server certificate, user login
- ``nodes``          resolves NodeIds and browse paths, checks them on the server
- ``source``         the running source: connection, subscriptions, monitored items
- ``queue``          the bounded notification queue
- ``values``         value and status conversion, sample keys
- ``triggers``       ``Triggers``: trigger edges, the group Read, the ack after commit
- ``backfill``       ``Backfill``: gaps, HistoryRead paging, persisted watermarks
- ``client``         the asyncua client with the gateway's reconnect loop

Contract (see ``edge.components``): ``factory(cfg, ctx)`` does no I/O; ``run()``
connects and serves until cancelled. Every event is submitted to the outbox and counted
there; asyncua acknowledges notifications to the server on receipt, so a gap can only be
recovered by HistoryRead where the server historizes the node — the source does that
after every connection loss or subscription re-creation (and after a gateway restart,
from the watermarks in ``state_dir``). Configuration problems found on the server (unknown
node, wrong type, refused certificate) raise ``FatalStartupError`` with the location, e.g.
``sources[station7].monitored[3].node: BadNodeIdUnknown (ns=2;s=Station7.Nope)``; the
component stops, the daemon keeps running the others.

``README.md`` beside this file is the reference (every option, the guarantees) and
``sample.yaml`` a complete, commented source; ``docs/opcua.md`` holds the operator notes.
"""

from __future__ import annotations

from typing import Any

from edge.plugin import ComponentContext, ComponentType
from edge.sources.opcua.config import OpcUaSourceConfig

__all__ = ["COMPONENT", "OpcUaSourceConfig", "factory"]


def factory(cfg: OpcUaSourceConfig, ctx: ComponentContext) -> Any:
    """Build the source (compiles the mappings; no I/O)."""
    from edge.sources.opcua.source import OpcUaSource

    return OpcUaSource(cfg, ctx)


COMPONENT = ComponentType(
    kind="source",
    type="opcua",
    config_model=OpcUaSourceConfig,
    factory=factory,
    description="OPC UA client: monitored items, triggered group reads, alarms and conditions",
)
