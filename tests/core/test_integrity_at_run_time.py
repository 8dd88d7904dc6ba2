"""The outbox's full integrity check runs beside intake, after the gateway is ready.

Promise (DESIGN invariants 1 and 7, restart readiness): a start reads only the outbox
file's header and first pages, so the gateway is ready at once however large the backlog;
the full ``quick_check`` then runs in the background. When it finds the file damaged,
intake is no longer acknowledged (a dropped file stays in its folder), readiness fails
with the ``outbox_corrupt`` alarm, and a restart moves the file aside and starts a fresh
outbox, from which ``edge outbox salvage`` recovers every readable event.

The damage is real: one leaf page in the middle of the ``events`` table overwritten with
garbage — a page the start-up check does not read. The background check is held at its
start (a wrapper around ``quick_check``) so "ready first" is observed deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.cli.main import main
from edge.outbox import Outbox, integrity
from tests.support import (
    api_yaml,
    eventually,
    free_port,
    hold_quick_check,
    sample,
    scribble_middle_leaf,
    sink_yaml,
    sub,
)

PAGE = 4096
EVENTS = 1500


async def _fill(state: Path) -> None:
    async with Outbox(state, router=lambda ev: ["erp"], maintenance_interval_s=3600) as ob:
        for i in range(0, EVENTS, 300):
            await ob.submit([sub(key=f"lot:{j % 7}", pad="p" * 300, n=j, dedupe=f"m{j}")
                             for j in range(i, i + 300)])


@pytest.fixture
def held_check(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The background check waits for ``.set()`` before it reads the file."""
    return hold_quick_check(monkeypatch)


def _body(api_port: int, drop: Path) -> str:
    return (api_yaml(api_port) + sink_yaml("http://127.0.0.1:9") +  # nothing drains
            "sources:\n"
            "  - {id: lims, type: file, path: " + str(drop) + ", settle_s: 0, "
            "poll_interval_s: 0.05, files: [{pattern: '*.csv', event: inspection.result, "
            "fields: {lot_id: lot, serial: sn, result: result}}]}\n")


async def _get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def test_corruption_found_after_ready_stops_intake_and_a_restart_salvages(
        gateways: Any, tmp_path: Path, held_check: threading.Event) -> None:
    state, drop = tmp_path / "state", tmp_path / "drop"
    drop.mkdir()
    await _fill(state)
    db = state / "outbox.db"
    scribble_middle_leaf(db)
    assert integrity.cheap_check(str(db)) is None  # a page the start does not read

    port = free_port()
    gw = await gateways(_body(port, drop))
    # ready before the full check has judged the file
    assert (await _get(port, "/readyz")).status_code == 200
    status = (await _get(port, "/status")).json()
    assert status["outbox"]["integrity"]["state"] == "running"

    held_check.set()
    reasons = await eventually(
        lambda: _not_ready(port), what="/readyz 503 once the background check found damage")
    assert "outbox_corrupt" in [r["code"] for r in reasons]
    status = (await _get(port, "/status")).json()
    assert status["outbox"]["integrity"]["state"] == "failed"
    assert status["health"]["state"] == "critical"
    [alarm] = [a for a in status["alarms"] if a["code"] == "outbox_corrupt"]
    assert "edge outbox salvage" in alarm["message"] and "Restart" in alarm["message"]
    assert Path(str(db) + integrity.MARKER_SUFFIX).exists()

    # intake is not acknowledged: the dropped file is retried, never moved to done/
    (drop / "lot7.csv").write_text("lot,sn,result\nL7,S1,pass\nL7,S2,pass\n")
    await eventually(lambda: sample(gw, "edge_outbox_write_errors_total",
                                    reason="corrupt") >= 2,
                     what="the file source's submits refused at least twice")
    assert (drop / "lot7.csv").exists()
    assert not (drop / "done" / "lot7.csv").exists()
    await gw.stop()

    # the restart honours the verdict: file moved aside, a fresh outbox takes the file
    gw2 = await gateways(_body(free_port(), drop))
    [moved] = [p for p in state.glob("outbox.db.corrupt-*")
               if not p.name.endswith(("-wal", "-shm"))]
    assert [a["code"] for a in gw2.outbox.alarms] == ["outbox_corrupt"]
    assert not Path(str(db) + integrity.MARKER_SUFFIX).exists()
    await eventually(lambda: (drop / "done" / "lot7.csv").exists(),
                     what="the dropped file stored in the fresh outbox and moved")
    await gw2.stop()

    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {state}\napi: {{enabled: false}}\n"
                   + sink_yaml("http://127.0.0.1:9"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = await asyncio.to_thread(main, ["outbox", "salvage", str(moved), "-c", str(cfg),
                                            "--json"])
    assert rc == 0, out.getvalue()
    report = json.loads(out.getvalue())
    lost = report["unreadable"]["count"]
    assert 0 < lost <= 20  # one page's events, named
    assert report["requeued"] == EVENTS - lost


async def _not_ready(port: int) -> list[dict[str, str]] | None:
    resp = await _get(port, "/readyz")
    return resp.json()["reasons"] if resp.status_code == 503 else None


async def test_the_api_answers_while_the_background_check_runs(
        gateways: Any, tmp_path: Path, held_check: threading.Event) -> None:
    await _fill(tmp_path / "state")
    port = free_port()
    gw = await gateways(api_yaml(port) + sink_yaml("http://127.0.0.1:9"))
    assert (await _get(port, "/healthz")).status_code == 200
    assert (await _get(port, "/readyz")).status_code == 200
    assert (await _get(port, "/status")).json()["outbox"]["integrity"]["state"] == "running"
    assert await gw.outbox.submit([sub(n=1)])  # intake is taken meanwhile
    held_check.set()
    await eventually(lambda: gw.integrity is not None and gw.integrity.state == "passed",
                     what="the background check passing")
    check = (await _get(port, "/status")).json()["outbox"]["integrity"]
    assert check["state"] == "passed" and check["finished_at"] and check["problem"] is None
    assert (await _get(port, "/readyz")).status_code == 200
