"""/status, /metrics and the HTML page against a real gateway and a stand-in ERP."""

from __future__ import annotations

import httpx

from tests.support import api_yaml, eventually, free_port, http_sink_yaml, submission


async def _gateway(gateways, erp, extra: str = ""):
    port = free_port()
    gw = await gateways(api_yaml(port) + extra + "sinks:\n" + http_sink_yaml(erp.url))
    return gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")


async def test_status_shows_backlog_per_sink_and_class_while_the_erp_is_down(gateways, erp):
    erp.outage(True)
    gw, client = await _gateway(gateways, erp)
    await gw.pipeline.submit([
        submission("L1"), submission("L2"),
        submission("L3", type="quality.hold", reason="crack"),
        submission("L4", type="production.count", good=10),
    ])
    async with client:
        doc = (await client.get("/status")).json()
        erp_entry = doc["sinks"]["erp"]
        assert erp_entry["depth"] == {"critical": 1, "high": 2, "normal": 1, "low": 0}
        assert erp_entry["total"] == 4 and erp_entry["configured"] is True
        assert doc["site"] == "test-site"
        assert {c["id"] for c in doc["components"]} == {"erp"}
        assert doc["outbox"]["dead_letters"] == 0
        assert doc["outbox"]["budget"]["budget_bytes"] > 0
        # The circuit opens after repeated failures; the page says so in words.
        await eventually(lambda: _sink_down(client))
        page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "PROBLEM" in page.text and "unreachable" in page.text and "NO (circuit" in page.text


async def _sink_down(client: httpx.AsyncClient) -> bool:
    return (await client.get("/status")).json()["sinks"]["erp"]["up"] is False


async def test_status_counts_the_dead_letter_after_a_422(gateways, erp):
    erp.reject(lambda e: e.get("data", {}).get("lot_id") == "BAD", 422)
    gw, client = await _gateway(gateways, erp)
    await gw.pipeline.submit([submission("BAD"), submission("GOOD")])
    async with client:
        doc = await eventually(lambda: _status_with_dead_letter(client))
        page = (await client.get("/")).text
    assert doc["sinks"]["erp"]["dead_letters"] == 1
    assert doc["sinks"]["erp"]["total"] == 0
    assert "1 dead letter(s)" in page


async def _status_with_dead_letter(client: httpx.AsyncClient) -> dict | None:
    doc = (await client.get("/status")).json()
    return doc if doc["outbox"]["dead_letters"] == 1 else None


async def test_metrics_are_prometheus_text_of_the_gateway(gateways, erp):
    gw, client = await _gateway(gateways, erp)
    await gw.pipeline.submit([submission("L1")])
    async with client:
        text = await eventually(lambda: _metrics_after_delivery(client))
    assert 'edge_events_received_total{source="line1"} 1.0' in text
    assert 'edge_outbox_depth{class="high",sink="erp"}' in text


async def _metrics_after_delivery(client: httpx.AsyncClient) -> str | None:
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text if 'edge_events_delivered_total{sink="erp"} 1.0' in resp.text else None


async def test_page_is_self_contained_and_highlights_alarms(gateways, erp):
    # Over budget from the start: the budget alarm and backpressure must stand out.
    gw, client = await _gateway(gateways, erp, "outbox: {max_size_mb: 0.01}\n")
    async with client:
        page = await client.get("/")
    html = page.text
    assert page.status_code == 200
    assert "http-equiv='refresh'" in html
    assert "<script" not in html and "<link" not in html and "src=" not in html
    assert "PROBLEM" in html and "class='critical'" in html
    assert "backpressure" in html and "outbox at" in html  # the outbox_budget alarm text
    assert "erp" in html and "test-site" in html


async def test_page_escapes_what_it_shows(gateways, erp):
    gw, client = await _gateway(gateways, erp)
    gw.status["erp"].error = "<img src=x onerror=alert(1)>"
    gw.status["erp"].state = "retrying"
    async with client:
        html = (await client.get("/")).text
    assert "<img src=x" not in html and "&lt;img src=x" in html
