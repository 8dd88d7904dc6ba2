"""Governed payload contracts: a route's ``schema_file`` and ``api_version``, and the
receiver's error body kept with a dead letter.

A body that violates its route's JSON Schema is dead-lettered before sending with the
schema error as its reason and never reaches the receiver; a valid one carries the API
version header. ``check-config`` reads the schema files and locates what is wrong. The
stand-in ERP (``edge.sim.erp``) is the receiver, on loopback.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from edge.components import OutcomeKind
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.outbox import queries
from edge.sinks.http.contract import SchemaFileError, load_schema
from edge.sinks.http.request import MAX_ERROR_BODY
from tests.sinks.http.support import event, open_sink, stored
from tests.support import eventually, result, sink_yaml, sub

SCHEMAS = Path(__file__).resolve().parents[3] / "config" / "schemas"
LOT_STATUS = SCHEMAS / "erp-lot-status.json"
STATES = "['released', 'hold', 'quarantine', 'rejected']"


def lot_status_routes(extra: str = "") -> str:
    return ("[{events: [lot.status], method: PUT, path: '/lots/{data.lot_id}/status', "
            f"schema_file: '{LOT_STATUS}', api_version: '2024-06'{extra}}}, "
            "{events: ['*'], method: POST, path: /events, max_batch: 100}]")


def write_schema(folder: Path, name: str, schema: object) -> Path:
    path = folder / name
    path.write_text(json.dumps(schema) if not isinstance(schema, str) else schema)
    return path


# a contract for inspection results, on a field the event catalogue leaves to the plant
PLANT_CODE = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "object", "required": ["plant_code"],
                                      "properties": {"plant_code": {
                                          "type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}}}}


# ------------------------------------------------------------------ the sink, one send


async def test_a_body_the_schema_refuses_is_dead_lettered_and_never_sent(erp):
    async with open_sink(erp.url, routes=lot_status_routes()) as sink:
        outcomes = await sink.send(stored([
            event("lot.status", "L1", 1, status="paused"),
            event("lot.status", "L2", 2, status="hold")]))
    assert [o.kind for o in outcomes] == [OutcomeKind.dead_letter, OutcomeKind.delivered]
    assert outcomes[0].reason == (
        f"schema erp-lot-status.json: data.status: 'paused' is not one of {STATES}")
    assert outcomes[0].status is None
    assert [(r.method, r.path) for r in erp.requests] == [("PUT", "/lots/L2/status")]


async def test_a_valid_body_carries_the_api_version_header(erp):
    async with open_sink(erp.url, routes=lot_status_routes()) as sink:
        outcomes = await sink.send(stored([
            event("lot.status", "L1", 1, status="hold", reason="bore", decided_by="gateway"),
            event("inspection.result", "L1", 2, result="pass")]))
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered] * 2
    put, post = erp.requests
    assert put.headers["api-version"] == "2024-06"
    assert "api-version" not in post.headers  # only the route that names it


async def test_the_api_version_header_name_is_configurable(erp):
    routes = ("[{events: ['*'], path: /events, api_version: 2024-06, "
              "api_version_header: X-Erp-Api-Version}]")
    async with open_sink(erp.url, routes=routes) as sink:
        await sink.send(stored([event("inspection.result", "L1", 1, result="pass")]))
    [req] = erp.requests
    assert req.headers["x-erp-api-version"] == "2024-06"
    assert "api-version" not in req.headers


async def test_a_schema_dead_letter_holds_the_later_events_of_its_key(erp):
    async with open_sink(erp.url, routes=lot_status_routes()) as sink:
        outcomes = await sink.send(stored([
            event("lot.status", "L1", 1, status="paused"),
            event("inspection.result", "L1", 2, result="pass"),
            event("inspection.result", "L2", 3, result="pass")]))
    assert [o.kind for o in outcomes] == [OutcomeKind.dead_letter, OutcomeKind.retry,
                                          OutcomeKind.delivered]
    assert outcomes[1].attempted is False
    assert [e["data"]["n"] for e in erp.events] == [3]


async def test_on_dead_letter_continue_lets_the_key_flow_past_a_schema_dead_letter(erp):
    async with open_sink(erp.url, routes=lot_status_routes(),
                         extra="on_dead_letter: continue") as sink:
        outcomes = await sink.send(stored([
            event("lot.status", "L1", 1, status="paused"),
            event("inspection.result", "L1", 2, result="pass")]))
    assert [o.kind for o in outcomes] == [OutcomeKind.dead_letter, OutcomeKind.delivered]


async def test_each_element_of_a_batched_route_is_checked_on_its_own(erp, tmp_path):
    schema = write_schema(tmp_path, "plant-code.json", PLANT_CODE)
    routes = f"[{{events: ['*'], path: /events, max_batch: 100, schema_file: '{schema}'}}]"
    async with open_sink(erp.url, routes=routes) as sink:
        outcomes = await sink.send(stored([
            event("inspection.result", "A", 1, result="pass", plant_code="DE07"),
            event("inspection.result", "B", 2, result="pass", plant_code="de-7"),
            event("inspection.result", "C", 3, result="pass", plant_code="FR01")]))
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered, OutcomeKind.dead_letter,
                                          OutcomeKind.delivered]
    assert outcomes[1].reason == ("schema plant-code.json: data.plant_code: 'de-7' does "
                                  "not match '^[A-Z]{2}[0-9]{2}$'")
    [req] = erp.requests  # the others still share one request
    assert [e["data"]["n"] for e in req.events] == [1, 3]


async def test_a_data_route_is_checked_against_the_data_it_sends(erp, tmp_path):
    schema = write_schema(tmp_path, "status-data.json", {
        "type": "object", "required": ["lot_id", "status"], "additionalProperties": True,
        "properties": {"status": {"enum": ["hold", "released"]}}})
    routes = (f"[{{events: ['*'], method: PUT, path: '/lots/{{data.lot_id}}', body: data, "
              f"schema_file: '{schema}'}}]")
    async with open_sink(erp.url, routes=routes) as sink:
        outcomes = await sink.send(stored([event("lot.status", "L1", 1, status="hold"),
                                           event("lot.status", "L2", 2, status="gone")]))
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered, OutcomeKind.dead_letter]
    assert outcomes[1].reason == ("schema status-data.json: status: 'gone' is not one of "
                                  "['hold', 'released']")
    assert erp.events == [{"n": 1, "lot_id": "L1", "status": "hold"}]


async def test_the_envelope_is_checked_with_references_to_other_files_and_formats(erp):
    """The sample schemas refer to ``envelope.json`` beside them; its ``received_ts`` is a
    ``date-time``, which the gateway asserts (RFC 3339 with a time zone)."""
    [ev] = stored([event("lot.status", "L1", 1, status="hold")])
    doc = orjson.loads(ev.body)
    doc["received_ts"] = "2026-11-30 08:00"  # no T, no time zone
    bad = replace(ev, seq=2, id="01968a1e-0000-7000-8000-000000000002",
                  body=orjson.dumps(doc), _doc=None)
    async with open_sink(erp.url, routes=lot_status_routes()) as sink:
        outcomes = await sink.send([ev, bad])
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered, OutcomeKind.dead_letter]
    assert outcomes[1].reason == ("schema erp-lot-status.json: received_ts: "
                                  "'2026-11-30 08:00' is not a 'date-time'")


async def test_more_errors_are_counted_in_the_reason(erp):
    async with open_sink(erp.url, routes=lot_status_routes()) as sink:
        [outcome] = await sink.send(stored([event("lot.status", "L1", 1, status="paused",
                                                  decided_by="")]))
    assert outcome.kind is OutcomeKind.dead_letter
    assert outcome.reason.endswith("(and 1 more error)")


# ------------------------------------------------------------------ the whole gateway


async def test_the_gateway_dead_letters_a_refused_body_and_the_erp_never_sees_it(
        gateways, erp, tmp_path):
    schema = write_schema(tmp_path, "plant-code.json", PLANT_CODE)
    gw = await gateways(sink_yaml(erp.url, routes=(
        f"[{{events: [inspection.result], path: /results, schema_file: {schema.name}, "
        "api_version: '2024-06'}]")))
    bad, later, good = await gw.pipeline.submit([
        result("A", 1, plant_code="x"), result("A", 2, plant_code="DE07"),
        result("B", 3, plant_code="DE07")])
    await erp.wait_for(lambda e: len(e.events) == 1)

    async def dead() -> list[dict]:
        return await gw.outbox.read(lambda c: queries.dlq_list(c))

    await eventually(dead, what="the dead letter")
    [dl] = await dead()
    assert dl["event_id"] == bad
    assert dl["reason"] == ("schema plant-code.json: data.plant_code: 'x' does not match "
                            "'^[A-Z]{2}[0-9]{2}$'")
    assert dl["status"] is None and dl["response_body"] is None
    assert erp.ids() == [good]
    assert erp.requests[0].headers["api-version"] == "2024-06"
    # the dead letter parks its lot: the later result of lot A waits for the operator
    assert later not in erp.ids()
    st = await gw.outbox.stats()
    assert st["events"] >= 2


# ------------------------------------------------------------------ check-config


def load(routes: str, tmp_path: Path, *, check_files: bool = True):
    text = "site: s\n" + sink_yaml("http://127.0.0.1:9", routes=routes)
    return load_config_text(text, base_dir=tmp_path, check_files=check_files)


def schema_error(tmp_path: Path, name: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(f"[{{events: ['*'], path: /e, schema_file: {name}}}]", tmp_path)
    [issue] = err.value.issues
    assert issue.location == "sinks[0].routes[0].schema_file"
    return issue.message


def test_a_missing_schema_file_is_a_located_config_error(tmp_path):
    assert schema_error(tmp_path, "schemas/nope.json") == (
        f"schema file not found: {tmp_path}/schemas/nope.json")


def test_a_schema_file_that_is_not_json_names_line_and_column(tmp_path):
    write_schema(tmp_path, "broken.json", '{\n  "type": "object",\n  "required": [lot_id]\n}')
    assert schema_error(tmp_path, "broken.json") == (
        "schema broken.json: not valid JSON: line 3, column 16: Expecting value")


def test_a_schema_file_that_is_no_valid_schema_names_the_keyword(tmp_path):
    write_schema(tmp_path, "wrong.json", {"properties": {"status": {"enum": "hold"}}})
    assert schema_error(tmp_path, "wrong.json") == (
        "schema wrong.json: not a valid JSON Schema (https://json-schema.org/draft/2020-12/"
        "schema): properties.status.enum: 'hold' is not of type 'array'")


@pytest.mark.parametrize(("ref", "problem"), [
    ("#/$defs/nope", "$ref '#/$defs/nope' does not resolve"),
    ("other.json", "$ref 'other.json' does not resolve; another file is looked up by its "
                   "name in this schema's folder"),
    ("https://schemas.example.com/lot.json",
     "$ref 'https://schemas.example.com/lot.json' does not resolve; another file is "
     "looked up by its name in this schema's folder"),
])
def test_a_reference_that_does_not_resolve_is_a_config_error(tmp_path, ref, problem):
    write_schema(tmp_path, "refs.json", {"properties": {"data": {"$ref": ref}}})
    assert schema_error(tmp_path, "refs.json") == f"schema refs.json: properties.data: {problem}"


def test_an_unknown_schema_draft_is_a_config_error(tmp_path):
    write_schema(tmp_path, "draft.json", {"$schema": "https://example.com/my-draft"})
    assert "is not a JSON Schema draft this gateway knows" in schema_error(tmp_path,
                                                                           "draft.json")


def test_another_draft_named_by_the_file_is_used(tmp_path):
    write_schema(tmp_path, "d7.json", {"$schema": "http://json-schema.org/draft-07/schema#",
                                       "definitions": {"x": {"type": "string"}},
                                       "properties": {"a": {"$ref": "#/definitions/x"}}})
    schema = load_schema(tmp_path / "d7.json")
    assert schema.violation({"a": 1}) == "schema d7.json: a: 1 is not of type 'string'"


def test_skip_files_does_not_read_schema_files(tmp_path):
    cfg = load("[{events: ['*'], path: /e, schema_file: schemas/later.json}]", tmp_path,
               check_files=False)
    assert cfg.sinks[0].routes[0].schema_file == str(tmp_path / "schemas" / "later.json")


async def test_a_schema_file_gone_since_the_config_was_checked_stops_the_start(tmp_path):
    with pytest.raises(ConfigError) as err:
        async with open_sink("http://127.0.0.1:9", routes=(
                "[{events: ['*'], path: /e, schema_file: gone.json}]"),
                base_dir=tmp_path, check_files=False):
            pass
    assert str(err.value) == (f"sinks[erp].routes[0].schema_file: schema file not found: "
                              f"{tmp_path}/gone.json")


def test_the_sample_schemas_are_valid(tmp_path):
    for path in sorted(SCHEMAS.glob("*.json")):
        load_schema(path)  # raises SchemaFileError when one is not
    assert {p.name for p in SCHEMAS.glob("*.json")} >= {
        "envelope.json", "erp-lot-status.json", "qms-inspection-result.json",
        "qms-nonconformance.json"}


@pytest.mark.parametrize(("route", "message"), [
    ("api_version_header: X-V", "api_version_header names the header of api_version; set "
                                "api_version too"),
    ("api_version: '1', api_version_header: 'Api Version'",
     "must be a header name, got 'Api Version'"),
    ("api_version: '1', api_version_header: X-Api-Token",
     "X-Api-Token: secrets are not allowed inline"),
    ("api_version: '1', api_version_header: Idempotency-Key",
     "Idempotency-Key: set by the gateway on every request; remove it"),
    ("api_version: '1', api_version_header: Content-Type",
     "Content-Type: set by the gateway on every request; choose another name"),
    ("api_version: '1', headers: {api-version: '2'}",
     "headers.api-version: the route's api_version sets this header; keep one of them"),
    ("api_version: ''", "must be a non-empty printable value, got ''"),
    ("api_version: \"2024\\n06\"", "must be a non-empty printable value"),
])
def test_api_version_config_errors(tmp_path, route, message):
    with pytest.raises(ConfigError) as err:
        load(f"[{{events: ['*'], path: /e, {route}}}]", tmp_path)
    assert message in str(err.value)


def test_a_sink_header_of_the_api_version_name_is_refused(tmp_path):
    text = "site: s\n" + sink_yaml("http://127.0.0.1:9", routes=(
        "[{events: ['*'], path: /e, api_version: '2024-06'}]"),
        extra="headers: {Api-Version: '2023'}")
    with pytest.raises(ConfigError) as err:
        load_config_text(text, base_dir=tmp_path)
    assert "headers.Api-Version: routes[0] sets this header from its api_version" in str(
        err.value)


def test_a_yaml_date_or_number_is_taken_as_the_version_text(tmp_path):
    cfg = load("[{events: ['*'], path: /e, api_version: 2024-06-01}, "
               "{events: ['*'], path: /f, api_version: 3}]", tmp_path)
    assert [r.api_version for r in cfg.sinks[0].routes] == ["2024-06-01", "3"]


# ------------------------------------------------------------------ the receiver's body


async def test_a_receivers_error_body_is_kept_whole_in_the_dead_letter(gateways, erp):
    problem = json.dumps({"type": "https://erp.example.com/problems/validation",
                          "errors": [{"field": f"f{i}", "detail": "x" * 50}
                                     for i in range(750)]})
    assert 50_000 < len(problem) < MAX_ERROR_BODY
    erp.reject(lambda e: True, 422, problem)
    gw = await gateways(sink_yaml(erp.url))
    await gw.pipeline.submit([sub("inspection.result", key="lot:A")])

    async def dead() -> list[dict]:
        return await gw.outbox.read(lambda c: queries.dlq_list(c))

    await eventually(dead, what="the dead letter")
    [dl] = await dead()
    assert dl["status"] == 422
    assert dl["response_body"] == problem


async def test_a_longer_body_is_cut_with_a_note_of_its_length(erp):
    page = "<html>" + "é" * 200_000 + "</html>"  # 400,013 bytes of UTF-8
    erp.reject(lambda e: True, 400, page)
    async with open_sink(erp.url) as sink:
        [outcome] = await sink.send(stored([event("inspection.result", "A", 1)]))
    assert outcome.kind is OutcomeKind.dead_letter
    body = outcome.body
    assert body is not None and len(body) <= MAX_ERROR_BODY
    head, _, note = body.rpartition("\n")
    assert page.startswith(head) and len(head) > 60_000
    assert note == (f"[cut by the gateway: the answer had 400013 bytes; its first "
                    f"{len(head.encode())} bytes are above]")


async def test_a_body_just_under_the_bound_is_not_cut(erp):
    body = "x" * MAX_ERROR_BODY
    erp.reject(lambda e: True, 422, body)
    async with open_sink(erp.url) as sink:
        [outcome] = await sink.send(stored([event("inspection.result", "A", 1)]))
    assert outcome.body == body


def test_schema_file_errors_are_value_errors():
    """pydantic turns a ValueError of a validator into a located config error."""
    assert issubclass(SchemaFileError, ValueError)
