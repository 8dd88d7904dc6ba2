"""The event catalogue: models, defaults per type, validation, JSON Schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.components import Submission
from edge.errors import InputError
from edge.events import EventClass, make_event
from edge.events.catalogue import (
    CATALOGUE,
    LOT_SCOPED_TYPES,
    LOT_STATUSES,
    InspectionResult,
    json_schemas,
    validate_data,
)
from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.rules import SpecLimitsRule, build_rules
from edge.transforms.map import Mapper, MappingConfig

TYPES = ["material.receipt", "inspection.result", "lot.status", "quality.hold",
         "quality.release", "nonconformance", "supplier.case", "capa.request", "notification",
         "production.count", "machine.reading", "machine.alarm"]


def fields(event_type: str) -> set[str]:
    return set(CATALOGUE[event_type].model.model_fields)


def required(event_type: str) -> set[str]:
    return {n for n, f in CATALOGUE[event_type].model.model_fields.items() if f.is_required()}


def test_the_catalogue_holds_the_quality_workflow_types() -> None:
    assert list(CATALOGUE) == TYPES
    assert all(spec.schema_version == 1 for spec in CATALOGUE.values())


def test_field_names_match_what_the_gateway_emits_and_maps() -> None:
    assert fields("inspection.result") >= {
        "characteristic", "measured", "unit", "lower", "upper", "result", "sample", "serial",
        "lot_id", "supplier", "station", "operator"}
    assert required("inspection.result") == {"lot_id", "result"}
    # what edge.rules puts into its nonconformance and hold
    assert fields("nonconformance") >= {"lot_id", "reason", "inspection_event_id", "serial",
                                        "characteristic", "measured", "lower", "upper"}
    assert fields("quality.hold") >= {"lot_id", "reason", "inspection_event_id"}
    assert fields("lot.status") >= {"lot_id", "status", "reason", "decided_by"}
    assert LOT_STATUSES == ("released", "hold", "quarantine", "rejected")
    assert required("quality.release") == {"lot_id", "reason", "decided_by"}
    assert required("supplier.case") == {"lot_id", "supplier", "reason"}
    assert required("capa.request") == {"supplier", "characteristic"}
    assert required("notification") == {"audience", "subject"}
    assert required("production.count") == {"count"}
    assert fields("machine.reading") >= {"value", "status", "signal", "unit", "station"}
    # the lot is `lot_id` everywhere, never `lot`
    assert not any("lot" in fields(t) for t in TYPES)


def test_lot_scoped_types_require_a_lot_and_are_ordered_by_it() -> None:
    lot_scoped = {"material.receipt", "inspection.result", "lot.status", "quality.hold",
                  "quality.release", "nonconformance", "supplier.case"}
    assert set(LOT_SCOPED_TYPES) == lot_scoped
    for t in LOT_SCOPED_TYPES:
        assert "lot_id" in required(t), t
        assert CATALOGUE[t].ordering_key == "lot:{lot_id}", t


@pytest.mark.parametrize("event_type", TYPES)
def test_every_example_is_valid_and_normalizing_twice_changes_nothing(event_type: str) -> None:
    spec = CATALOGUE[event_type]
    data = validate_data(event_type, spec.example)
    assert validate_data(event_type, data) == data
    assert set(spec.example) <= set(data)


@pytest.mark.parametrize(("event_type", "cls"), [
    ("material.receipt", "high"), ("inspection.result", "high"), ("lot.status", "critical"),
    ("quality.hold", "critical"), ("quality.release", "critical"),
    ("nonconformance", "critical"), ("supplier.case", "critical"), ("capa.request", "high"),
    ("notification", "high"), ("production.count", "normal"), ("machine.reading", "low"),
    ("machine.alarm", "high"),
    ("machine.state", "low"), ("plant.custom", "normal")])
def test_default_class_per_type(event_type: str, cls: str) -> None:
    data = CATALOGUE[event_type].example if event_type in CATALOGUE else {}
    ev = make_event(type=event_type, site="p", source="s", data=data)
    assert ev.event_class is EventClass[cls]
    configured = make_event(type=event_type, site="p", source="s", data=data, event_class="low")
    assert configured.event_class is EventClass.low


def key(event_type: str, **data: Any) -> str | None:
    return make_event(type=event_type, site="p", source="s", data=data).ordering_key


def test_default_ordering_key_per_type() -> None:
    for t in LOT_SCOPED_TYPES:
        assert key(t, lot_id="L7") == "lot:L7", t
    assert key("capa.request", supplier="acme", characteristic="bore", lot_id="L7") \
        == "supplier:acme"
    # readings are telemetry: never parked behind a lot's quality records
    assert key("machine.reading", value=1, lot_id="L7", station="st1") is None
    assert key("notification", audience="planning", subject="x", lot_id="L7") == "lot:L7"
    assert key("notification", audience="planning", subject="x") is None
    assert key("production.count", count=3, lot_id=42) == "lot:42"
    assert key("production.count", count=3) is None
    # a machine's alarms are ordered per alarm source, never by lot
    assert key("machine.alarm", event_id="ab", severity=500, source="st7.temp", lot_id="L7") \
        == "alarm:st7.temp"
    # unknown types stay allowed, with the general default
    assert key("plant.custom", lot_id="L7") == "lot:L7"
    assert key("plant.custom", lot_id={"nested": 1}) is None
    assert key("plant.custom", station="st1") is None
    # a configured key always wins
    ev = make_event(type="machine.reading", site="p", source="s", data={"value": 1},
                    ordering_key="machine:st1")
    assert ev.ordering_key == "machine:st1"


def test_the_envelope_carries_the_version_of_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(InspectionResult, "schema_version", 2)
    assert make_event(type="inspection.result", site="p", source="s",
                      data={"lot_id": "L", "result": "pass"}).schema_version == 2
    assert make_event(type="lot.status", site="p", source="s",
                      data={"lot_id": "L", "status": "hold"}).schema_version == 1
    assert make_event(type="plant.custom", site="p", source="s", data={}).schema_version == 1


@pytest.mark.parametrize(("event_type", "data", "named"), [
    ("inspection.result", {"result": "pass"}, "lot_id"),
    ("inspection.result", {"lot_id": "  ", "result": "pass"}, "lot_id"),
    ("inspection.result", {"lot_id": "L1", "result": "maybe"}, "result"),
    ("inspection.result", {"lot_id": "L1", "result": "pass", "measured": "n/a"}, "measured"),
    ("inspection.result", {"lot_id": "L1", "result": "pass", "measured": True}, "measured"),
    ("inspection.result", {"lot_id": "L1", "result": "pass", "measured": float("nan")},
     "measured"),
    ("inspection.result", {"lot_id": "L1", "result": "pass", "lower": 10.05, "upper": 9.95},
     "lower"),
    ("inspection.result", {"lot_id": True, "result": "pass"}, "lot_id"),
    ("material.receipt", {"lot_id": "L1", "quantity": -5}, "quantity"),
    ("lot.status", {"lot_id": "L1", "status": "available"}, "status"),
    ("quality.hold", {"lot_id": "L1"}, "reason"),
    ("quality.release", {"lot_id": "L1", "reason": "sorted"}, "decided_by"),
    ("nonconformance", {"lot_id": "L1", "reason": ""}, "reason"),
    ("supplier.case", {"lot_id": "L1", "reason": "r"}, "supplier"),
    ("capa.request", {"supplier": "s", "characteristic": "c", "count": 0}, "count"),
    ("capa.request", {"supplier": "s", "characteristic": "c", "lot_ids": ["L1", None]},
     "lot_ids[1]"),
    ("notification", {"audience": "Procurement Team", "subject": "x"}, "audience"),
    ("notification", {"audience": "planning"}, "subject"),
    ("production.count", {"count": 2.5}, "count"),
    ("machine.reading", {"unit": "C"}, "value"),
    ("machine.reading", {"value": None, "status": "Good"}, "value"),
    ("machine.alarm", {"event_id": "ab", "severity": 0}, "severity"),
    ("machine.alarm", {"severity": 500}, "event_id"),
])
def test_invalid_data_is_refused_naming_the_field(event_type: str, data: dict[str, Any],
                                                   named: str) -> None:
    with pytest.raises(InputError) as err:
        validate_data(event_type, data)
    assert err.value.reason == "invalid_data"
    assert err.value.detail.startswith(f"{event_type}: ")
    assert named in err.value.detail, err.value.detail


def test_every_failing_field_is_named_up_to_a_few() -> None:
    with pytest.raises(InputError) as err:
        validate_data("inspection.result", {"measured": "x", "lower": "y", "upper": "z",
                                            "serial": False})
    detail = err.value.detail
    assert "lot_id: required field is missing" in detail and "result: required" in detail
    assert detail.endswith("; and 3 more")


def test_normalization_plants_need_and_extra_fields_kept() -> None:
    data = validate_data("inspection.result", {
        "lot_id": 4711, "serial": 12.0, "result": "NOK", "measured": "10.02",
        "station": "st1", "plant_field": {"any": ["thing"]}, "dropped": None})
    assert data == {"lot_id": "4711", "serial": "12", "result": "fail", "measured": 10.02,
                    "station": "st1", "plant_field": {"any": ["thing"]}}
    assert validate_data("lot.status", {"lot_id": "L", "status": " Released "})["status"] \
        == "released"
    assert validate_data("notification", {"audience": "Planning", "subject": "s"}) == {
        "audience": "planning", "subject": "s"}
    # a Bad reading says so explicitly: no value
    assert validate_data("machine.reading", {"value": None, "status": "BadSensorFailure"}) \
        == {"value": None, "status": "BadSensorFailure"}


def test_unknown_types_are_not_validated() -> None:
    data: dict[str, Any] = {"lot": None, "anything": [1, "x"]}
    assert validate_data("plant.custom", data) is data
    assert validate_data("machine.state", data) is data


async def test_what_the_rules_derive_conforms_to_the_catalogue(tmp_path: Path) -> None:
    """A failure opens a hold episode: every event the rules store for it (nonconformance,
    hold, lot status, supplier case, notifications) fits its catalogue model."""
    outbox = Outbox(tmp_path, router=lambda ev: ["erp"])
    await outbox.open()
    try:
        rules = build_rules([SpecLimitsRule(type="spec_limits", lower=9.95, upper=10.05)],
                            "p")
        pipeline = Pipeline(outbox, rules)
        cause = make_event(type="inspection.result", site="p", source="s", data=validate_data(
            "inspection.result", {"lot_id": "L1", "serial": "S1", "result": "pass",
                                  "measured": 10.2, "characteristic": "bore",
                                  "supplier": "ACME"}))
        await pipeline.submit([Submission(cause)])
        rows = await outbox.read(lambda c: c.execute(
            "SELECT type, body FROM events ORDER BY seq").fetchall())
    finally:
        await outbox.close()
    derived = [(type_, orjson.loads(body)) for type_, body in rows[1:]]
    assert {type_ for type_, _ in derived} >= {"nonconformance", "quality.hold", "lot.status",
                                               "supplier.case", "notification"}
    for type_, doc in derived:
        assert validate_data(type_, doc["data"]) == doc["data"], type_
        assert doc["ordering_key"] == "lot:L1"


def test_mapped_sources_get_the_check() -> None:
    """Every source that maps payloads (MQTT, OPC UA monitored items, triggers) maps
    through Mapper: its events of catalogue types are checked there."""
    mapper = Mapper(MappingConfig.model_validate({
        "event": "inspection.result",
        "fields": {"lot_id": "lot", "result": "r", "measured": "v"}}), site="p", source="s")
    with pytest.raises(InputError) as err:
        mapper.map({"lot": "L1", "r": "OK", "v": "ten"})
    assert err.value.reason == "invalid_data" and "measured" in err.value.detail
    event, _ = mapper.map({"lot": 7, "r": "OK", "v": "10.01"})
    assert event.data == {"lot_id": "7", "result": "pass", "measured": 10.01}
    assert event.ordering_key == "lot:7" and event.schema_version == 1
    custom = Mapper(MappingConfig.model_validate({"event": "plant.custom"}), site="p",
                    source="s")
    event, _ = custom.map({"whatever": None})
    assert event.data == {"whatever": None}


def test_json_schemas_describe_what_the_gateway_emits() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = json_schemas()
    assert list(schemas) == TYPES
    for event_type, schema in schemas.items():
        spec = CATALOGUE[event_type]
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["x-event-type"] == event_type
        assert schema["x-schema-version"] == spec.schema_version
        assert schema["x-event-class"] == spec.event_class
        assert schema["x-ordering-key"] == spec.ordering_key
        assert schema["additionalProperties"] is True
        assert set(schema["properties"]) == fields(event_type)
        assert set(schema.get("required", ())) == required(event_type)
        validator = jsonschema.Draft202012Validator(schema)
        assert not list(validator.iter_errors(validate_data(event_type, spec.example)))
    # absent, not null: optional fields are left out rather than sent as null
    measured = schemas["inspection.result"]["properties"]["measured"]
    assert measured["type"] == "number" and "anyOf" not in measured
    # a bad reading's value is null
    value = schemas["machine.reading"]["properties"]["value"]
    assert {"type": "null"} in value["anyOf"]
    bad = dict(CATALOGUE["inspection.result"].example, result="OK")
    assert list(jsonschema.Draft202012Validator(schemas["inspection.result"]).iter_errors(bad))
