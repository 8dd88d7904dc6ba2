"""Edge quality rules: an out-of-spec part holds its lot even with the ERP down."""

from __future__ import annotations

import sqlite3

import pytest

from edge.components import Submission
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.events import make_event
from tests.support import eventually, sink_yaml

RULES = """\
rules:
  - type: spec_limits
    field: measured
    lower: 9.95
    upper: 10.05
"""


def _inspection(lot: str, measured: float, result: str = "pass", serial: str = "S1",
                dedupe: str | None = None) -> Submission:
    return Submission(make_event(
        type="inspection.result", site="test-site", source="st7",
        data={"lot_id": lot, "serial": serial, "result": result, "measured": measured},
        ordering_key=f"lot:{lot}"), dedupe)


async def test_out_of_spec_stores_nonconformance_and_one_hold_per_lot(gateways, erp, tmp_path):
    erp.outage(True)  # the cloud is down: the decision is taken and kept locally
    gw = await gateways(RULES + sink_yaml(erp.url))
    [ok] = await gw.pipeline.submit([_inspection("L1", 10.0)])
    [bad1] = await gw.pipeline.submit([_inspection("L2", 10.2, serial="S7", dedupe="m1")])
    [bad2] = await gw.pipeline.submit([_inspection("L2", 9.0, serial="S8", dedupe="m2")])
    [rep] = await gw.pipeline.submit([_inspection("L3", 10.0, result="fail", dedupe="m3")])
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    rows = conn.execute("SELECT type, class, ordering_key, body FROM events "
                        "ORDER BY seq").fetchall()
    conn.close()
    types = [r[0] for r in rows]
    assert types.count("nonconformance") == 3
    assert types.count("quality.hold") == 2  # L2 once, L3 once
    holds = [r for r in rows if r[0] == "quality.hold"]
    assert {r[2] for r in holds} == {"lot:L2", "lot:L3"} and {r[1] for r in holds} == {0}
    assert b"above upper limit 10.05" in rows[types.index("nonconformance")][3]
    erp.outage(False)
    await erp.wait_for(lambda e: len(e.events) == 9, within_s=20)
    by_type = {}
    for e in erp.events:
        by_type.setdefault(e["type"], []).append(e)
    nc = next(e for e in by_type["nonconformance"] if e["data"]["serial"] == "S7")
    assert nc["correlation_id"] == bad1  # lineage back to the inspection
    assert nc["data"]["inspection_event_id"] == bad1
    # the hold of lot L2 reaches the ERP after the result that caused it (same key, order)
    l2 = [e["type"] for e in erp.events if e["ordering_key"] == "lot:L2"]
    assert l2.index("inspection.result") < l2.index("quality.hold")
    assert ok and bad2 and rep


async def test_redelivered_failure_does_not_duplicate_derived_events(gateways, erp):
    gw = await gateways(RULES + sink_yaml(erp.url))
    await gw.pipeline.submit([_inspection("L9", 11.0, dedupe="same-msg")])
    await gw.pipeline.submit([_inspection("L9", 11.0, dedupe="same-msg")])
    await erp.wait_for(lambda e: len(e.events) == 3)
    await eventually(lambda: gw.outbox.inflight("erp") == set())
    assert sorted(e["type"] for e in erp.events) == [
        "inspection.result", "nonconformance", "quality.hold"]


def test_the_rule_derives_per_cause_with_the_causes_key_and_no_key_for_the_nonconformance():
    from edge.rules import SpecLimits, SpecLimitsRule

    rule = SpecLimits(SpecLimitsRule(type="spec_limits", lower=9.95, upper=10.05), "test-site")
    cause = Submission(make_event(type="inspection.result", site="test-site", source="st7",
                                  data={"lot_id": "L4", "result": "pass", "measured": 11.0,
                                        "serial": "S1"}))
    assert cause.event.ordering_key == "lot:L4"  # no key configured: the lot's
    nc, hold = rule(cause)
    assert (nc.event.type, hold.event.type) == ("nonconformance", "quality.hold")
    assert nc.derived and hold.derived
    assert nc.dedupe_key is None  # deduplicated through its cause
    assert hold.dedupe_key == "hold:L4" and not hold.redelivery_only
    assert {nc.event.ordering_key, hold.event.ordering_key} == {"lot:L4"}
    assert nc.event.correlation_id == hold.event.correlation_id == cause.event.id
    assert rule(_inspection("L4", 10.0)) == []


def test_limits_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config_text("site: p\nrules: [{type: spec_limits, lower: 2, upper: 1}]\n")
    assert "rules[0]: lower (2.0) is above upper (1.0)" in str(err.value)
