"""Configuration: YAML → ``${ENV}`` substitution → pydantic v2 validation.

Contract:
- ``load_config(path)`` returns a validated ``GatewayConfig`` or raises ``ConfigError``
  whose ``issues`` name every problem with its location, e.g.
  ``sinks[0].routes[1].method: must be one of POST, PUT, PATCH, got 'GET'``.
- Components (``sources``/``sinks``) are discriminated unions on ``type`` built from the
  registry, so plugins validate exactly like built-ins. Every model forbids unknown keys.
- ``${VAR}`` / ``${VAR:-default}`` are substituted in every string before validation; a
  missing variable is a located error. Secrets are never inline: keys ending in ``_file``
  name files (relative paths resolve against the config file's folder) that must exist
  unless validated with ``check_files=False``; read them with ``read_secret``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import AfterValidator, BeforeValidator

from edge.config_env import DEFAULT_STATE_DIR, substitute_env
from edge.errors import ConfigError, ConfigIssue
from edge.inline_secrets import check_http_url
from edge.registry import Registry, default_registry
from edge.rules import QualityConfig, RuleConfig

__all__ = [
    "ApiConfig",
    "AuditConfig",
    "AuditFileExportConfig",
    "AuditHttpExportConfig",
    "CircuitBreakerConfig",
    "ConfigDir",
    "GatewayConfig",
    "OutboxConfig",
    "RetryConfig",
    "SecretFile",
    "SinkConfigBase",
    "SourceConfigBase",
    "StormGuardConfig",
    "StrictModel",
    "deprecations",
    "load_config",
    "check_secret_files",
    "load_config_text",
    "read_secret",
    "secret_files",
]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors.

    ``renamed_keys`` maps an option's old name to its new one: the old name keeps working
    for one release (moved to the new key before validation) and ``deprecations(cfg)``
    reports it, located, so ``check-config`` and ``edge run`` name the new key. Giving
    both names is an error.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    renamed_keys: ClassVar[dict[str, str]] = {}
    _deprecated_keys: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _accept_renamed_keys(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        moved: list[tuple[str, str]] = []
        if cls.renamed_keys and isinstance(data, dict):
            data = dict(data)
            for old, new in cls.renamed_keys.items():
                if old not in data:
                    continue
                if new in data:
                    raise ValueError(f"{old} and {new} are the same option; keep {new} "
                                     f"({old} is its deprecated name)")
                data[new] = data.pop(old)
                moved.append((old, new))
        model = handler(data)
        if moved and isinstance(model, StrictModel):
            model._deprecated_keys = moved
        return model


def _existing(kind: Literal["file", "directory"]) -> Any:
    """Validator: resolve a path against the config file's folder; it must exist (unless
    validated with ``check_files=False``)."""

    def check(value: str, info: ValidationInfo) -> str:
        ctx = info.context or {}
        base = ctx.get("base_dir")
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        found = path.is_file() if kind == "file" else path.is_dir()
        if ctx.get("check_files", True) and not found:
            if kind == "file" and path.is_dir():
                raise ValueError(f"{path} is a folder, not a file")
            if path.is_symlink():
                raise ValueError(f"{kind} not found: {path} is a link to "
                                 f"{os.readlink(path)}, which does not exist")
            raise ValueError(f"{kind} not found: {path}")
        return str(path)

    return check


class _SecretMark:
    """Marks ``SecretFile`` fields so ``secret_files`` finds them in any component model."""

    def __repr__(self) -> str:
        return "SecretFile"


SECRET_MARK = _SecretMark()

SecretFile = Annotated[str, AfterValidator(_existing("file")), SECRET_MARK]
"""A path to a file holding a secret or certificate; checked at load, read at start."""

ConfigDir = Annotated[str, AfterValidator(_existing("directory"))]
"""A path to an existing folder (e.g. a certificate trust folder); checked at load."""


def read_secret(path: str | None) -> str | None:
    """Read a secret file, stripping one trailing newline. ``None`` passes through."""
    if path is None:
        return None
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as err:
        raise ConfigError(f"cannot read secret file {path}: {err.strerror}") from err


def _is_secret_annotation(annotation: Any) -> bool:
    from typing import get_args

    if SECRET_MARK in getattr(annotation, "__metadata__", ()):
        return True
    return any(_is_secret_annotation(a) for a in get_args(annotation))


def secret_files(cfg: BaseModel) -> list[tuple[str, str]]:
    """``(location, path)`` of every ``SecretFile`` field set in a loaded config (sources,
    sinks, auth and TLS blocks included), e.g. ``("sources[0].password_file", "/run/...")``."""
    out: list[tuple[str, str]] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, BaseModel):
            for name, field in type(value).model_fields.items():
                item = getattr(value, name, None)
                loc = f"{where}.{name}" if where else name
                if isinstance(item, str) and (SECRET_MARK in field.metadata
                                              or _is_secret_annotation(field.annotation)):
                    out.append((loc, item))
                else:
                    walk(item, loc)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")

    walk(cfg, "")
    return out


API_TOKEN_MIN_LENGTH = 16
"""Shortest API token ``check-config`` and ``edge run`` accept (a guessable token is none)."""


def check_secret_files(cfg: BaseModel) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """Read every secret file of ``cfg``: ``(errors, warnings)``, each located.

    Errors: missing, not a regular file (a folder, a dangling link), unreadable, empty, and
    an ``api.token_file`` token shorter than ``API_TOKEN_MIN_LENGTH``. Warnings: a file
    readable by its group or by others (``mode & 0o044``).
    """
    errors: list[ConfigIssue] = []
    warnings: list[ConfigIssue] = []
    for loc, path in secret_files(cfg):
        p = Path(path)
        try:
            data = p.read_bytes()
        except IsADirectoryError:
            errors.append(ConfigIssue(loc, f"{path} is a folder, not a file"))
            continue
        except OSError as err:
            errors.append(ConfigIssue(loc, f"cannot read secret file {path}: "
                                           f"{err.strerror or err}"))
            continue
        if not data.strip():
            errors.append(ConfigIssue(loc, f"secret file {path} is empty"))
            continue
        try:
            mode = p.stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o044 and not loc.endswith(_PUBLIC_FILES):
            warnings.append(ConfigIssue(loc, f"secret file {path} is readable by its group or "
                                             f"others (mode {mode & 0o777:o}); chmod 600 or 400"))
        if loc == "api.token_file":
            errors.extend(_token_issues(loc, path, data))
    return errors, warnings


_PUBLIC_FILES = ("ca_file", "cert_file")
"""Certificates are typed ``SecretFile`` too, but are public: no warning for their mode."""


def _token_issues(loc: str, path: str, data: bytes) -> list[ConfigIssue]:
    """The api token file's lines (``TOKEN`` or ``NAME TOKEN``, ``#`` comments), as
    ``edge.api.auth.load_tokens`` reads them; each token at least ``API_TOKEN_MIN_LENGTH``."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return [ConfigIssue(loc, f"token file {path} is not UTF-8 text")]
    out: list[ConfigIssue] = []
    found = 0
    for n, line in enumerate(text.splitlines(), 1):
        parts = re.sub(r"(^|\s)#.*$", "", line).split()  # as load_tokens: '#' in a token stays
        if not parts:
            continue
        if len(parts) > 2:
            out.append(ConfigIssue(loc, f"{path} line {n}: must be 'TOKEN' or 'NAME TOKEN'"))
            continue
        found += 1
        if len(parts[-1]) < API_TOKEN_MIN_LENGTH:
            out.append(ConfigIssue(loc, f"{path} line {n}: token is {len(parts[-1])} characters,"
                                        f" at least {API_TOKEN_MIN_LENGTH} are required"))
    if not found and not out:
        out.append(ConfigIssue(loc, f"token file {path} has no token (only comments)"))
    return out


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ComponentConfigBase(StrictModel):
    id: str = Field(description="unique id of this component; names it in metrics and /status")
    type: str

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not _ID_RE.match(v):
            raise ValueError(
                "must be 1-64 characters of letters, digits, '_', '.', '-' "
                f"starting with a letter or digit, got {v!r}"
            )
        return v


