"""The local API against the browser (edge.api.guard): a web page on the same PC must not
act on the gateway (a form POST, a cross-site fetch, cached Basic credentials), and a
rebound DNS name must not read it. Real gateway, real uvicorn on loopback, real HTTP."""

from __future__ import annotations

import socket

import httpx
import pytest

from edge.config import load_config_text
from edge.errors import ConfigError
from tests.support import api_yaml, eventually, free_port, http_sink_yaml, submission

TOKEN = "s3cr3t-7b21e4c0ffee"
EVIL = "http://evil.example"
# What a page's <form enctype="text/plain"> with one field named '{"sink": "erp", "reason": "'
# and the value '"}' sends: a valid discard request in a body no browser asks consent for.
FORM_BODY = b'{"sink": "erp", "reason": "="}'
FORM_HEADERS = {"Content-Type": "text/plain", "Origin": EVIL, "Sec-Fetch-Site": "cross-site",
                "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
DISCARD = {"sink": "erp", "reason": "test lot, never existed"}


async def _with_dead_letter(gateways, erp, tmp_path, *, token: bool = False,
                            hosts: list[str] | None = None, port: int | None = None):
    """A gateway whose ERP refused lot L7 (one dead letter); its API's base URL and port."""
    erp.reject(lambda e: e.get("data", {}).get("lot_id") == "L7", 422)
    port = port or free_port()
    if token:
        (tmp_path / "api.token").write_text(TOKEN + "\n")
    gw = await gateways(api_yaml(port, token_file="api.token" if token else None,
                                 hosts=hosts) + "sinks:\n" + http_sink_yaml(erp.url))
    [event_id] = await gw.pipeline.submit([submission("L7")])
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers) as client:
        await eventually(lambda: _dead_letters(client))
    return url, port, event_id


async def _dead_letters(client: httpx.AsyncClient) -> list:
    resp = await client.get("/dlq")
    assert resp.status_code == 200, resp.text
    return resp.json()["dead_letters"]


async def test_a_foreign_page_cannot_discard_but_the_api_own_page_can(gateways, erp, tmp_path):
    url, port, event_id = await _with_dead_letter(gateways, erp, tmp_path)
    async with httpx.AsyncClient(base_url=url) as client:
        form = await client.post("/dlq/discard", content=FORM_BODY, headers=FORM_HEADERS)
        assert form.status_code == 403, form.text
        assert form.json()["error"] == "cross_site_request"
        # An older browser sends no Sec-Fetch-*: the Origin alone refuses it, and without
        # an Origin either the text/plain body does.
        no_fetch = {k: v for k, v in FORM_HEADERS.items() if not k.startswith("Sec-")}
        assert (await client.post("/dlq/discard", content=FORM_BODY, headers=no_fetch)
                ).json()["error"] == "foreign_origin"
        plain = await client.post("/dlq/discard", content=FORM_BODY,
                                  headers={"Content-Type": "text/plain"})
        assert (plain.status_code, plain.json()["error"]) == (415, "not_json")
        assert len(await _dead_letters(client)) == 1  # still there
        trace = (await client.get(f"/trace/{event_id}")).json()
        assert "discarded" not in [r["state"] for r in trace["audit"]]

        own = await client.post("/dlq/discard", json=DISCARD, headers={
            "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
        assert own.json() == {"discarded": 1}
        assert await _dead_letters(client) == []


@pytest.mark.parametrize("origin", [
    EVIL, "null", "http://127.0.0.1:1", "https://127.0.0.1:{port}", "http://[::1]:{port}",
    "http://127.0.0.1:{port}/", "http://localhost.:{port}",
])
async def test_json_from_a_foreign_origin_is_refused(gateways, erp, tmp_path, origin):
    url, port, _ = await _with_dead_letter(gateways, erp, tmp_path)
    async with httpx.AsyncClient(base_url=url) as client:
        resp = await client.post("/dlq/discard", json=DISCARD,
                                 headers={"Origin": origin.format(port=port)})
        assert resp.status_code == 403
        assert resp.json()["error"] == "foreign_origin"
        assert "origin" in resp.json()["detail"].lower()
        assert len(await _dead_letters(client)) == 1
        metrics = (await client.get("/metrics")).text
    assert 'edge_api_requests_refused_total{reason="foreign_origin"} 1.0' in metrics


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site", "somewhere-else"])
async def test_a_cross_site_fetch_is_refused(gateways, erp, tmp_path, site):
    url, _, _ = await _with_dead_letter(gateways, erp, tmp_path)
    async with httpx.AsyncClient(base_url=url) as client:
        resp = await client.post("/dlq/replay", json=DISCARD, headers={"Sec-Fetch-Site": site})
        assert resp.status_code == 403
        assert resp.json()["error"] == "cross_site_request"
        assert "another site" in resp.json()["detail"]
        assert len(await _dead_letters(client)) == 1


@pytest.mark.parametrize("path", ["/status", "/healthz", "/metrics", "/", "/readyz", "/dlq"])
async def test_a_host_that_does_not_name_the_api_is_refused(gateways, erp, path):
    """DNS rebinding: the page's own name resolves to 127.0.0.1, the browser sends it."""
    port = free_port()
    await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        refused = {}
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}",
                     f"[::1]:{port}", f"localhost.:{port}", f"127.0.0.1:{port}, evil.example"):
            refused[host] = await client.get(path, headers={"Host": host})
        by_ip = await client.get(path)
        by_localhost = await client.get(path, headers={"Host": f"LocalHost:{port}"})
    for host, resp in refused.items():
        assert resp.status_code == 421, host
        assert resp.json()["error"] == "misdirected_host", host
        assert "api.hosts" in resp.json()["detail"], host
    assert by_ip.status_code == 200 and by_localhost.status_code == 200


