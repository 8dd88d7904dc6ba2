"""DLQ and trace endpoints: a 422 dead-letters an event; an operator fixes and replays it."""

from __future__ import annotations

import httpx

from tests.support import api_yaml, eventually, free_port, http_sink_yaml, submission


async def _dead_lettered(gateways, erp, lot: str = "L7"):
    """A running gateway whose ERP refuses lot ``lot`` until ``refusing["on"]`` is False."""
    refusing = {"on": True}
    erp.reject(lambda e: refusing["on"] and e.get("data", {}).get("lot_id") == lot, 422,
               body='{"error": "unknown material M-17"}')
    port = free_port()
    gw = await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    [event_id] = await gw.pipeline.submit([submission(lot, material="M-17")])
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}"), refusing, event_id


async def _dlq(client: httpx.AsyncClient, query: str = "") -> list | None:
    resp = await client.get("/dlq" + query)
    assert resp.status_code == 200
    return resp.json()["dead_letters"] or None


async def test_replay_redelivers_after_the_cause_is_fixed(gateways, erp):
    client, refusing, event_id = await _dead_lettered(gateways, erp)
    async with client:
        [dl] = await eventually(lambda: _dlq(client))
        assert (dl["event_id"], dl["sink"], dl["status"]) == (event_id, "erp", 422)
        shown = (await client.get(f"/dlq/{dl['id']}")).json()
        assert "unknown material" in shown["response_body"]
        assert shown["event"]["data"]["material"] == "M-17"
        assert (await client.get(f"/dlq/{event_id}")).json()["id"] == dl["id"]
        assert (await client.get("/dlq/999999")).status_code == 404

        no_reason = await client.post("/dlq/replay", json={"ids": [dl["id"]]})
        assert no_reason.status_code == 400 and "reason" in no_reason.json()["error"]
        assert await _dlq(client)  # still there

        refusing["on"] = False  # master data fixed in the ERP
        resp = await client.post("/dlq/replay", json={"ids": [dl["id"]],
                                                      "reason": "material M-17 created in ERP"})
        assert resp.json() == {"replayed": 1}
        await erp.wait_for(lambda r: r.accepted_ids[event_id] >= 1)
        assert await _dlq(client) is None

        trace = await eventually(lambda: _trace_delivered(client, event_id))
        states = [r["state"] for r in trace["audit"]]
        assert states == ["stored", "dead_lettered", "replayed", "delivered"]
        replayed = trace["audit"][2]
        assert (replayed["actor"], replayed["reason"]) == ("api", "material M-17 created in ERP")
        assert trace["sinks"] == {"erp": "delivered"}

        by_key = (await client.get("/trace", params={"key": "lot:L7"})).json()
        assert [e["event_id"] for e in by_key["events"]] == [event_id]
        assert (await client.get("/trace", params={"key": "lot:nope"})).status_code == 404
        assert (await client.get("/trace/not-an-event")).status_code == 404


async def _trace_delivered(client: httpx.AsyncClient, event_id: str) -> dict | None:
    doc = (await client.get(f"/trace/{event_id}")).json()
    return doc if doc["audit"][-1]["state"] == "delivered" else None


async def test_discard_by_sink_is_audited(gateways, erp):
    client, _, event_id = await _dead_lettered(gateways, erp, lot="L9")
    async with client:
        await eventually(lambda: _dlq(client))
        resp = await client.post("/dlq/discard", json={"sink": "erp",
                                                       "reason": "test lot, never existed"})
        assert resp.json() == {"discarded": 1}
        assert await _dlq(client, "?sink=erp") is None
        trace = (await client.get(f"/trace/{event_id}")).json()
    assert trace["audit"][-1]["state"] == "discarded"
    assert trace["audit"][-1]["reason"] == "test lot, never existed"
    assert trace["event"] is None  # nothing of it is left in the outbox
    assert erp.accepted_ids[event_id] == 0


async def test_bad_requests_are_refused_with_the_reason(gateways, erp):
    port = free_port()
    await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        cases = [
            ({"reason": "x"}, "ids"),
            ({"ids": [], "reason": "x"}, "ids"),
            ({"ids": ["1"], "reason": "x"}, "ids"),
            ({"sink": "erp", "reason": "  "}, "reason"),
            ({"sink": "erp", "reason": "x", "all": True}, "unknown key"),
        ]
        for body, words in cases:
            resp = await client.post("/dlq/discard", json=body)
            assert resp.status_code == 400, body
            assert words in resp.json()["error"], body
        not_json = await client.post("/dlq/replay", content=b"{nope",
                                     headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400
        huge = await client.post("/dlq/replay", json={"sink": "erp", "reason": "x" * 100_000})
        assert huge.status_code == 413
        assert (await client.get("/dlq", params={"limit": "0"})).status_code == 400
        assert (await client.get("/trace")).status_code == 400
