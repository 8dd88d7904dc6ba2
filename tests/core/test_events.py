"""Event identity and envelope."""

from __future__ import annotations

import uuid

from edge.events import Event, EventClass, make_event, payload_sha256, uuid7


def test_uuid7_is_version_7_and_time_ordered():
    ids = [uuid7() for _ in range(5000)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_fast_construction_equals_full_validation():
    ev = make_event(type="inspection.result", site="p", source="s",
                    data={"lot_id": "L1", "result": "fail"}, ordering_key="lot:L1")
    again = Event.model_validate(ev.to_wire())
    assert again == ev
    assert again.model_dump() == ev.model_dump()
    assert Event.from_json(ev.to_json()) == ev


def test_class_defaults_by_type_and_wire_form_uses_names():
    hold = make_event(type="quality.hold", site="p", source="s", data={"lot_id": "L", "reason": "r"})
    assert hold.event_class is EventClass.critical
    assert hold.to_wire()["class"] == "critical"
    assert make_event(type="x.y", site="p", source="s", data={}).event_class is EventClass.normal


def test_payload_hash_is_over_canonical_data_and_detects_change():
    ev = make_event(type="t", site="p", source="s", data={"b": 1, "a": [1, 2]})
    assert ev.payload_sha256 == payload_sha256({"a": [1, 2], "b": 1})
    assert ev.integrity_ok()
    tampered = ev.model_copy(update={"data": {"b": 2, "a": [1, 2]}})
    assert not tampered.integrity_ok()


def test_an_event_about_a_lot_is_ordered_by_its_lot_unless_a_key_is_configured():
    result = make_event(type="inspection.result", site="p", source="s", data={"lot_id": "L7"})
    assert result.ordering_key == "lot:L7"
    numeric = make_event(type="inspection.result", site="p", source="s", data={"lot_id": 42})
    assert numeric.ordering_key == "lot:42"
    configured = make_event(type="inspection.result", site="p", source="s",
                            data={"lot_id": "L7"}, ordering_key="line:3")
    assert configured.ordering_key == "line:3"
    assert make_event(type="machine.reading", site="p", source="s",
                      data={"value": 1}).ordering_key is None
    assert make_event(type="t", site="p", source="s", data={"lot_id": ""}).ordering_key is None


def test_a_mapped_mqtt_result_without_a_configured_key_gets_the_lot_key():
    from edge.transforms.map import Mapper, MappingConfig

    cfg = MappingConfig.model_validate({"event": "inspection.result",
                                        "fields": {"lot_id": "lot", "result": "r"}})
    event, _ = Mapper(cfg, site="p", source="line1").map({"lot": "L9", "r": "pass"})
    assert event.ordering_key == "lot:L9"
