"""Token protection: every endpoint but /healthz needs the token from api.token_file."""

from __future__ import annotations

import logging

import httpx
import pytest

from edge.errors import FatalStartupError
from tests.support import api_yaml, eventually, free_port, http_sink_yaml, submission

TOKEN = "s3cr3t-7b21e4c0ffee"
OTHER = "0th3r-token-for-the-mes-team"


async def _gateway(gateways, erp, tmp_path, token_text: str):
    (tmp_path / "api.token").write_text(token_text)
    port = free_port()
    gw = await gateways(api_yaml(port, token_file="api.token") + "sinks:\n"
                        + http_sink_yaml(erp.url))
    return gw, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("path", ["/status", "/readyz", "/metrics", "/", "/dlq", "/trace?key=x"])
async def test_every_endpoint_but_healthz_needs_the_token(gateways, erp, tmp_path, path):
    _, url = await _gateway(gateways, erp, tmp_path, TOKEN + "\n")
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
        missing = await client.get(path)
        wrong = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}x"})
        right = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert "www-authenticate" in missing.headers
    assert right.status_code in (200, 404)  # /trace?key=x: authorised, nothing found


async def test_the_page_accepts_the_token_as_basic_password(gateways, erp, tmp_path):
    """A browser cannot send a Bearer header; it asks for Basic credentials instead."""
    _, url = await _gateway(gateways, erp, tmp_path, TOKEN)
    async with httpx.AsyncClient(base_url=url) as client:
        challenge = await client.get("/")
        page = await client.get("/", auth=("plant-it", TOKEN))
        wrong = await client.get("/", auth=("plant-it", "guess"))
    assert challenge.status_code == 401
    assert challenge.headers["www-authenticate"].startswith("Basic")
    assert page.status_code == 200 and "test-site" in page.text
    assert wrong.status_code == 401


async def test_named_token_is_the_actor_in_the_audit_trail(gateways, erp, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    erp.reject(lambda e: True, 422)
    gw, url = await _gateway(gateways, erp, tmp_path,
                             f"# operators\nalice {TOKEN}   # shift lead\n{OTHER}\n")
    [event_id] = await gw.pipeline.submit([submission("L1")])
    alice = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=alice) as client:
        await eventually(lambda: _dead_letters(client))
        resp = await client.post("/dlq/discard", json={"sink": "erp", "reason": "duplicate lot"})
        assert resp.json() == {"discarded": 1}
        trace = (await client.get(f"/trace/{event_id}")).json()
        status = (await client.get("/status")).text
        other = await client.get("/status", headers={"Authorization": f"Bearer {OTHER}"})
    assert trace["audit"][-1]["actor"] == "api:alice"
    assert other.status_code == 200
    assert TOKEN not in status
    assert not [r for r in caplog.records if TOKEN in r.getMessage() or TOKEN in str(
        getattr(r, "fields", ""))]


async def _dead_letters(client: httpx.AsyncClient) -> int:
    return (await client.get("/status")).json()["outbox"]["dead_letters"]


async def test_an_empty_token_file_stops_the_start(gateways, erp, tmp_path):
    with pytest.raises(FatalStartupError, match="no token"):
        await _gateway(gateways, erp, tmp_path, "# nothing yet\n\n")
