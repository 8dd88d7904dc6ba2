"""Config model of the ``http`` sink: base URL, routes, auth, TLS, limits.

Cheap to import (no aiohttp). Secrets are read at start from ``*_file`` paths and never
logged; ``check_headers`` and ``check_url`` refuse secrets written inline (header names and
URL query parameters that look like credentials, user:password in a URL) at config load.

Auth (discriminated on ``type``):
- ``none``
- ``api_key``   header (default ``X-API-Key``) from ``key_file``
- ``bearer``    ``Authorization: Bearer`` from ``token_file``
- ``oauth2_client_credentials``   token from ``token_url`` cached until ``expires_in`` minus
  ``expiry_skew_s``, fetched under a lock (one fetch for many concurrent requests).

Routes may govern their payload (``schema_file``, ``api_version``; see ``contract``) and
choose their delivery mode: ``realtime`` (default) or ``{scheduled: {every_s: N}}``.
"""

from __future__ import annotations

import datetime as dt
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from edge import plugin
from edge.plugin import (
    DeliveryMode,
    ScheduledDelivery,
    SchedulePeriod,
    SecretFile,
    SinkConfigBase,
    StrictModel,
    TlsConfig,
    event_matches,
    looks_secret,
    template_fields,
)

__all__ = [
    "RESERVED_HEADERS",
    "ApiKeyAuth",
    "AuthConfig",
    "BearerAuth",
    "HttpSinkConfig",
    "NoAuth",
    "OAuth2Auth",
    "RouteConfig",
    "ScheduledDelivery",
    "SchedulePeriod",
    "check_headers",
    "check_http_url",
    "check_url",
    "looks_secret",
]

# Set by the sink on every request; a configured header of these names is refused.
RESERVED_HEADERS = frozenset({"idempotency-key", "x-correlation-id", "traceparent"})

_INLINE_HINT = "use auth (api_key, bearer, oauth2_client_credentials) with a *_file"


def check_headers(headers: Iterable[str]) -> None:
    """ValueError naming the first header that would carry a secret inline."""
    for name in headers:
        if looks_secret(name):
            raise ValueError(f"{name}: secrets are not allowed inline; {_INLINE_HINT}")


def check_url(url: str) -> None:
    """``edge.plugin.check_url`` with the sink's hint (the auth block)."""
    plugin.check_url(url, _INLINE_HINT)


def check_http_url(url: str) -> str:
    """``edge.plugin.check_http_url`` with the sink's hint (the auth block)."""
    return plugin.check_http_url(url, _INLINE_HINT)


class NoAuth(StrictModel):
    type: Literal["none"] = "none"


class ApiKeyAuth(StrictModel):
    type: Literal["api_key"]
    header: str = Field("X-API-Key", description="header that carries the key")
    key_file: SecretFile


class BearerAuth(StrictModel):
    type: Literal["bearer"]
    token_file: SecretFile


