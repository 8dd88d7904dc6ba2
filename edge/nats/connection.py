"""Opening a NATS connection from a ``NatsConnection`` config (the ``nats`` sink, ``edge relay``).

Contract of ``connect(cfg, name=..., config_dir=...)``:

- Secrets and certificates are read now, once: a missing or unreadable password, token,
  NKEY seed or creds file, a bad TLS file, or NKEY/creds auth without the ``nkeys``
  package raises ``ConfigError`` (located at ``auth`` or ``tls``) before any network I/O.
  Relative paths are resolved against ``config_dir`` (the config loader has usually made
  them absolute already). Secrets never appear in a log line or an error message.
- The first connection attempt is bounded: each server gets ``connect_timeout_s``, the
  whole attempt ``connect_timeout_s`` × servers + 1 s. Failure raises ``NatsConnectError``
  with a bounded ``code``: ``auth`` (the server refused the credentials), ``tls`` (the
  handshake or certificate check failed), ``unreachable`` (refused, DNS, timeout).
- Once connected, nats-py reconnects by itself (``reconnect_wait_s``,
  ``max_reconnect_attempts``; -1 = forever); a connection it gives up on is closed
  (``Client.is_closed``) and the caller connects again on its next use.
- Without an ``error_cb`` the client's errors are logged as one structured line per
  change of error (not one traceback per reconnect attempt).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.nats.config import CredsAuth, NatsConnection, NkeyAuth, TokenAuth, UserPasswordAuth
from edge.plugin import ConfigError, client_context, log_event, read_secret

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["NatsConnectError", "connect", "connect_options"]

log = logging.getLogger("edge.nats")

ErrorCallback = Callable[[Exception], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]


class NatsConnectError(Exception):
    """The first connection attempt failed; ``code`` is a bounded label:
    ``auth``, ``tls`` or ``unreachable``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


def _path(path: str, config_dir: str | Path | None) -> str:
    p = Path(path)
    if not p.is_absolute() and config_dir is not None:
        p = Path(config_dir) / p
    return str(p)


def _secret(path: str, config_dir: str | Path | None, what: str) -> str:
    try:
        value = read_secret(_path(path, config_dir))
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}", location="auth") from err
    if not value:
        raise ConfigError(f"{what}: the file {_path(path, config_dir)} is empty",
                          location="auth")
    return value


def _need_nkeys(kind: str) -> None:
    try:
        import nkeys  # noqa: F401  (nats-py imports it lazily, at the first handshake)
    except ImportError as err:
        raise ConfigError(f"auth type {kind} needs the Python package nkeys "
                          "(pip install 'nats-py[nkeys]')", location="auth") from err


def connect_options(cfg: NatsConnection, *, name: str,
                    config_dir: str | Path | None = None) -> dict[str, Any]:
    """The keyword arguments of ``nats.aio.client.Client.connect`` for ``cfg``, with every
    secret read now (``ConfigError`` as in the module contract). No network I/O."""
    from nats.aio.client import RawCredentials

    opts: dict[str, Any] = {
        "servers": list(cfg.servers),
        "name": cfg.name or name,
        "connect_timeout": cfg.connect_timeout_s,
        "allow_reconnect": True,
        "reconnect_time_wait": cfg.reconnect_wait_s,
        "max_reconnect_attempts": cfg.max_reconnect_attempts,
        "ping_interval": cfg.ping_interval_s,
        "max_outstanding_pings": cfg.max_outstanding_pings,
    }
    if cfg.uses_tls:
        tls = cfg.tls
        if tls is not None and config_dir is not None:
            tls = tls.model_copy(update={
                k: _path(v, config_dir) for k in ("ca_file", "cert_file", "key_file")
                if (v := getattr(tls, k)) is not None})
        ctx: ssl.SSLContext = client_context(tls, f"NATS client {opts['name']!r}")
        opts["tls"] = ctx
    auth = cfg.auth
    if isinstance(auth, UserPasswordAuth):
        opts["user"] = auth.user
        opts["password"] = _secret(auth.password_file, config_dir, "auth.password_file")
    elif isinstance(auth, TokenAuth):
        opts["token"] = _secret(auth.token_file, config_dir, "auth.token_file")
    elif isinstance(auth, NkeyAuth):
        _need_nkeys("nkey")
        opts["nkeys_seed_str"] = _secret(auth.nkey_seed_file, config_dir,
                                         "auth.nkey_seed_file")
    elif isinstance(auth, CredsAuth):
        _need_nkeys("creds")
        text = _secret(auth.creds_file, config_dir, "auth.creds_file")
        if "USER JWT" not in text or "NKEY SEED" not in text:
            raise ConfigError("auth.creds_file: not a NATS credentials file (it needs the "
                              "USER JWT and USER NKEY SEED blocks)", location="auth")
        opts["user_credentials"] = RawCredentials(text)
    return opts


