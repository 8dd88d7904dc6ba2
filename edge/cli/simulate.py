"""``edge simulate opcua|mqtt|sparkplug`` — run a station simulator alone."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from edge.cli.common import run_async

SIMULATORS = {
    "mqtt": ("edge.sim.mqtt_station", "MQTT inspection stations publishing results/readings"),
    "opcua": ("edge.sim.opcua_station", "an OPC UA inspection station server"),
    "sparkplug": ("edge.sim.sparkplug_node", "a Sparkplug B edge node with devices (MQTT)"),
}


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run a station simulator")
    ssub = p.add_subparsers(dest="simulator", metavar="PROTOCOL")
    ssub.required = True
    for name, (module_name, help_text) in SIMULATORS.items():
        s = ssub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            s.set_defaults(handler=lambda args: 2)
            continue
        module.add_arguments(s)
        s.set_defaults(handler=_runner(module))


def _runner(module: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from edge.telemetry import setup_logging

        setup_logging("info")
        return int(run_async(module.run(args)) or 0)

    return handler
