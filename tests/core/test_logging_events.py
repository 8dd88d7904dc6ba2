"""Every log line about one event names it: ``event_id`` and ``correlation_id`` are fields
of the retry, dead-letter and duplicate lines, so ``jq 'select(.event_id == "...")'`` finds
an event's whole story, and ``correlation_id`` its chain (a hold and the result it follows).

A real gateway, the real HTTP sink, a real loopback ERP; the lines as the JSON formatter
writes them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from edge.components import Submission
from edge.events import make_event
from edge.telemetry import _JsonFormatter
from tests.support import eventually, sink_yaml


class JsonLines(logging.Handler):
    """The JSON lines the gateway writes, parsed back."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(_JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def about(self, event_id: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("event_id") == event_id]


@pytest.fixture
def json_lines() -> Iterator[JsonLines]:
    handler = JsonLines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _chained(lot: str) -> Submission:
    """A result whose correlation id is not its own id (it continues a chain)."""
    return Submission(make_event(type="inspection.result", site="test-site", source="line1",
                                 data={"lot_id": lot, "result": "pass"},
                                 ordering_key=f"lot:{lot}",
                                 correlation_id=f"chain-of-{lot}"))


def _one(lines: list[dict[str, Any]], msg: str) -> dict[str, Any]:
    found = [d for d in lines if d["msg"].startswith(msg)]
    assert found, f"no line {msg!r} among {[d['msg'] for d in lines]}"
    return found[0]


async def test_retry_dead_letter_and_duplicate_lines_carry_both_ids(gateways, erp, json_lines):
    gw = await gateways(sink_yaml(erp.url))

    # a retry: the ERP answers 503 once, then takes the event
    erp.fail_next(1, 503)
    retried = _chained("L-RETRY")
    await gw.pipeline.submit([retried])
    await erp.wait_for(lambda e: retried.event.id in e.ids())
    line = _one(json_lines.about(retried.event.id), "delivery failed; events stay queued")
    assert line["correlation_id"] == "chain-of-L-RETRY" and line["sink"] == "erp"
    assert line["status"] == 503

    # a dead letter: the ERP judges the event (422)
    erp.reject(lambda e: e["data"]["lot_id"] == "L-BAD", 422)
    rejected = _chained("L-BAD")
    await gw.pipeline.submit([rejected])
    await eventually(lambda: any(d["msg"] == "event dead-lettered" and d["logger"]
                                 == "edge.forwarder" for d in json_lines.about(
                                     rejected.event.id)), what="the dead-letter line")
    line = _one([d for d in json_lines.about(rejected.event.id)
                 if d["logger"] == "edge.forwarder"], "event dead-lettered")
    assert line["correlation_id"] == "chain-of-L-BAD" and line["status"] == 422
    assert line["ordering_key"] == "lot:L-BAD" and line["parks_key"] is True

    # a duplicate: the ERP already had it (409)
    erp.fail_next(1, 409)
    twice = _chained("L-DUP")
    await gw.pipeline.submit([twice])
    await eventually(lambda: json_lines.about(twice.event.id), what="the duplicate line")
    line = _one(json_lines.about(twice.event.id), "receiver already had the event")
    assert line["correlation_id"] == "chain-of-L-DUP" and line["status"] == 409

    # the dead letter is one line, not one per layer
    assert [d["msg"] for d in json_lines.about(rejected.event.id)].count(
        "event dead-lettered") == 1
    # no line names an event without its chain
    for doc in json_lines.docs:
        if "event_id" in doc:
            assert doc.get("correlation_id"), doc
