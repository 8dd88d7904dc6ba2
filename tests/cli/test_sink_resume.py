"""``edge sink resume`` as an operator runs it: a subprocess asking a real running gateway
(its local API, with a token) to lift a dead-letter storm-guard pause."""

from __future__ import annotations

import json

from edge.outbox import queries
from tests.support import api_yaml, eventually, free_port, result, run_edge, sink_yaml


async def test_resume_lifts_a_storm_guard_pause_and_is_audited(gateways, erp, tmp_path):
    (tmp_path / "api.token").write_text("ops 9c4e-secret\n")
    port = free_port()
    body = api_yaml(port, token_file="api.token") + sink_yaml(erp.url)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {tmp_path / 'state'}\n" + body)
    erp.reject(lambda e: True, 410, body='{"error": "API version retired"}')
    gw = await gateways(body)
    ids = await gw.pipeline.submit([result(f"L{n}", n) for n in range(100)])
    await eventually(lambda: gw.forwarders["erp"].status()["paused"])

    rc, _, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), cwd=tmp_path)
    assert rc == 2 and "--reason" in err  # argparse: the reason is required
    rc, _, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason", "  ",
                            cwd=tmp_path)
    assert rc == 2 and "must say why" in err
    rc, _, err = await run_edge("sink", "resume", "mes", "-c", str(cfg), "--reason", "x",
                            cwd=tmp_path)
    assert rc == 1 and "no sink 'mes'" in err
    rc, _, err = await run_edge("sink", "resume", "erp", "--url", f"http://127.0.0.1:{port}",
                            "--reason", "x", cwd=tmp_path, env={"EDGE_API_TOKEN": "wrong"})
    assert rc == 1 and "refused the token" in err
    assert gw.forwarders["erp"].status()["paused"] is not None  # nothing changed so far

    erp.clear_rejects()  # the ERP team restored the API version
    rc, out, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason",
                              "v1 restored by the ERP team", "--by", "J. Doe", cwd=tmp_path)
    assert rc == 0, err
    assert "sink erp resumed by J. Doe: v1 restored by the ERP team" in out
    assert gw.forwarders["erp"].status()["paused"] is None
    dead = {d["event_id"] for d in await gw.outbox.read(queries.dlq_list)}
    await erp.wait_for(lambda e: set(e.ids()) == set(ids) - dead, within_s=20)
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT actor, reason, detail FROM audit WHERE state = 'sink_resumed'").fetchall())
    [(actor, reason, detail)] = rows
    assert (actor, reason) == ("api:ops by J. Doe", "v1 restored by the ERP team")
    assert json.loads(detail)["sink"] == "erp"

    rc, _, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason", "again",
                            cwd=tmp_path)
    assert rc == 1 and "not paused" in err


async def test_resume_says_when_no_gateway_answers(tmp_path):
    rc, _, err = await run_edge("sink", "resume", "erp", "--url", f"http://127.0.0.1:{free_port()}",
                            "--reason", "x", cwd=tmp_path)
    assert rc == 1 and "not running" in err