class OAuth2Auth(StrictModel):
    type: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str
    client_secret_file: SecretFile
    scope: str | None = None
    audience: str | None = None
    expiry_skew_s: float = Field(30.0, ge=0, description="refresh this long before expiry")
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("token_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v)


AuthConfig = Annotated[
    NoAuth | ApiKeyAuth | BearerAuth | OAuth2Auth, Field(discriminator="type")
]


_TEMPLATE_ROOTS = {"id", "type", "site", "source", "ordering_key", "class", "correlation_id",
                   "data"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)


def _schema_file(value: str, info: ValidationInfo) -> str:
    """Resolve against the config file's folder; unless validated with
    ``check_files=False``, the file must be a valid JSON Schema (``contract.load_schema``)."""
    ctx = info.context or {}
    path = Path(value)
    base = ctx.get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if ctx.get("check_files", True):
        from edge.sinks.http.contract import load_schema  # jsonschema only when used

        load_schema(path)  # SchemaFileError is a ValueError: a located config error
    return str(path)


SchemaFile = Annotated[str, AfterValidator(_schema_file)]


class RouteConfig(StrictModel):
    renamed_keys = {"batch_max": "max_batch"}

    events: list[str] = Field(
        description="event types this route carries; '*' = all, 'inspection.*' = a prefix",
        min_length=1,
    )
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    path: str = Field(description="appended to url; template, e.g. /lots/{data.lot_id}/status")
    max_batch: int = Field(1, ge=1, le=10_000, description="> 1 sends JSON arrays")
    body: Literal["envelope", "data"] = Field(
        "envelope", description="send the whole canonical envelope or only its data"
    )
    headers: dict[str, str] = Field(default_factory=dict)
    schema_file: SchemaFile | None = Field(
        None, description="JSON Schema (draft 2020-12) every body of the route must satisfy")
    api_version: str | None = Field(None, description="sent in api_version_header")
    api_version_header: str = "Api-Version"
    delivery: DeliveryMode = Field(
        "realtime", description="realtime, or {scheduled: {every_s: N}}: sent in batches once "
                                "per period")

    @field_validator("api_version", mode="before")
    @classmethod
    def _api_version(cls, v: Any) -> Any:
        if isinstance(v, (int, float, dt.date)) and not isinstance(v, bool):
            v = v.isoformat() if isinstance(v, dt.date) else str(v)  # YAML read it as such
        if isinstance(v, str) and (not v.strip() or not v.isprintable()):
            raise ValueError(f"must be a non-empty printable value, got {v!r}")
        return v

    @field_validator("api_version_header")
    @classmethod
    def _api_version_header(cls, v: str) -> str:
        if not _TOKEN.fullmatch(v):
            raise ValueError(f"must be a header name, got {v!r}")
        _check_headers({v: ""})
        if v.lower() in ("content-type", "content-length", "host", "user-agent"):
            raise ValueError(f"{v}: set by the gateway on every request; choose another name")
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _method_upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) and v.upper() in ("POST", "PUT", "PATCH") else v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        path, _, query = v.partition("?")
        if query:
            check_url("/?" + query)  # first: the messages below repeat the path
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        for name in template_fields(v):
            if name.split(".")[0] not in _TEMPLATE_ROOTS:
                allowed = ", ".join(sorted(_TEMPLATE_ROOTS))
                raise ValueError(f"unknown template field {{{name}}}; use {allowed} or data.<field>")
        # the template's own segments (each value is one more, checked per event at send)
        filled = "".join(literal + ("x" if name else "")
                         for literal, name, _, _ in string.Formatter().parse(path))
        segments = filled.split("/")[1:]
        if any(seg in (".", "..") for seg in segments) or "" in segments[:-1]:
            raise ValueError(f"must not have '.', '..' or empty segments, got {v!r}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        _check_headers(v)
        return v

    @field_validator("body")
    @classmethod
    def _batch_body(cls, v: str, info: ValidationInfo) -> str:
        if v == "data" and info.data.get("max_batch", 1) > 1:
            raise ValueError("a batched route (max_batch > 1) must send the envelope so every "
                             "element carries its id")
        return v

    @model_validator(mode="after")
    def _batch_path(self) -> RouteConfig:
        if self.max_batch > 1 and any(f.startswith("data") for f in template_fields(self.path)):
            raise ValueError("a batched route (max_batch > 1) needs a path without data fields")
        return self

    @model_validator(mode="after")
    def _api_version_set(self) -> RouteConfig:
        if self.api_version is None:
            if "api_version_header" in self.model_fields_set:
                raise ValueError("api_version_header names the header of api_version; "
                                 "set api_version too")
            return self
        name = self.api_version_header.lower()
        for header in self.headers:
            if header.lower() == name:
                raise ValueError(f"headers.{header}: the route's api_version sets this "
                                 "header; keep one of them")
        return self

    def matches(self, event_type: str) -> bool:
        return event_matches(self.events, event_type)


class HttpSinkConfig(SinkConfigBase):
    renamed_keys = {"max_concurrent_requests": "max_in_flight_requests"}

    type: Literal["http"]
    url: str = Field(description="base URL, e.g. https://erp.example.com/api/v1")
    routes: list[RouteConfig] = Field(min_length=1)
    auth: AuthConfig = Field(default_factory=NoAuth)
    tls: TlsConfig | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="sent on every request")
    timeout_s: float = Field(10.0, gt=0, description="whole-request timeout")
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(128, ge=1, le=256, description="connections to the receiver "
                                 "at most; keep >= max_in_flight_requests")
    max_in_flight_requests: int = Field(
        128, ge=1, le=256, description="requests in flight for the whole sink at most (all "
        "lanes): the ceiling of adaptive_concurrency, or the fixed limit without it")
    duplicate_statuses: list[int] = Field(
        default_factory=lambda: [409], description="statuses that mean 'already exists'"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v).rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        _check_headers(v)
        return v

    @model_validator(mode="after")
    def _api_version_headers(self) -> HttpSinkConfig:
        names = {h.lower(): h for h in self.headers}
        for i, route in enumerate(self.routes):
            if route.api_version is not None and route.api_version_header.lower() in names:
                raise ValueError(f"headers.{names[route.api_version_header.lower()]}: "
                                 f"routes[{i}] sets this header from its api_version; keep "
                                 "one of them")
        return self


def _check_headers(headers: dict[str, str]) -> None:
    """Not the headers the sink sets on every request itself, and no inline secrets."""
    for name in headers:
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"{name}: set by the gateway on every request; remove it")
    check_headers(headers)
