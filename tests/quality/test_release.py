"""Releasing a lot as an operator does it: ``edge lot release`` against a running gateway
(through its local API) and a stopped one (in its outbox file), ``edge lots``, and the
``POST /lots/{lot}/release`` endpoint. The release reaches the ERP stand-in."""

from __future__ import annotations

import json
import sqlite3

import httpx

from tests.quality.support import audit_rows, failing, receipt
from tests.support import api_yaml, eventually, free_port, run_edge, sink_yaml

TOKEN = "ops 9c4e-lot-secret"


def _released(events: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["type"], e["data"].get("status")) for e in events
            if e["type"] in ("lot.status", "quality.release")]


async def test_release_through_the_running_gateway(quality_gateways, erp, tmp_path) -> None:
    (tmp_path / "api.token").write_text(TOKEN + "\n")
    port = free_port()
    gw = await quality_gateways(api_yaml(port, token_file="api.token") + "rules:\n"
                                "  - {type: spec_limits, upper: 10.05}\n" + sink_yaml(erp.url))
    cfg = str(tmp_path / "edge.yaml")
    await gw.pipeline.submit([receipt("L1", supplier="acme"), failing("L1", "S1")])
    await erp.wait_for(lambda e: ("lot.status", "hold") in _released(e.events), within_s=20)

    rc, _, err = await run_edge("lot", "release", "L1", "-c", cfg, "--reason", "sorted",
                                cwd=tmp_path)
    assert rc == 2 and "--by" in err  # who decided is required
    rc, _, err = await run_edge("lot", "release", "L1", "-c", cfg, "--reason", " ", "--by",
                                "J. Doe", cwd=tmp_path)
    assert rc == 2 and "must say why" in err
    rc, _, err = await run_edge("lot", "release", "L404", "-c", cfg, "--reason", "x", "--by",
                                "J. Doe", cwd=tmp_path)
    assert rc == 2 and "unknown lot 'L404'" in err
    assert gw.outbox.quality.lots["L1"].state == "hold"  # nothing changed so far

    rc, out, err = await run_edge("lot", "release", "L1", "-c", cfg, "--reason",
                                  "sorted 100 %, 4 parts scrapped", "--by", "J. Doe",
                                  cwd=tmp_path)
    assert rc == 0, err
    assert "lot L1 released by J. Doe (episode 1, was hold)" in out
    await erp.wait_for(lambda e: ("quality.release", None) in _released(e.events),
                       within_s=20)
    lot_events = [e for e in erp.events if e["ordering_key"] == "lot:L1"]
    assert _released(lot_events)[-2:] == [("lot.status", "released"),
                                          ("quality.release", None)]
    assert {e["data"]["decided_by"] for e in lot_events[-2:]} == {"J. Doe"}
    assert gw.outbox.quality.lots["L1"].state == "released"
    released = [a for a in audit_rows(gw.outbox.path) if a["state"] == "lot_released"]
    assert [(a["actor"], a["reason"]) for a in released] == [
        ("api:ops by J. Doe", "sorted 100 %, 4 parts scrapped")]

    rc, _, err = await run_edge("lot", "release", "L1", "-c", cfg, "--reason", "again",
                                "--by", "J. Doe", cwd=tmp_path)
    assert rc == 1 and "released already" in err and "by J. Doe" in err

    rc, out, _ = await run_edge("lots", "-c", cfg, "--json", cwd=tmp_path)
    [lot] = json.loads(out)
    assert (lot["lot_id"], lot["state"], lot["episode"], lot["supplier"]) == (
        "L1", "released", 1, "acme")
    assert lot["last_events"]["lot.status"]["id"] == lot_events[-2]["id"]
    rc, out, _ = await run_edge("lots", "-c", cfg, cwd=tmp_path)
    assert rc == 0 and "L1" in out and "released" in out and "acme" in out


async def test_release_of_a_stopped_gateway_is_sent_when_it_starts(
        quality_gateways, erp, tmp_path) -> None:
    body = "rules:\n  - {type: spec_limits, upper: 10.05}\n" + sink_yaml(erp.url)
    gw = await quality_gateways(body)
    cfg = str(tmp_path / "edge.yaml")
    await gw.pipeline.submit([failing("L2", "S1")])
    await erp.wait_for(lambda e: ("lot.status", "hold") in _released(e.events), within_s=20)
    await gw.stop()

    rc, out, err = await run_edge("lot", "release", "L2", "-c", cfg, "--reason", "ok",
                                  "--by", "J. Doe", cwd=tmp_path)
    assert rc == 0, err
    assert "lot L2 released by J. Doe" in out and "the gateway is stopped" in out
    rc, _, err = await run_edge("lot", "release", "L2", "-c", cfg, "--reason", "ok",
                                "--by", "J. Doe", cwd=tmp_path)
    assert rc == 1 and "released already" in err
    rc, _, err = await run_edge("lot", "release", "L404", "-c", cfg, "--reason", "ok",
                                "--by", "J. Doe", cwd=tmp_path)
    assert rc == 2 and "unknown lot" in err
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    try:
        [(actor,)] = conn.execute("SELECT actor FROM audit WHERE state = 'lot_released'")
    finally:
        conn.close()
    assert actor.startswith("cli:") and actor.endswith(" by J. Doe")

    gw2 = await quality_gateways(body)  # the same state dir
    assert gw2.outbox.quality.lots["L2"].state == "released"
    await erp.wait_for(lambda e: ("quality.release", None) in _released(e.events),
                       within_s=20)
    await gw2.pipeline.submit([failing("L2", "S2")])  # the next failure: episode 2
    await erp.wait_for(lambda e: [x["data"].get("episode") for x in e.events
                                  if x["type"] == "quality.hold"] == [1, 2], within_s=20)


async def test_release_endpoint_answers(quality_gateways, erp) -> None:
    port = free_port()
    gw = await quality_gateways(api_yaml(port) + "rules:\n  - {type: spec_limits, "
                                "upper: 10.05}\n" + sink_yaml(erp.url))
    await gw.pipeline.submit([failing("A/1", "S1")])  # a lot id with a slash
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for body, says in [({"reason": "x"}, "by is required"),
                           ({"by": "J. Doe"}, "reason is required"),
                           ({"by": "J. Doe", "reason": "x", "when": 1}, "unknown key"),
                           ([], "JSON object")]:
            resp = await client.post("/lots/A%2F1/release", json=body)
            assert resp.status_code == 400 and says in resp.json()["error"], body
        resp = await client.post("/lots/NOPE/release", json={"by": "J. Doe", "reason": "x"})
        assert resp.status_code == 404 and "no lot 'NOPE'" in resp.json()["error"]
        resp = await client.post("/lots/A%2F1/release", json={"by": "J. Doe", "reason": "ok"})
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert (doc["lot_id"], doc["released"], doc["episode"], len(doc["event_ids"])) == (
            "A/1", True, 1, 2)
        resp = await client.post("/lots/A%2F1/release", json={"by": "J. Doe", "reason": "ok"})
        assert resp.status_code == 409 and resp.json()["lot"]["decided_by"] == "J. Doe"
        lots = (await client.get("/lots")).json()["lots"]
        assert [(x["lot_id"], x["state"]) for x in lots] == [("A/1", "released")]
        assert (await client.get("/lots?state=paused")).status_code == 400
    await eventually(lambda: gw.outbox.quality.lots["A/1"].state == "released")
