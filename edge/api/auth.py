"""Bearer-token protection of the local API.

Token file (``api.token_file``), read once at start, one token per line::

    # comments and blank lines are ignored
    3f9c0a...         # a token without a name: actions are audited as actor "api"
    alice 7b21e4...   # a named token: actions are audited as actor "api:alice"

Every request except ``GET /healthz`` must carry ``Authorization: Bearer <token>``.
Browsers cannot add that header to a page they open, so for reading (GET, HEAD) HTTP Basic
with the token as the password (any user name) is accepted too, and ``GET /`` answers 401
with a Basic challenge so the browser asks for it. Actions (every other method) need the
Bearer header: a browser sends cached Basic credentials by itself with any page's request,
so Basic on an action is refused (401 ``basic_auth_for_action``, counted by
``edge.api.guard.Refusals``) whether the password is right or not. Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from typing import Any

import orjson

from edge.api.guard import SAFE_METHODS, Refusals
from edge.config import read_secret
from edge.errors import ConfigError, FatalStartupError

__all__ = ["OPEN_PATHS", "Token", "TokenGuard", "load_tokens"]

OPEN_PATHS = frozenset({"/healthz"})
_COMMENT = re.compile(r"(^|\s)#.*$")  # a '#' inside a token is part of the token

Scope = dict[str, Any]


@dataclass(frozen=True)
class Token:
    name: str | None
    secret: bytes

    @property
    def actor(self) -> str:
        return f"api:{self.name}" if self.name else "api"


def load_tokens(path: str) -> list[Token]:
    """Parse the token file; ``FatalStartupError`` when it is unreadable or has no token."""
    try:
        text = read_secret(path) or ""
    except (ConfigError, UnicodeDecodeError) as err:
        raise FatalStartupError(f"api.token_file {path}: cannot read it ({err})") from err
    tokens = []
    for line in text.splitlines():
        parts = _COMMENT.sub("", line).split()
        if not parts:
            continue
        if len(parts) > 2:
            raise FatalStartupError(
                f"api.token_file {path}: a line must be 'TOKEN' or 'NAME TOKEN'")
        name, secret = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        tokens.append(Token(name, secret.encode()))
    if not tokens:
        raise FatalStartupError(f"api.token_file {path}: no token in the file")
    return tokens


class TokenGuard:
    """ASGI middleware: 401 unless the request carries a known token (see module docstring).

    The matching ``Token`` is put in ``scope["state"]["token"]`` for handlers (the actor).
    """

    def __init__(self, app: Any, tokens: list[Token], refusals: Refusals) -> None:
        self.app = app
        self.tokens = tokens
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, value = _authorization(scope).partition(" ")
        scheme = scheme.lower()
        if scheme == "basic" and scope["method"] not in SAFE_METHODS:
            await self.refusals.refuse(
                scope, send, 401, "basic_auth_for_action",
                "Basic credentials are accepted for reading only: send the token as "
                "'Authorization: Bearer <token>' (api.token_file)",
                [(b"www-authenticate", b'Bearer realm="edge-gateway"')])
            return
        token = self._match(scheme, value.strip())
        if token is None:
            await _unauthorized(scope, send)
            return
        scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)

    def _match(self, scheme: str, value: str) -> Token | None:
        if scheme == "bearer":
            offered = value.encode()
        elif scheme == "basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return None
            offered = decoded.partition(b":")[2]
        else:
            return None
        found = None
        for token in self.tokens:  # no early exit: the time does not depend on which one
            if hmac.compare_digest(offered, token.secret) and found is None:
                found = token
        return found


def _authorization(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value.decode("latin-1")
    return ""


async def _unauthorized(scope: Scope, send: Any) -> None:
    challenge = (b'Basic realm="edge-gateway", charset="UTF-8"' if scope["path"] == "/"
                 else b'Bearer realm="edge-gateway"')
    body = orjson.dumps({"error": "unauthorized",
                         "detail": "send 'Authorization: Bearer <token>' (api.token_file)"})
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge),
    ]})
    await send({"type": "http.response.body", "body": body})
