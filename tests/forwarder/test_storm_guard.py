"""Dead-letter storm guard: a receiver that answers the same dead-letter status for nearly
everything (a wrong base URL, a removed API version) pauses the sink instead of emptying
its backlog into the dead-letter table; ``Gateway.resume_sink`` continues, audited.

Real gateway, real HTTP sink, real loopback ERP.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from edge.outbox import queries
from tests.support import eventually, metric, result, sink_yaml


async def _audit(gw, state: str) -> list[tuple[str, str, dict]]:
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT actor, reason, detail FROM audit WHERE state = ? ORDER BY rowid",
        (state,)).fetchall())
    return [(a, r, orjson.loads(d) if d else {}) for a, r, d in rows]


async def _dead_letters(gw) -> list[dict]:
    return await gw.outbox.read(lambda c: queries.dlq_list(c, limit=1000))


async def test_a_wrong_base_url_pauses_the_sink_instead_of_dead_lettering_the_backlog(
        gateways, erp):
    """Before, every one of the 300 events became a dead letter with 404."""
    erp.reject(lambda e: True, 404, body='{"error": "no such API"}')
    gw = await gateways(sink_yaml(erp.url, extra="lease_batch: 50"))
    ids = await gw.pipeline.submit([result(f"L{n}", n) for n in range(300)])
    fwd = gw.forwarders["erp"]
    await eventually(lambda: fwd.status()["paused"], timeout=20)
    report = await gw.status_report()
    paused = report["sinks"]["erp"]["paused"]
    assert paused["code"] == "storm_guard" and "HTTP 404" in paused["reason"]
    assert paused["since"] and "edge sink resume erp" in paused["reason"]
    assert report["sinks"]["erp"]["alarm"]["code"] == "storm_guard"
    assert report["sinks"]["erp"]["up"] is False
    assert metric(gw.metrics.sink_paused, "erp") == 1
    await eventually(lambda: not gw.outbox.inflight("erp"),
                     what="the requests in flight to record their outcome")
    dead = await _dead_letters(gw)
    assert len(dead) < 20  # at most what the guard needed to see, not the backlog
    assert (await gw.outbox.stats())["events"] == 300 - len(dead)  # the rest kept
    sent = erp.request_count
    await asyncio.sleep(1.0)  # a window in which nothing may be sent
    assert erp.request_count == sent  # paused: nothing is sent
    [(actor, reason, detail)] = await _audit(gw, "sink_paused")
    assert actor == "gateway" and "HTTP 404" in reason
    assert detail["sink"] == "erp" and detail["status"] == 404

    erp.clear_rejects()  # the operator fixes the base URL
    with pytest.raises(KeyError):
        await gw.resume_sink("nope", actor="ops", reason="x")
    assert await gw.resume_sink("erp", actor="api by J. Doe", reason="base URL fixed")
    assert await gw.resume_sink("erp", actor="api by J. Doe", reason="again") is False
    assert fwd.status()["paused"] is None and fwd.status()["alarm"] is None
    dead_ids = {d["event_id"] for d in dead}
    await erp.wait_for(lambda e: set(e.ids()) == set(ids) - dead_ids, within_s=20)
    [(actor, reason, detail)] = await _audit(gw, "sink_resumed")
    assert (actor, reason) == ("api by J. Doe", "base URL fixed")
    assert detail["sink"] == "erp" and detail["pause"] == "storm_guard"
    assert metric(gw.metrics.sink_paused, "erp") == 0


async def test_occasional_dead_letters_of_different_statuses_do_not_pause(gateways, erp):
    erp.reject(lambda e: e["data"]["n"] % 3 == 0, 422)
    erp.reject(lambda e: e["data"]["n"] % 3 == 1, 404)
    gw = await gateways(sink_yaml(erp.url))
    await gw.pipeline.submit([result(f"L{n}", n) for n in range(90)])
    await eventually(lambda: len(erp.events) == 30)
    await eventually(lambda: _count_dead(gw, 60))
    assert gw.forwarders["erp"].status()["paused"] is None


async def _count_dead(gw, n: int) -> bool:
    return len(await _dead_letters(gw)) == n


async def test_the_guard_can_be_tuned_or_switched_off(gateways, erp, tmp_path):
    erp.reject(lambda e: True, 410)
    gw = await gateways(sink_yaml(erp.url, extra="storm_guard: {enabled: false}"))
    await gw.pipeline.submit([result(f"L{n}", n) for n in range(40)])
    await eventually(lambda: _count_dead(gw, 40))
    assert gw.forwarders["erp"].status()["paused"] is None
    tuned = await gateways(sink_yaml(
        erp.url, sink_id="qms",
        extra="storm_guard: {window_outcomes: 5, min_share: 0.8, min_events: 4}"),
        state_dir=tmp_path / "state-2")
    await tuned.pipeline.submit([result(f"Q{n}", n) for n in range(40)])
    await eventually(lambda: tuned.forwarders["qms"].status()["paused"])
    assert len(await _dead_letters(tuned)) < 5
