"""Authentication of the HTTP sink at run time.

A credential is one header (``header``, ``value()``) set on every request. One credential
refresh per request: on a 401 or a 403 ``refresh(used)`` reads the key/token file again
(True, so the request is resent, only when it changed: it was rotated), or fetches the
OAuth2 token again (always resent). What the receiver answers then is final (the sink
turns a 401/403 into a sink fault). The token endpoint's own refusal raises
``TokenRefused`` (its status; 200 when the answer had no usable token); no answer from it
raises the transport's errors. The config models are in ``edge.sinks.http.config``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlencode

from edge.plugin import ConfigError, read_secret
from edge.sinks.http.config import ApiKeyAuth, BearerAuth, NoAuth, OAuth2Auth
from edge.sinks.http.transport import Reply, Transport

__all__ = ["REFRESH_STATUSES", "Credential", "TokenRefused", "build_auth"]

REFRESH_STATUSES = frozenset({401, 403})  # answers that get one credential refresh


class TokenRefused(Exception):  # noqa: N818 - the token endpoint's answer, not a bug
    """The OAuth2 token endpoint answered without a usable token; ``reply`` is its answer."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message)
        self.reply = reply

    @property
    def status(self) -> int:
        return self.reply.status


class Credential:
    """One header carrying a credential; ``refresh`` after a 401/403 (module docstring)."""

    header = "Authorization"

    async def value(self) -> str:
        raise NotImplementedError

    async def refresh(self, used: str) -> bool:
        """After a 401/403 to a request sent with ``used``: True when the request is to be
        sent again with ``value()``."""
        raise NotImplementedError


class _StaticHeaderAuth(Credential):
    """A header read from a file; on a 401/403 the file is read again once and the request
    resent if the value changed (rotated). An unreadable file keeps the value in use."""

    def __init__(self, header: str, path: str, prefix: str = "") -> None:
        self.header, self.path, self.prefix = header, path, prefix
        self._value = prefix + (read_secret(path) or "")

    async def value(self) -> str:
        return self._value

    async def refresh(self, used: str) -> bool:
        try:
            fresh = self.prefix + (read_secret(self.path) or "")
        except ConfigError:
            return False  # the answer stands; the sink reports it
        self._value = fresh
        return fresh != used


class _OAuth2ClientCredentials(Credential):
    def __init__(self, cfg: OAuth2Auth, verify: ssl.SSLContext) -> None:
        self.cfg = cfg
        self.secret = read_secret(cfg.client_secret_file) or ""
        self.verify = verify
        self.token: str | None = None
        self.expires_at = 0.0
        self._lock = asyncio.Lock()

    async def value(self) -> str:
        if self.token and time.monotonic() < self.expires_at:  # no lock on the hot path
            return f"Bearer {self.token}"
        return f"Bearer {await self._token()}"

    async def refresh(self, used: str) -> bool:
        await self._token(force=True, stale=used.removeprefix("Bearer "))
        return True

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
            reply = await self._fetch(urlencode(data).encode())
            if reply.status != 200:
                raise TokenRefused(f"token endpoint answered {reply.status}", reply)
            try:
                doc = reply.json()
                if not isinstance(doc, dict):
                    raise TypeError("the answer is not a JSON object")
                token, ttl = doc["access_token"], float(doc.get("expires_in", 3600))
                if not isinstance(token, str) or not token:
                    raise ValueError("access_token is not a non-empty string")
            except (ValueError, TypeError, KeyError) as err:
                raise TokenRefused("token endpoint answered 200 without a usable "
                                   "access_token", reply) from err
            self.token = token
            self.expires_at = time.monotonic() + max(0.0, ttl - self.cfg.expiry_skew_s)
            return self.token

    async def _fetch(self, form: bytes) -> Reply:
        """One POST to the token endpoint on a connection of its own (rare: once per
        token lifetime), with the sink's TLS context and the same transport rules."""
        timeout = self.cfg.timeout_s
        transport = Transport("", ssl_context=self.verify, max_connections=1,
                              connect_timeout_s=timeout, read_timeout_s=timeout,
                              max_body=1 << 16)
        try:
            return await transport.post(
                self.cfg.token_url, form,
                {"Content-Type": "application/x-www-form-urlencoded",
                 "Accept": "application/json"}, timeout)
        finally:
            await transport.close()


def build_auth(cfg: NoAuth | ApiKeyAuth | BearerAuth | OAuth2Auth,
               verify: ssl.SSLContext) -> Credential | None:
    """The sink's credential (created inside the running loop), or None without auth."""
    if isinstance(cfg, ApiKeyAuth):
        return _StaticHeaderAuth(cfg.header, cfg.key_file)
    if isinstance(cfg, BearerAuth):
        return _StaticHeaderAuth("Authorization", cfg.token_file, prefix="Bearer ")
    if isinstance(cfg, OAuth2Auth):
        return _OAuth2ClientCredentials(cfg, verify)
    return None
