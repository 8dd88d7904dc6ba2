"""The status page and ``edge status`` summary name held ordering keys, pauses and alarms."""

from __future__ import annotations

import re

import httpx
import pytest

from edge.api import page
from edge.api.summary import problems
from tests.support import api_yaml, eventually, free_port, http_sink_yaml, submission

SINCE = "2026-03-02T06:40:11Z"


def _report(**erp: object) -> dict:
    sink = {"depth": {"critical": 0, "high": 3, "normal": 0, "low": 0}, "total": 3,
            "retrying": 0, "oldest_age_s": 12.0, "dead_letters": 1, "up": True,
            "circuit": "closed", "configured": True, **erp}
    return {"site": "plant-01", "version": "1", "uptime_s": 5, "components": [],
            "outbox": {"events": 4, "accepting": True}, "sinks": {"erp": sink}, "alarms": []}


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_parked_keys_are_named_with_their_dead_letter():
    keys = [{"key": "lot:L7", "dead_letter_id": 12, "event_id": "ev-7", "since": SINCE,
             "waiting": 2},
            {"key": "lot:<b>", "dead_letter_id": 13, "event_id": "ev-8", "since": SINCE}]
    html = page.render(_report(parked=25, parked_keys=keys), [])
    text = _text(html)
    assert f"lot:L7 parked since {SINCE}" in text and "dead letter #12" in text
    assert "2 event(s) waiting behind it" in text
    assert "lot:&lt;b&gt;" in html and "lot:<b>" not in html
    assert "23 more key(s)" in text and "/dlq?sink=erp" in html
    [held] = [p for p in problems(_report(parked=25, parked_keys=keys)) if "held" in p.message]
    assert "25 ordering key(s)" in held.message and "lot:L7 (dead letter #12)" in held.message
    assert held.since == SINCE
    for older in (_report(), _report(parked=None, parked_keys=None, paused=None, alarm=None)):
        html = page.render(older, [])  # stats of a gateway without these fields
        assert "Held ordering keys" not in html and "PAUSED" not in html
        assert "NEEDS ATTENTION" in html  # the dead letter still counts


def test_a_paused_sink_and_its_alarm_are_shown():
    paused = {"code": "storm_guard", "reason": "19 of the last 20 answers were 404",
              "since": SINCE}
    alarm = {"code": "storm_guard", "message": "dead-letter storm: 404", "since": SINCE}
    report = _report(paused=paused, alarm=alarm)
    text = _text(page.render(report, []))
    assert "PROBLEM" in text and "PAUSED (storm_guard)" in text
    assert "19 of the last 20 answers were 404" in text
    assert "edge sink resume erp" in text and "/sinks/erp/resume" in text
    found = problems(report)
    assert [p.severity for p in found if "paused" in p.message] == ["critical"]
    assert not [p for p in found if p.message == alarm["message"]]  # one story, one line
    auth = problems(_report(alarm={"code": "auth", "message": "credentials refused (401)",
                                   "since": SINCE}))
    assert [(p.severity, p.message) for p in auth][:1] == [
        ("critical", "credentials refused (401)")]


async def test_a_key_parked_by_a_real_dead_letter_is_on_the_page(gateways, erp):
    erp.reject(lambda e: e.get("data", {}).get("lot_id") == "L7", 422)
    port = free_port()
    gw = await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    await gw.pipeline.submit([submission("L7")])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        [dead] = await eventually(lambda: _dead_letters(client))
        sink = (await client.get("/status")).json()["sinks"]["erp"]
        if "parked_keys" not in sink:
            pytest.skip("these outbox stats do not report parked keys yet")
        await gw.pipeline.submit([submission("L7", serial="S2")])  # held behind it
        text = _text((await client.get("/")).text)
    assert f"lot:L7 parked since {dead['dead_at']}" in text
    assert f"dead letter #{dead['id']}" in text


async def _dead_letters(client: httpx.AsyncClient) -> list:
    return (await client.get("/dlq")).json()["dead_letters"]
