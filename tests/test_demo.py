"""``edge demo``: the packaged config, the verdict, and whole runs as a user starts them."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge.config import load_config_text
from edge.demo.runner import Demo, DemoOptions, demo_config_text
from edge.demo.summary import Tally, judge
from tests.fixtures.mosquitto import find_mosquitto
from tests.support import eventually

REPO = Path(__file__).resolve().parents[1]


def test_packaged_demo_config_is_the_one_in_config() -> None:
    """edge/resources/demo.yaml ships in the wheel; config/demo.yaml is what people read."""
    assert demo_config_text() == (REPO / "config" / "demo.yaml").read_text()


def test_demo_config_is_valid_with_its_defaults(tmp_path: Path) -> None:
    cfg = load_config_text(demo_config_text(), base_dir=tmp_path, env={})
    assert cfg.site == "demo-plant"
    src = cfg.sources[0]  # type: ignore[attr-defined]
    assert src.type == "mqtt" and src.protocol == "5" and src.client_id == "edge-demo-line1"
    assert [s.topic for s in src.subscriptions] == [
        "plant/{site}/line/{line}/station/{station}/inspection",
        "plant/{site}/line/{line}/station/{station}/reading",
    ]
    assert [s.id for s in cfg.sources] == ["line1", "mes", "station7"]
    assert [s.id for s in cfg.sinks] == ["erp", "qms", "supplier-portal", "line-holds"]
    assert cfg.quality.stuck_after_s == 15  # type: ignore[attr-defined]
    embedded = load_config_text(demo_config_text(), base_dir=tmp_path,
                                env={"EDGE_DEMO_MQTT_PROTOCOL": "3.1.1",
                                     "EDGE_DEMO_API_ENABLED": "false"})
    assert embedded.sources[0].protocol == "3.1.1"  # type: ignore[attr-defined]
    assert embedded.api.enabled is False


class Group:
    """A station group as the verdict sees it: what was sent and confirmed."""

    label = "test"
    source_ids = ["line1"]

    def __init__(self, confirmed: set[str], sent: int | None = None) -> None:
        self._confirmed = confirmed
        self.sent = len(confirmed) if sent is None else sent

    def confirmed(self) -> set[str]:
        return self._confirmed

    def key_of(self, event: dict[str, Any]) -> str | None:
        return event["data"].get("message_id")


def ev(event_id: str, key: str, source: str = "line1") -> dict[str, Any]:
    return {"id": event_id, "source": source, "data": {"message_id": key}}


def test_verdict_counts_lost_duplicates_and_repeats() -> None:
    group = Group({"a", "b", "c", "d"}, sent=5)
    events = [ev("1", "a"), ev("2", "b"), ev("2", "b"),  # b resent with the same id
              ev("3", "c"), ev("4", "c"),  # c under two ids: a real duplicate
              ev("9", "d", source="other")]  # another source's event does not count
    v = judge([group], events)
    assert (v.published, v.delivered, v.lost, v.duplicates, v.repeats, v.unconfirmed) == (
        4, 3, 1, 1, 1, 1)
    assert not v.ok and v.lost_examples == ("d",)
    assert v.line() == ("published 4, delivered 3 (1 lost, 1 duplicates); 1 resent under the "
                        "same Idempotency-Key, 1 never confirmed by the broker")


def test_verdict_names_each_station_group() -> None:
    mqtt, opcua = Group({"a", "b"}), Group({"r1", "r2"})
    mqtt.label, opcua.label = "MQTT stations", "OPC UA station"
    opcua.source_ids = ["station7"]
    v = judge([mqtt, opcua], [ev("1", "a"), ev("2", "b"), ev("3", "r1", source="station7")])
    assert v.line() == ("published 4, delivered 3 (1 lost, 0 duplicates)\n"
                        "  MQTT stations: 2 published, 2 delivered; "
                        "OPC UA station: 2 published, 1 delivered")


def test_verdict_is_ok_when_everything_arrived_once_in_pieces() -> None:
    group = Group({"a", "b"})
    tally = Tally([group])
    tally.add([ev("1", "a")])
    assert tally.missing([group.confirmed()]) == 1
    tally.add([ev("2", "b")])
    assert tally.missing([group.confirmed()]) == 0
    v = tally.verdict()
    assert v.ok and v.line() == "published 2, delivered 2 (0 lost, 0 duplicates)"


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "edge", "demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


STORY = [
    r"^--- receipt: lot LStation7-0001, 500 pcs BRG-6204 from supplier acme",
    r"^--- receipt: lot LWH-0002, .* from supplier globex \(never inspected\)",
    r"^--- hold: lot LStation7-0001 episode 1 \(.*limit.*\): on hold on the line's broker, "
    r"supplier case for acme",
    r"^--- supplier case for acme, lot LStation7-0001: in the QMS and on the supplier portal",
    r"^--- release: lot LStation7-0001 released by QMS: A. Inspector",
    r"^--- stuck: lot LWH-0002 \(globex\)",
]

LIVE = re.compile(r"received (\d+)  stored (\d+)  delivered (\d+)  backlog (\d+)  "
                  r"dead letters (\d+).*ERP (up|DOWN)")


@pytest.mark.mqtt
def test_edge_demo_with_an_erp_outage_ends_with_nothing_lost() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    done = run_demo("--duration", "10", "--outage", "3", "--broker", "mosquitto")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    m = re.search(r"^published (\d+), delivered (\d+) \(0 lost, 0 duplicates\)", out, re.M)
    assert m and int(m.group(1)) == int(m.group(2)) > 100, out[-2000:]
    # both protocols flow: every group's confirmed records reached the ERP
    groups = re.search(r"MQTT stations: (\d+) published, (\d+) delivered; "
                       r"OPC UA station: (\d+) published, (\d+) delivered", out)
    assert groups, out[-2000:]
    mqtt_pub, mqtt_dlv, opcua_pub, opcua_dlv = map(int, groups.groups())
    assert mqtt_pub == mqtt_dlv > 0 and opcua_pub == opcua_dlv > 0
    lines = [LIVE.search(line) for line in out.splitlines()]
    live = [x for x in lines if x]
    assert len(live) >= 8  # one a second
    # the backlog grew while the ERP was down and drained afterwards
    assert max(int(x.group(4)) for x in live if x.group(6) == "DOWN") > 0
    assert int(live[-1].group(4)) == 0
    assert "--- ERP outage for 3 s" in out and "--- ERP back" in out
    # the quality story's first part: receipts, a hold episode with its supplier case (the
    # rest is checked with the status page below, without a fixed duration)
    for pattern in STORY[:4]:
        assert re.search(pattern, out, re.M), (pattern, out[-3000:])
    assert "warehouse and MES: " in out
    if importlib.util.find_spec("edge.api.server") is not None:
        assert re.search(r"status:  http://127\.0\.0\.1:\d+/ ", out)


@pytest.mark.mqtt
def test_edge_demo_runs_on_the_embedded_broker() -> None:
    pytest.importorskip("amqtt")
    done = run_demo("--duration", "4", "--broker", "embedded", "--no-api")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "embedded amqtt" in done.stdout and "MQTT 3.1.1" in done.stdout
    assert re.search(r"published (\d+), delivered \1 \(0 lost, 0 duplicates\)", done.stdout)


@pytest.mark.mqtt
@pytest.mark.opcua
async def test_demo_tells_the_quality_story_in_its_lines_and_on_the_status_page() -> None:
    """Receipts, a hold episode with its supplier case, the release and a stuck lot: in
    the demo's lines, in its live summary, and on the status page while it runs."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    import asyncio

    import httpx

    lines: list[str] = []
    demo = Demo(DemoOptions(broker="mosquitto", stuck_after_s=8, rate=10), out=lines.append)
    run = asyncio.create_task(demo.run())
    try:
        await eventually(lambda: run.done() or all(
            any(x.startswith(prefix) for x in lines) for prefix in ("--- stuck", "--- release")),
            timeout=60, what="the release's and the stuck lot's lines")
        assert not run.done(), "\n".join(lines)
        text = "\n".join(lines)
        for pattern in STORY:
            assert re.search(pattern, text, re.M), (pattern, text[-3000:])
        # order of the story: receipt, hold, case, release
        firsts = [min(i for i, x in enumerate(lines) if re.search(p, x)) for p in STORY[:5]]
        assert firsts[0] < firsts[2] < firsts[3] < firsts[4], text
        live = [x for x in lines if LIVE.search(x)]
        assert await eventually(lambda: any(re.search(r"lots \d+ \(.*stuck [1-9]\d*\)", x)
                                            for x in lines), what="a live line with a stuck lot"), live[-3:]
        url = next(m.group(1) for x in lines
                   if (m := re.search(r"status:  (http://127\.0\.0\.1:\d+/) ", x)))
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            status = (await client.get("/status")).json()["lots"]
            page = (await client.get("/")).text
        # the lot nobody inspected, oldest of the stuck ones (the MES decides the others)
        assert status["stuck_lots"][0]["lot_id"] == "LWH-0002", status
        assert status["by_state"]["released"] >= 1
        assert "LWH-0002" in page and "<h2>Lots" in page
    finally:
        demo.stop()
        code = await asyncio.wait_for(run, 120)
    assert code == 0, "\n".join(lines[-20:])
    assert re.search(r"warehouse and MES: (\d+) published, \1 delivered", "\n".join(lines))
