"""``alarms`` of the opcua source: checked at load with located messages, the EventFilter
it sends, and the mapping of a notification to a ``machine.alarm`` event (no server)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from asyncua import ua

from edge.events import EventClass
from edge.sources.opcua.alarms import REFRESH_END, REFRESH_START, STANDARD, event_filter
from edge.sources.opcua.config import AlarmConfig
from tests.sources.opcua.test_config import BASE, issues, ok


def test_an_alarms_only_source_loads_with_the_defaults(tmp_path):
    src = ok(BASE + "  alarms: [{}]\n", tmp_path)
    [a] = src.alarms
    assert a.notifier == "i=2253" and a.event_types == ["i=2915"]
    assert a.event == "machine.alarm" and a.refresh and a.where is None
    assert [(c.min, c.event_class) for c in a.severity_classes] == [
        (800, "critical"), (500, "high"), (200, "normal"), (1, "low")]
    assert a.severity_class(1000).label == "critical"
    assert a.severity_class(799).label == "high"
    assert a.severity_class(1).label == "low"


def test_severity_classes_are_sorted_and_may_leave_low_severities_unclassed(tmp_path):
    src = ok(BASE + "  alarms: [{severity_classes: [{min: 300, class: normal, name: warn},"
                    " {min: 700, class: critical}]}]\n", tmp_path)
    [a] = src.alarms
    assert [c.min for c in a.severity_classes] == [700, 300]
    assert a.severity_class(500).label == "warn"
    assert a.severity_class(299) is None


@pytest.mark.parametrize(("snippet", "expected"), [
    ("alarms: [{notifier: Server}]", "sources[0].alarms[0].notifier: 'Server' is neither"),
    ("alarms: [{event_types: []}]", "sources[0].alarms[0].event_types: List should have at "
                                    "least 1 item"),
    ("alarms: [{event_types: [i=2915, /Objects/2:Station7]}]",
     "sources[0].alarms[0].event_types: [1]: an event type lives under /Types"),
    ("alarms: [{select: {severity: Severity}}]",
     "sources[0].alarms[0].select: 'severity' is a standard field of the event"),
    ("alarms: [{select: {limit: 'High Limit//x'}}]",
     "sources[0].alarms[0].select: limit: 'High Limit//x' is not a browse path"),
    ("alarms: [{select: {high-limit: HighLimit}}]",
     "sources[0].alarms[0].select: 'high-limit' is not a field name"),
    ("alarms: [{where: {min_severity: 1001}}]",
     "sources[0].alarms[0].where.min_severity: Input should be less than or equal to 1000"),
    ("alarms: [{where: {severity: 5}}]", "sources[0].alarms[0].where.severity: unknown key"),
    ("alarms: [{where: {source_names: []}}]",
     "sources[0].alarms[0].where.source_names: List should have at least 1 item"),
    ("alarms: [{severity_classes: [{min: 500, class: urgent}]}]",
     "sources[0].alarms[0].severity_classes[0].class: "),
    ("alarms: [{severity_classes: [{min: 500, class: high}, {min: 500, class: low}]}]",
     "sources[0].alarms[0].severity_classes: min 500 is used twice"),
    ("alarms: [{severity_classes: [{min: 0, class: high}]}]",
     "sources[0].alarms[0].severity_classes[0].min: Input should be greater than or equal"),
    ("alarms: [{event: Machine.Alarm}]", "sources[0].alarms[0].event: must be a dotted"),
    ("alarms: [{ordering_key: 'alarm:{source'}]",
     "sources[0].alarms[0].ordering_key: malformed template"),
    ("alarms: [{queue_size: 0}]", "sources[0].alarms[0].queue_size: Input should be greater"),
])
def test_alarm_config_errors_are_located(snippet, expected, tmp_path):
    found = issues(BASE + "  " + snippet + "\n", tmp_path)
    assert any(expected in i for i in found), found


def _operand_path(op: Any) -> str:
    return "/".join(q.Name for q in op.BrowsePath)


def test_the_event_filter_selects_the_condition_fields_and_lets_refresh_through():
    a = AlarmConfig.model_validate({"select": {"high": "HighLimit", "custom": "2:Lim/2:Hi"},
                                    "where": {"min_severity": 400,
                                              "source_names": ["St7.Temp"]}})
    types = [ua.NodeId(ua.Int32(2915)), ua.NodeId(ua.Int32(10637))]
    flt = event_filter(a, types, types[0])
    paths = [_operand_path(op) for op in flt.SelectClauses]
    assert paths[:len(STANDARD)] == [p or "" for _, _, p in STANDARD]
    assert paths[len(STANDARD):] == ["HighLimit", "Lim/Hi"]
    assert flt.SelectClauses[-1].BrowsePath[0].NamespaceIndex == 2
    cond_id = flt.SelectClauses[len(STANDARD) - 1]
    assert cond_id.AttributeId == ua.AttributeIds.NodeId and not cond_id.BrowsePath
    els = flt.WhereClause.Elements
    assert els[0].FilterOperator == ua.FilterOperator.Or
    ops = {e.FilterOperator for e in els}
    assert {ua.FilterOperator.InList, ua.FilterOperator.GreaterThanOrEqual,
            ua.FilterOperator.And} <= ops
    refresh = els[els[0].FilterOperands[1].Index]
    assert [o.Value.Value for o in refresh.FilterOperands[1:]][:2] == [REFRESH_START,
                                                                        REFRESH_END]
    # every event of the notifier: no where clause at all
    plain = event_filter(AlarmConfig.model_validate({}), None, types[0])
    assert not plain.WhereClause.Elements


class _Ctx:
    site = "plant-01"


def _alarms_part(cfg: AlarmConfig) -> Any:
    from edge.sources.opcua.alarms import Alarms

    part = Alarms.__new__(Alarms)
    part.id = "station7"
    part.ctx = _Ctx()  # type: ignore[assignment]
    part.cfg = type("C", (), {"alarms": [cfg]})()
    return part


def _values(**over: Any) -> list[Any]:
    base = {"event_id": b"\x01\xab", "event_type": ua.NodeId(ua.Int32(2915)),
            "source_node": ua.NodeId(ua.String("St7.Temp"), ua.Int16(2)), "source": "St7.Temp",
            "time": datetime(2026, 3, 1, 8, 0, tzinfo=UTC), "receive_time": None,
            "message": ua.LocalizedText("hot"), "severity": 650, "condition": "Overheat",
            "branch_id": ua.NodeId(), "retain": True, "active": True, "acked": False,
            "confirmed": None, "condition_id": ua.NodeId(ua.String("St7.Alarms.Overheat"), ua.Int16(2))}
    base.update(over)
    return [base[name] for name, _, _ in STANDARD]


def test_a_notification_maps_to_one_classed_event_identified_by_its_event_id():
    cfg = AlarmConfig.model_validate({"static": {"station": "7"}, "select": {"hi": "HighLimit"}})
    sub = _alarms_part(cfg)._event(0, [*_values(), 80.0], refresh=True)
    ev = sub.event
    assert sub.dedupe_key == "alarm:01ab"
    assert ev.type == "machine.alarm" and ev.event_class is EventClass.high
    assert ev.ordering_key == "alarm:St7.Temp"
    assert ev.source_ts == datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    assert ev.data == {
        "event_id": "01ab", "event_type": "i=2915", "source_node": "ns=2;s=St7.Temp",
        "source": "St7.Temp", "time": "2026-03-01T08:00:00Z", "message": "hot",
        "severity": 650, "severity_class": "high", "condition": "Overheat", "retain": True,
        "active": True, "acked": False, "condition_id": "ns=2;s=St7.Alarms.Overheat",
        "hi": 80.0, "refresh": True, "station": "7"}


def test_a_notification_without_event_id_or_with_a_bad_severity_is_refused():
    from edge.errors import InputError

    part = _alarms_part(AlarmConfig.model_validate({}))
    with pytest.raises(InputError, match="without an EventId"):
        part._event(0, _values(event_id=None), refresh=False)
    with pytest.raises(InputError, match="severity"):
        part._event(0, _values(severity=0), refresh=False)
