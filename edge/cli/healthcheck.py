"""``edge healthcheck [-c FILE] [--ready]`` — one probe of the running gateway's local API,
for a container's ``HEALTHCHECK`` or any supervisor that runs a command.

The address is the config's ``api.listen`` (a wildcard address is asked on loopback, IPv6
in brackets); with ``--ready`` the probe asks ``/readyz`` and sends the token of
``api.token_file`` when there is one (``/healthz`` needs none). One line of output: on
stdout when healthy, on stderr when not. Exit 0 healthy (200); 1 not (nothing answers, no
answer within ``--timeout``, any other status); 2 the config cannot say where to ask
(unreadable, an invalid ``api`` section, ``api.enabled: false``).

The probe runs every few seconds for the life of a container, so it reads only the
config's ``api`` section (plain YAML, ``${VAR}`` substituted) and asks with the standard
library: well under a second instead of the full validation's imports. Anything unusual
in that section falls back to the full validation, which locates the error (exit 2). The
rest of the config is the daemon's business: it validated it at its start.

``/healthz`` answers from the start of start-up, before the outbox is checked and opened
(a cheap check: the file's header and first pages; the full integrity check runs in the
background once the gateway is ready). ``--ready`` fails with ``starting`` until the
gateway takes events, and with ``outbox_corrupt`` once the background check found the
file damaged (``docs/container.md``: the start period covers the start itself).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from edge.cli.common import DEFAULT_CREDENTIALS_DIRECTORY, EXIT_CONFIG

DEFAULT_CONFIG = "/etc/edge-gateway/edge.yaml"
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_LISTEN = "127.0.0.1:8080"
"""``api.listen``'s default (``edge.config.ApiConfig``; a test keeps the two equal)."""

_API_KEYS = frozenset({"listen", "token_file", "hosts", "enabled"})
_LISTEN = (re.compile(r"^\[([0-9a-fA-F:]+)\]:(\d{1,5})$"), re.compile(r"^([^:\s]+):(\d{1,5})$"))
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}


class ApiTarget(NamedTuple):
    host: str
    port: int
    token_file: str | None
    enabled: bool


def register(sub: Any) -> None:
    p = sub.add_parser("healthcheck", help="probe the running gateway's /healthz (or "
                       "/readyz): exit 0 healthy, 1 not, 2 the config says nowhere to ask")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"the gateway's config: API address and token file "
                   f"(default {DEFAULT_CONFIG})")
    p.add_argument("--ready", action="store_true",
                   help="ask /readyz (outbox writable, sinks configured) instead of /healthz")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"give up on an answer after this long (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(handler=cmd_healthcheck)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    api = peek_api(args.config) or _validated_api(args.config)
    if not api.enabled:
        print(f"{args.config}: the local API is off (api.enabled: false): nothing to probe",
              file=sys.stderr)
        return EXIT_CONFIG
    host = _WILDCARDS.get(api.host, api.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{api.port}"
    path = "/readyz" if args.ready else "/healthz"
    token = _token(api.token_file) if args.ready and api.token_file else None
    status, body = _get(host, api.port, path, token, args.timeout, url)
    if status is None:  # _get printed why
        return 1
    if status == 200:
        print(f"healthy: {url}{path} answered 200")
        return 0
    print(f"unhealthy: {url}{path} answered {status}: {_reasons(body)}", file=sys.stderr)
    return 1


def peek_api(config: str) -> ApiTarget | None:
    """The ``api`` section read without validating the config; None when anything in it
    is unusual (the caller then validates the whole file)."""
    import yaml

    from edge.config_env import substitute_env

    try:
        raw = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    api = raw.get("api", {}) if isinstance(raw, dict) else None
    if not isinstance(api, dict) or not set(api) <= _API_KEYS:
        return None
    env = {"CREDENTIALS_DIRECTORY": DEFAULT_CREDENTIALS_DIRECTORY, **os.environ}
    issues: list[Any] = []
    api = substitute_env(api, env, "api", issues)
    listen, token_file = api.get("listen", DEFAULT_LISTEN), api.get("token_file")
    enabled = api.get("enabled", True)
    if issues or not isinstance(listen, str) or not isinstance(enabled, bool) or not (
            token_file is None or isinstance(token_file, str) and token_file):
        return None
    m = _LISTEN[0].match(listen) or _LISTEN[1].match(listen)
    if not m or not 0 < int(m.group(2)) <= 65535:
        return None
    if token_file is not None and not Path(token_file).is_absolute():
        token_file = str(Path(config).resolve().parent / token_file)
    return ApiTarget(m.group(1), int(m.group(2)), token_file, enabled)


def _validated_api(config: str) -> ApiTarget:
    """The full validation's ``api`` section; exits 2 with the located errors."""
    from edge.cli.common import load_or_exit

    cfg = load_or_exit(config, check_files=False)
    api = getattr(cfg, "api", None)
    if api is None:  # a relay's config: its API is not the gateway's
        print(f"{config}: not a gateway's config (no api section)", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return ApiTarget(api.host, api.port, api.token_file, api.enabled)


def _get(host: str, port: int, path: str, token: str | None, timeout: float,
         url: str) -> tuple[int | None, bytes]:
    """One GET; (None, b"") after one line on stderr when no HTTP answer came."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(4096)
    except ConnectionRefusedError:
        print(f"edge healthcheck: the gateway is not running (nothing answers at {url})",
              file=sys.stderr)
    except TimeoutError:
        print(f"edge healthcheck: {url} did not answer within {timeout:g} s (overloaded, "
              "or hung)", file=sys.stderr)
    except (OSError, http.client.HTTPException) as err:
        print(f"edge healthcheck: cannot ask {url}: {err or type(err).__name__}",
              file=sys.stderr)
    finally:
        conn.close()
    return None, b""


def _token(path: str) -> str | None:
    """The first token of ``api.token_file``; None (after one line) when it cannot be read:
    the probe then goes without one and the API's 401 makes it fail."""
    from edge.api.auth import load_tokens
    from edge.errors import FatalStartupError

    try:
        return load_tokens(path)[0].secret.decode()
    except FatalStartupError as err:
        print(f"edge healthcheck: {err}", file=sys.stderr)
        return None


def _reasons(body: bytes) -> str:
    """The ``/readyz`` reasons' codes joined, else the body's start (one line)."""
    import json

    try:
        reasons = json.loads(body).get("reasons", [])
        codes = [str(r.get("code", "?")) for r in reasons]
    except (ValueError, AttributeError):
        codes = []
    if codes:
        return ", ".join(codes)
    return " ".join(body.decode(errors="replace").split())[:200]
