"""``edge healthcheck [-c FILE] [--ready]`` — one probe of the running gateway's local API,
for a container's ``HEALTHCHECK`` or any supervisor that runs a command.

The address is the config's ``api.listen`` (a wildcard address is asked on loopback, IPv6
in brackets); with ``--ready`` the probe asks ``/readyz`` and sends the token of
``api.token_file`` when there is one (``/healthz`` needs none). One line of output: on
stdout when healthy, on stderr when not. Exit 0 healthy (200), 1 not (no answer within
``--timeout``, refused, any other status), 2 bad usage or config, or the API is off.

``/healthz`` answers once the gateway has checked and opened its outbox and started its
components: during the start-up integrity check the port may accept connections but no
answer comes, so a probe fails until then (``docs/container.md``: the start period).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edge.cli.common import EXIT_CONFIG

DEFAULT_CONFIG = "/etc/edge-gateway/edge.yaml"
DEFAULT_TIMEOUT_S = 3.0


def register(sub: Any) -> None:
    p = sub.add_parser("healthcheck", help="probe the running gateway's /healthz (or "
                       "/readyz): exit 0 healthy, 1 not, 2 bad config")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"the gateway's config: API address and token file "
                   f"(default {DEFAULT_CONFIG})")
    p.add_argument("--ready", action="store_true",
                   help="ask /readyz (outbox writable, sinks configured) instead of /healthz")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"give up on an answer after this long (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(handler=cmd_healthcheck)


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from edge.cli.common import load_or_exit
    from edge.cli.daemon_api import request

    cfg = load_or_exit(args.config, check_files=False)
    if not getattr(cfg, "api", None) or not cfg.api.enabled:
        print(f"{args.config}: the local API is off (api.enabled: false): nothing to probe",
              file=sys.stderr)
        return EXIT_CONFIG
    path = "/readyz" if args.ready else "/healthz"
    url = _loopback_url(cfg.api.host, cfg.api.port)
    token = _token(cfg.api.token_file) if args.ready and cfg.api.token_file else None
    resp = request("healthcheck", "GET", url, path, token, timeout=args.timeout)
    if resp is None:  # request() printed why
        return 1
    if resp.status_code == 200:
        print(f"healthy: {url}{path} answered 200")
        return 0
    print(f"unhealthy: {url}{path} answered {resp.status_code}: {_reasons(resp)}",
          file=sys.stderr)
    return 1


def _loopback_url(host: str, port: int) -> str:
    """The API's base URL; a wildcard listen address (all interfaces) is asked on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


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


def _reasons(resp: Any) -> str:
    """The ``/readyz`` reasons' codes joined, else the body's start (one line)."""
    try:
        body = resp.json()
        codes = [r.get("code", "?") for r in body.get("reasons", [])]
    except (ValueError, AttributeError):
        codes = []
    if codes:
        return ", ".join(codes)
    return " ".join(resp.text.split())[:200]
