"""How CLI verbs reach the running gateway's local API (``edge status``, ``edge sink``).

``target(args, verb)`` finds the base URL and token: ``--url``, else the config's
``api.listen`` (a wildcard address is asked on loopback), else ``DEFAULT_URL``; the token
from the config's ``api.token_file``, else ``$EDGE_API_TOKEN``. ``request(verb, ...)``
makes one call and turns what an operator cannot act on from a traceback into one line on
stderr: nothing answers, no answer in time, a refused token. It returns the response, or
None after printing why (the verb then exits 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from edge.cli.common import load_or_exit

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_URL", "request", "target"]

DEFAULT_URL = "http://127.0.0.1:8080"


def target(args: argparse.Namespace, verb: str) -> tuple[str, str | None]:
    """(base URL, token) from the arguments, the config file and the environment."""
    from edge.api.auth import load_tokens
    from edge.errors import FatalStartupError

    url, token = args.url, os.environ.get("EDGE_API_TOKEN") or None
    if args.config:
        cfg = load_or_exit(args.config, check_files=False)
        if not cfg.api.enabled and not url:
            print(f"{args.config}: the local API is off (api.enabled: false); use "
                  f"`edge outbox stats -c {args.config}` to read the outbox directly",
                  file=sys.stderr)
            raise SystemExit(1)
        if url is None:
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.api.host, cfg.api.host)
            url = f"http://{f'[{host}]' if ':' in host else host}:{cfg.api.port}"
        if cfg.api.token_file:
            try:
                token = load_tokens(cfg.api.token_file)[0].secret.decode()
            except FatalStartupError as err:
                print(f"edge {verb}: {err}", file=sys.stderr)
                raise SystemExit(1) from err
    return (url or DEFAULT_URL).rstrip("/"), token


def request(verb: str, method: str, url: str, path: str, token: str | None, *,
            timeout: float, json: Any = None) -> httpx.Response | None:
    """One call to the daemon; None (after one line on stderr) when it cannot be used."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.request(method, f"{url}{path}", json=json, headers=headers,
                             timeout=timeout, trust_env=False)
    except httpx.ConnectError:
        print(f"edge {verb}: the gateway is not running (nothing answers at {url})",
              file=sys.stderr)
        return None
    except httpx.TimeoutException:
        print(f"edge {verb}: {url} did not answer within {timeout:g} s "
              "(the gateway may be overloaded or hung)", file=sys.stderr)
        return None
    except httpx.HTTPError as err:
        print(f"edge {verb}: cannot ask {url}: {err}", file=sys.stderr)
        return None
    if resp.status_code == 401:
        print(f"edge {verb}: {url} refused the token: give the config with its "
              "api.token_file (-c FILE) or set EDGE_API_TOKEN", file=sys.stderr)
        return None
    if resp.status_code == 421:
        print(f"edge {verb}: {url} does not answer to that name: use the address in "
              "api.listen or add the name to api.hosts", file=sys.stderr)
        return None
    return resp
