"""plugins/README.md is real code: every block that starts with ``# file: NAME`` is written
out as that file and run — the unit test the README shows, and its ``spool`` source and
``dropdir`` sink in a gateway with a real outbox, configured by the README's YAML."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import eventually, metric

README = Path(__file__).resolve().parents[2] / "plugins" / "README.md"
BLOCK = re.compile(r"^```\w*\n# file: (\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def readme_files() -> dict[str, str]:
    return {name: f"# file: {name}\n{body}" for name, body in BLOCK.findall(README.read_text())}


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """The README's files as a reader would lay them out: the config beside a ``plugins``
    folder that holds the packages and the test."""
    plugins = tmp_path / "plugins"
    for name, text in readme_files().items():
        path = tmp_path / name if name.endswith(".yaml") else plugins / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return plugins


def test_the_readme_has_the_files_it_promises():
    assert set(readme_files()) == {"spool/__init__.py", "dropdir/__init__.py", "edge.yaml",
                                   "test_spool.py"}


async def test_the_readme_unit_test_passes(plugin_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    spec = importlib.util.spec_from_file_location("readme_test_spool",
                                                  plugin_dir / "test_spool.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        tests: list[Callable[..., Any]] = [f for name, f in vars(module).items()
                                           if name.startswith("test_") and callable(f)]
        assert tests
        for test in tests:
            work = tmp_path / test.__name__
            work.mkdir()
            result = test(work)
            if inspect.isawaitable(result):
                await result
    finally:
        sys.modules.pop("spool", None)


async def test_the_readme_source_and_sink_run_in_a_gateway(plugin_dir: Path, tmp_path: Path,
                                                            gateways: Any):
    inbox, erp_import = tmp_path / "inbox", tmp_path / "erp-import"
    inbox.mkdir()
    erp_import.mkdir()
    for n in (1, 2, 3):
        (inbox / f"r{n}.json").write_text(json.dumps({"lot_id": "L1", "serial": f"S{n}",
                                                      "result": "pass"}))
    (inbox / "r4.json").write_text("{ not json")
    gw = await gateways((tmp_path / "edge.yaml").read_text())

    def written() -> list[dict[str, Any]]:
        return [json.loads(p.read_bytes()) for p in erp_import.glob("*.json")]

    await eventually(lambda: len(written()) == 3)
    await eventually(lambda: not list(inbox.glob("*.json")))
    assert sorted(p.name for p in (inbox / "done").iterdir()) == [
        "r1.json", "r2.json", "r3.json", "r4.json"]
    events = written()
    assert sorted(e["data"]["serial"] for e in events) == ["S1", "S2", "S3"]
    assert {(e["type"], e["source"], e["site"]) for e in events} == {
        ("inspection.result", "inbox", "test-site")}
    assert sorted(p.name for p in erp_import.iterdir()) == sorted(
        f"{e['id']}.json" for e in events)  # no temporary file left behind
    assert metric(gw.metrics.events_quarantined, "inbox", "invalid_data") == 1
    await eventually(lambda: metric(gw.metrics.events_delivered, "erp-import") == 3)