class SourceConfigBase(ComponentConfigBase):
    """Keys every source has. Subclasses set ``type: Literal["name"]``."""


class RetryConfig(StrictModel):
    initial_backoff_s: float = Field(1.0, gt=0, description="first retry delay (full jitter)")
    max_backoff_s: float = Field(300.0, gt=0, description="cap of the exponential backoff")
    max_attempts: int | None = Field(
        None, ge=1, description="dead-letter after this many attempts; null = retry forever"
    )


class CircuitBreakerConfig(StrictModel):
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    open_s: float = Field(10.0, gt=0, description="wait before one probe request")
    max_open_s: float = Field(120.0, gt=0, description="cap when probes keep failing")


class StormGuardConfig(StrictModel):
    """Dead-letter storm guard: when most recent answers of a sink are the same dead-letter
    status (a wrong base URL → 404 for everything, a removed API version → 410), the sink
    pauses with an alarm instead of dead-lettering its backlog (``edge sink resume``)."""

    enabled: bool = Field(True, description="pause the sink on a dead-letter storm")
    window_outcomes: int = Field(
        20, ge=2, le=10_000, description="judge the last N answers of the sink, one per event"
    )
    min_share: float = Field(
        0.9, gt=0, le=1, description="share of those answers that are one dead-letter status"
    )
    min_events: int = Field(
        10, ge=1, description="distinct events among them (one event replayed is no storm)"
    )

    @model_validator(mode="after")
    def _events_fit(self) -> StormGuardConfig:
        if self.min_events > self.window_outcomes:
            raise ValueError(f"min_events ({self.min_events}) must not exceed "
                             f"window_outcomes ({self.window_outcomes})")
        return self


