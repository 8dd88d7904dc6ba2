"""The installable example plugin (plugins/example-source): registered by its entry point
alone, as an installed distribution is, then checked and run by the ``edge`` CLI.

``pip install`` would need a build backend and a minute; what the gateway sees of an
installed distribution is its package on ``sys.path`` and a ``.dist-info`` folder with
``entry_points.txt``, so the test writes exactly that from the plugin's pyproject.toml.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from edge.sim.erp import ErpReceiver
from tests.support import eventually

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "example-source"


def install(target: Path) -> dict[str, str]:
    """Lay the plugin out in ``target`` as ``pip install --target`` would; return an
    environment with ``target`` on the path."""
    pyproject = tomllib.loads((PLUGIN / "pyproject.toml").read_text())
    project = pyproject["project"]
    dist = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {ref}\n" for name, ref in eps.items()) + "\n"
        for group, eps in project["entry-points"].items()))
    for package in pyproject["tool"]["setuptools"]["packages"]:
        shutil.copytree(PLUGIN / package, target / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return {**os.environ, "PYTHONPATH": str(target)}


@pytest.fixture
def installed(tmp_path: Path) -> dict[str, str]:
    return install(tmp_path / "site-packages")


def edge_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_check_config_knows_the_type_only_from_the_entry_point(installed: dict[str, str]):
    sample = str(PLUGIN / "sample.yaml")
    ok = edge_cli("check-config", sample, env=installed)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stderr
    without = edge_cli("check-config", sample, env={**os.environ, "PYTHONPATH": ""})
    assert without.returncode == 2 and "'http_poll'" in without.stderr


def test_check_config_names_a_bad_option(installed: dict[str, str], tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((PLUGIN / "sample.yaml").read_text().replace(
        "url: http://127.0.0.1:8090/results", "url: ftp://127.0.0.1/results"))
    out = edge_cli("check-config", str(bad), env=installed)
    assert out.returncode == 2
    assert "sources[0].url: must be an http:// or https:// URL" in out.stderr


def test_importing_the_plugin_is_cheap(installed: dict[str, str]):
    out = subprocess.run([sys.executable, "-c", "import sys, edge_http_poll; "
                          "print('httpx' in sys.modules)"],
                         capture_output=True, text=True, env=installed, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


class Station:
    """A station's result endpoint: ``GET /results?after=N`` → records with id > N."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.asked: list[int | None] = []  # the cursor of every poll, in order
        station = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                query = parse_qs(urlsplit(self.path).query)
                after = int(query["after"][0]) if "after" in query else None
                station.asked.append(after)
                body = json.dumps([r for r in list(station.records)
                                   if after is None or r["id"] > after]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/results"

    def add(self, n: int) -> None:
        self.records.append({"id": n, "lot_id": "L1", "serial": f"S{n}", "result": "pass"})


@pytest.fixture
def station() -> Iterator[Station]:
    st = Station()
    thread = threading.Thread(target=st.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield st
    finally:
        st.server.shutdown()
        st.server.server_close()


async def test_run_stores_records_and_resumes_after_its_cursor(
        installed: dict[str, str], station: Station, erp: ErpReceiver, tmp_path: Path):
    config = tmp_path / "edge.yaml"
    config.write_text(f"""\
site: test-site
state_dir: {tmp_path / "state"}
api: {{enabled: false}}
sources:
  - {{id: station9, type: http_poll, url: "{station.url}", event: inspection.result,
     interval_s: 0.05}}
sinks:
  - id: erp
    type: http
    url: {erp.url}
    retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.5}}
    routes:
      - {{events: ["*"], method: POST, path: /events}}
""")
    log = tmp_path / "gateway.log"

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "run", "-c", str(config), env=installed,
            stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab"))

    def delivered() -> list[int]:
        return sorted(e["data"]["id"] for e in erp.events)

    for n in (1, 2, 3):
        station.add(n)
    gateway = await start()
    try:
        await eventually(lambda: delivered() == [1, 2, 3])
        station.add(4)
        await eventually(lambda: delivered() == [1, 2, 3, 4])
        assert 3 in station.asked  # the cursor moved once the first records were stored
        gateway.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gateway.wait(), 30) == 0
        polls_before_restart = len(station.asked)
        station.add(5)
        # a record that breaks the catalogue's inspection.result is quarantined, not sent,
        # and does not stop the records after it
        station.records.append({"id": 6, "lot_id": "L1", "serial": "S6", "result": "maybe"})
        station.add(7)
        gateway = await start()
        await eventually(lambda: delivered() == [1, 2, 3, 4, 5, 7])
    finally:
        if gateway.returncode is None:
            gateway.send_signal(signal.SIGTERM)
            await asyncio.wait_for(gateway.wait(), 30)
    assert station.asked[polls_before_restart] == 4, log.read_text()[-3000:]
    assert {e["source"] for e in erp.events} == {"station9"}
    assert {e["type"] for e in erp.events} == {"inspection.result"}
