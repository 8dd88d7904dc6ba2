"""Edge quality rules: an out-of-spec part holds its lot even with the ERP down.

The episode logic in depth is in ``tests/quality``; here: the rules in a real gateway
against the stand-in ERP, what one cause derives, and the rules' config."""

from __future__ import annotations

import sqlite3

import pytest

from edge.components import Submission
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.events import make_event
from edge.quality.state import QualityState
from edge.rules import SpecLimitsRule, build_rules
from tests.support import eventually, sink_yaml

RULES = """\
rules:
  - type: spec_limits
    field: measured
    lower: 9.95
    upper: 10.05
"""
EPISODE = ["quality.hold", "lot.status", "notification", "notification"]


def _inspection(lot: str, measured: float, result: str = "pass", serial: str = "S1",
                dedupe: str | None = None) -> Submission:
    return Submission(make_event(
        type="inspection.result", site="test-site", source="st7",
        data={"lot_id": lot, "serial": serial, "result": result, "measured": measured},
        ordering_key=f"lot:{lot}"), dedupe)


async def test_out_of_spec_stores_nonconformance_and_one_episode_per_lot(gateways, erp,
                                                                        tmp_path):
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
    assert types.count("lot.status") == 2 and types.count("notification") == 4
    holds = [r for r in rows if r[0] == "quality.hold"]
    assert {r[2] for r in holds} == {"lot:L2", "lot:L3"} and {r[1] for r in holds} == {0}
    assert b"above upper limit 10.05" in rows[types.index("nonconformance")][3]
    erp.outage(False)
    await erp.wait_for(lambda e: len(e.events) == len(rows), within_s=20)
    by_type: dict[str, list] = {}
    for e in erp.events:
        by_type.setdefault(e["type"], []).append(e)
    nc = next(e for e in by_type["nonconformance"] if e["data"]["serial"] == "S7")
    assert nc["correlation_id"] == bad1  # lineage back to the inspection
    assert nc["data"]["inspection_event_id"] == bad1
    # the hold of lot L2 reaches the ERP after the result that caused it (same key, order)
    l2 = [e["type"] for e in erp.events if e["ordering_key"] == "lot:L2"]
    assert l2.index("inspection.result") < l2.index("quality.hold") < l2.index("lot.status")
    assert ok and bad2 and rep


async def test_redelivered_failure_does_not_duplicate_derived_events(gateways, erp):
    gw = await gateways(RULES + sink_yaml(erp.url))
    await gw.pipeline.submit([_inspection("L9", 11.0, dedupe="same-msg")])
    await gw.pipeline.submit([_inspection("L9", 11.0, dedupe="same-msg")])
    await erp.wait_for(lambda e: len(e.events) == 6)
    await eventually(lambda: gw.outbox.inflight("erp") == set())
    assert sorted(e["type"] for e in erp.events) == sorted([
        "inspection.result", "nonconformance", *EPISODE])
    assert gw.outbox.quality.lots["L9"].failures == 1


def test_one_cause_derives_its_nonconformance_and_an_episode_keyed_by_number():
    rules = build_rules([SpecLimitsRule(type="spec_limits", lower=9.95, upper=10.05)],
                        "test-site")
    cause = Submission(make_event(type="inspection.result", site="test-site", source="st7",
                                  data={"lot_id": "L4", "result": "pass", "measured": 11.0,
                                        "serial": "S1"}))
    assert cause.event.ordering_key == "lot:L4"  # no key configured: the lot's
    batch, causes = rules.derive([cause], QualityState())
    assert causes == [0]
    item, nc, hold, status, *notes = batch
    assert item.event is cause.event and len(item.quality) == 1  # the lot's change
    assert [s.event.type for s in (nc, hold, status, *notes)] == [
        "nonconformance", *EPISODE]
    assert all(s.derived for s in batch[1:])
    assert nc.dedupe_key is None  # deduplicated through its cause
    assert hold.dedupe_key == "hold:L4:1" and not hold.redelivery_only
    assert status.dedupe_key == "lot-status:L4:1:hold"
    assert [n.dedupe_key for n in notes] == ["notify:L4:1:procurement", "notify:L4:1:planning"]
    assert {s.event.ordering_key for s in batch} == {"lot:L4"}
    assert {s.event.correlation_id for s in batch} == {cause.event.id}
    passing = Submission(make_event(type="inspection.result", site="test-site", source="st7",
                                    data={"lot_id": "L4", "result": "pass", "measured": 10.0}))
    [only] = rules.derive([passing], QualityState())[0]
    assert only.event is passing.event  # passes: no derived event, only the lot is seen


def test_limits_and_audiences_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config_text("site: p\nrules: [{type: spec_limits, lower: 2, upper: 1}]\n")
    assert "rules[0]: lower (2.0) is above upper (1.0)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config_text("site: p\nrules: [{type: spec_limits, upper: 1, notify: [Buyers!]}]\n")
    assert "audience 'Buyers!' must be lower case" in str(err.value)


def test_capa_rules_load_from_yaml():
    cfg = load_config_text("site: p\nrules:\n  - {type: capa, nonconformances: 3, "
                           "window_s: 604800, by: [supplier, characteristic]}\n")
    assert cfg.rules[0].key == "supplier+characteristic/3/604800"


def test_the_quality_section_loads_from_yaml():
    cfg = load_config_text("site: p\nquality: {stuck_after_s: 600}\n")
    assert cfg.quality.stuck_after_s == 600
