"""Browser guard of the local API: ASGI middleware, outermost, installed on every app.

The API is reachable from any browser on the same PC (or the plant network), and a web page
can make that browser send requests to it: a ``text/plain`` form POST needs no consent from
the API, and DNS rebinding lets a page's own name resolve to the gateway so the browser even
lets the page read the answers. A token does not help against the first (a browser adds
cached Basic credentials by itself) and is not there on loopback. So, token or not, the
guard checks every HTTP request, reading headers only, never the body, in this order:

1. ``Host`` must name this API: the host of ``api.listen`` (unless it is the wildcard
   ``0.0.0.0`` or ``::``, which names no address), the IP address the connection arrived
   on, or ``localhost`` when that address is ``127.0.0.1`` or ``::1``, each with the port
   the socket listens on; or an ``api.hosts`` entry. No port means 80; names compare
   case-insensitively, IP literals in canonical form. Anything else → **421**
   ``misdirected_host``.
2. An action (any method but GET and HEAD) must come from the API's own page or from a
   client that is not a browser:

   a. ``Sec-Fetch-Site`` absent, ``same-origin`` or ``none``; ``cross-site``, ``same-site``
      or anything else → **403** ``cross_site_request``;
   b. ``Origin`` absent, or ``http://`` and a host that passes (1) for this connection;
      anything else (``null``, ``https://…``, another host or port, a path) → **403**
      ``foreign_origin``;
   c. ``Content-Type: application/json`` (parameters allowed) → else **415** ``not_json``:
      a page cannot send that type to another origin without a CORS preflight, and the API
      answers no preflight.

A header these checks read that is sent twice is refused like a wrong one. Every
refusal answers ``{"error": code, "detail": why}``, logs one warning line and increments
``edge_api_requests_refused_total{reason=code}`` (``Refusals``, shared with the token
guard, which refuses Basic credentials on actions).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from edge.config import split_host_port
from edge.telemetry import log_event

__all__ = ["SAFE_METHODS", "BrowserGuard", "Refusals"]

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD"})
_SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})
_WILDCARDS = frozenset({"0.0.0.0", "::"})
# Browsers resolve "localhost" to loopback themselves (never through DNS), so that name
# cannot be rebound to a page's server; it names the API only where the connection arrived
# on the loopback address localhost stands for. 127.0.0.2 or [::1] while listening on
# 127.0.0.1 cannot be what a browser that reached this socket typed: strict, refused.
_LOCALHOST_ADDRESSES = frozenset({"127.0.0.1", "::1"})
_AUTHORITY = re.compile(r"^(\[[^\[\]\s]+\]|[^:\[\]\s/@]+)(?::(\d{1,5}))?$")

Scope = dict[str, Any]
Authority = tuple[str, int]  # (host in canonical form, port)


def _parse_authority(value: str) -> Authority | None:
    """``host[:port]`` as in ``Host`` → ``(host, port)``; ``None`` when malformed.

    Names are lower-cased, IP literals written canonically (``[0::1]`` → ``::1``, an
    IPv4-mapped IPv6 address as IPv4), and a missing port is 80 (browsers leave it out).
    """
    m = _AUTHORITY.match(value)
    if not m:
        return None
    port = int(m.group(2)) if m.group(2) else 80
    if not 1 <= port <= 65535:
        return None
    host = m.group(1)
    if host.startswith("["):
        host = host[1:-1]
        if not _is_ip(host, version=6):
            return None
    return _canonical_host(host), port


def _canonical_host(host: str) -> str:
    """Lower-case; IP literals in their canonical text (IPv4-mapped IPv6 → IPv4)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_ip(host: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


class Refusals:
    """Answers, logs and counts refused requests: one place for every guard of the API."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.counter = Counter(
            "edge_api_requests_refused_total",
            "Local API requests refused before any handler (browser guard, token guard)",
            ["reason"], registry=registry)

    async def refuse(self, scope: Scope, send: Any, status: int, code: str, detail: str,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Send ``status`` with ``{"error": code, "detail": detail}``; log; count."""
        self.counter.labels(code).inc()
        log_event(log, logging.WARNING, "local API request refused", reason=code,
                  status=status, method=scope.get("method"), path=scope.get("path"),
                  detail=detail[:300])
        body = orjson.dumps({"error": code, "detail": detail})
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *headers,
        ]})
        await send({"type": "http.response.body", "body": body})


