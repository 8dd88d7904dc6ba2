"""The ``opcua`` source's bundle agrees with its code: every option of ``OpcUaSourceConfig``
and of its nested models has a row in its model's table in ``README.md`` (with the default
the model has, where the table names one), no table documents an option that does not
exist, and ``sample.yaml`` (which sets every option) and the README's example load as a
gateway config.

A README that drifts from the code is a defect: these tests fail when an option is added
without documenting it, renamed, or given another default.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import edge.sources.opcua
from edge.config import deprecations, load_config_text
from edge.sources.opcua import OpcUaSourceConfig
from edge.transforms.map import Mapper
from tests.support import config_models

BUNDLE = Path(edge.sources.opcua.__file__).parent
README = (BUNDLE / "README.md").read_text()
SAMPLE = (BUNDLE / "sample.yaml").read_text()
ENV = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-gateway.service"}

# the README's table (by its heading) for each config model
SECTIONS: dict[str, list[str]] = {
    "OpcUaSourceConfig": ["Keys every source has", "Keys of the `opcua` source"],
    "SecurityConfig": ["Security (`security`)"],
    "BackfillConfig": ["Backfill (`backfill`)"],
    "MonitoredItemConfig": ["Monitored items (`monitored[]`)"],
    "DeadbandConfig": ["Deadband (`monitored[].deadband`)"],
    "TriggerConfig": ["Triggers (`triggers[]`)"],
    "TriggerAckConfig": ["Trigger ack (`triggers[].ack`)"],
    "AlarmConfig": ["Alarms (`alarms[]`)"],
    "AlarmWhereConfig": ["Alarm filter (`alarms[].where`)"],
    "SeverityClassConfig": ["Severity classes (`alarms[].severity_classes[]`)"],
}


MODELS = config_models(OpcUaSourceConfig)


def _options(model: type[BaseModel]) -> dict[str, Any]:
    """Option name as written in YAML (alias first) → its field."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


OPTIONS = sorted((name, option) for name, model in MODELS.items() for option in _options(model))


def _rows(model: str) -> dict[str, str]:
    """Key → default cell of the README tables of ``model``."""
    rows: dict[str, str] = {}
    for heading in SECTIONS[model]:
        marker = f"\n### {heading}\n"
        assert marker in README, f"no section '### {heading}' in the README"
        section = README.split(marker, 1)[1].split("\n#", 1)[0]
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or len(cells) != 3 or cells[0] in ("key", "---"):
                continue
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows[key] = cells[1]
    return rows


def _yaml(value: Any) -> str:
    """A default as the README writes it."""
    if isinstance(value, BaseModel):
        return ""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def test_the_walk_reaches_every_nested_model():
    assert set(MODELS) == set(SECTIONS)


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_every_option_has_a_row_in_its_table(model, option):
    rows = _rows(model)
    assert option in rows, f"{model}.{option} has no row in the README ({SECTIONS[model]})"


@pytest.mark.parametrize("model", sorted(SECTIONS))
def test_every_row_is_an_option(model):
    stale = set(_rows(model)) - set(_options(MODELS[model]))
    assert not stale, f"the README documents {sorted(stale)} for {model}: no such option"


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_the_default_in_the_table_is_the_models(model, option):
    cell = _rows(model).get(option)
    field = _options(MODELS[model])[option]
    if cell == "—":
        assert field.is_required(), f"{model}.{option} is optional; the README says required"
        return
    assert not field.is_required(), f"{model}.{option} is required; the README gives a default"
    literal = re.fullmatch(r"`([^`]*)`", cell or "")
    if literal:  # prose ("by type", "from `cert_file`") is not compared
        default = field.get_default(call_default_factory=True)
        assert literal.group(1) == _yaml(default), \
            f"{model}.{option}: README default {cell}, model default {default!r}"


@pytest.mark.parametrize("old", sorted(
    old for model in MODELS.values() for old in getattr(model, "renamed_keys", {})))
def test_every_deprecated_name_is_in_the_readme(old):
    assert f"`{old}`" in README


# ------------------------------------------------------------------ sample and example


def _load(sources_block: str) -> Any:
    return load_config_text("site: plant-01\n" + sources_block, env=ENV, check_files=False)


def _set_in_sample() -> set[tuple[str, str]]:
    """(model, option) of every key the sample sets."""
    [src] = yaml.safe_load(SAMPLE)["sources"]
    found = {("OpcUaSourceConfig", k) for k in src}
    found |= {("SecurityConfig", k) for k in src.get("security", {})}
    found |= {("BackfillConfig", k) for k in src.get("backfill", {})}
    for item in src.get("monitored", []):
        found |= {("MonitoredItemConfig", k) for k in item}
        found |= {("DeadbandConfig", k) for k in item.get("deadband") or {}}
    for trig in src.get("triggers", []):
        found |= {("TriggerConfig", k) for k in trig}
        found |= {("TriggerAckConfig", k) for k in trig.get("ack") or {}}
    for alarm in src.get("alarms", []):
        found |= {("AlarmConfig", k) for k in alarm}
        found |= {("AlarmWhereConfig", k) for k in alarm.get("where") or {}}
        for band in alarm.get("severity_classes") or []:
            found |= {("SeverityClassConfig", k) for k in band}
    return found


def test_the_sample_loads_as_one_opcua_source():
    cfg = _load(SAMPLE)
    assert deprecations(cfg) == []
    [src] = cfg.sources
    assert isinstance(src, OpcUaSourceConfig)
    assert src.security.enabled and src.password_file == ENV["CREDENTIALS_DIRECTORY"] + "/station7"
    assert src.monitored and src.triggers and src.triggers[0].ack is not None
    assert src.alarms and src.alarms[0].severity_class(650).event_class == "high"


def test_the_sample_sets_every_option():
    missing = set(OPTIONS) - _set_in_sample()
    assert not missing, f"sample.yaml leaves out {sorted(missing)}"


def test_the_sample_trigger_maps_a_read_to_one_result():
    [src] = _load(SAMPLE).sources
    trig = src.triggers[0]
    read = {"lot_id": "L-7", "serial": "S-1", "result": "pass", "measured": 10.01,
            "measured_at": "2026-03-01T08:00:00Z"}
    event, dedupe = Mapper(trig, site="plant-01", source=src.id).map(read, source_ts=None)
    assert event.type == "inspection.result" and event.ordering_key == "lot:L-7"
    assert event.data["serial"] == "S-1" and event.data["station"] == "Station7"
    assert event.source_ts == datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    assert dedupe == "S-1"


def test_the_readme_example_loads():
    [example] = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    [src] = _load(example).sources
    assert isinstance(src, OpcUaSourceConfig)
