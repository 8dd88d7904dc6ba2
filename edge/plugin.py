"""The public plugin SDK: everything a source or sink needs, and nothing else.

A component is one folder (a package) with a config model, a factory and a
``COMPONENT = ComponentType(...)`` in its ``__init__.py``, registered by one entry point in
the distribution that ships it::

    [project.entry-points."edge.sources"]
    labfile = "my_plant_plugins.labfile:COMPONENT"

The gateway's own sources and sinks (``edge/sources/*``, ``edge/sinks/*``) are built on
exactly this module and register the same way. ``plugins/README.md`` walks through a
source in 30 lines.

Contracts (the full text is in ``edge.components``):

- ``factory(config, ctx)`` validates and builds the component without I/O. Importing a
  component's package stays cheap: heavy client libraries are imported in the factory.
- A source commits through ``ctx.ingest.submit(...)`` and acknowledges upstream only after
  it returned (DESIGN invariant 1). ``OutboxFullError``: do not ack, ``await
  ctx.ingest.wait_accepting()`` and retry the same records.
- A source that builds events itself (``make_event``) checks the data of a catalogue type
  first: ``validate_data(type, data)`` returns the normalized data or raises
  ``InputError("invalid_data", detail)`` — quarantine the record and ack it. ``Mapper``
  does this for mapped payloads. ``CATALOGUE`` is the event catalogue (docs/events.md).
- A sink's ``send(events)`` returns one ``Outcome`` per event, in order, and never raises for
  one event's failure; ``send_in_key_order`` keeps per-key order (invariant 4). A sink that
  sends requests concurrently keeps one ``AdaptiveConcurrency`` as its ``concurrency``
  attribute and passes it to every ``send_in_key_order`` call: the limit is sink-wide,
  adapts to the receiver and shows in ``/status`` and ``edge_sink_concurrency``.

Names not exported here are internal and may change in any release. ``__version__`` is
the gateway's version: the SDK is released with it.
"""

from __future__ import annotations

from edge import __version__
from edge.components import (
    ComponentContext,
    Ingest,
    Outcome,
    OutcomeKind,
    Sink,
    Source,
    StoredEvent,
    Submission,
)
from edge.concurrency import AdaptiveConcurrency, pushes_back
from edge.config import (
    ConfigDir,
    SecretFile,
    SinkConfigBase,
    SourceConfigBase,
    StrictModel,
    read_secret,
)
from edge.delivery import (
    DeliveryMode,
    ScheduledDelivery,
    SchedulePeriod,
    blocks_key,
    event_matches,
    held_back,
    send_in_key_order,
)
from edge.errors import (
    ConfigError,
    FatalStartupError,
    InputError,
    OutboxClosedError,
    OutboxError,
    OutboxFullError,
    OutboxOrderError,
    RetryableStartupError,
)
from edge.events import Event, EventClass, make_event
from edge.events.catalogue import CATALOGUE, validate_data
from edge.inline_secrets import check_http_url, check_url, looks_secret
from edge.registry import ComponentType
from edge.retry import parse_retry_after
from edge.telemetry import Metrics, log_event
from edge.tls import TlsConfig, client_context
from edge.transforms.map import (
    Mapper,
    MappingConfig,
    get_path,
    render_template,
    template_fields,
)

__all__ = [
    "AdaptiveConcurrency",
    "pushes_back",
    "DeliveryMode",
    "SchedulePeriod",
    "ScheduledDelivery",
    "held_back",
    "__version__",
    "CATALOGUE",
    "ComponentContext",
    "ComponentType",
    "ConfigDir",
    "ConfigError",
    "Event",
    "EventClass",
    "FatalStartupError",
    "Ingest",
    "InputError",
    "Mapper",
    "MappingConfig",
    "Metrics",
    "Outcome",
    "OutcomeKind",
    "OutboxClosedError",
    "OutboxError",
    "OutboxFullError",
    "OutboxOrderError",
    "RetryableStartupError",
    "SecretFile",
    "Sink",
    "SinkConfigBase",
    "Source",
    "SourceConfigBase",
    "StoredEvent",
    "StrictModel",
    "Submission",
    "TlsConfig",
    "blocks_key",
    "check_http_url",
    "check_url",
    "client_context",
    "event_matches",
    "get_path",
    "log_event",
    "looks_secret",
    "make_event",
    "parse_retry_after",
    "read_secret",
    "render_template",
    "send_in_key_order",
    "template_fields",
    "validate_data",
]