class _Refusal(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class BrowserGuard:
    """ASGI middleware applying the module contract around ``app``.

    ``listen`` is ``api.listen``; ``hosts`` the ``api.hosts`` entries (validated at load).
    """

    def __init__(self, app: Any, *, listen: str, hosts: Iterable[str],
                 refusals: Refusals) -> None:
        self.app = app
        host, self.port = split_host_port(listen)
        self.listen = listen
        self.host = None if host in _WILDCARDS else _canonical_host(host)
        self.hosts = frozenset(a for a in map(_parse_authority, hosts) if a is not None)
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except _Refusal as no:
            await self.refusals.refuse(scope, send, no.status, no.code, no.detail)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> None:
        names = self._names(scope)
        self._check_host(_header(scope, b"host"), names)
        if scope["method"] not in SAFE_METHODS:
            _check_fetch_site(_header(scope, b"sec-fetch-site"))
            self._check_origin(_header(scope, b"origin"), names)
            _check_json(_header(scope, b"content-type"))

    def _names(self, scope: Scope) -> frozenset[Authority]:
        """The authorities that name this API for this connection (contract point 1)."""
        server = scope.get("server")
        # The port the socket listens on (api.listen may say 0: a port picked at bind).
        port = int(server[1]) if server and server[1] else self.port
        names = set(self.hosts)
        if self.host is not None:
            names.add((self.host, port))
        if server:
            # An IP literal cannot be rebound: a page elsewhere can make a browser send it,
            # but its origin is another one, so it cannot read the answer and its actions
            # carry its own Origin (point 2).
            arrived = _canonical_host(str(server[0]))
            names.add((arrived, port))
            if arrived in _LOCALHOST_ADDRESSES:
                names.add(("localhost", port))
        return frozenset(names)

    def _check_host(self, value: str | None, names: frozenset[Authority]) -> None:
        if value is None:
            raise _Refusal(421, "misdirected_host", "a request must carry one Host header")
        if _parse_authority(value) not in names:
            raise _Refusal(421, "misdirected_host", (
                f"Host {value[:100]!r} does not name this API: open it by its listen address "
                f"({self.listen}) or add that host:port to api.hosts "
                "(names are refused unless listed: DNS rebinding defence)"))

    def _check_origin(self, value: str | None, names: frozenset[Authority]) -> None:
        if value is None:
            return
        authority = value[len("http://"):] if value.startswith("http://") else None
        if authority is None or _parse_authority(authority) not in names:
            raise _Refusal(403, "foreign_origin", (
                f"Origin {value[:100]!r} is not this API's own origin: actions are accepted "
                "only from the API's page (http:// and its listen address or an api.hosts "
                "entry) or from a client that is not a browser"))


def _check_fetch_site(value: str | None) -> None:
    if value is not None and value.strip().lower() not in _SAME_ORIGIN_FETCH:
        raise _Refusal(403, "cross_site_request", (
            f"Sec-Fetch-Site: {value[:40]}: the browser says another site sent this request; "
            "actions are accepted only from the API's own page or a client that is not a "
            "browser"))


def _check_json(value: str | None) -> None:
    if value is None or value.partition(";")[0].strip().lower() != "application/json":
        raise _Refusal(415, "not_json", (
            f"actions need Content-Type: application/json, got {(value or 'none')[:100]!r} "
            "(a web page cannot send JSON to another site without the site's consent)"))


def _header(scope: Scope, name: bytes) -> str | None:
    """The header's value, ``None`` when absent.

    Sent twice, the values are joined with ", " (RFC 9110 5.3): no check accepts that.
    """
    found = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name]
    return ", ".join(found) if found else None
