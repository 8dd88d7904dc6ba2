"""Security headers on every HTTP response of a local API: ASGI middleware, outermost.

``SecurityHeaders(app, style_hashes=...)`` adds to every response start that ``app`` (or
anything inside it: the guards' refusals, starlette's 404 and 500) sends:

- ``Content-Security-Policy: default-src 'none'; style-src <hashes>; frame-ancestors
  'none'; base-uri 'none'; form-action 'none'`` — nothing is loaded from anywhere (no
  script, no image, no font, no connection), only the stylesheets whose SHA-256 is given
  apply, and no page may frame the API (clickjacking an operator's click).
  ``style-src`` is left out when no hash is given (the relay's API serves no HTML).
- ``X-Content-Type-Options: nosniff`` — a JSON answer is never run as a script or page.
- ``X-Frame-Options: DENY`` — ``frame-ancestors`` for browsers older than CSP 2.
- ``Referrer-Policy: no-referrer`` — the API's addresses do not leak through links.
- ``Cache-Control: no-store`` unless the app set its own — status is live data.

A header the app set itself is kept, not sent twice.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import Any

__all__ = ["SecurityHeaders", "content_security_policy", "style_hash"]


def style_hash(css: str) -> str:
    """The CSP source (``'sha256-…'``) that allows exactly this ``<style>`` content."""
    digest = hashlib.sha256(css.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def content_security_policy(style_hashes: Iterable[str] = ()) -> str:
    """The policy of the module contract, with ``style-src`` for ``style_hashes``."""
    hashes = " ".join(style_hashes)
    return "; ".join(["default-src 'none'", *([f"style-src {hashes}"] if hashes else []),
                      "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'"])


class SecurityHeaders:
    """ASGI middleware adding the module contract's headers to every HTTP response."""

    def __init__(self, app: Any, *, style_hashes: Iterable[str] = ()) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", content_security_policy(style_hashes).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cache-control", b"no-store"),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", ())}
                message = {**message, "headers": [
                    *message.get("headers", ()),
                    *((k, v) for k, v in self.headers if k not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
