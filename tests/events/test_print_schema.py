"""``edge print-schema --events``: the JSON Schemas of the catalogue, keyed by type; plain
``edge print-schema`` stays the config schema."""

from __future__ import annotations

import json
from pathlib import Path

from edge.config import json_schema
from edge.events.catalogue import CATALOGUE, json_schemas
from tests.support import run_edge


async def test_print_schema_events_prints_every_catalogue_type(tmp_path: Path) -> None:
    code, out, err = await run_edge("print-schema", "--events", cwd=tmp_path)
    assert code == 0, err
    printed = json.loads(out)
    assert list(printed) == list(CATALOGUE)
    assert printed == json_schemas()
    hold = printed["quality.hold"]
    assert hold["required"] == ["lot_id", "reason"]
    assert hold["x-event-class"] == "critical" and hold["x-ordering-key"] == "lot:{lot_id}"


async def test_plain_print_schema_is_still_the_config_schema(tmp_path: Path) -> None:
    code, out, err = await run_edge("print-schema", cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(json_schema()))
