"""docs/events.md documents the whole catalogue: every type, its declared fields, its class
and ordering key, and an example envelope that the gateway would accept and emit."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from edge.events import Event
from edge.events.catalogue import CATALOGUE, LOT_SCOPED_TYPES, validate_data

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def sections() -> dict[str, str]:
    """``### `type` `` heading → the text up to the next heading of that level or above."""
    text = DOC.read_text()
    found: dict[str, str] = {}
    for m in re.finditer(r"^### `([^`]+)`\n(.*?)(?=^#{1,3} |\Z)", text, re.M | re.S):
        found[m.group(1)] = m.group(2)
    return found


def test_every_catalogue_type_has_a_section_and_nothing_else_does() -> None:
    assert list(sections()) == list(CATALOGUE)


@pytest.mark.parametrize("event_type", list(CATALOGUE))
def test_a_type_section_names_every_field_its_class_key_and_version(event_type: str) -> None:
    spec = CATALOGUE[event_type]
    body = sections()[event_type]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \|(.*)$", body, re.M))
    model_fields = spec.model.model_fields
    assert set(rows) == set(model_fields), "field table differs from the model"
    for name, info in model_fields.items():
        cells = re.split(r"(?<!\\)\|", rows[name])  # `pass` \| `fail` is one cell
        is_required = cells[1].strip() == "yes"
        assert is_required == info.is_required(), name
    assert f"Class `{spec.event_class}`" in body
    key = f"`{spec.ordering_key}`" if spec.ordering_key else "none"
    assert f"ordering key {key}" in body
    assert f"schema version {spec.schema_version}" in body


@pytest.mark.parametrize("event_type", list(CATALOGUE))
def test_the_example_envelope_is_what_the_gateway_emits(event_type: str) -> None:
    spec = CATALOGUE[event_type]
    blocks = re.findall(r"```json\n(.*?)```", sections()[event_type], re.S)
    assert len(blocks) == 1, "one example envelope per type"
    envelope = orjson.loads(blocks[0])
    event = Event.model_validate(envelope)
    assert event.type == event_type
    assert event.data == validate_data(event_type, event.data), "data is not normalized"
    assert event.integrity_ok()
    assert event.event_class.name == spec.event_class
    assert event.ordering_key == spec.ordering_key_for(event.data)
    assert event.schema_version == spec.schema_version


def test_the_summary_table_matches_the_catalogue() -> None:
    text = DOC.read_text()
    summary = text.split("## The catalogue at a glance", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| \[`([^`]+)`\]\([^)]*\) \|(.*)$", summary, re.M)}
    assert list(rows) == list(CATALOGUE)
    for event_type, row in rows.items():
        spec = CATALOGUE[event_type]
        cls, key, req = (c.strip() for c in row.split("|")[:3])
        assert cls == f"`{spec.event_class}`", event_type
        assert (spec.ordering_key or "none") in key, event_type
        wanted = [n for n, f in spec.model.model_fields.items() if f.is_required()]
        assert re.findall(r"`([a-z_]+)`", req) == wanted, event_type
    listed = re.search(r"\*\*Lot-scoped types\*\*(.*?)\n\n", text, re.S)
    assert listed is not None
    assert set(re.findall(r"`([a-z]+\.[a-z.]+|nonconformance)`", listed.group(1))) \
        == LOT_SCOPED_TYPES
