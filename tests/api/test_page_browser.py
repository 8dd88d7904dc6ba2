"""The status page in a real browser: headless Debian chromium loads ``/`` from a real
gateway (MQTT source on a private mosquitto, a stand-in ERP that refuses one lot, a QMS
that cannot be reached, a source whose broker is gone), a screenshot is saved, and the
figures in the rendered DOM are those of ``/status``. Every response of the API carries
the security headers."""

from __future__ import annotations

import asyncio
import html
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.api import history, page
from tests.fixtures.mosquitto import inspection, start_publisher, wait_connected
from tests.support import (
    api_yaml,
    eventually,
    free_port,
    http_sink_yaml,
    mqtt_source_yaml,
    stop_async_process,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it; or "
    "apt-get install chromium): the status page's browser test needs a real browser")
HOSTILE = "<script>document.title='pwned'</script>"
REFUSAL = f'{{"error": "lot closed {HOSTILE}"}}'


def _sources(broker_url: str, dead_broker_port: int) -> str:
    line1 = mqtt_source_yaml(broker_url, client_id="edge-page-test-line1")
    line2 = mqtt_source_yaml(f"mqtt://127.0.0.1:{dead_broker_port}", source_id="line2",
                             client_id="edge-page-test-line2")
    return line1 + line2.removeprefix("sources:\n")


def _qms_sink(port: int) -> str:
    """A sink nobody answers for, whose circuit stays open once opened (a stable state)."""
    return textwrap.indent(textwrap.dedent(f"""\
        - id: qms
          type: http
          url: http://127.0.0.1:{port}
          retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.2}}
          circuit_breaker: {{failure_threshold: 3, open_s: 120, max_open_s: 120}}
          routes: [{{events: ["*"], method: POST, path: /events}}]
        """), "  ")


