"""Authentication of the HTTP sink at run time (httpx).

One credential refresh per request: on a 401 or a 403 the key/token file is read again
(and the request resent if it changed: it was rotated), or the OAuth2 token is fetched
again and the request resent. What the receiver answers then is final (the sink turns a
401/403 into a sink fault). The token endpoint's own refusal surfaces as
``httpx.HTTPStatusError`` (its status; 200 when the answer had no usable token).
The config models are in ``edge.sinks.http.config``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncGenerator

import httpx

from edge.plugin import ConfigError, read_secret
from edge.sinks.http.config import ApiKeyAuth, BearerAuth, NoAuth, OAuth2Auth

__all__ = ["REFRESH_STATUSES", "build_auth"]

REFRESH_STATUSES = frozenset({401, 403})  # answers that get one credential refresh


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
