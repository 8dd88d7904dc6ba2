"""Stuck lots in ``/status``, on the status page, in ``edge status`` and in
``edge_lots_stuck``: a receipt or results but no disposition, or a hold without a
decision, for longer than ``quality.stuck_after_s``."""

from __future__ import annotations

import httpx

from edge.rules import QualityConfig
from tests.quality.support import failing, receipt
from tests.support import api_yaml, eventually, free_port, run_edge, sample, sink_yaml


async def _stuck(client: httpx.AsyncClient, n: int) -> dict | None:
    doc = (await client.get("/status")).json()
    return doc if doc["lots"]["stuck"] == n else None


async def test_stuck_lots_show_in_status_page_metrics_and_edge_status(
        quality_gateways, erp, tmp_path) -> None:
    port = free_port()
    gw = await quality_gateways(
        api_yaml(port) + "rules:\n  - {type: spec_limits, upper: 10.05}\n" + sink_yaml(erp.url),
        quality=QualityConfig(stuck_after_s=0.5))
    await gw.pipeline.submit([receipt("WAITING", supplier="acme"), failing("HELD", "S1"),
                              receipt("DONE")])
    await gw.release_lot("DONE", by="J. Doe", reason="ok", actor="test")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        doc = await eventually(lambda: _stuck(client, 2), what="two stuck lots")
        page = (await client.get("/")).text
    lots = doc["lots"]
    assert lots["by_state"] == {"unknown": 1, "hold": 1, "quarantine": 0, "rejected": 0,
                                "released": 1}
    assert [x["lot_id"] for x in lots["stuck_lots"]] == ["WAITING", "HELD"]  # oldest first
    assert lots["stuck_lots"][0]["supplier"] == "acme"
    assert "sinks" in doc and "outbox" in doc  # the existing keys stay
    assert "<h2>Lots</h2>" in page and "WAITING" in page and "NEEDS ATTENTION" in page
    assert "2 lot(s) without a disposition" in page
    assert sample(gw, "edge_lots_stuck") == 2
    assert sample(gw, "edge_lots", state="released") == 1
    rc, out, _ = await run_edge("status", "--url", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert rc == 0 and "lots: 2 lot(s) without a disposition" in out and "WAITING" in out


async def test_nothing_is_stuck_within_the_default_hour(quality_gateways, erp) -> None:
    port = free_port()
    gw = await quality_gateways(api_yaml(port) + sink_yaml(erp.url))
    await gw.pipeline.submit([receipt("L1")])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        doc = (await client.get("/status")).json()
        page = (await client.get("/")).text
    assert doc["lots"]["stuck"] == 0 and doc["lots"]["stuck_after_s"] == 3600
    assert doc["lots"]["by_state"]["unknown"] == 1
    assert "Nothing: every component runs" in page
