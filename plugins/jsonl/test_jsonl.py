"""The jsonl plugin loaded from a plugins_dir, end to end through a real gateway."""

from __future__ import annotations

from pathlib import Path

import orjson

from edge.plugin import Submission, make_event
from tests.support import eventually

PLUGINS = Path(__file__).resolve().parents[1]


def _result(lot: str) -> Submission:
    return Submission(make_event(type="inspection.result", site="test-site", source="t",
                                 data={"lot_id": lot, "result": "fail"}, ordering_key=f"lot:{lot}"))


async def test_events_land_in_daily_files_once_each(gateways, tmp_path: Path):
    gw = await gateways(f"""\
        plugins_dir: {PLUGINS}
        sinks:
          - id: history
            type: jsonl
            directory: history
            events: [inspection.*]
        """)
    ids = await gw.pipeline.submit([_result(f"L{i}") for i in range(25)])
    history = tmp_path / "state" / "history"

    def lines() -> list[dict]:
        return [orjson.loads(line) for f in sorted(history.glob("*.jsonl"))
                for line in f.read_bytes().splitlines()]

    await eventually(lambda: len(lines()) >= 25)
    assert [e["id"] for e in lines()] == ids
    assert all(f.name.startswith("test-site-") for f in history.glob("*.jsonl"))


async def test_write_error_keeps_events_queued(gateways, tmp_path: Path):
    target = tmp_path / "export"
    gw = await gateways(f"""\
        plugins_dir: {PLUGINS}
        sinks:
          - id: history
            type: jsonl
            directory: {target}
            retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.1}}
        """)
    target.rmdir()
    target.write_text("the export medium was swapped for something else")
    await gw.pipeline.submit([_result("A")])
    await eventually(lambda: gw.forwarders["history"].last_error)
    assert "write failed" in gw.forwarders["history"].last_error
    assert (await gw.outbox.stats())["sinks"]["history"]["total"] == 1
