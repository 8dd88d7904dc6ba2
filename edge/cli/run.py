"""``edge run -c FILE``, ``edge check-config FILE``, ``edge print-schema``, ``edge components``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edge.cli.common import config_exit, load_or_exit, run_async
from edge.errors import ConfigError, OutboxOpenError, StartupError


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the gateway with a config file")
    p.add_argument("-c", "--config", required=True, metavar="FILE")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "text", "json"],
                   help="override logging.format: json lines, text, or auto (json unless "
                   "stderr is a terminal)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file (exit 2 on errors)")
    p.add_argument("file")
    p.add_argument("--skip-files", action="store_true",
                   help="do not require *_file paths to exist nor read secrets (checking on "
                   "another machine)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when there are warnings (dead routes, unused subscriptions, "
                   "secrets readable by others)")
    p.set_defaults(handler=cmd_check_config)

    p = sub.add_parser("print-schema", help="print the config JSON Schema (--events: the "
                       "JSON Schemas of the event catalogue's types)")
    p.add_argument("--events", action="store_true",
                   help="print the data schema of every catalogue event type, as one JSON "
                   "object keyed by type (docs/events.md), instead of the config schema")
    p.set_defaults(handler=cmd_print_schema)

    p = sub.add_parser("components", help="list the source and sink types this installation "
                       "knows (built-ins and installed plugins)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_components)


def cmd_run(args: argparse.Namespace) -> int:
    from edge import systemd
    from edge.config_env import peek_state_dir
    from edge.outbox.integrity import EarlyCheck

    # the start-up check reads the outbox file's header and first pages (the full check
    # runs in the background once ready); SQLite's WAL recovery after a crash may read a
    # large WAL from a slow disk: systemd is still asked for more time until READY=1
    systemd.begin_startup("starting: checking the outbox file, then sources and sinks")

    state_dir = peek_state_dir(args.config)
    early = EarlyCheck(str(Path(state_dir) / "outbox.db")) if state_dir else None

    from edge.app import Gateway
    from edge.config import deprecations
    from edge.telemetry import setup_logging

    cfg = load_or_exit(args.config)
    if hasattr(cfg, "relay"):
        print(f"{args.config}: a relay's config (it has a `relay:` section); run it with "
              "`edge relay -c FILE`", file=sys.stderr)
        return 2
    from edge.config import check_secret_files

    # a secret that cannot be read is a config error (exit 2, located), not a traceback at
    # the component's start
    secret_errors, secret_warnings = check_secret_files(cfg)
    if secret_errors:
        config_exit(args.config, ConfigError(secret_errors))
    setup_logging(args.log_level or cfg.logging.level,
                  args.log_format or cfg.logging.format)
    for issue in [*deprecations(cfg), *secret_warnings]:
        logging.getLogger("edge.config").warning("%s", issue)

    async def main() -> None:
        await Gateway(cfg, config_path=args.config, early_check=early).run()

    try:
        run_async(main())
    except ConfigError as err:
        config_exit(args.config, err)
    except OutboxOpenError as err:  # a host problem to fix, not a crash to restart into
        print(f"edge: cannot start: {err}", file=sys.stderr)
        return 2
    except StartupError as err:
        print(f"edge: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate, read every secret file (errors: exit 2), then warn (stderr) about
    deprecated names, secrets readable by others and dead configuration; ``--strict`` turns
    warnings into exit 1."""
    from edge.config import check_secret_files, deprecations
    from edge.config_lint import lint

    cfg = load_or_exit(args.file, check_files=not args.skip_files)
    warnings = list(deprecations(cfg))
    if not args.skip_files:
        errors, secret_warnings = check_secret_files(cfg)
        if errors:
            config_exit(args.file, ConfigError(errors))
        warnings += secret_warnings
    if not hasattr(cfg, "relay"):
        warnings += lint(cfg)
    for issue in warnings:
        print(f"warning: {issue}", file=sys.stderr)
    if hasattr(cfg, "relay"):
        print(f"OK: relay of stream {cfg.relay.stream} ({cfg.relay.partitions} partitions), "
              f"{len(cfg.sinks)} sink(s)")
    else:
        print(f"OK: site {cfg.site}, {len(cfg.sources)} source(s), {len(cfg.sinks)} sink(s)")
    if warnings and args.strict:
        print(f"{len(warnings)} warning(s); --strict fails on warnings", file=sys.stderr)
        return 1
    return 0


def cmd_print_schema(args: argparse.Namespace) -> int:
    if args.events:
        from edge.events.catalogue import json_schemas

        json.dump(json_schemas(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from edge.config import json_schema

    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    """One line per registered type: kind, ``type:`` name, module, description."""
    from edge.registry import default_registry

    reg = default_registry()
    rows = [{"kind": kind, "type": name, "module": c.factory.__module__,
             "description": c.description}
            for kind in ("source", "sink")
            for name, c in sorted(reg.types(kind).items())]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for r in rows:
        print(f"{r['kind']:<7} {r['type']:<12} {r['description']}  ({r['module']})")
    return 0