async def test_a_name_in_api_hosts_is_accepted(gateways, erp, tmp_path):
    port = free_port()
    url, _, _ = await _with_dead_letter(gateways, erp, tmp_path, port=port,
                                        hosts=[f"GW01.plant.local:{port}", "gw01:80"])
    named = {"Host": f"gw01.plant.local:{port}"}
    async with httpx.AsyncClient(base_url=url) as client:
        status = await client.get("/status", headers=named)
        metrics = await client.get("/metrics", headers={"Host": "gw01"})  # port 80: no port
        other = await client.get("/status", headers={"Host": f"gw02.plant.local:{port}"})
        cross = await client.post("/dlq/discard", json=DISCARD, headers={
            **named, "Origin": f"http://gw02.plant.local:{port}"})
        own = await client.post("/dlq/discard", json=DISCARD, headers={
            **named, "Origin": f"http://gw01.plant.local:{port}",
            "Sec-Fetch-Site": "same-origin"})
    assert status.status_code == 200 and status.json()["site"] == "test-site"
    assert metrics.status_code == 200
    assert other.status_code == 421
    assert cross.status_code == 403
    assert own.json() == {"discarded": 1}


def test_api_hosts_entries_are_checked_at_load():
    text = ("site: s\napi: {hosts: [gw01.plant.local:8080, 'http://gw01:8080', gw01, "
            "'[fd00::5]:8080', 'gw01:0']}\n")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, check_files=False)
    where = [i.location for i in info.value.issues]
    assert where == ["api.hosts[1]", "api.hosts[2]", "api.hosts[4]"]
    assert "must be host:port" in str(info.value) and "'http://gw01:8080'" in str(info.value)


async def test_basic_credentials_cannot_act(gateways, erp, tmp_path):
    """A browser adds cached Basic credentials to any page's request by itself."""
    url, _, event_id = await _with_dead_letter(gateways, erp, tmp_path, token=True)
    async with httpx.AsyncClient(base_url=url) as client:
        basic = await client.post("/dlq/discard", json=DISCARD, auth=("plant-it", TOKEN))
        reading = await client.get("/dlq", auth=("plant-it", TOKEN))
        assert basic.status_code == 401
        assert basic.json()["error"] == "basic_auth_for_action"
        assert basic.headers["www-authenticate"].startswith("Bearer")
        assert reading.status_code == 200 and reading.json()["count"] == 1  # still there
        bearer = await client.post("/dlq/discard", json=DISCARD,
                                   headers={"Authorization": f"Bearer {TOKEN}"})
        trace = (await client.get(f"/trace/{event_id}", auth=("plant-it", TOKEN))).json()
    assert bearer.json() == {"discarded": 1}
    assert trace["audit"][-1]["actor"] == "api"


async def test_the_host_check_comes_before_the_token(gateways, erp, tmp_path):
    url, port, _ = await _with_dead_letter(gateways, erp, tmp_path, token=True)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=bearer) as client:
        rebound = await client.get("/status", headers={"Host": f"evil.example:{port}"})
        health = await client.get("/healthz", headers={"Host": f"evil.example:{port}"})
        form = await client.post("/dlq/discard", content=FORM_BODY, headers=FORM_HEADERS)
        assert len(await _dead_letters(client)) == 1
    assert rebound.status_code == 421 and health.status_code == 421
    assert form.status_code == 403


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_listening_on_ipv6_loopback_names_only_that_address(gateways, erp):
    port = free_port()
    await gateways(api_yaml(port, host="::1") + "sinks:\n" + http_sink_yaml(erp.url))
    async with httpx.AsyncClient(base_url=f"http://[::1]:{port}") as client:
        by_ip = await client.get("/status")
        by_localhost = await client.get("/status", headers={"Host": f"localhost:{port}"})
        long_form = await client.get("/status", headers={"Host": f"[0:0:0:0:0:0:0:1]:{port}"})
        v4 = await client.get("/status", headers={"Host": f"127.0.0.1:{port}"})
    assert (by_ip.status_code, by_localhost.status_code, long_form.status_code) == (200,) * 3
    assert v4.status_code == 421
