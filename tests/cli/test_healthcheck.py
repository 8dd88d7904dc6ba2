"""``edge healthcheck`` as a container's HEALTHCHECK runs it: a subprocess reading the
gateway's config and probing a real running gateway's local API."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.support import api_yaml, free_port, run_edge, sink_yaml

TOKEN = "ops 7f3a9c4e-health-probe-token\n"


def _config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {tmp_path / 'state'}\n" + body)
    return cfg


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_healthy_and_ready_through_a_token_protected_api(gateways, erp, tmp_path):
    (tmp_path / "api.token").write_text(TOKEN)
    body = api_yaml(free_port(), token_file="api.token") + sink_yaml(erp.url)
    cfg = _config(tmp_path, body)
    await gateways(body)

    rc, out, err = await run_edge("healthcheck", "-c", str(cfg), cwd=tmp_path)
    assert rc == 0, err
    assert out.startswith("healthy: ") and "/healthz" in out and out.count("\n") == 1
    # /readyz needs the token: the probe reads it from api.token_file
    rc, out, err = await run_edge("healthcheck", "-c", str(cfg), "--ready", cwd=tmp_path)
    assert rc == 0, err
    assert "/readyz answered 200" in out


async def test_not_ready_is_exit_1_with_the_reason(gateways, tmp_path):
    body = api_yaml(free_port())  # no sink: alive, not ready
    cfg = _config(tmp_path, body)
    await gateways(body)
    rc, _, _ = await run_edge("healthcheck", "-c", str(cfg), cwd=tmp_path)
    assert rc == 0
    rc, out, err = await run_edge("healthcheck", "-c", str(cfg), "--ready", cwd=tmp_path)
    assert rc == 1 and out == ""
    assert "answered 503: no_sinks" in err and err.count("\n") == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::1"])
async def test_wildcard_and_ipv6_listen_addresses(gateways, erp, tmp_path, host):
    if ":" in host and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    (tmp_path / "api.token").write_text(TOKEN)
    body = api_yaml(free_port(), token_file="api.token", host=host) + sink_yaml(erp.url)
    cfg = _config(tmp_path, body)
    await gateways(body)
    rc, out, err = await run_edge("healthcheck", "-c", str(cfg), "--ready", cwd=tmp_path)
    assert rc == 0, err
    expected = "http://127.0.0.1:" if host == "0.0.0.0" else "http://[::1]:"
    assert expected in out


async def test_nothing_listening_is_unhealthy(tmp_path):
    cfg = _config(tmp_path, api_yaml(free_port()))
    rc, out, err = await run_edge("healthcheck", "-c", str(cfg), cwd=tmp_path)
    assert rc == 1 and out == ""
    assert "not running" in err and err.count("\n") == 1


async def test_alive_but_not_ready_while_the_outbox_is_opened_at_start(gateways, erp,
                                                                       tmp_path, monkeypatch):
    """The API answers before the outbox is checked and opened: the container's probe
    (/healthz) passes during a long start, while --ready says "starting" until the
    gateway takes events."""
    from edge.outbox import Outbox

    checked = asyncio.Event()
    real_open = Outbox.open

    async def slow_open(self, *args, **kwargs):
        await checked.wait()
        return await real_open(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, "open", slow_open)
    port = free_port()
    body = api_yaml(port) + sink_yaml(erp.url)
    cfg = _config(tmp_path, body)
    starting = asyncio.create_task(gateways(body))
    try:
        for _ in range(20):  # until the API answers (the port is bound early)
            rc, out, err = await run_edge("healthcheck", "-c", str(cfg), "--timeout", "2",
                                          cwd=tmp_path)
            if rc == 0:
                break
            await asyncio.sleep(0.1)
        assert rc == 0 and "answered 200" in out, err
        rc, out, err = await run_edge("healthcheck", "-c", str(cfg), "--ready", cwd=tmp_path)
        assert rc == 1 and out == ""
        assert "answered 503: starting" in err
        assert not starting.done()
    finally:
        checked.set()
        await starting
    rc, _, err = await run_edge("healthcheck", "-c", str(cfg), "--ready", cwd=tmp_path)
    assert rc == 0, err


async def test_bad_config_or_api_off_is_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: test-site\napi: {listen: 'nowhere'}\n")
    rc, _, err = await run_edge("healthcheck", "-c", str(bad), cwd=tmp_path)
    assert rc == 2 and "api.listen" in err
    rc, _, err = await run_edge("healthcheck", "-c", str(tmp_path / "missing.yaml"),
                                cwd=tmp_path)
    assert rc == 2
    off = _config(tmp_path, "api: {enabled: false}\n")
    rc, _, err = await run_edge("healthcheck", "-c", str(off), cwd=tmp_path)
    assert rc == 2 and "api.enabled: false" in err


@pytest.mark.parametrize("api", [
    "",
    "api: {listen: '0.0.0.0:8080', token_file: api.token}\n",
    "api: {listen: '[::1]:9090'}\n",
    "api: {listen: 'localhost:9090', enabled: false}\n",
    "api:\n  listen: '127.0.0.1:${EDGE_TEST_PORT:-7070}'\n"
    "  token_file: '${CREDENTIALS_DIRECTORY}/api'\n"
    "  hosts: ['gw01.plant.local:7070']\n",
])
def test_the_quick_read_of_the_api_section_agrees_with_the_full_validation(tmp_path, api,
                                                                           monkeypatch):
    """The probe reads only ``api`` (fast, every few seconds): it must come to the same
    address, token file and switch as ``edge run``'s validation of the whole file."""
    from edge.cli.common import load_or_exit
    from edge.cli.healthcheck import DEFAULT_LISTEN, peek_api
    from edge.config import ApiConfig

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert ApiConfig.model_fields["listen"].default == DEFAULT_LISTEN
    cfg = _config(tmp_path, api)
    quick = peek_api(str(cfg))
    full = load_or_exit(str(cfg), check_files=False).api
    assert quick is not None
    assert quick == (full.host, full.port, full.token_file, full.enabled)