class SinkConfigBase(ComponentConfigBase):
    """Keys every sink has; the forwarder reads them. Subclasses set ``type``."""

    rate_limit_per_s: float | None = Field(
        None, gt=0, description="max events/s sent (drain limit); null = unlimited"
    )
    max_in_flight: int = Field(4, ge=1, le=256, description="leased batches sent concurrently "
                               "(lanes; their requests share the sink's max_in_flight_requests)")
    adaptive_concurrency: bool = Field(
        True, description="adapt the requests in flight to the receiver (AIMD on round-trip "
        "time and on 429/503/timeouts), up to max_in_flight_requests; false: always "
        "max_in_flight_requests (sinks that send requests concurrently: http, mqtt, nats)")
    lease_batch: int = Field(500, ge=1, le=10000, description="rows leased per outbox read")
    live_share: float = Field(
        0.2, ge=0, le=1, description="share of each lease taken from the newest rows"
    )
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    storm_guard: StormGuardConfig = StormGuardConfig()
    shutdown_grace_s: float = Field(5.0, ge=0, description="finish in-flight sends on stop")
    on_dead_letter: Literal["park", "continue"] = Field(
        "park",
        description="park: a dead letter holds the later events of its ordering key until "
        "an operator replays or discards it; continue: later events of the key flow on",
    )


