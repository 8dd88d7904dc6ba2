"""The routing of ``config/plant.example.yaml`` (the quality workflow's sinks) and the
sample contracts in ``config/schemas/``.

The example loads like ``edge check-config --skip-files`` does, and with every file it
names present, the way ``edge check-config`` reads it on a gateway: the schema files
resolve beside it and are valid. Each event type goes to the systems the workflow needs;
the sample schemas accept the events the gateway emits and refuse what their receivers
would.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import orjson
import pytest

from edge.config import load_config
from edge.errors import ConfigError
from edge.events import make_event
from edge.sinks.http.config import HttpSinkConfig, ScheduledDelivery
from edge.sinks.http.contract import load_schema
from tests.support import run_edge

CONFIG = Path(__file__).resolve().parents[3] / "config"
EXAMPLE = CONFIG / "plant.example.yaml"
ENV = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-gateway.service"}

ROUTING = {  # event type → the sinks it is queued for
    "material.receipt": {"erp"},
    "lot.status": {"erp"},
    "inspection.result": {"qms"},
    "nonconformance": {"qms"},
    "supplier.case": {"qms", "supplier-portal"},
    "capa.request": {"qms"},
    "quality.hold": {"qms", "line-holds"},
    "quality.release": {"qms", "line-holds"},
    "notification": {"erp"},
    "machine.reading": {"analytics"},
    "production.count": {"analytics", "erp-confirmations"},
    "some.plant.type": set(),  # no catch-all route: sent nowhere
}


def example():
    return load_config(EXAMPLE, check_files=False, env=ENV)


def sink(cfg, sink_id: str):
    return next(s for s in cfg.sinks if s.id == sink_id)


def route(cfg, sink_id: str, event_type: str):
    return next(r for r in sink(cfg, sink_id).routes if r.matches(event_type))


def carries(sink_cfg, event_type: str) -> bool:
    """A sink with routes carries a type one of them matches; the nats sink its `events`."""
    if hasattr(sink_cfg, "routes"):
        return any(r.matches(event_type) for r in sink_cfg.routes)
    return bool(sink_cfg.matches(event_type))


@pytest.mark.parametrize(("event_type", "sinks"), sorted(ROUTING.items()))
def test_each_event_type_goes_to_the_systems_of_the_workflow(event_type, sinks):
    cfg = example()
    # and every type to the fleet's JetStream stream, for the relays
    assert {s.id for s in cfg.sinks if carries(s, event_type)} == sinks | {"jetstream"}


async def test_check_config_with_skip_files_accepts_the_example():
    code, out, err = await run_edge("check-config", "--skip-files", str(EXAMPLE),
                                    cwd=CONFIG, env=ENV)
    assert (code, err) == (0, "")
    assert out.startswith("OK: site plant-01")


def test_the_example_with_its_files_present_passes_the_file_checks(tmp_path):
    """Every file the example names is made (empty) except the schemas, which are the
    shipped ones beside it: what is left to check are the schema files."""
    shutil.copy(EXAMPLE, tmp_path / "edge.yaml")
    shutil.copytree(CONFIG / "schemas", tmp_path / "schemas")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")}
    for _ in range(50):
        try:
            cfg = load_config(tmp_path / "edge.yaml", env=env)
            break
        except ConfigError as err:
            missing = [m.group(1) for i in err.issues
                       if (m := re.fullmatch(r"(?:file|directory) not found: (.+)", i.message))]
            assert missing, str(err)  # anything else is a real error of the example
            for path in map(Path, missing):
                assert not path.name.endswith(".json"), f"a schema is missing: {path}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    else:
        pytest.fail("the example names ever more missing files")
    assert route(cfg, "erp", "lot.status").schema_file == str(
        tmp_path / "schemas" / "erp-lot-status.json")


def test_the_erp_lot_status_route_is_governed():
    r = route(example(), "erp", "lot.status")
    assert (r.method, r.path, r.api_version, r.api_version_header) == (
        "PUT", "/lots/{data.lot_id}/status", "2024-06", "Api-Version")
    assert r.schema_file is not None and Path(r.schema_file).name == "erp-lot-status.json"
    assert r.delivery == "realtime"


def test_the_qms_routes_name_their_contracts():
    cfg = example()
    assert Path(route(cfg, "qms", "inspection.result").schema_file or "").name == \
        "qms-inspection-result.json"
    assert Path(route(cfg, "qms", "nonconformance").schema_file or "").name == \
        "qms-nonconformance.json"


def test_the_supplier_portal_uses_oauth2_client_credentials_from_a_file():
    portal = sink(example(), "supplier-portal")
    assert isinstance(portal, HttpSinkConfig)
    assert portal.auth.type == "oauth2_client_credentials"
    assert portal.auth.client_secret_file == ENV["CREDENTIALS_DIRECTORY"] + "/supplier-portal"


def test_holds_reach_the_local_broker_retained_with_qos_1():
    r = route(example(), "line-holds", "quality.hold")
    assert (r.qos, r.retain) == (1, True)
    assert r.topic == "plant/{site}/lot/{data.lot_id}/hold"
    assert route(example(), "line-holds", "quality.release").topic == r.topic  # clears it


def test_counts_are_confirmed_to_the_erp_in_scheduled_batches_on_a_sink_of_their_own():
    """A scheduled event holds its key on its sink: counts carry their lot's key, so they
    must not share a sink with the lot's status and holds."""
    cfg = example()
    r = route(cfg, "erp-confirmations", "production.count")
    assert isinstance(r.delivery, ScheduledDelivery) and r.delivery.scheduled.every_s == 900
    assert r.max_batch > 1
    for s in cfg.sinks:
        scheduled = [t for t in ROUTING if any(
            x.matches(t) and isinstance(getattr(x, "delivery", None), ScheduledDelivery)
            for x in getattr(s, "routes", ()))]
        lot_types = {"lot.status", "quality.hold", "quality.release", "nonconformance"}
        if scheduled:
            assert not any(x.matches(t) for x in s.routes for t in lot_types), s.id


