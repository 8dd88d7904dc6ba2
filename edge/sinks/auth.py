"""Authentication, TLS and the no-inline-secrets checks of the HTTP sink.

Config models (discriminated on ``type``):
- ``none``
- ``api_key``   header (default ``X-API-Key``) from ``key_file``
- ``bearer``    ``Authorization: Bearer`` from ``token_file``
- ``oauth2_client_credentials``   token from ``token_url`` cached until ``expires_in`` minus
  ``expiry_skew_s``, fetched under a lock (one fetch for many concurrent requests).
mTLS: ``tls: {ca_file, cert_file, key_file}`` → an ``ssl.SSLContext`` passed as ``verify=``.

One credential refresh per request: on a 401 or a 403 the key/token file is read again
(and the request resent if it changed: it was rotated), or the OAuth2 token is fetched
again and the request resent. What the receiver answers then is final (the sink turns a
401/403 into a sink fault). The token endpoint's own refusal surfaces as
``httpx.HTTPStatusError`` (its status; 200 when the answer had no usable token).

Secrets are read at start from ``*_file`` paths and never logged. ``check_headers`` and
``check_url`` refuse secrets written inline (header names and URL query parameters that look
like credentials, user:password in a URL) at config load.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx
from pydantic import Field, field_validator, model_validator

from edge.config import SecretFile, StrictModel, read_secret
from edge.errors import ConfigError

__all__ = [
    "ApiKeyAuth",
    "AuthConfig",
    "BearerAuth",
    "NoAuth",
    "OAuth2Auth",
    "TlsConfig",
    "build_auth",
    "build_ssl_context",
    "check_headers",
    "check_url",
    "looks_secret",
]

REFRESH_STATUSES = frozenset({401, 403})  # answers that get one credential refresh

# Names (headers, query parameters) that carry a credential. Compared lower-case with "-"
# read as "_": a name that is one of _SECRET_NAMES, ends in "_key" or contains a word.
_SECRET_NAMES = frozenset({"key", "sig", "pwd", "auth"})
_SECRET_WORDS = ("token", "secret", "password", "passwd", "apikey", "api_key", "signature",
                 "credential", "authorization", "cookie")
_INLINE_HINT = "use auth (api_key, bearer, oauth2_client_credentials) with a *_file"


def looks_secret(name: str) -> bool:
    """True for a header or query parameter name that carries a credential
    (``Authorization``, ``X-API-Key``, ``X-Auth-Token``, ``api_key``, ``sig`` …)."""
    n = name.strip().lower().replace("-", "_")
    return n in _SECRET_NAMES or n.endswith("_key") or any(w in n for w in _SECRET_WORDS)


def check_headers(headers: Iterable[str]) -> None:
    """ValueError naming the first header that would carry a secret inline."""
    for name in headers:
        if looks_secret(name):
            raise ValueError(f"{name}: secrets are not allowed inline; {_INLINE_HINT}")


def check_url(url: str) -> None:
    """ValueError when ``url`` carries a credential: ``user:password@`` (or a user name)
    before the host, or a query parameter that looks like a secret. The message never
    repeats the secret."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(f"credentials are not allowed inline in a URL; {_INLINE_HINT}")
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if looks_secret(name):
            raise ValueError(f"query parameter {name!r} looks like a secret; secrets are not "
                             f"allowed inline, {_INLINE_HINT}")


def check_http_url(url: str) -> str:
    """``url`` when it is an http(s) URL without inline credentials, else ValueError
    (credentials first: the scheme message repeats the URL)."""
    check_url(url)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {url!r}")
    return url


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


class TlsConfig(StrictModel):
    ca_file: SecretFile | None = Field(None, description="CA bundle to trust (default: system)")
    cert_file: SecretFile | None = Field(None, description="client certificate (mTLS)")
    key_file: SecretFile | None = Field(None, description="client key (mTLS)")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS)")
        return self


def build_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tls.ca_file if tls and tls.ca_file else None)
    if tls and tls.cert_file and tls.key_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(f"cannot load client certificate/key: {err}",
                              location="tls") from err
    return ctx


class _StaticHeaderAuth(httpx.Auth):
    """A header read from a file; on a 401/403 the file is read again once and the request
    resent if the value changed (rotated). An unreadable file keeps the value in use."""

    def __init__(self, header: str, path: str, prefix: str = "") -> None:
        self.header, self.path, self.prefix = header, path, prefix
        self.value = read_secret(path) or ""

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers[self.header] = self.prefix + self.value
        response = yield request
        if response.status_code in REFRESH_STATUSES:
            try:
                fresh = read_secret(self.path) or ""
            except ConfigError:
                return  # the answer stands; the sink reports it
            if fresh != self.value:
                self.value = fresh
                request.headers[self.header] = self.prefix + self.value
                yield request


class _OAuth2ClientCredentials(httpx.Auth):
    def __init__(self, cfg: OAuth2Auth, verify: ssl.SSLContext) -> None:
        self.cfg = cfg
        self.secret = read_secret(cfg.client_secret_file) or ""
        self.verify = verify
        self.token: str | None = None
        self.expires_at = 0.0
        self.fetches = 0
        self._lock = asyncio.Lock()

    async def _token(self, force: bool = False, stale: str | None = None) -> str:
        async with self._lock:
            # another request may have refreshed while we waited for the lock
            if self.token and not force and time.monotonic() < self.expires_at:
                return self.token
            if force and self.token and self.token != stale:
                return self.token
            data = {"grant_type": "client_credentials", "client_id": self.cfg.client_id,
                    "client_secret": self.secret}
            if self.cfg.scope:
                data["scope"] = self.cfg.scope
            if self.cfg.audience:
                data["audience"] = self.cfg.audience
            async with httpx.AsyncClient(verify=self.verify, timeout=self.cfg.timeout_s) as c:
                resp = await c.post(self.cfg.token_url, data=data)
            self.fetches += 1
            if resp.status_code != 200:
                raise httpx.HTTPStatusError(
                    f"token endpoint answered {resp.status_code}", request=resp.request,
                    response=resp)
            try:
                doc = resp.json()
                token, ttl = doc["access_token"], float(doc.get("expires_in", 3600))
                if not isinstance(token, str) or not token:
                    raise ValueError("access_token is not a non-empty string")
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                raise httpx.HTTPStatusError(
                    "token endpoint answered 200 without a usable access_token",
                    request=resp.request, response=resp) from err
            self.token = token
            self.expires_at = time.monotonic() + max(0.0, ttl - self.cfg.expiry_skew_s)
            return self.token

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code in REFRESH_STATUSES:
            token = await self._token(force=True, stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


def build_auth(cfg: NoAuth | ApiKeyAuth | BearerAuth | OAuth2Auth,
               verify: ssl.SSLContext) -> httpx.Auth | None:
    if isinstance(cfg, ApiKeyAuth):
        return _StaticHeaderAuth(cfg.header, cfg.key_file)
    if isinstance(cfg, BearerAuth):
        return _StaticHeaderAuth("Authorization", cfg.token_file, prefix="Bearer ")
    if isinstance(cfg, OAuth2Auth):
        return _OAuth2ClientCredentials(cfg, verify)
    return None
