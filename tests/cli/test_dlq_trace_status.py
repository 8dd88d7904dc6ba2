"""``edge dlq``, ``edge trace`` and ``edge status`` as an operator runs them: subprocesses
against the state dir of a real gateway run (stopped or running)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from edge.outbox import queries
from tests.support import api_yaml, eventually, free_port, http_sink_yaml, run_edge, submission


def write_config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "edge.yaml"
    path.write_text(f"site: test-site\nstate_dir: {tmp_path / 'state'}\n" + body)
    return str(path)


async def test_dead_letter_replayed_from_the_cli_while_stopped_then_delivered(
        gateways, erp, tmp_path):
    refusing = {"on": True}
    erp.reject(lambda e: refusing["on"] and e["data"]["lot_id"] == "L7", 422,
               body='{"error": "unknown material M-17"}')
    body = "sinks:\n" + http_sink_yaml(erp.url)
    gw = await gateways(body)
    [event_id, _] = await gw.pipeline.submit([submission("L7"), submission("L8")])
    await eventually(lambda: gw.outbox.read(queries.dlq_list))
    await gw.stop()
    cfg = write_config(tmp_path, "api: {enabled: false}\n" + body)

    rc, out, _ = await run_edge("dlq", "list", "-c", cfg, "--json", cwd=tmp_path)
    [dl] = json.loads(out)
    assert (rc, dl["event_id"], dl["status"], dl["ordering_key"]) == (0, event_id, 422, "lot:L7")
    rc, out, _ = await run_edge("dlq", "list", "-c", cfg, cwd=tmp_path)
    assert rc == 0 and "422" in out and "lot:L7" in out
    rc, out, _ = await run_edge("dlq", "show", str(dl["id"]), "-c", cfg, cwd=tmp_path)
    assert rc == 0 and "unknown material M-17" in out and event_id in out

    rc, _, err = await run_edge("dlq", "replay", str(dl["id"]), "-c", cfg, cwd=tmp_path)
    assert rc == 2 and "--reason" in err
    rc, _, err = await run_edge("dlq", "replay", "-c", cfg, "--reason", "x", cwd=tmp_path)
    assert rc == 2 and "ids or --sink" in err
    rc, out, _ = await run_edge("dlq", "replay", str(dl["id"]), "-c", cfg,
                            "--reason", "material M-17 created in ERP", cwd=tmp_path)
    assert rc == 0 and "replayed 1" in out
    rc, out, _ = await run_edge("dlq", "list", "-c", cfg, "--json", cwd=tmp_path)
    assert json.loads(out) == []

    rc, out, _ = await run_edge("trace", event_id, "-c", cfg, cwd=tmp_path)
    assert rc == 0
    assert "dead-lettered: HTTP 422" in out
    assert 'replayed by cli:' in out and "material M-17 created in ERP" in out
    assert "now: erp: queued" in out

    refusing["on"] = False
    gw2 = await gateways(body)  # same state dir: the replayed row is delivered
    await erp.wait_for(lambda r: r.accepted_ids[event_id] >= 1)
    await eventually(lambda: _no_pending(gw2, event_id))
    await gw2.stop()

    rc, out, _ = await run_edge("trace", event_id, "-c", cfg, "--json", cwd=tmp_path)
    doc = json.loads(out)
    states = [r["state"] for r in doc["audit"]]
    assert states == ["stored", "dead_lettered", "replayed", "delivered"]
    assert doc["audit"][2]["actor"].startswith("cli:")
    rc, out, _ = await run_edge("trace", "--key", "lot:L7", "-c", cfg, cwd=tmp_path)
    assert rc == 0 and event_id in out and "now: erp: delivered" in out
    rc, _, err = await run_edge("trace", "0190-no-such-event", "-c", cfg, cwd=tmp_path)
    assert rc == 1 and "no trace" in err


async def _no_pending(gw, event_id: str) -> bool:
    return await gw.outbox.read(queries.event_by_id, event_id) is None


async def test_discard_from_the_cli_with_the_daemon_running(gateways, erp, tmp_path):
    erp.reject(lambda e: True, 422)
    body = "sinks:\n" + http_sink_yaml(erp.url)
    gw = await gateways(body)
    [event_id] = await gw.pipeline.submit([submission("L1")])
    await eventually(lambda: gw.outbox.read(queries.dlq_list))
    cfg = write_config(tmp_path, "api: {enabled: false}\n" + body)

    rc, out, _ = await run_edge("dlq", "discard", "--sink", "erp", "-c", cfg,
                            "--reason", "test lot", cwd=tmp_path)
    assert rc == 0 and "discarded 1" in out
    assert await gw.outbox.read(queries.dlq_list) == []
    rc, out, _ = await run_edge("dlq", "discard", "--sink", "erp", "-c", cfg,
                            "--reason", "again", cwd=tmp_path)
    assert rc == 1
    rc, out, _ = await run_edge("trace", event_id, "-c", cfg, cwd=tmp_path)
    assert 'discarded by cli:' in out and "test lot" in out


async def test_status_asks_the_running_daemon_with_its_token(gateways, erp, tmp_path):
    (tmp_path / "api.token").write_text("ops 4f1d-secret\n")
    port = free_port()
    body = api_yaml(port, token_file="api.token") + "sinks:\n" + http_sink_yaml(erp.url)
    erp.outage(True)
    gw = await gateways(body)
    await gw.pipeline.submit([submission("L1"), submission("L2", type="quality.hold")])
    cfg = write_config(tmp_path, body)

    rc, out, _ = await run_edge("status", "-c", cfg, cwd=tmp_path)
    assert rc == 0 and "test-site" in out
    erp_line = next(line for line in out.splitlines() if line.startswith("erp "))
    assert erp_line.split()[2:7] == ["1", "1", "0", "0", "2"]  # critical high normal low total
    rc, out, _ = await run_edge("status", "-c", cfg, "--json", cwd=tmp_path)
    assert rc == 0 and json.loads(out)["sinks"]["erp"]["total"] == 2

    rc, _, err = await run_edge("status", "--url", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert rc == 1 and "refused the token" in err

    await gw.stop()
    rc, _, err = await run_edge("status", "-c", cfg, cwd=tmp_path)
    assert rc == 1 and "not running" in err


async def test_a_dead_letter_parks_its_lot_until_the_operator_replays_it(
        gateways, erp, tmp_path):
    """Invariant 4 end to end: the ERP refuses a lot's first result (422); the lot's later
    result waits (parked: in /status, `edge status`, the metric) while other lots flow;
    after `edge dlq replay` the ERP gets the lot's results in ingest order. Before, the
    later result was delivered at once, ahead of the refused one."""
    refusing = {"on": True}
    erp.reject(lambda e: refusing["on"] and e["data"].get("serial") == "S1", 422,
               body='{"error": "unknown material M-17"}')
    port = free_port()
    body = api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url)
    gw = await gateways(body)
    [first] = await gw.pipeline.submit([submission("L7", serial="S1")])
    await eventually(lambda: gw.outbox.read(queries.dlq_list))
    [second, other] = await gw.pipeline.submit([submission("L7", serial="S2"),
                                                submission("L8", serial="S3")])
    await erp.wait_for(lambda r: r.accepted_ids[other] >= 1)
    await asyncio.sleep(0.5)  # several lease rounds: the parked result must not go
    assert erp.accepted_ids[second] == 0

    cfg = write_config(tmp_path, body)
    rc, out, _ = await run_edge("status", "-c", cfg, cwd=tmp_path)
    assert rc == 0 and "parked keys: 1" in out
    assert any("lot:L7" in line and "1 waiting" in line for line in out.splitlines())
    import httpx

    async def parked_metric() -> bool:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        return 'edge_outbox_parked_keys{sink="erp"} 1.0' in text

    await eventually(parked_metric)  # the gauges refresh every few seconds

    refusing["on"] = False
    [dl] = await gw.outbox.read(queries.dlq_list)
    rc, out, _ = await run_edge("dlq", "replay", str(dl["id"]), "-c", cfg,
                            "--reason", "material M-17 created in ERP", cwd=tmp_path)
    assert rc == 0 and "replayed 1" in out
    await erp.wait_for(lambda r: r.accepted_ids[second] >= 1)
    l7 = [e["id"] for e in erp.events if e["data"]["lot_id"] == "L7"]
    assert l7 == [first, second]