# ------------------------------------------------------------------ the sample contracts


def envelope(type_: str, **data: object) -> dict:
    ev = make_event(type=type_, site="plant-01", source="station7", data=data)
    return orjson.loads(ev.to_json())


GOOD = {
    "erp-lot-status.json": [
        envelope("lot.status", lot_id="L-2026-0412", status="hold",
                 reason="bore_diameter 10.07 above upper limit 10.05", decided_by="gateway"),
        envelope("lot.status", lot_id="L-2026-0412", status="released",
                 reason="sorted 100 %", decided_by="mmiller"),
    ],
    "qms-inspection-result.json": [
        envelope("inspection.result", lot_id="L-2026-0412", characteristic="bore_diameter",
                 measured=10.07, unit="mm", lower=9.95, upper=10.05, result="fail",
                 sample="3", serial="SN-000123", supplier="acme-bearings",
                 station="station7", operator="jdoe"),
        envelope("inspection.result", lot_id="L-2026-0413", result="pass"),
    ],
    "qms-nonconformance.json": [
        envelope("nonconformance", lot_id="L-2026-0412", serial="SN-000123",
                 characteristic="bore_diameter", measured=10.07, lower=9.95, upper=10.05,
                 reason="measured 10.07 above upper limit 10.05",
                 inspection_event_id="01968a1e-4f2b-7c3d-9a10-5b6c7d8e9f01"),
    ],
}

BAD = [
    ("erp-lot-status.json", envelope("lot.status", lot_id="L1", status="paused"),
     "data.status: 'paused' is not one of ['released', 'hold', 'quarantine', 'rejected']"),
    ("erp-lot-status.json", envelope("lot.status", status="hold"),
     "data: 'lot_id' is a required property"),
    ("erp-lot-status.json", envelope("quality.hold", lot_id="L1", reason="x"),
     "type: 'lot.status' was expected (and 1 more error)"),  # and no status
    ("qms-inspection-result.json",
     envelope("inspection.result", lot_id="L1", result="fail", measured="10,07",
              characteristic="bore"),
     "data.measured: '10,07' is not of type 'number'"),
    ("qms-inspection-result.json",
     envelope("inspection.result", lot_id="L1", result="fail", measured=10.07),
     "data: 'characteristic' is a dependency of 'measured'"),
    ("qms-nonconformance.json", envelope("nonconformance", lot_id="L1"),
     "data: 'reason' is a required property"),
]


@pytest.mark.parametrize(("name", "body"), [(n, b) for n, bs in GOOD.items() for b in bs])
def test_the_sample_schemas_accept_the_events_the_gateway_emits(name, body):
    assert load_schema(CONFIG / "schemas" / name).violation(body) is None


@pytest.mark.parametrize(("name", "body", "problem"), BAD)
def test_the_sample_schemas_refuse_what_their_receiver_would(name, body, problem):
    assert load_schema(CONFIG / "schemas" / name).violation(body) == f"schema {name}: {problem}"


def test_an_envelope_without_its_id_is_refused_by_every_sample():
    for name, bodies in GOOD.items():
        body = dict(bodies[0])
        del body["id"]
        assert load_schema(CONFIG / "schemas" / name).violation(body) == (
            f"schema {name}: body: 'id' is a required property")