class OutboxConfig(StrictModel):
    synchronous: Literal["full", "normal"] = Field(
        "full", description="full: a commit survives power loss; required to ack upstream"
    )
    max_size_mb: float = Field(2048, gt=0, description="disk budget of the outbox")
    commit_interval_ms: float = Field(10, ge=0, le=5000, description="group-commit window")
    commit_max_rows: int = Field(500, ge=1, le=100000, description="rows per transaction")
    alarm_at_percent: float = Field(80, gt=0, le=100, description="health degraded above")
    expire_at_percent: float = Field(90, gt=0, le=100, description="expire `low` rows above")
    dedupe_window_s: float = Field(
        7 * 86400, ge=0, description="how long a source's dedupe key maps to its event id"
    )
    audit_retention_days: float = Field(
        90, gt=0, description="deprecated name of audit.retention_days"
    )
    quarantine_max_rows: int = Field(
        10_000, ge=1, description="newest quarantined inbound records kept"
    )
    # the gateway's ``audit`` section, handed over at load (``GatewayConfigBase``)
    _audit: AuditConfig | None = PrivateAttr(None)

    @property
    def audit(self) -> AuditConfig:
        """The audit settings the outbox applies (defaults when built on its own)."""
        if self._audit is None:
            self._audit = AuditConfig(retention_days=self.audit_retention_days)
        return self._audit

    @model_validator(mode="after")
    def _thresholds(self) -> OutboxConfig:
        if self.expire_at_percent < self.alarm_at_percent:
            raise ValueError("expire_at_percent must be >= alarm_at_percent")
        return self


class AuditFileExportConfig(StrictModel):
    """Ship audit entries to a bundle folder before they are pruned (docs/audit.md)."""

    type: Literal["file"] = "file"
    path: str = Field(description="bundle folder (created if missing; relative to the "
                      "config file): JSON-lines files that verify on their own with "
                      "`edge audit verify --bundle`")
    interval_s: float = Field(60, gt=0, description="how often new entries are shipped")
    max_file_rows: int = Field(100_000, ge=1, description="entries per bundle file")

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        path = Path(v)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        return str(path)


class AuditHttpExportConfig(StrictModel):
    """POST audit entries to an archive before they are pruned (docs/audit.md)."""

    type: Literal["http"]
    url: str = Field(description="http(s) URL that receives each batch as one POST of "
                     "JSON lines (the bundle file format); 2xx = stored")
    token_file: SecretFile | None = Field(
        None, description="bearer token file (Authorization: Bearer)")
    ca_file: SecretFile | None = Field(
        None, description="CA bundle (PEM) of the archive's certificate; default: system")
    timeout_s: float = Field(30, gt=0, description="per request")
    interval_s: float = Field(60, gt=0, description="how often new entries are shipped")
    max_file_rows: int = Field(10_000, ge=1, description="entries per POST")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        return check_http_url(v, "put the archive's token in token_file")


def _export_type(value: Any) -> Any:
    """``type`` defaults to ``file`` (the first export kind)."""
    if isinstance(value, dict) and "type" not in value:
        return {"type": "file", **value}
    return value


AuditExportConfig = Annotated[
    AuditFileExportConfig | AuditHttpExportConfig, Field(discriminator="type"),
    BeforeValidator(_export_type)]


class AuditConfig(StrictModel):
    retention_days: float = Field(
        90, gt=0, description="audit entries older are pruned, leaving a checkpoint "
        "(earlier under disk pressure); with export, only entries already exported")
    export: AuditExportConfig | None = Field(
        None, description="ship entries to a bundle folder (type: file) or an archive URL "
        "(type: http) before pruning them")
    checkpoint_key_file: SecretFile | None = Field(
        None, description="HMAC-SHA256 key that signs every checkpoint (prune records); "
        "`edge audit verify --key-file` checks the signatures")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiConfig(StrictModel):
    listen: str = Field("127.0.0.1:8080", description="host:port of the local health/API")
    token_file: SecretFile | None = Field(
        None, description="bearer token file; required when listen is not loopback"
    )
    hosts: list[Annotated[str, AfterValidator(_host_entry)]] = Field(
        default_factory=list,
        description="more host:port names the API answers to besides listen (Host header), "
        "e.g. gw01.plant.local:8080; anything else is refused (DNS rebinding)",
    )
    enabled: bool = True

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    @field_validator("listen")
    @classmethod
    def _listen_shape(cls, v: str) -> str:
        split_host_port(v)
        return v

    @staticmethod
    def _host_entry(value: str) -> str:
        """One ``api.hosts`` entry: ``name:port`` or ``address:port``, as a browser sends it
        in ``Host`` (edge.api.guard compares case-insensitively)."""
        m = re.match(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                     r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*):(\d{1,5})$", value)
        if not m or not 1 <= int(m.group(5)) <= 65535:
            raise ValueError(
                "must be host:port, the name and port the API is opened with, e.g. "
                f"gw01.plant.local:8080 ([fd00::5]:8080 for IPv6), got {value!r}"
            )
        if value.startswith("["):
            try:
                ipaddress.IPv6Address(value[1 : value.rindex("]")])
            except ValueError as err:
                raise ValueError(f"must hold a valid IPv6 address in [...], got {value!r}"
                                 ) from err
        return value

    @model_validator(mode="after")
    def _token_when_exposed(self) -> ApiConfig:
        if not _is_loopback(self.host) and not self.token_file:
            raise ValueError(
                f"token_file is required when listen ({self.listen}) is not a loopback address"
            )
        return self


