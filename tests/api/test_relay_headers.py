"""The relay's HTTP endpoints carry the same security headers as the gateway's API."""

from __future__ import annotations

from types import SimpleNamespace

import httpx

from edge.relay.api import RelayApi
from edge.telemetry import Metrics


async def test_every_relay_response_carries_the_security_headers():
    # a relay that has not connected yet: the endpoints answer from these fields only
    relay = SimpleNamespace(metrics=Metrics(), nc=None, forwarders={}, ownership=None,
                            started=False, queue=None, sinks={},
                            status=lambda: {"relay_id": "r1"})
    api = RelayApi(relay, "127.0.0.1:0")
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url) as client:
            answers = [await client.get(p) for p in ("/healthz", "/readyz", "/status",
                                                     "/metrics", "/nope")]
    finally:
        await api.close()
    assert [r.status_code for r in answers] == [200, 503, 200, 200, 404]
    for resp in answers:
        assert resp.headers["content-security-policy"] == (
            "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"
        assert resp.headers["x-frame-options"] == "DENY"
        assert resp.headers["cache-control"] == "no-store"
