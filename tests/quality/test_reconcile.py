"""ERP / QMS reconciliation against two stand-in systems on loopback: mismatches reported
once, a QMS release coming down as a local lot.status, failed reads that are no mismatch,
no loop for what the gateway sent itself. Rounds are run by the test
(``gw.reconciler.round()``); the periodic task waits an hour."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest

from edge.errors import ConfigError
from edge.sim.erp import ErpReceiver
from tests.quality.support import audit_rows, failing, receipt
from tests.support import eventually, http_sink_yaml, run_edge, sample

RULES = "rules:\n  - {type: spec_limits, upper: 10.05}\n"


def _quality(sources: str = "[{sink: erp}, {sink: qms}]", extra: str = "") -> str:
    return ("quality:\n"
            f"  reconcile: {{every_s: 3600, sources: {sources}}}\n" + extra)


@pytest.fixture
async def qms() -> AsyncIterator[ErpReceiver]:
    """A stand-in QMS (the same receiver as the ERP stand-in) on a free loopback port."""
    receiver = ErpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


def _statuses(receiver: ErpReceiver, lot: str) -> list[str]:
    return [e["data"].get("status") for e in receiver.events
            if e["type"] == "lot.status" and e["data"].get("lot_id") == lot]


async def _gateway(quality_gateways, erp, qms, *, quality: str | None = None):
    body = (RULES + (quality or _quality()) + "sinks:\n" + http_sink_yaml(erp.url, sink_id="erp")
            + http_sink_yaml(qms.url, sink_id="qms"))
    return await quality_gateways(body)


async def _held(gw, erp, qms, lot: str, status: str = "hold") -> None:
    """``lot`` fails, and both systems got its status (nothing of it is in transit)."""
    await gw.pipeline.submit([receipt(lot), failing(lot)])
    for receiver in (erp, qms):
        await receiver.wait_for(lambda r: status in _statuses(r, lot), within_s=20)
    await _drained(gw)


async def _drained(gw) -> None:
    async def empty() -> bool:
        st = await gw.outbox.stats()
        return all(s["total"] == 0 for s in st["sinks"].values())

    await eventually(empty, what="every sink drained")


def _came_down(receiver: ErpReceiver) -> list[dict]:
    """What a receiver got from the reconciliation (decisions that came down)."""
    return [e for e in receiver.events if e["source"] == "reconcile"]


def _mismatch_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("lot status mismatch:")]


async def test_a_mismatch_is_reported_once_and_an_erp_difference_is_not_applied(
        quality_gateways, erp, qms, tmp_path, caplog) -> None:
    gw = await _gateway(quality_gateways, erp, qms)
    await _held(gw, erp, qms, "L1")
    erp.lot_status["L1"] = "available"  # the ERP lets the lot be used
    qms.lot_status["L1"] = {"status": "hold", "decided_by": "gateway"}

    caplog.set_level(logging.INFO, logger="edge.quality.reconcile")
    section = await gw.reconciler.round()
    again = await gw.reconciler.round()

    assert section["mismatches"] == again["mismatches"] == 1
    [lot] = again["mismatch_lots"]
    assert lot["lot_id"] == "L1" and lot["local"] == "hold"
    assert {m["between"]: m["text"] for m in lot["mismatches"]} == {
        "local/erp": "locally hold, erp available", "erp/qms": "erp available, qms hold"}
    # logged once each, not every round
    assert sorted(_mismatch_logs(caplog)) == [
        "lot status mismatch: erp available, qms hold",
        "lot status mismatch: locally hold, erp available"]
    assert sample(gw, "edge_lot_status_mismatch", between="local/erp") == 1
    assert sample(gw, "edge_lot_status_mismatch", between="erp/qms") == 1
    assert sample(gw, "edge_lot_status_mismatch", between="local/qms") == 0
    # an ERP-only difference is reported, not applied
    assert gw.outbox.quality.lots["L1"].state == "hold"
    await _drained(gw)
    assert not _came_down(erp)

    report = await gw.status_report()
    assert report["lots"]["reconcile"]["mismatches"] == 1
    assert report["health"]["state"] == "degraded"
    assert any("differs between the gateway, the ERP and the QMS" in p["message"]
               for p in report["health"]["problems"])

    rc, out, err = await run_edge("lots", "-c", str(tmp_path / "edge.yaml"), cwd=tmp_path)
    assert rc == 0, err
    assert "mismatch" in out.splitlines()[1]
    assert "locally hold, erp available" in out
    rc, out, _ = await run_edge("lots", "-c", str(tmp_path / "edge.yaml"), "--json",
                                cwd=tmp_path)
    [row] = json.loads(out)
    assert row["reconcile"]["systems"]["erp"]["status"] == "available"

    # the ERP comes in line: resolved, logged once, gauge back to 0
    erp.lot_status["L1"] = "blocked"
    done = await gw.reconciler.round()
    assert done["mismatches"] == 0
    assert sample(gw, "edge_lot_status_mismatch", between="local/erp") == 0
    assert sum("mismatch resolved" in r.getMessage() for r in caplog.records) == 2


async def test_a_qms_release_comes_down_as_a_local_lot_status(
        quality_gateways, erp, qms, caplog) -> None:
    gw = await _gateway(quality_gateways, erp, qms)
    await _held(gw, erp, qms, "L2")
    first = await gw.reconciler.round()  # neither knows the lot yet: 404, not a mismatch
    assert first["mismatches"] == 0 and first["unknown"] == 2

    qms.lot_status["L2"] = {"status": "released", "decided_by": "QA M. Weber",
                            "decided_at": "2099-01-01T00:00:00Z"}
    section = await gw.reconciler.round()

    lot = gw.outbox.quality.lots["L2"]
    assert (lot.state, lot.episode, lot.decided_by) == ("released", 1, "QA M. Weber")
    # the decision flows on to the ERP like any lot.status, with a quality.release after it
    await erp.wait_for(lambda r: len(_came_down(r)) == 2, within_s=20)
    status, release = _came_down(erp)
    assert (status["type"], release["type"]) == ("lot.status", "quality.release")
    assert status["data"]["status"] == "released"
    assert status["data"]["system"] == "qms" and status["data"]["decided_by"] == "QA M. Weber"
    released = [a for a in audit_rows(gw.outbox.path) if a["state"] == "lot_released"]
    assert [(a["actor"], a["detail"]["decided_by"]) for a in released] == [
        ("reconcile:qms", "QA M. Weber")]
    assert section["applied"][0]["lot_id"] == "L2" and section["mismatches"] == 0
    assert sample(gw, "edge_lot_dispositions_applied_total", system="qms",
                  status="released") == 1
    await _drained(gw)

    # no loop: more rounds (the QMS still says released) add nothing
    await gw.reconciler.round()
    await gw.reconciler.round()
    await _drained(gw)
    assert len(_came_down(erp)) == 2

    # a new failure opens episode 2; the QMS's old release is not a new decision
    await gw.pipeline.submit([failing("L2", "S9")])
    for receiver in (erp, qms):
        await receiver.wait_for(lambda r: _statuses(r, "L2").count("hold") == 2, within_s=20)
    await _drained(gw)
    qms.lot_status["L2"]["decided_at"] = None  # even without a time to compare
    section = await gw.reconciler.round()
    assert gw.outbox.quality.lots["L2"].state == "hold"
    assert gw.outbox.quality.lots["L2"].episode == 2
    await _drained(gw)
    assert len(_came_down(erp)) == 2
    assert [m["between"] for m in section["mismatch_lots"][0]["mismatches"]] == ["local/qms"]


async def test_the_gateways_own_status_echoed_back_is_no_decision(
        quality_gateways, erp, qms) -> None:
    qms.reflect_status = True  # the QMS stores every lot.status it is sent
    gw = await _gateway(quality_gateways, erp, qms)
    await _held(gw, erp, qms, "L3")
    await gw.release_lot("L3", by="J. Doe", reason="sorted", actor="test")
    await qms.wait_for(lambda r: "released" in _statuses(r, "L3"), within_s=20)
    await _drained(gw)
    await gw.reconciler.round()
    await gw.pipeline.submit([failing("L3", "S2")])  # episode 2
    await qms.wait_for(lambda r: _statuses(r, "L3").count("hold") == 2, within_s=20)
    await _drained(gw)
    section = await gw.reconciler.round()
    assert gw.outbox.quality.lots["L3"].state == "hold"
    await _drained(gw)
    assert not _came_down(erp) and not _came_down(qms)
    assert section["applied"] == []


async def test_a_status_still_in_transit_is_not_judged(quality_gateways, erp, qms) -> None:
    gw = await _gateway(quality_gateways, erp, qms)
    # the QMS refuses the gateway's status updates for now (retried), its read still works
    qms.reject(lambda e: e.get("type") in ("lot.status", "quality.hold"), 503)
    qms.lot_status["L4"] = "released"  # stale: it has not got the hold yet
    await gw.pipeline.submit([receipt("L4"), failing("L4")])
    await erp.wait_for(lambda r: "hold" in _statuses(r, "L4"), within_s=20)
    section = await gw.reconciler.round()
    assert gw.outbox.quality.lots["L4"].state == "hold"  # not released by the stale answer
    assert section["mismatches"] == 0 and section["in_transit"] == 1
    qms.clear_rejects()
    await _drained(gw)
    section = await gw.reconciler.round()
    assert gw.outbox.quality.lots["L4"].state == "hold"  # seen before: reported only
    assert section["mismatches"] == 1


async def test_a_failed_read_is_unknown_not_a_mismatch(quality_gateways, erp, qms) -> None:
    gw = await _gateway(quality_gateways, erp, qms)
    await _held(gw, erp, qms, "L5")
    qms.lot_status["L5"] = "released"
    qms.outage(True)  # the QMS is down
    section = await gw.reconciler.round()  # the ERP does not know the lot: 404
    assert section["mismatches"] == 0
    assert sorted((r["system"], r["reason"]) for r in section["unknown_reads"]) == [
        ("erp", "not found (404)"), ("qms", "answered 503")]
    assert gw.outbox.quality.lots["L5"].state == "hold"
    assert sample(gw, "edge_lot_status_read_failures_total", system="qms",
                  reason="http_error") == 1
    assert sample(gw, "edge_lot_status_read_failures_total", system="erp",
                  reason="not_found") == 1
    assert sample(gw, "edge_lot_status_unknown", system="qms") == 1
    report = await gw.status_report()
    assert any("read(s) failed" in p["message"] for p in report["health"]["problems"])
    assert not any("differs" in p["message"] for p in report["health"]["problems"])

    await erp.stop()  # the ERP goes away altogether
    section = await gw.reconciler.round()
    assert [r["reason"] for r in section["unknown_reads"] if r["system"] == "erp"][0] \
        .startswith("unreachable")
    assert section["mismatches"] == 0


async def test_reconciliation_config_is_checked(quality_gateways, erp, qms) -> None:
    # found at load (check-config), located
    with pytest.raises(ConfigError, match=r"quality.reconcile.sources\[0\].sink: no sink 'nope'"):
        await _gateway(quality_gateways, erp, qms,
                       quality=_quality("[{sink: nope, kind: qms}]"))
    with pytest.raises(Exception, match=r"\{lot_id\} once"):
        await _gateway(quality_gateways, erp, qms,
                       quality=_quality('[{sink: erp, path: "/lots/status"}]'))
    with pytest.raises(Exception, match="kind: say whether sink 'portal'"):
        await _gateway(quality_gateways, erp, qms, quality=_quality("[{sink: portal}]"))


async def test_reads_use_the_sinks_credentials(quality_gateways, erp, tmp_path) -> None:
    (tmp_path / "secret").write_text("s3cret")
    qms = await ErpReceiver(oauth_client=("gateway", "s3cret")).start()
    try:
        auth = (f"auth: {{type: oauth2_client_credentials, token_url: {qms.url}/oauth/token, "
                "client_id: gateway, client_secret_file: secret}\n")
        gw = await quality_gateways(
            RULES + _quality() + "sinks:\n" + http_sink_yaml(erp.url, sink_id="erp")
            + http_sink_yaml(qms.url, sink_id="qms", extra=auth))
        await _held(gw, erp, qms, "L6")
        qms.lot_status["L6"] = "rejected"
        section = await gw.reconciler.round()
        assert [s for _, s in qms.status_reads] == [200]  # with the sink's bearer token
        assert gw.outbox.quality.lots["L6"].state == "rejected"  # a QMS rejection applies
        assert section["applied"][0]["status"] == "rejected"
    finally:
        await qms.stop()