def split_host_port(value: str) -> tuple[str, int]:
    m = re.match(r"^\[([0-9a-fA-F:]+)\]:(\d+)$", value) or re.match(r"^([^:\s]+):(\d+)$", value)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"must be host:port (IPv6 as [::1]:8080), got {value!r}")
    return m.group(1), int(m.group(2))


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "text", "json"] = "auto"
    """``auto``: JSON lines when stderr is not a terminal (journald, Docker), text on one."""


class GatewayConfigBase(StrictModel):
    site: str = Field(description="plant/site id; stamped on every event")
    state_dir: str = Field(
        DEFAULT_STATE_DIR, description="outbox.db, audit, certificates"
    )
    plugins_dir: str | None = Field(None, description="folder of drop-in plugin packages")
    outbox: OutboxConfig = OutboxConfig()
    audit: AuditConfig = Field(
        default_factory=AuditConfig, description="audit trail: retention, export, "
        "checkpoint signing (docs/audit.md)")
    api: ApiConfig = ApiConfig()
    logging: LoggingConfig = LoggingConfig()
    rules: list[RuleConfig] = Field(
        default_factory=list, description="edge quality rules (docs/quality.md): spec_limits, "
        "capa")
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="lot tracking: stuck lots, retention")
    # Replaced by discriminated unions of the registered types in build_config_model().
    sources: list[Any] = Field(default_factory=list)
    sinks: list[Any] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> GatewayConfigBase:
        seen: dict[str, str] = {}
        for kind in ("sources", "sinks"):
            for i, comp in enumerate(getattr(self, kind, [])):
                where = f"{kind}[{i}]"
                if comp.id in seen:
                    raise ValueError(f"{where}.id {comp.id!r} is already used by {seen[comp.id]}")
                seen[comp.id] = where
        return self

    @model_validator(mode="after")
    def _audit_to_outbox(self) -> GatewayConfigBase:
        """``outbox.audit_retention_days`` is the old name of ``audit.retention_days``
        (reported by ``deprecations``); the outbox applies the ``audit`` section."""
        old = "audit_retention_days" in self.outbox.model_fields_set
        if old and self.outbox.audit_retention_days != self.audit.retention_days:
            if "retention_days" in self.audit.model_fields_set:
                raise ValueError("outbox.audit_retention_days and audit.retention_days are the "
                                 "same option; keep audit.retention_days")
            self.audit.retention_days = self.outbox.audit_retention_days
            self.outbox._deprecated_keys = [*self.outbox._deprecated_keys,
                                            ("audit_retention_days", "audit.retention_days")]
        else:
            self.outbox.audit_retention_days = self.audit.retention_days
        self.outbox._audit = self.audit
        return self

    @model_validator(mode="after")
    def _reconcile_reads_http_sinks(self) -> GatewayConfigBase:
        """``quality.reconcile.sources[].sink`` names a configured ``http`` sink: its
        client (url, auth, TLS) does the reads."""
        reconcile = self.quality.reconcile
        if reconcile is None:
            return self
        types = {s.id: getattr(s, "type", None) for s in self.sinks}
        for i, src in enumerate(reconcile.sources):
            where = f"quality.reconcile.sources[{i}].sink"
            if src.sink not in types:
                known = ", ".join(sorted(types)) or "(no sinks)"
                raise ValueError(f"{where}: no sink {src.sink!r}; one of {known}")
            if types[src.sink] != "http":
                raise ValueError(f"{where}: sink {src.sink!r} is type {types[src.sink]}; "
                                 "lot status is read through an http sink")
        return self

    @field_validator("state_dir")
    @classmethod
    def _resolve_state_dir(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        path = Path(v)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        return str(path)


# The concrete model (with source/sink unions) is built from the registry at load time;
# this alias is what the rest of the code types against.
GatewayConfig = GatewayConfigBase


def build_config_model(registry: Registry, base: type[GatewayConfigBase] = GatewayConfigBase
                       ) -> type[GatewayConfigBase]:
    """``base`` (``GatewayConfigBase``, or a relay's) + ``sources``/``sinks`` as
    discriminated unions of the registry."""

    def union(kind: Literal["source", "sink"]) -> Any:
        types = registry.types(kind)
        models = [c.config_model for c in types.values()]
        allowed = ", ".join(sorted(types)) or "(none installed)"

        def known_type(item: Any) -> Any:
            # One clear error for an unknown type instead of every field of every model.
            if isinstance(item, dict):
                if "type" not in item:
                    raise ValueError(f"missing key 'type' (one of {allowed})")
                if item["type"] not in types:
                    raise ValueError(f"type must be one of {allowed}, got {item['type']!r}")
            return item

        if not models:
            return Annotated[dict[str, Any], BeforeValidator(known_type)]
        if len(models) == 1:
            return Annotated[models[0], BeforeValidator(known_type)]
        return Annotated[
            Union[tuple(models)],  # noqa: UP007
            Field(discriminator="type"),
            BeforeValidator(known_type),
        ]

    model = create_model(
        "GatewayConfig" if base is GatewayConfigBase else base.__name__.removesuffix("Base"),
        __base__=base,
        sources=cast(Any, (list.__class_getitem__(union("source")), Field(default_factory=list))),
        sinks=cast(Any, (list.__class_getitem__(union("sink")), Field(default_factory=list))),
    )

    return model


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    check_files: bool = True,
) -> GatewayConfigBase:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read {p}: {err.strerror}") from err
    return load_config_text(
        text, base_dir=p.resolve().parent, env=env, registry=registry, check_files=check_files
    )


