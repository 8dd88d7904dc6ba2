"""POST /sinks/{id}/resume: an operator lifts a sink's pause, saying who and why."""

from __future__ import annotations

import httpx
import pytest

from edge.app import Gateway
from tests.support import api_yaml, eventually, free_port, http_sink_yaml, submission

TOKEN = "s3cr3t-7b21e4c0ffee"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class _Recorder:
    """Stands in for ``Gateway.resume_sink`` where a pause cannot be staged cheaply."""

    def __init__(self, paused: set[str], known: set[str]) -> None:
        self.paused, self.known = paused, known
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, sink_id: str, *, actor: str, reason: str) -> bool:
        self.calls.append((sink_id, actor, reason))
        if sink_id not in self.known:
            raise KeyError(sink_id)
        if sink_id in self.paused:
            self.paused.discard(sink_id)
            return True
        return False


async def _gateway(gateways, erp, tmp_path, *, token: bool = False):
    port = free_port()
    if token:
        (tmp_path / "api.token").write_text(f"alice {TOKEN}\n")
    gw = await gateways(api_yaml(port, token_file="api.token" if token else None)
                        + "sinks:\n" + http_sink_yaml(erp.url))
    return gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                 headers=BEARER if token else {})


async def test_resume_passes_who_and_why_to_the_gateway(gateways, erp, tmp_path, monkeypatch):
    gw, client = await _gateway(gateways, erp, tmp_path, token=True)
    fake = _Recorder(paused={"erp"}, known={"erp"})
    monkeypatch.setattr(gw, "resume_sink", fake, raising=False)
    async with client:
        first = await client.post("/sinks/erp/resume", json={
            "reason": "  base URL fixed in ERP gateway  ", "by": "J. Doe"})
        again = await client.post("/sinks/erp/resume", json={"reason": "once more"})
        unknown = await client.post("/sinks/mes/resume", json={"reason": "x"})
    assert (first.status_code, first.json()) == (200, {"sink": "erp", "resumed": True})
    assert again.status_code == 200
    assert again.json() == {"sink": "erp", "resumed": False, "detail": "the sink was not paused"}
    assert unknown.status_code == 404 and "mes" in unknown.json()["error"]
    assert fake.calls == [("erp", "api:alice by J. Doe", "base URL fixed in ERP gateway"),
                          ("erp", "api:alice", "once more"), ("mes", "api:alice", "x")]


async def test_resume_refuses_what_it_cannot_record(gateways, erp, tmp_path, monkeypatch):
    gw, client = await _gateway(gateways, erp, tmp_path)
    fake = _Recorder(paused={"erp"}, known={"erp"})
    monkeypatch.setattr(gw, "resume_sink", fake, raising=False)
    cases = [
        ({}, "reason"),
        ({"reason": "   "}, "reason"),
        ({"reason": "x" * 2001}, "2000"),
        ({"reason": "ok", "by": 7}, "by"),
        ({"reason": "ok", "by": "x" * 201}, "by"),
        ({"reason": "ok", "force": True}, "unknown key"),
        (["reason"], "JSON object"),
    ]
    async with client:
        for body, words in cases:
            resp = await client.post("/sinks/erp/resume", json=body)
            assert resp.status_code == 400, body
            assert words in resp.json()["error"], body
        form = await client.post("/sinks/erp/resume", content=b'{"reason": "="}',
                                 headers={"Content-Type": "text/plain"})
        foreign = await client.post("/sinks/erp/resume", json={"reason": "x"},
                                    headers={"Origin": "http://evil.example"})
        longest = await client.post("/sinks/erp/resume", json={"reason": "x" * 2000})
    assert form.status_code == 415 and foreign.status_code == 403
    assert longest.json()["resumed"] is True
    assert [c[2] for c in fake.calls] == ["x" * 2000]


async def test_resume_is_501_where_the_gateway_cannot_resume(gateways, erp, tmp_path,
                                                             monkeypatch):
    monkeypatch.delattr(Gateway, "resume_sink", raising=False)
    _, client = await _gateway(gateways, erp, tmp_path)
    async with client:
        resp = await client.post("/sinks/erp/resume", json={"reason": "x"})
    assert resp.status_code == 501 and "resume" in resp.json()["error"]


@pytest.mark.skipif(not hasattr(Gateway, "resume_sink"),
                    reason="this gateway has no Gateway.resume_sink yet")
async def test_a_storm_paused_sink_shows_on_the_page_and_resumes(gateways, erp, tmp_path):
    """Every event answered 404 (a wrong base URL): the storm guard pauses the sink."""
    refusing = {"on": True}
    erp.reject(lambda e: refusing["on"], 404, body='{"error": "no such route"}')
    gw, client = await _gateway(gateways, erp, tmp_path)
    await gw.pipeline.submit([submission(f"L{i}") for i in range(40)])
    async with client:
        paused = await eventually(lambda: _paused(client))
        page = (await client.get("/")).text
        refusing["on"] = False
        resumed = await client.post("/sinks/erp/resume", json={
            "reason": "base URL corrected", "by": "J. Doe"})
        after = (await client.get("/status")).json()["sinks"]["erp"]
        not_paused = await client.post("/sinks/erp/resume", json={"reason": "again"})
        unknown = await client.post("/sinks/nope/resume", json={"reason": "x"})
    assert paused["code"] == "storm_guard"
    assert "PAUSED (storm_guard)" in page and "edge sink resume erp" in page
    assert resumed.json() == {"sink": "erp", "resumed": True}
    assert after.get("paused") is None
    assert not_paused.json()["resumed"] is False
    assert unknown.status_code == 404


async def _paused(client: httpx.AsyncClient) -> dict | None:
    return (await client.get("/status")).json()["sinks"]["erp"].get("paused")
