"""The HTTP sink's transport: one request, its whole answer, or an error of two kinds.

A small interface over aiohttp (its C parser makes a per-event request several times
cheaper than httpx's pure-Python one; ``bench/bench_http_clients.py``), so planning,
auth and the response policy never see the client library:

- ``Transport.request(method, path, body, headers, timeout_s)`` → ``Reply`` (status,
  reason, headers, at most ``max_body`` bytes of the body); ``post`` and ``get`` name
  the method.
- ``TransportTimeout`` (a ``TimeoutError``): no answer within a phase's limit (``phase``:
  ``connect`` or ``read``) — or, a plain ``TimeoutError``, no complete answer within the
  request's ``timeout_s`` (a receiver that trickles its answer cannot hold a lane).
- ``TransportError`` (a ``ConnectionError``): no usable answer: refused or failed connect,
  TLS refused, connection reset or closed, an answer lost mid-body, a malformed answer.

Fixed behaviour: redirects are not followed (the 3xx is the answer); no proxy from the
environment; TLS through the ``ssl.SSLContext`` given; at most ``max_connections``
connections, kept alive; the default headers (User-Agent, configured headers) on every
request. An answer longer than ``max_body`` is not read to its end: ``complete`` is False
and its connection is closed instead of reused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from yarl import URL

__all__ = ["Reply", "Transport", "TransportError", "TransportTimeout"]

_URL_CACHE_SIZE = 1024
_IDLE_S = 4.0  # seconds an idle connection is kept for the next request


class TransportTimeout(TimeoutError):
    """No answer within the limit of one phase: ``connect`` or ``read``."""

    def __init__(self, phase: str, detail: str = "") -> None:
        super().__init__(f"{phase} timeout" + (f": {detail}" if detail else ""))
        self.phase = phase


class TransportError(ConnectionError):
    """No usable answer; the message names the client's own error class first."""


@dataclass(slots=True, frozen=True)
class Reply:
    """A receiver's answer. ``body``: at most the transport's ``max_body`` bytes (decoded
    from any ``Content-Encoding``); ``complete``: the body was read to its end; ``read``:
    bytes read in all."""

    status: int
    reason: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes = b""
    complete: bool = True
    read: int = 0
    charset: str | None = None

    @property
    def status_code(self) -> int:
        return self.status

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return self.body.decode("utf-8", errors="replace")

    def json(self) -> object:
        """The body as JSON; ``ValueError`` when it is not."""
        return orjson.loads(self.body)


class Transport:
    """Requests to one base URL. Create and close inside the running event loop."""

    def __init__(self, base_url: str, *, ssl_context: ssl.SSLContext | None,
                 max_connections: int, connect_timeout_s: float, read_timeout_s: float,
                 headers: Mapping[str, str] | None = None, max_body: int = 1 << 20) -> None:
        # in its encoded form (an IDN host as punycode), so paths can be appended as sent
        self.base_url = str(URL(base_url.rstrip("/"))) if base_url else ""
        self.max_body = max_body
        self._connect_timeout_s = connect_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                              sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        # ssl=True: aiohttp's default verifying context for https; unused for http. Idle
        # connections are dropped before common servers' own keep-alive limits (5 s for
        # uvicorn and Node), so a request never races a server closing its connection.
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0,
                                         ssl=ssl_context if ssl_context is not None else True,
                                         keepalive_timeout=_IDLE_S)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=dict(headers or {}), timeout=self._timeout,
            trust_env=False, auto_decompress=True, raise_for_status=False,
            skip_auto_headers=("Content-Type",),
        )
        self._urls: dict[str, URL] = {}

    def _url(self, path: str) -> URL:
        """``base_url + path`` as sent: percent-escapes in ``path`` are kept verbatim. A full
        ``http(s)://`` URL (a token endpoint) is parsed as configured."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            if path.startswith(("http://", "https://")):
                url = URL(path)
            else:
                url = URL(self.base_url + path, encoded=True)
            self._urls[path] = url
        return url

    async def post(self, path: str, body: bytes, headers: Mapping[str, str],
                   timeout_s: float) -> Reply:
        return await self.request("POST", path, body, headers, timeout_s)

    async def get(self, path: str, headers: Mapping[str, str] | None, timeout_s: float
                  ) -> Reply:
        return await self.request("GET", path, None, headers, timeout_s)

    async def request(self, method: str, path: str, body: bytes | None,
                      headers: Mapping[str, str] | None, timeout_s: float) -> Reply:
        """One request and its answer within ``timeout_s`` (the whole exchange). Raises
        ``TransportTimeout``/``TimeoutError`` or ``TransportError`` (module docstring)."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._exchange(method, path, body, headers, timeout_s)
        except aiohttp.ClientError as err:
            raise _mapped(err) from err

    async def _exchange(self, method: str, path: str, body: bytes | None,
                        headers: Mapping[str, str] | None, timeout_s: float) -> Reply:
        timeout = self._timeout
        if timeout_s < (timeout.sock_read or 0):  # a shorter read limit for this request
            timeout = aiohttp.ClientTimeout(sock_connect=self._connect_timeout_s,
                                            sock_read=timeout_s)
        async with self._session.request(method, self._url(path), data=body, headers=headers,
                                         allow_redirects=False, timeout=timeout) as resp:
            kept = bytearray()
            read = 0
            complete = True
            limit = self.max_body
            async for chunk in resp.content.iter_any():
                read += len(chunk)
                kept += chunk[:limit - len(kept)]
                if read > limit:
                    complete = False
                    resp.close()  # the rest is not read: the connection is not reused
                    break
            return Reply(resp.status, resp.reason or "", resp.headers, bytes(kept), complete,
                         read, resp.charset)

    async def close(self) -> None:
        """Close the client and its connections (idempotent)."""
        await self._session.close()


def _mapped(err: aiohttp.ClientError) -> Exception:
    """aiohttp's error → ``TransportTimeout`` or ``TransportError`` naming its class."""
    name = type(err).__name__
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return TransportTimeout("connect", str(err))
    if isinstance(err, aiohttp.ServerTimeoutError):
        return TransportTimeout("read", str(err))
    if isinstance(err, aiohttp.ClientPayloadError):
        return TransportError(f"{name}: the answer was cut off: {err}")
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return TransportError(f"{name}: the server closed the connection without an answer")
    return TransportError(f"{name}: {err}")
