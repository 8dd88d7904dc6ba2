"""The reconciliation through the local API: GET /lots carries each lot's last round, the
page shows the mismatch and /status the health it degrades."""

from __future__ import annotations

import httpx

from edge.components import Submission
from edge.events import make_event
from tests.support import api_yaml, eventually, free_port, http_sink_yaml


def _status(lot: str, state: str) -> Submission:
    return Submission(make_event(type="lot.status", site="test-site", source="qms-downlink",
                                 data={"lot_id": lot, "status": state, "decided_by": "qms"}))


async def test_lots_page_and_status_show_a_mismatch(gateways, erp) -> None:
    port = free_port()
    gw = await gateways(api_yaml(port) + "quality:\n  reconcile: {every_s: 3600, sources: "
                        "[{sink: erp}]}\nsinks:\n" + http_sink_yaml(erp.url))
    await gw.pipeline.submit([_status("L1", "hold")])
    await erp.wait_for(lambda r: any(e["type"] == "lot.status" for e in r.events), 20)
    erp.lot_status["L1"] = {"status": "released", "decided_by": "ERP batch job"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        async def delivered() -> bool:  # the hold has left the outbox (not in transit)
            return ((await gw.outbox.stats())["sinks"].get("erp") or {}).get("total", 0) == 0

        await eventually(delivered, what="the hold delivered")
        await gw.reconciler.round()
        lots = (await client.get("/lots")).json()["lots"]
        status = (await client.get("/status")).json()
        page = (await client.get("/")).text
    [lot] = lots
    assert lot["reconcile"]["systems"]["erp"]["status"] == "released"
    assert lot["reconcile"]["mismatches"][0]["text"] == "locally hold, erp released"
    assert status["health"]["state"] == "degraded"
    assert "Reconciliation with erp" in page and "locally hold, erp released" in page
