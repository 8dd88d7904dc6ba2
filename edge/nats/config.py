"""Connection keys of the JetStream tier, shared by the ``nats`` sink and ``edge relay``.

``NatsConnection`` holds the servers, TLS, authentication (secrets only as files, read by
``edge.nats.connection.connect`` at start) and the reconnect behaviour. A component's
config model inherits it (``class NatsSinkConfig(SinkConfigBase, NatsConnection)``), so
every component that talks to NATS has the same keys with the same meaning.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edge.plugin import SecretFile, StrictModel, TlsConfig

__all__ = [
    "CredsAuth",
    "NatsAuth",
    "NatsConnection",
    "NkeyAuth",
    "NoAuth",
    "TokenAuth",
    "UserPasswordAuth",
]

SCHEMES = ("nats", "tls")


class NoAuth(StrictModel):
    """No credentials (a server that allows anonymous clients)."""

    type: Literal["none"] = "none"


class UserPasswordAuth(StrictModel):
    type: Literal["user_password"]
    user: str = Field(min_length=1, description="NATS user name")
    password_file: SecretFile = Field(description="file holding the password")


class TokenAuth(StrictModel):
    type: Literal["token"]
    token_file: SecretFile = Field(description="file holding the authentication token")


class NkeyAuth(StrictModel):
    type: Literal["nkey"]
    nkey_seed_file: SecretFile = Field(
        description="file holding the user's NKEY seed (SU...); needs the nkeys package")


class CredsAuth(StrictModel):
    type: Literal["creds"]
    creds_file: SecretFile = Field(
        description="decentralized-auth credentials file (user JWT + NKEY seed, as `nsc` "
        "writes it); needs the nkeys package")


NatsAuth = Annotated[
    NoAuth | UserPasswordAuth | TokenAuth | NkeyAuth | CredsAuth, Field(discriminator="type")
]


class NatsConnection(StrictModel):
    """Where and how to connect to NATS; secrets are files, never inline."""

    servers: list[str] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1,
        description="server URLs of one cluster, nats://host:4222 or tls://host:4222; "
        "no credentials in them")
    name: str | None = Field(
        None, description="client name shown by the server (connz); default edge-<site>-<id>")
    connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="TCP + TLS + CONNECT handshake timeout per server")
    tls: TlsConfig | None = Field(
        None, description="CA and client certificate; set it (or use tls://) for TLS")
    auth: NatsAuth = Field(default_factory=NoAuth, description="none | user_password | token "
                           "| nkey | creds")
    reconnect_wait_s: float = Field(
        2.0, gt=0, le=300, description="pause between reconnect attempts to one server")
    max_reconnect_attempts: int = Field(
        -1, ge=-1, description="reconnect attempts per server before the connection is "
        "closed (it is opened again on the next use); -1 = forever")
    ping_interval_s: float = Field(
        20.0, gt=0, le=3600, description="client PING interval; a dead connection is noticed "
        "after ping_interval_s × max_outstanding_pings")
    max_outstanding_pings: int = Field(2, ge=1, le=100, description="unanswered PINGs that "
                                       "mark the connection dead")

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in SCHEMES:
                raise ValueError(f"must start with nats:// or tls://, got {url!r}")
            if parts.username or parts.password:
                raise ValueError("credentials do not belong in the server URL: use auth "
                                 "(user_password, token, nkey or creds)")
            try:
                port = parts.port
            except ValueError as err:
                raise ValueError(f"invalid port in {url!r}") from err
            if not parts.hostname or port == 0:
                raise ValueError(f"needs a host, e.g. nats://127.0.0.1:4222, got {url!r}")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"must be scheme://host:port without a path, got {url!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c.isspace() for c in v)):
            raise ValueError(f"must be a non-empty name without whitespace, got {v!r}")
        return v

    @model_validator(mode="after")
    def _tls_consistent(self) -> NatsConnection:
        schemes = {urlsplit(u).scheme for u in self.servers}
        if len(schemes) > 1:
            raise ValueError("servers mix nats:// and tls://; use one scheme for a cluster")
        return self

    @property
    def uses_tls(self) -> bool:
        """TLS is used when ``tls`` is set or the servers are ``tls://`` URLs."""
        return self.tls is not None or urlsplit(self.servers[0]).scheme == "tls"

    def client_name(self, site: str, component_id: str) -> str:
        """``name``, or the stable default ``edge-<site>-<id>``."""
        return self.name or f"edge-{site}-{component_id}"
