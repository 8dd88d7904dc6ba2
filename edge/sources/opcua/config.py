"""Configuration of the ``opcua`` source (validated at load; no asyncua import here).

Everything that can be checked without the server is checked here, with the location of
the offending key (``sources[1].monitored[3].deadband: ...``). What needs the server (does
the node exist, is it a Variable, is its type numeric for a deadband) is checked when the
source connects, by ``edge.sources.opcua.nodes``.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator

from edge.plugin import (
    ConfigDir,
    EventClass,
    MappingConfig,
    SecretFile,
    SourceConfigBase,
    StrictModel,
    template_fields,
)

__all__ = [
    "AlarmConfig",
    "AlarmWhereConfig",
    "BackfillConfig",
    "DeadbandConfig",
    "MonitoredItemConfig",
    "OpcUaSourceConfig",
    "SecurityConfig",
    "SeverityClassConfig",
    "TriggerAckConfig",
    "TriggerConfig",
    "validate_node_ref",
]

POLICIES = ("None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
MODES = ("None", "Sign", "SignAndEncrypt")

_NODEID_RE = re.compile(r"^(ns=\d+;|nsu=[^;]+;)?[isgb]=.+$")
_BROWSE_STEP_RE = re.compile(r"^\d+:[^/]+$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EVENT_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


def validate_node_ref(value: str) -> str:
    """A NodeId string (``ns=2;s=Station7.Temperature``, ``nsu=urn:x;s=...``, ``i=2258``)
    or an absolute browse path (``/Objects/2:Station7/2:Temperature``)."""
    v = value.strip()
    if v.startswith("/"):
        steps = v.split("/")[1:]
        if not steps or any(not s for s in steps):
            raise ValueError(f"browse path {value!r} has an empty step")
        if steps[0] not in ("Objects", "0:Objects", "Types", "0:Types", "Views", "0:Views"):
            raise ValueError(
                f"browse path {value!r} must start at /Objects, /Types or /Views"
            )
        for step in steps[1:]:
            if not _BROWSE_STEP_RE.match(step):
                raise ValueError(
                    f"browse path step {step!r} must be <namespace index>:<BrowseName>, "
                    "e.g. 2:Station7"
                )
        return v
    if not _NODEID_RE.match(v):
        raise ValueError(
            f"{value!r} is neither a NodeId like 'ns=2;s=Station7.Temperature' nor a "
            "browse path like '/Objects/2:Station7/2:Temperature'"
        )
    return v


class DeadbandConfig(StrictModel):
    """Server-side filter: changes smaller than the deadband produce no notification."""

    absolute: float | None = Field(None, gt=0, description="in the node's engineering unit")
    percent: float | None = Field(
        None, gt=0, le=100, description="of the node's EURange (the node needs an EURange)"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DeadbandConfig:
        if (self.absolute is None) == (self.percent is None):
            raise ValueError("set exactly one of absolute or percent")
        return self


class MonitoredItemConfig(StrictModel):
    """One data-change subscription; every change becomes one event.

    The event's ``data`` is ``{value, status, node}`` plus ``static`` fields; its
    ``source_ts`` is the value's SourceTimestamp (the ServerTimestamp if the server sends
    none). The dedupe key is ``<node>@<source timestamp>``, so a sample that arrives both
    live and from a HistoryRead backfill is stored once.
    """

    node: str = Field(description="NodeId string or browse path")
    event: str = Field("machine.reading", description="event type")
    event_class: str | None = Field(
        None, alias="class", description="critical | high | normal | low (default by type)"
    )
    ordering_key: str | None = Field(
        None, description="template over data fields and static, e.g. '{station}:{node}'"
    )
    static: dict[str, Any] = Field(
        default_factory=dict, description="constant data fields, e.g. station, characteristic"
    )
    sampling_ms: float = Field(500, ge=0, description="server sampling interval")
    queue_size: int = Field(
        10, ge=1, le=10000, description="server-side queue per item (changes between publishes)"
    )
    deadband: DeadbandConfig | None = None
    backfill: bool = Field(
        True, description="recover a gap with HistoryRead where the node historizes"
    )
    quarantine_status: Literal["none", "bad", "not_good"] = Field(
        "none", description="samples that are quarantined instead of becoming events: none "
        "(every sample is an event with its status), bad, or not_good (Bad and Uncertain)"
    )

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_node_ref(v)

    @field_validator("event")
    @classmethod
    def _event(cls, v: str) -> str:
        if not _EVENT_RE.match(v):
            raise ValueError(f"must be a dotted lowercase name like machine.reading, got {v!r}")
        return v

    @field_validator("event_class")
    @classmethod
    def _class(cls, v: str | None) -> str | None:
        if v is not None:
            EventClass.parse(v)
        return v

    @field_validator("ordering_key")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            template_fields(v)
        return v

    def mapping(self) -> MappingConfig:
        """The ``map`` configuration used for every notification of this item."""
        return MappingConfig.model_validate({
            "event": self.event, "class": self.event_class,
            "ordering_key": self.ordering_key, "static": self.static,
        })


class TriggerAckConfig(StrictModel):
    """Written after the event is committed (handshake: the station may then go on)."""

    node: str = Field(description="NodeId string or browse path of a writable variable")
    value: bool | int | float | str = Field(False, description="value to write")

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_node_ref(v)


class TriggerConfig(MappingConfig):
    """On a change of ``node`` TO ``when``, read ``read`` in one Read call → one event.

    Edge-triggered: a notification fires only when the previous value was different (or
    unknown: the first value after (re)connecting counts as a change, and the default
    dedupe key ``trigger:<node>@<trigger SourceTimestamp>`` turns a repeat of the same edge
    into a duplicate, not a second event). The read values are the payload of ``map``:
    without ``fields`` they become ``data`` as named in ``read``.
    """

    node: str = Field(description="trigger variable (NodeId string or browse path)")
    when: bool | int | float | str = Field(True, description="value that fires the trigger")
    read: dict[str, str] = Field(description="payload name: node, read in ONE Read call")
    sampling_ms: float = Field(100, ge=0, description="server sampling of the trigger node")
    queue_size: int = Field(10, ge=1, le=10000, description="server-side queue of the trigger")
    ack: TriggerAckConfig | None = Field(
        None, description="write this value after the event is committed"
    )

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_node_ref(v)

    @field_validator("read")
    @classmethod
    def _read(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("name at least one node to read")
        for name, node in v.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a field name (letters, digits, _)")
            try:
                validate_node_ref(node)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return v


_SELECT_STEP_RE = re.compile(r"^(\d+:)?[^/:]+$")

# data fields a machine.alarm event gets from the standard select clauses
ALARM_FIELDS = ("event_id", "event_type", "source", "source_node", "time", "message",
                "severity", "severity_class", "condition", "condition_id", "branch_id",
                "retain", "active", "acked", "confirmed", "refresh")


class SeverityClassConfig(StrictModel):
    """Alarms with a severity of at least ``min`` get this event class and name (the
    first entry, by descending ``min``, that fits)."""

    min: int = Field(ge=1, le=1000, description="lowest OPC UA severity (1-1000) of the class")
    event_class: str = Field(alias="class", description="event class: critical | high | "
                             "normal | low")
    name: str | None = Field(None, description="the event's severity_class (default: class)")

    @field_validator("event_class")
    @classmethod
    def _class(cls, v: str) -> str:
        EventClass.parse(v)
        return v

    @property
    def label(self) -> str:
        return self.name or self.event_class


def _default_severity_classes() -> list[SeverityClassConfig]:
    return [SeverityClassConfig.model_validate({"min": m, "class": c})
            for m, c in ((800, "critical"), (500, "high"), (200, "normal"), (1, "low"))]


class AlarmWhereConfig(StrictModel):
    """The server-side where clause: only events that pass it are sent (ConditionRefresh's
    RefreshStart/RefreshEnd events always pass)."""

    min_severity: int | None = Field(None, ge=1, le=1000,
                                     description="only events with at least this severity")
    source_names: list[str] | None = Field(
        None, min_length=1, description="only events whose SourceName is one of these")


class AlarmConfig(StrictModel):
    """One event subscription (OPC UA Alarms & Conditions); every event notification,
    condition state change or refresh becomes one event (default ``machine.alarm``).

    Identity: the event's EventId (dedupe key ``alarm:<EventId hex>``), so a condition
    re-sent by ConditionRefresh after a reconnect is stored once."""

    notifier: str = Field("i=2253", description="node whose events are subscribed "
                          "(default: the Server object)")
    event_types: list[str] = Field(
        default_factory=lambda: ["i=2915"], min_length=1,
        description="event type nodes, subtypes included (default AlarmConditionType; "
                    "i=2041 BaseEventType for every event)")
    select: dict[str, str] = Field(
        default_factory=dict, description="extra data field: browse path below the first "
        "event type, e.g. {high_limit: HighLimit, input: 0:InputNode}")
    where: AlarmWhereConfig | None = Field(None, description="server-side filter")
    event: str = Field("machine.alarm", description="event type")
    severity_classes: list[SeverityClassConfig] = Field(
        default_factory=_default_severity_classes,
        description="severity → event class and severity_class")
    ordering_key: str | None = Field(
        None, description="template over data fields (default alarm:{source})")
    static: dict[str, Any] = Field(default_factory=dict, description="constant data fields")
    queue_size: int = Field(1000, ge=1, le=100000,
                            description="server-side queue of the event item")
    refresh: bool = Field(True, description="call ConditionRefresh after every (re)connect "
                          "and subscription re-creation")

    @field_validator("notifier")
    @classmethod
    def _notifier(cls, v: str) -> str:
        return validate_node_ref(v)

    @field_validator("event_types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        for i, ref in enumerate(v):
            if ref.strip().startswith("/") and not ref.strip().split("/")[1].endswith("Types"):
                raise ValueError(f"[{i}]: an event type lives under /Types, got {ref!r}")
            try:
                validate_node_ref(ref)
            except ValueError as err:
                raise ValueError(f"[{i}]: {err}") from None
        return [r.strip() for r in v]

    @field_validator("select")
    @classmethod
    def _select(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a field name (letters, digits, _)")
            if name in ALARM_FIELDS:
                raise ValueError(f"{name!r} is a standard field of the event; choose another "
                                 f"name (standard: {', '.join(ALARM_FIELDS)})")
            steps = path.split("/")
            if not path or any(not _SELECT_STEP_RE.match(s) for s in steps):
                raise ValueError(f"{name}: {path!r} is not a browse path like HighLimit or "
                                 "2:Limits/2:High (steps <namespace index>:<BrowseName>, "
                                 "namespace 0 when omitted)")
        return v

    @field_validator("event")
    @classmethod
    def _event(cls, v: str) -> str:
        if not _EVENT_RE.match(v):
            raise ValueError(f"must be a dotted lowercase name like machine.alarm, got {v!r}")
        return v

    @field_validator("severity_classes")
    @classmethod
    def _classes(cls, v: list[SeverityClassConfig]) -> list[SeverityClassConfig]:
        mins = [c.min for c in v]
        dup = sorted({m for m in mins if mins.count(m) > 1})
        if dup:
            raise ValueError(f"min {dup[0]} is used twice; each class needs its own min")
        return sorted(v, key=lambda c: -c.min)

    @field_validator("ordering_key")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None:
            template_fields(v)
        return v

    def severity_class(self, severity: int) -> SeverityClassConfig | None:
        """The class of ``severity`` (None: below every ``min``)."""
        for c in self.severity_classes:
            if severity >= c.min:
                return c
        return None


class SecurityConfig(StrictModel):
    """Secure channel. With a policy other than None the server's identity must be fixed
    by ``server_cert_file`` (pinned) or ``trust_dir`` (a folder of trusted DER/PEM
    certificates or CAs): the gateway never trusts a server certificate on first use."""

    policy: Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"] = (
        "None"
    )
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    cert_file: SecretFile | None = Field(None, description="client certificate (DER or PEM)")
    key_file: SecretFile | None = Field(None, description="client private key (PEM)")
    server_cert_file: SecretFile | None = Field(None, description="pinned server certificate")
    trust_dir: ConfigDir | None = Field(None, description="folder of trusted certificates / CAs")

    @model_validator(mode="after")
    def _consistent(self) -> SecurityConfig:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError(
                f"policy {self.policy} and mode {self.mode} do not go together: use None for "
                "both, or a policy with Sign or SignAndEncrypt"
            )
        if self.policy == "None":
            return self
        missing = [k for k in ("cert_file", "key_file") if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} required with policy {self.policy} "
                "(create them with `edge certs`)"
            )
        if self.server_cert_file is None and self.trust_dir is None:
            raise ValueError(
                "set server_cert_file (pin the server certificate) or trust_dir (trusted "
                "certificates); the gateway does not trust a server on first use"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.policy != "None"


class BackfillConfig(StrictModel):
    """HistoryRead after a gap (reconnect, subscription re-created, queue overflow,
    gateway or source restart)."""

    enabled: bool = True
    max_gap_s: float = Field(
        86400, gt=0, description="older parts of a gap are not read (bounded catch-up, "
        "audited backfill_truncated)"
    )
    max_values: int = Field(
        100000, ge=1, description="values read per node in one round; a longer gap is read "
        "on in further rounds (audited backfill_round), other nodes' gaps in between"
    )
    page_values: int = Field(1000, ge=1, le=100000, description="values per HistoryRead call")
    first_sample_wait_s: float = Field(
        10, gt=0, description="wait this long for the first live sample that ends a gap"
    )
    order: Literal["strict", "live_first"] = Field(
        "strict", description="strict: a node's live values wait (in memory, bounded by "
        "queue_max) until the backfilled values of its gap are committed, so every key "
        "keeps source-time order; live_first: live values go at once, backfilled ones "
        "after them"
    )


class OpcUaSourceConfig(SourceConfigBase):
    renamed_keys = {"batch_max": "max_batch", "reconnect_max_delay_s": "reconnect_max_s"}

    type: Literal["opcua"]
    endpoint: str = Field(description="opc.tcp://host:port[/path]")
    security: SecurityConfig = SecurityConfig()
    username: str | None = None
    password_file: SecretFile | None = Field(None, description="file holding the password")
    monitored: list[MonitoredItemConfig] = Field(default_factory=list)
    triggers: list[TriggerConfig] = Field(default_factory=list)
    alarms: list[AlarmConfig] = Field(
        default_factory=list, description="event subscriptions (Alarms & Conditions)")
    publishing_ms: float = Field(
        500, gt=0, description="publishing interval of the monitored-items subscription"
    )
    keepalive_s: float = Field(
        10, gt=0, description="the server sends a keep-alive at least this often"
    )
    timeout_s: float = Field(10, gt=0, description="per request to the server")
    watchdog_s: float = Field(1.0, gt=0, description="connection health probe interval")
    reconnect_max_s: float = Field(30, gt=0, description="cap of the reconnect backoff")
    connect_timeout_s: float = Field(
        3.0, gt=0, description="per reconnect attempt (socket, hello, secure channel, "
        "session): a link that is down is tried again soon instead of waited for")
    queue_max: int = Field(
        10000, ge=10, le=1_000_000,
        description="notifications buffered in the gateway; when full the oldest is dropped "
                    "(counted in edge_source_dropped_total)",
    )
    max_batch: int = Field(
        5000, ge=1, le=100000,
        description="events per outbox commit at most (larger batches sustain higher rates; "
                    "at low rates a commit holds what arrived meanwhile)",
    )
    backfill: BackfillConfig = BackfillConfig()
    application_uri: str | None = Field(
        None, description="client application URI; default: taken from cert_file"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme != "opc.tcp" or not u.hostname:
            raise ValueError(f"must look like opc.tcp://host:4840, got {v!r}")
        try:
            u.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as err:
            raise ValueError(f"bad port in {v!r}: {err}") from None
        if u.username or u.password:
            raise ValueError("put no credentials in the endpoint: use username + password_file")
        return v

    @model_validator(mode="after")
    def _checks(self) -> OpcUaSourceConfig:
        if not self.monitored and not self.triggers and not self.alarms:
            raise ValueError("configure at least one of monitored or triggers (or alarms)")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        if self.username is not None and self.password_file is None:
            raise ValueError("username needs password_file (secrets are never inline)")
        seen: dict[str, str] = {}
        for i, item in enumerate(self.monitored):
            where = f"monitored[{i}].node"
            if item.node in seen:
                raise ValueError(f"{where} {item.node!r} is already monitored by {seen[item.node]}")
            seen[item.node] = where
        trig_seen: dict[str, str] = {}
        for i, trig in enumerate(self.triggers):
            where = f"triggers[{i}].node"
            if trig.node in trig_seen:
                raise ValueError(f"{where} {trig.node!r} is already used by {trig_seen[trig.node]}")
            trig_seen[trig.node] = where
        return self
