"""Broker connection keys shared by the ``mqtt`` source and the ``mqtt`` sink."""

from __future__ import annotations

import re
import ssl
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edge.plugin import SecretFile, StrictModel, TlsConfig, client_context

__all__ = ["MqttConnectionConfig", "ssl_context"]


def _protocol(v: Any) -> Any:
    text = str(v).strip().lower().removeprefix("v").removeprefix("mqtt")
    if text in ("3.1.1", "311", "3"):
        return "3.1.1"
    if text in ("5", "5.0", "50"):
        return "5"
    raise ValueError(f"must be 3.1.1 or 5, got {v!r}")


class MqttConnectionConfig(StrictModel):
    """Broker connection keys shared by the ``mqtt`` source and the ``mqtt`` sink."""

    url: str = Field(description="mqtt://host:1883 or mqtts://host:8883 (TLS)")
    client_id: str | None = Field(
        None, description="stable client id of the persistent session; default edge-<site>-<id>"
    )
    protocol: Literal["3.1.1", "5"] = Field("5", description="3.1.1 | 5")
    tls: TlsConfig | None = Field(None, description="CA and client certificate for mqtts://")
    username: str | None = None
    password_file: SecretFile | None = Field(None, description="file holding the password")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive")
    connect_timeout_s: float = Field(10, gt=0, le=300, description="TCP+TLS+CONNACK timeout")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        return _protocol(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"must start with mqtt:// or mqtts://, got {v!r}")
        try:
            port = parts.port
        except ValueError as err:
            raise ValueError(f"invalid port in {v!r}") from err
        if not parts.hostname:
            raise ValueError(f"needs a host, e.g. mqtt://127.0.0.1:1883, got {v!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"must be scheme://host:port without a path, got {v!r}")
        if parts.username or parts.password:
            raise ValueError("credentials do not belong in the url: use username and "
                             "password_file")
        if port == 0:
            raise ValueError(f"invalid port in {v!r}")
        return v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^[\x21-\x7e]{1,128}$", v) or v[0] in "+#$":
            raise ValueError(
                f"must be 1-128 printable ASCII characters without spaces, not starting with "
                f"+, # or $, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _connection_consistent(self) -> MqttConnectionConfig:
        if self.tls is not None and self.scheme == "mqtt":
            raise ValueError("tls is set but url uses mqtt://; use mqtts:// for TLS")
        if self.password_file and not self.username:
            raise ValueError("password_file needs a username")
        return self

    def client_id_for(self, site: str, component_id: str) -> str:
        """``client_id``, or the stable default ``edge-<site>-<id>``."""
        return self.client_id or f"edge-{site}-{component_id}"

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.scheme == "mqtts" else 1883)


def ssl_context(cfg: MqttConnectionConfig, who: str) -> ssl.SSLContext | None:
    """TLS context for an mqtts:// url (None for mqtt://); ConfigError names ``who``."""
    if cfg.scheme != "mqtts":
        return None
    return client_context(cfg.tls, who)
