"""Component packages are cheap to import (``edge.registry`` contract): their ``__init__``
holds the config model and ``COMPONENT``; the client libraries (asyncua, paho, httpx, aiohttp) are
imported by the factory only, so ``check-config`` and start-up never load them for nothing.

Each check runs in a fresh interpreter: this test process has long imported them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("asyncua", "paho", "httpx", "aiohttp")

_PROBE = """
import json, sys
{imports}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def _heavy_modules_after(imports: str) -> list[str]:
    code = _PROBE.format(imports=imports, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("imports", [
    "import edge.sources.mqtt, edge.sources.opcua, edge.sinks.http, edge.sinks.mqtt, "
    "edge.plugin",
    # what check-config does: every registered type's config model in one schema
    "from edge.config import build_config_model\n"
    "from edge.registry import default_registry\n"
    "build_config_model(default_registry())",
], ids=["component-packages", "config-model"])
def test_no_client_library_is_imported(imports: str) -> None:
    assert _heavy_modules_after(imports) == []
