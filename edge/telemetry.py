"""Metrics (Prometheus, names start with ``edge_``) and structured logging.

Every drop, reject, expiry or dead-letter increments a counter here AND logs one structured
line (``log_event``). Each ``Metrics`` owns its own ``CollectorRegistry`` so several
gateways (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LOG_FORMATS", "Metrics", "event_ids", "log_event", "resolve_log_format", "setup_logging"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_received = Counter(
            "edge_events_received_total", "Events committed to the outbox", ["source"], registry=r
        )
        self.events_quarantined = Counter(
            "edge_events_quarantined_total",
            "Inbound records that could not become events",
            ["source", "reason"],
            registry=r,
        )
        self.events_deduplicated = Counter(
            "edge_events_deduplicated_total",
            "Redelivered records mapped to an already stored event",
            ["source"],
            registry=r,
        )
        self.events_unrouted = Counter(
            "edge_events_unrouted_total",
            "Events no sink had a route for (not stored)",
            ["type"],
            registry=r,
        )
        self.events_delivered = Counter(
            "edge_events_delivered_total", "Events a sink confirmed", ["sink"], registry=r
        )
        self.events_duplicate = Counter(
            "edge_events_duplicate_total",
            "Deliveries the receiver reported as already present (counted as delivered too)",
            ["sink"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "edge_events_dead_lettered_total", "Events moved to the DLQ", ["sink"], registry=r
        )
        self.events_expired = Counter(
            "edge_events_expired_total", "Events expired by disk policy", ["class"], registry=r
        )
        self.events_replayed = Counter(
            "edge_events_replayed_total", "Dead letters replayed by an operator", ["sink"],
            registry=r,
        )
        self.events_discarded = Counter(
            "edge_events_discarded_total", "Rows discarded by an operator", ["sink"], registry=r
        )
        self.delivery_attempts = Counter(
            "edge_delivery_attempts_total",
            "Send attempts by outcome",
            ["sink", "outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "edge_delivery_latency_seconds",
            "Time from ingest to confirmed delivery, per sink and event type (the delivery "
            "SLA of each type: e.g. lot.status within 60 s)",
            ["sink", "type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self.outbox_depth = Gauge(
            "edge_outbox_depth", "Undelivered rows", ["sink", "class"], registry=r
        )
        self.outbox_oldest_age = Gauge(
            "edge_outbox_oldest_age_seconds", "Age of the oldest undelivered row", ["sink"],
            registry=r,
        )
        self.outbox_dead_letters = Gauge(
            "edge_outbox_dead_letters", "Rows in the dead-letter table", ["sink"], registry=r
        )
        self.outbox_parked_keys = Gauge(
            "edge_outbox_parked_keys",
            "ordering keys held by a dead letter (later events of the key wait)", ["sink"],
            registry=r)
        self.dedupe_pruned = Counter(
            "edge_dedupe_pruned_total",
            "dedupe keys removed (reason: window, horizon, budget)", ["reason"], registry=r)
        self.outbox_size_bytes = Gauge(
            "edge_outbox_size_bytes", "Bytes used by the outbox database", registry=r
        )
        self.outbox_budget_bytes = Gauge(
            "edge_outbox_budget_bytes", "Configured outbox size budget", registry=r
        )
        self.outbox_backpressure = Gauge(
            "edge_outbox_backpressure", "1 while new events are refused (budget full)", registry=r
        )
        self.outbox_commits = Counter(
            "edge_outbox_commits_total", "Write transactions committed", registry=r
        )
        self.outbox_commit_rows = Histogram(
            "edge_outbox_commit_rows",
            "Events per committed transaction",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.outbox_write_errors = Counter(
            "edge_outbox_write_errors_total", "Failed write transactions", ["reason"], registry=r
        )
        self.audit_pruned = Counter(
            "edge_audit_pruned_total",
            "Audit rows removed (retention age, or disk budget for finished events)",
            ["reason"],
            registry=r,
        )
        self.quarantine_pruned = Counter(
            "edge_quarantine_pruned_total",
            "Oldest quarantined records removed to keep the quarantine bounded",
            registry=r,
        )
        self.source_connected = Gauge(
            "edge_source_connected", "1 while the source is connected", ["source"], registry=r
        )
        self.source_errors = Counter(
            "edge_source_errors_total", "Source errors by code", ["source", "code"], registry=r
        )
        self.source_gaps = Counter(
            "edge_source_gaps_total", "Connection gaps of a source", ["source"], registry=r
        )
        self.source_dropped = Counter(
            "edge_source_dropped_total",
            "Notifications a source could not keep (queue overflow)",
            ["source", "reason"],
            registry=r,
        )
        self.source_backfilled = Counter(
            "edge_source_backfilled_total",
            "Events recovered after a gap (e.g. HistoryRead)",
            ["source"],
            registry=r,
        )
        self.sink_up = Gauge("edge_sink_up", "1 while the sink accepts requests", ["sink"],
                             registry=r)
        self.sink_circuit_open = Gauge(
            "edge_sink_circuit_open", "1 while the circuit breaker is open", ["sink"], registry=r
        )
        self.sink_faults = Counter(
            "edge_sink_faults_total",
            "Answers that fault the sink, not the event (3xx, 401/403, unlisted statuses), "
            "by status ('none' without one); the events stay queued",
            ["sink", "code"],
            registry=r,
        )
        self.sink_paused = Gauge(
            "edge_sink_paused",
            "1 while the sink is paused (dead-letter storm guard or refused credentials)",
            ["sink"],
            registry=r,
        )
        self.sink_concurrency = Gauge(
            "edge_sink_concurrency",
            "Requests the sink may have in flight now (its adaptive concurrency limit)",
            ["sink"],
            registry=r,
        )


LOG_FORMATS = ("auto", "text", "json")
"""``logging.format`` / ``--log-format`` values; ``auto`` picks by ``stderr.isatty()``."""

_CORE_KEYS = ("ts", "level", "logger", "msg")


def _timestamp(record: logging.LogRecord) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{ts}.{int(record.msecs):03d}Z"


class _TextFormatter(logging.Formatter):
    """``TS LEVEL logger: msg key=value ...`` for a person at a terminal. A value with a
    space, a quote, ``=`` or a line break is quoted and escaped, so a value cannot fake a
    line; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _fmt(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\\') or not s.isprintable():
        return orjson.dumps(s).decode()
    return s


class _JsonFormatter(logging.Formatter):
    """Exactly one JSON object per line: ``ts`` (UTC, ms), ``level``, ``logger``, ``msg``,
    then the event's fields (a field named like one of those four is kept as ``field_NAME``),
    then ``exc_type`` and ``exc`` (the traceback as one string) when an exception is
    attached. Values that are not JSON types are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            doc[f"field_{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info:
            exc_type = record.exc_info[0]
            doc["exc_type"] = exc_type.__name__ if exc_type else None
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:  # e.g. a non-str dict key: still one line
            return orjson.dumps({k: str(v) for k, v in doc.items()}).decode()


def resolve_log_format(fmt: str, stream: Any = None) -> str:
    """``text`` or ``json``: ``auto`` is JSON unless ``stream`` (stderr) is a terminal."""
    if fmt != "auto":
        return fmt
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once (stderr; ``fmt``: auto, text or json); tame the
    chatty client libraries."""
    handler = logging.StreamHandler(sys.stderr)
    json_lines = resolve_log_format(fmt) == "json"
    handler.setFormatter(_JsonFormatter() if json_lines else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncua logs a traceback every second while a server is down and whole
    # PublishResults at INFO; uvicorn/httpx log every request.
    for name in ("asyncua", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("asyncua.client.ua_session", "asyncua.uaprotocol",
                 "asyncua.common.subscription", "asyncua.server.server"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # a traceback per untrusted certificate / per channel a server drops: the OPC UA
    # source logs one clear line for these instead
    for name in ("asyncuagds.validate", "asyncua.client.ua_client.UASocketProtocol",
                 "asyncua.client.client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def event_ids(event: Any) -> dict[str, Any]:
    """``event_id`` and ``correlation_id`` of one event (a ``StoredEvent``, an ``Event``,
    anything with ``id`` and ``correlation_id``), to spread into ``log_event``. A stored
    body that no longer parses (an integrity failure) gives ``correlation_id`` None."""
    try:
        correlation_id = event.correlation_id
    except Exception:  # noqa: BLE001 - a damaged body must not stop the log line
        correlation_id = None
    return {"event_id": event.id, "correlation_id": correlation_id}


def log_event(logger: logging.Logger, level: int, msg: str, /, **fields: Any) -> None:
    """One structured line: ``msg key=value ...`` as text, or one JSON object with the
    fields as keys. A line about one event passes ``event_id`` and ``correlation_id``."""
    logger.log(level, msg, extra={"fields": fields})
