"""A sink's pauses outlive a restart of the gateway (systemd restart, watchdog, power cut):
the dead-letter storm guard's pause holds until ``edge sink resume``, whether the gateway
runs or is stopped when the operator resumes it, and a receiver's ``Retry-After`` holds
until its time.

Real gateways restarted on the same ``state_dir``, real HTTP sink, real loopback ERP, the
real ``edge`` command as a subprocess.
"""

from __future__ import annotations

import asyncio
import getpass
import sqlite3
from pathlib import Path

import orjson

from edge.outbox import queries
from tests.support import api_yaml, eventually, free_port, metric, result, run_edge, sink_yaml

STORM = "storm_guard: {window_outcomes: 10, min_share: 0.8, min_events: 5}"


async def _audit(gw, state: str) -> list[tuple[str, str, dict]]:
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT actor, reason, detail FROM audit WHERE state = ? ORDER BY seq",
        (state,)).fetchall())
    return [(a, r, orjson.loads(d) if d else {}) for a, r, d in rows]


async def _paused_by_a_storm(gateways, erp, body: str, n: int):
    """A gateway whose sink the storm guard paused (every event answered 404), stopped
    once in-flight requests recorded their outcome; returns (its /status entry, the event
    ids, the dead-lettered ids)."""
    erp.reject(lambda e: True, 404, body='{"error": "no such API"}')
    gw = await gateways(body)
    ids = await gw.pipeline.submit([result(f"L{i}", i) for i in range(n)])
    await eventually(lambda: gw.forwarders["erp"].status()["paused"])
    await gw.stop()  # in-flight requests finish and record their outcome first
    entry = gw.forwarders["erp"].status()
    dead = {d["event_id"] for d in _dead_letters(gw.config.state_dir)}
    assert entry["paused"]["code"] == "storm_guard" and len(dead) < n
    erp.clear_rejects()  # the cause is fixed; only the pause holds the sink now
    return entry, ids, dead


def _dead_letters(state_dir: str) -> list[dict]:
    conn = sqlite3.connect(Path(state_dir) / "outbox.db")
    try:
        return queries.dlq_list(conn, limit=1000)
    finally:
        conn.close()


async def test_a_storm_guard_pause_holds_across_a_restart_until_edge_sink_resume(
        gateways, erp, tmp_path):
    """Before, the restarted gateway sent the whole backlog at once: the pause an operator
    was meant to lift was lifted by the restart."""
    (tmp_path / "api.token").write_text("ops 9c4e-secret\n")
    body = api_yaml(free_port(), token_file="api.token") + sink_yaml(erp.url, extra=STORM)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {tmp_path / 'state'}\n" + body)
    before, ids, dead = await _paused_by_a_storm(gateways, erp, body, 60)
    sent = erp.request_count

    gw = await gateways(body)  # restarted on the same state_dir
    fwd = gw.forwarders["erp"]
    report = (await gw.status_report())["sinks"]["erp"]
    assert report["paused"] == before["paused"]  # code, reason and since as before
    assert report["alarm"] == before["alarm"] and report["alarm"]["code"] == "storm_guard"
    assert report["up"] is False
    assert metric(gw.metrics.sink_paused, "erp") == 1
    await asyncio.sleep(1.0)  # a window in which nothing may be sent
    assert erp.request_count == sent, "the restarted gateway sent while paused"

    rc, out, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason",
                              "base URL fixed", "--by", "J. Doe", cwd=tmp_path)
    assert rc == 0, err
    assert "sink erp resumed by J. Doe: base URL fixed" in out
    assert fwd.status()["paused"] is None and fwd.status()["alarm"] is None
    await erp.wait_for(lambda e: set(e.ids()) == set(ids) - dead, within_s=30)
    [(actor, _, detail)] = await _audit(gw, "sink_paused")  # once: not again after restart
    assert detail["status"] == 404
    [(actor, reason, detail)] = await _audit(gw, "sink_resumed")
    assert (actor, reason) == ("api:ops by J. Doe", "base URL fixed")

    await gw.stop()
    gw = await gateways(body)  # the resume is stored as well: no pause comes back
    assert gw.forwarders["erp"].status()["paused"] is None
    assert gw.forwarders["erp"].status()["alarm"] is None