async def _browser(*args: str, profile: Path, timeout: float = 60) -> tuple[str, str]:
    """Run headless chromium with ``args``: (stdout, its log), the log with the page's
    console, where a Content-Security-Policy violation is reported."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, log = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            await stop_async_process(proc)
    return out.decode(), log.decode(errors="replace")


def _field(dom: str, name: str, scope: str = "") -> str:
    """Text of the element with ``data-field=name`` (after ``scope`` in the DOM)."""
    start = dom.index(scope) if scope else 0
    m = re.search(rf"data-field=\"{re.escape(name)}\"[^>]*>(.*?)</(?:td|span|b|p|h1|code)>",
                  dom[start:], re.S)
    assert m, f"no data-field={name} after {scope!r}"
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).strip()


async def _settled(client: httpx.AsyncClient) -> dict[str, Any] | None:
    doc = (await client.get("/status")).json()
    erp, qms = doc["sinks"]["erp"], doc["sinks"]["qms"]
    line2 = next(c for c in doc["components"] if c["id"] == "line2")
    if (erp["dead_letters"] == 1 and erp["total"] == 1 and qms["up"] is False
            and qms["total"] == 7 and line2["connected"] is False and erp["delivered"] >= 5):
        return doc
    return None


@needs_chromium
async def test_the_page_in_a_real_browser_shows_what_status_says(
        gateways, erp, mosquitto, tmp_path, monkeypatch):
    monkeypatch.setattr(history, "SAMPLE_EVERY_S", 0.2)  # a chart within the test's seconds
    erp.reject(lambda e: e.get("data", {}).get("lot_id") == "BAD", 422, body=REFUSAL)
    port = free_port()
    gw = await gateways(api_yaml(port) + _sources(mosquitto.url, free_port()) + "sinks:\n"
                        + http_sink_yaml(erp.url) + _qms_sink(free_port()))
    await wait_connected(gw, "line1")
    pub = await start_publisher(mosquitto.url)
    try:
        for i in range(5):
            pub.publish(*inspection(f"m{i}", lot=f"L{i}"), key=f"m{i}")
        for i in range(2):  # the second waits behind the first's dead letter (lot parked)
            pub.publish(*inspection(f"bad{i}", lot="BAD"), key=f"bad{i}")
        assert await asyncio.to_thread(pub.wait_acked, 10)
    finally:
        await asyncio.to_thread(pub.stop)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as client:
        await eventually(lambda: _settled(client), what="the known state")
        await asyncio.sleep(0.5)  # a few history samples with the intake in them
        status = (await client.get("/status")).json()
        shot = tmp_path / "status-page.png"
        dom, log = await _browser("--dump-dom", f"{url}/", profile=tmp_path / "chromium")
        await _browser(f"--screenshot={shot}", "--window-size=1280,1600",
                       "--hide-scrollbars", f"{url}/", profile=tmp_path / "chromium")
        after = (await client.get("/status")).json()["health"]
    # the state did not change while the browser loaded the page
    assert (after["state"], after["problems"][0]) == (status["health"]["state"],
                                                      status["health"]["problems"][0])
    assert shot.exists() and shot.stat().st_size > 10_000
    # the page works under its own policy: nothing blocked (its stylesheet is allowed by
    # hash, the charts are inline SVG without style attributes)
    assert [x for x in log.splitlines() if "Content Security Policy" in x] == []
    assert "<style>" in dom and "</html>" in dom
    assert "<svg" in dom and "polyline" in dom, "the chart of the last hour is drawn"
    # the verdict and its reason: the first problem /status names
    health = status["health"]
    assert _field(dom, "health") == page.LABELS[health["state"]] == "PROBLEM"
    first = health["problems"][0]
    assert _field(dom, "health-reason").startswith(f"{first['subject']}: {first['message']}")
    assert "qms" in first["subject"]
    # sinks: state, queued, dead letters as /status counts them
    for sid in ("erp", "qms"):
        row = f'data-sink="{sid}"'
        assert int(_field(dom, "queued", row)) == status["sinks"][sid]["total"]
        assert int(_field(dom, "dead-letters", row)) == status["sinks"][sid]["dead_letters"]
    assert _field(dom, "state", 'data-sink="erp"') == "delivering"
    assert _field(dom, "state", 'data-sink="qms"').startswith("NO (circuit open")
    assert _field(dom, "last-delivery", 'data-sink="qms"') == "never"
    queued = sum(s["total"] for s in status["sinks"].values())
    assert int(_field(dom, "queued")) == queued == 8
    assert int(_field(dom, "dead-letters")) == status["outbox"]["dead_letters"] == 1
    assert int(_field(dom, "parked")) == 1
    # the dead letter's reason, escaped: the receiver's script is text, never a script
    assert _field(dom, "dead-letter-reason") == "HTTP 422 Unprocessable Entity"
    assert HOSTILE in _field(dom, "dead-letter-response", "dead-letter-reason")
    assert "<script>" not in dom and "pwned" not in _title(dom)
    # sources: connected or not
    assert _field(dom, "connected", 'data-source="line1"') == "yes"
    assert _field(dom, "connected", 'data-source="line2"') == "NO"
    # the disk budget makes no forecast from a few seconds of history
    assert _field(dom, "disk-forecast").startswith("not enough history yet")


def _title(dom: str) -> str:
    m = re.search(r"<title>(.*?)</title>", dom, re.S)
    return m.group(1) if m else ""


SECURITY = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def _check_headers(resp: httpx.Response, what: str) -> None:
    csp = resp.headers.get("content-security-policy", "")
    for directive in ("default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'",
                      "form-action 'none'"):
        assert directive in csp, f"{what}: {directive!r} missing from {csp!r}"
    assert "unsafe-inline" not in csp and "http" not in csp
    for name, value in SECURITY.items():
        assert resp.headers.get(name) == value, f"{what}: {name}"
    assert resp.headers.get("cache-control") == "no-store", what


async def test_every_response_carries_the_security_headers(gateways, erp, tmp_path,
                                                           monkeypatch):
    (tmp_path / "api.token").write_text("s3cr3t-7b21e4c0ffee\n")
    port = free_port()
    gw = await gateways(api_yaml(port, token_file="api.token") + "sinks:\n"
                        + http_sink_yaml(erp.url))
    auth = {"Authorization": "Bearer s3cr3t-7b21e4c0ffee"}

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        with monkeypatch.context() as patch:
            patch.setattr(gw.outbox, "read", broken)
            crashed = await client.get("/dlq", headers=auth)
        answers = {
            "500": crashed,
            "page": await client.get("/", headers=auth),
            "status": await client.get("/status", headers=auth),
            "metrics": await client.get("/metrics", headers=auth),
            "healthz": await client.get("/healthz"),
            "404": await client.get("/nope", headers=auth),
            "400": await client.get("/dlq?limit=x", headers=auth),
            "401 (token guard)": await client.get("/status"),
            "421 (browser guard)": await client.get("/status", headers={"Host": "evil.example"}),
            "405": await client.put("/status", headers={**auth, "Content-Type":
                                                        "application/json"}),
        }
    expected = {"500": 500, "page": 200, "status": 200, "metrics": 200, "healthz": 200, "404": 404,
                "400": 400, "401 (token guard)": 401, "421 (browser guard)": 421, "405": 405}
    assert {k: r.status_code for k, r in answers.items()} == expected
    for what, resp in answers.items():
        _check_headers(resp, what)
    # the page's one stylesheet is allowed by its hash, nothing else
    csp = answers["page"].headers["content-security-policy"]
    assert f"style-src {page.STYLE_HASH}" in csp
    assert "<script" not in answers["page"].text and " style=" not in answers["page"].text


def test_values_from_config_and_receivers_are_escaped():
    report = {"site": "plant<x-site>", "version": "1", "uptime_s": 5, "alarms": [],
              "components": [{"id": "line<x-src>", "kind": "source", "type": "mqtt",
                              "state": "running", "connected": False,
                              "error": HOSTILE}],
              "outbox": {"events": 1, "accepting": True, "dead_letters": 1,
                         "budget": {"used_bytes": 1, "budget_bytes": 2, "percent": 50.0,
                                    "forecast": {"state": "not_growing",
                                                 "text": "not growing"}}},
              "sinks": {HOSTILE: {"total": 1, "depth": {"high": 1}, "dead_letters": 1,
                                  "up": False, "circuit": "<open>", "last_error": HOSTILE}}}
    extras = page.Extras(dead_letters={"total": 1, "groups": [
        {"sink": HOSTILE, "status": 422, "reason": HOSTILE, "count": 1, "latest_id": 1,
         "latest_at": 0.0}]}, source_gaps={"line<x-src>": 2})
    out = page.render(report, [{"code": "x", "message": HOSTILE}], extras, now=10.0)
    assert "<script" not in out and "<x-" not in out and "<open>" not in out
    assert html.escape(HOSTILE) in out and "plant&lt;x-site&gt;" in out