def _classify(err: BaseException | None, errors: list[BaseException]) -> tuple[str, str]:
    """(code, message) of a failed first attempt from the error and the client's errors."""
    seen = [e for e in [*errors, err] if e is not None]
    for e in seen:
        text = str(e).lower()
        if ("authorization" in text or "authentication" in text
                or "auth" in type(e).__name__.lower()):
            return "auth", "the server refused the credentials (authorization violation)"
    for e in seen:
        if isinstance(e, ssl.SSLError | ssl.CertificateError) or "tls" in str(e).lower():
            return "tls", f"TLS handshake failed: {type(e).__name__}: {e}"
    last = seen[-1] if seen else None
    detail = f"{type(last).__name__}: {last}" if last is not None else "timed out"
    return "unreachable", f"no server reachable ({detail})"


async def connect(cfg: NatsConnection, *, name: str, config_dir: str | Path | None = None,
                  error_cb: ErrorCallback | None = None,
                  disconnected_cb: Callback | None = None,
                  reconnected_cb: Callback | None = None,
                  closed_cb: Callback | None = None) -> Client:
    """A connected ``nats.aio.client.Client`` (see the module contract).

    ``name`` is the client name unless ``cfg.name`` sets one. Raises ``ConfigError`` for
    an unusable secret or TLS file and ``NatsConnectError`` when no server accepted the
    connection within the bounded first attempt.
    """
    import asyncio

    from nats.aio.client import Client

    opts = connect_options(cfg, name=name, config_dir=config_dir)
    errors: list[BaseException] = []
    last_logged: list[str] = []

    fatal = asyncio.Event()

    async def on_error(err: Exception) -> None:
        errors.append(err)
        del errors[:-8]
        if not nc.is_connected and _classify(err, [])[0] in ("auth", "tls"):
            fatal.set()
        if error_cb is not None:
            await error_cb(err)
            return
        text = f"{type(err).__name__}: {err}"
        if not last_logged or last_logged[-1] != text:
            last_logged[:] = [text]
            log_event(log, logging.WARNING, "NATS connection error", client=opts["name"],
                      error=text)

    async def on_reconnected() -> None:
        last_logged.clear()
        if reconnected_cb is not None:
            await reconnected_cb()

    callbacks: dict[str, Any] = {"error_cb": on_error, "reconnected_cb": on_reconnected}
    if disconnected_cb is not None:
        callbacks["disconnected_cb"] = disconnected_cb
    if closed_cb is not None:
        callbacks["closed_cb"] = closed_cb
    nc = Client()
    limit = cfg.connect_timeout_s * len(cfg.servers) + 1.0
    # nats-py retries a refused login or a failed handshake until the limit: stop at the
    # first such error, retrying cannot fix it within this attempt
    attempt = asyncio.ensure_future(nc.connect(**opts, **callbacks))
    refused = asyncio.ensure_future(fatal.wait())
    try:
        await asyncio.wait({attempt, refused}, timeout=limit,
                           return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled (shutdown): leave no half-open client behind
        attempt.cancel()
        await _close_quietly(nc)
        raise
    finally:
        refused.cancel()
        if not attempt.done():
            attempt.cancel()
            await asyncio.wait({attempt})  # let it unwind; raises nothing itself
    err = None if attempt.cancelled() else attempt.exception()
    if attempt.cancelled() or err is not None:
        await _close_quietly(nc)
        code, message = _classify(err, errors)
        raise NatsConnectError(code, message) from err
    return nc


async def _close_quietly(nc: Client) -> None:
    try:
        await nc.close()
    except Exception as err:  # noqa: BLE001  closing a half-open client may fail any way
        log.debug("closing a failed NATS client: %r", err)