def load_config_text(
    text: str,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    registry: Registry | None = None,
    check_files: bool = True,
) -> GatewayConfigBase:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([ConfigIssue(where, f"invalid YAML: {problem}")]) from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping of keys (site, sources, sinks, ...)")
    issues: list[ConfigIssue] = []
    raw = substitute_env(raw, os.environ if env is None else env, "", issues)
    if issues:
        raise ConfigError(issues)
    reg = registry or default_registry()
    plugins_dir = raw.get("plugins_dir")
    if isinstance(plugins_dir, str):
        pdir = Path(plugins_dir)
        if not pdir.is_absolute() and base_dir is not None:
            pdir = Path(base_dir) / pdir
        reg.load_plugins_dir(pdir)
        raw["plugins_dir"] = str(pdir)
    base: type[GatewayConfigBase] = GatewayConfigBase
    if "relay" in raw:  # a relay's file (``edge relay -c FILE``): sinks and a relay section
        from edge.relay.config import RelayFileConfigBase

        base = RelayFileConfigBase
    model = build_config_model(reg, base)
    context = {"base_dir": str(base_dir) if base_dir else None, "check_files": check_files}
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, raw)) from err


def deprecations(cfg: BaseModel) -> list[ConfigIssue]:
    """Every option given under its deprecated name, located like config errors
    (``sinks[erp].routes[0].max_batch``), with the name to use instead."""
    out: list[ConfigIssue] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, StrictModel):
            for old, new in value._deprecated_keys:
                loc = f"{where}.{old}" if where else old
                out.append(ConfigIssue(loc, f"deprecated name: use {new} (the old name is "
                                            "accepted until the next release)"))
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{where}.{name}" if where else name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                ident = getattr(item, "id", None)
                walk(item, f"{where}[{ident if isinstance(ident, str) else i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")

    walk(cfg, "")
    return out


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of the configuration, including every registered component."""
    model = build_config_model(registry or default_registry())
    schema = TypeAdapter(model).json_schema(mode="validation")
    schema["title"] = "edge-gateway configuration"
    return schema


# --------------------------------------------------------------------------- error text


def format_validation_error(
    err: ValidationError, model: type[BaseModel], raw: Any
) -> list[ConfigIssue]:
    """Pydantic errors → located, plant-engineer-readable issues."""
    out: list[ConfigIssue] = []
    for e in err.errors(include_url=False):
        loc = _location(e["loc"], raw)
        out.append(ConfigIssue(loc, _message(e, model, e["loc"], raw)))
    return out


def _location(loc: tuple[Any, ...], raw: Any) -> str:
    """``('sinks', 0, 'http', 'routes', 1, 'method')`` → ``sinks[0].routes[1].method``.

    The discriminator tag pydantic inserts after a list index is dropped. A model-level
    error on a unique-id check is located by its message instead.
    """
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and node.get("type") == item:
            continue  # discriminator tag
        if isinstance(item, str) and item.startswith(("function-", "json-or-python")):
            continue
        parts.append(f".{item}" if parts else str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...], raw: Any) -> type[BaseModel] | None:
    """The model class that owns the key at ``loc`` (for listing allowed keys)."""
    current: Any = model
    node = raw
    for item in loc[:-1]:
        if isinstance(item, int):
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and node.get("type") == item:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(item)
        if field is None:
            return None
        current = _unwrap_model(field.annotation, node.get(item) if isinstance(node, dict) else None)
        node = node.get(item) if isinstance(node, dict) else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any, value: Any) -> Any:
    """Find the BaseModel inside ``list[Annotated[Union[...]]]``/``X | None``."""
    from typing import get_args, get_origin

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = get_args(annotation)
    if not args:
        return None
    if get_origin(annotation) is list:
        item = value[0] if isinstance(value, list) and value else None
        return _unwrap_model(args[0], item if isinstance(item, dict) else None)
    candidates = [_unwrap_model(a, value) for a in args]
    models = [c for c in candidates if c is not None]
    if isinstance(value, dict) and "type" in value:
        for m in models:
            f = m.model_fields.get("type")
            if f is not None and value["type"] in get_args(f.annotation):
                return m
    return models[0] if len(models) == 1 else None


def _message(e: Any, model: type[BaseModel], loc: tuple[Any, ...], raw: Any) -> str:
    kind = e["type"]
    ctx = e.get("ctx") or {}
    got = e.get("input")
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        allowed = ", ".join(x.strip().strip("'\"") for x in re.split(r",| or ", expected) if x.strip())
        return f"must be one of {allowed}, got {got!r}"
    if kind == "union_tag_invalid":
        allowed = ", ".join(x.strip().strip("'\"") for x in str(ctx.get("expected_tags", "")).split(","))
        return f"type must be one of {allowed}, got {ctx.get('tag')!r}"
    if kind == "union_tag_not_found":
        return "missing key 'type'"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        owner = _model_at(model, loc, raw)
        allowed = ", ".join(f.alias or n for n, f in owner.model_fields.items()) if owner else ""
        return f"unknown key{f' (allowed: {allowed})' if allowed else ''}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", e["msg"])).removeprefix("Value error, ")
    msg = e["msg"]
    if got is not None and not isinstance(got, (dict, list)):
        return f"{msg}, got {got!r}"
    return msg
