"""`edge components` tells an operator which source and sink types this installation has."""

from __future__ import annotations

import json
import subprocess
import sys


def test_components_lists_every_builtin_with_its_description() -> None:
    out = subprocess.run([sys.executable, "-m", "edge", "components", "--json"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    rows = {(r["kind"], r["type"]): r for r in json.loads(out)}
    assert {("source", "mqtt"), ("source", "opcua"), ("sink", "http"),
            ("sink", "mqtt")} <= set(rows)
    assert rows[("sink", "http")]["module"] == "edge.sinks.http"
    assert all(r["description"] for r in rows.values())
