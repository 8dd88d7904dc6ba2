"""Every TLS client context the gateway builds: one config model, one set of error messages.

Used by the MQTT source and sink (``mqtts://``) and the HTTP sink (``https://``). OPC UA
secures its channel with its own certificates (``edge.sources.opcua.security``), not TLS.

Contract: ``client_context`` verifies the server against ``ca_file`` (default: the system
trust store), requires TLS 1.2 or newer, presents the client certificate when both
``cert_file`` and ``key_file`` are given, and turns an unreadable or invalid file into a
``ConfigError`` located at ``tls`` and naming the component.
"""

from __future__ import annotations

import ssl

from pydantic import Field, model_validator

from edge.config import SecretFile, StrictModel
from edge.errors import ConfigError

__all__ = ["TlsConfig", "client_context"]


class TlsConfig(StrictModel):
    """CA bundle and optional client certificate (mTLS) of one connection."""

    ca_file: SecretFile | None = Field(
        None, description="CA bundle (PEM) that signed the server's certificate; "
        "default: the system trust store")
    cert_file: SecretFile | None = Field(None, description="client certificate (PEM) for mTLS")
    key_file: SecretFile | None = Field(None, description="client private key (PEM) for mTLS")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together (mTLS)")
        return self


def client_context(tls: TlsConfig | None, who: str) -> ssl.SSLContext:
    """A verifying client context; ``who`` names the component in the error message."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file if tls and tls.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls is not None and tls.cert_file and tls.key_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"cannot load the TLS files of {who}: {err}", location="tls") from err
    return ctx