async def test_a_stopped_gateways_sink_is_resumed_in_its_outbox_file(gateways, erp, tmp_path):
    """Before, ``edge sink resume`` only asked a running gateway: with it stopped there was
    no way to lift a pause before the next start."""
    body = sink_yaml(erp.url, extra=STORM)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {tmp_path / 'state'}\n"
                   "api: {enabled: false}\n" + body)
    before, ids, dead = await _paused_by_a_storm(gateways, erp, body, 40)

    rc, _, err = await run_edge("sink", "resume", "mes", "-c", str(cfg), "--reason", "x",
                            cwd=tmp_path)
    assert rc == 1 and "no sink 'mes'" in err
    rc, out, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason",
                              "base URL fixed (ticket 4711)", cwd=tmp_path)
    assert rc == 0, err
    assert "sink erp resumed" in out and "gateway is stopped" in out
    assert before["paused"]["since"] in out
    rc, _, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason", "again",
                            cwd=tmp_path)
    assert rc == 1 and "not paused" in err

    gw = await gateways(body)
    assert gw.forwarders["erp"].status()["paused"] is None
    await erp.wait_for(lambda e: set(e.ids()) == set(ids) - dead, within_s=30)
    [(actor, reason, detail)] = await _audit(gw, "sink_resumed")
    assert actor == f"cli:{getpass.getuser()}" and reason == "base URL fixed (ticket 4711)"
    assert detail["sink"] == "erp" and detail["pause"] == "storm_guard"
    assert detail["paused_since"] == before["paused"]["since"]
    # running with its API off: the command says how, and touches nothing
    rc, _, err = await run_edge("sink", "resume", "erp", "-c", str(cfg), "--reason", "x",
                            cwd=tmp_path)
    assert rc == 1 and "local API off" in err and "stop it" in err


async def test_a_retry_after_pause_holds_across_a_restart(gateways, erp):
    """Before, the restarted gateway sent the rest of the backlog at once, seconds before
    the time the receiver had asked for."""
    erp.fail_next(1, 429, retry_after="6")
    # one request at a time: nothing is in flight when the 429 comes back
    body = sink_yaml(erp.url, extra="max_in_flight: 1\nlease_batch: 1")
    gw = await gateways(body)
    ids = await gw.pipeline.submit([result(f"L{i}", i) for i in range(10)])
    await eventually(lambda: gw.forwarders["erp"].status()["paused_for_s"] > 0)
    await gw.stop()
    [refused] = [r for r in erp.requests if r.status == 429]

    gw = await gateways(body)
    assert gw.forwarders["erp"].status()["paused_for_s"] > 0
    await erp.wait_for(lambda e: set(e.ids()) == set(ids), within_s=30)
    later = erp.requests[erp.requests.index(refused) + 1:]
    assert later and all(r.mono >= refused.not_before_mono for r in later), \
        "sent before the receiver's Retry-After"
    # over once its time has passed: a restart now does not pause the sink
    await gw.stop()
    gw = await gateways(body)
    assert gw.forwarders["erp"].status()["paused_for_s"] == 0


def test_a_stored_retry_after_never_outlasts_the_receivers_delay():
    """A wall clock stepped back while the gateway was stopped would stretch a stored end;
    the start caps it at the delay the receiver gave, counted from the start."""
    from edge.outbox import pauses

    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    now = 1_000_000.0
    pauses.keep_retry_after(conn, "erp", now + 3600, 30.0, now=now - 10)  # stepped back 1 h
    pauses.keep_retry_after(conn, "qms", now + 20, 30.0, now=now - 10)
    pauses.keep_retry_after(conn, "mes", now - 1, 30.0, now=now - 31)
    pauses.settle_retry_after(conn, now)
    stored = pauses.load_pauses(conn)
    assert stored["erp"]["retry_after"]["until"] == now + 30
    assert stored["qms"]["retry_after"]["until"] == now + 20
    assert "mes" not in stored
