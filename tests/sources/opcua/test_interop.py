"""The same end-to-end behaviour against node-opcua, an independent server implementation.

The node-opcua station (tests/opcua_node/server.js) runs by itself: Temperature is
20 + n/100 at every 100 ms step n, part k gets serial Station7-N<k>, lot LNODE-<(k-1)//5+1>,
result fail when k is a multiple of 10. So the tests can check that nothing was skipped.
"""

from __future__ import annotations

import asyncio
import shutil
import textwrap

import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, http_sink_yaml, metric

pytestmark = pytest.mark.opcua


def _body(st, erp_url: str, *, security: str = "", login: bool = False, ack: bool = False
          ) -> str:
    text = textwrap.dedent(f"""\
        sources:
          - id: node7
            type: opcua
            endpoint: {st.endpoint}
            publishing_ms: 100
            monitored:
              - {{node: "{st.node_id('Temperature')}", sampling_ms: 0, queue_size: 50,
                  ordering_key: "t"}}
              - {{node: "/Objects/{st.ns}:Station7/{st.ns}:SpindleSpeed", sampling_ms: 0}}
            triggers:
              - node: "{st.node_id('ResultReady')}"
                event: inspection.result
                ordering_key: "lot:{{lot_id}}"
                sampling_ms: 0
                read:
                  lot_id: "{st.node_id('LotId')}"
                  serial: "{st.node_id('Serial')}"
                  result: "{st.node_id('Result')}"
                  measured: "ns={st.ns};s=Station7.Measured"
    """)
    if ack:  # handshake: the station waits for it, so every part is read, none skipped
        text += f'        ack: {{node: "{st.node_id("ResultReady")}", value: false}}\n'

    if security:
        text += f"    security: {security}\n"
    if login:
        text += "    username: gateway\n    password_file: password\n"
    return text + "sinks:\n" + http_sink_yaml(erp_url)


def _steps(erp) -> list[int]:
    return [round((e["data"]["value"] - 20.0) * 100)
            for e in events_of(erp, "machine.reading") if e["data"]["node"].endswith("Temperature")]


def _check_results(erp) -> None:
    results = events_of(erp, "inspection.result")
    parts = sorted(int(e["data"]["serial"].rsplit("N", 1)[1]) for e in results)
    assert parts == list(range(parts[0], parts[0] + len(parts))), f"parts skipped: {parts}"
    for e in results:
        part = int(e["data"]["serial"].rsplit("N", 1)[1])
        assert e["data"]["result"] == ("fail" if part % 10 == 0 else "pass")
        assert e["data"]["lot_id"] == f"LNODE-{(part - 1) // 5 + 1:04d}"
        assert e["ordering_key"] == f"lot:{e['data']['lot_id']}"


async def test_node_opcua_monitored_and_triggered(node_opcua_station, erp, gateways):
    st = await node_opcua_station("--handshake")
    gw = await gateways(_body(st, erp.url, ack=True))
    await wait_connected(gw, "node7")
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) >= 8
                       and len(_steps(r)) >= 15, 60)
    _check_results(erp)
    steps = _steps(erp)
    assert steps == list(range(steps[0], steps[0] + len(steps))), f"samples skipped: {steps}"
    speeds = [e for e in events_of(erp, "machine.reading")
              if e["data"]["node"].endswith("SpindleSpeed")]
    assert speeds and all(e["data"]["status"] == "Good" for e in speeds)


async def test_node_opcua_sign_and_encrypt_with_login(node_opcua_station, opcua_certs, erp,
                                                      gateways, tmp_path):
    st = await node_opcua_station("--user", "gateway:s3cret", "--handshake")
    (tmp_path / "password").write_text("s3cret")
    c = opcua_certs
    gw = await gateways(_body(
        st, erp.url, login=True, ack=True,
        security=f"{{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {c.client_cert},"
                 f" key_file: {c.client_key}, server_cert_file: {st.server_cert}}}"))
    await wait_connected(gw, "node7")
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) >= 3
                       and len(_steps(r)) >= 5, 60)
    _check_results(erp)


async def test_node_opcua_history_fills_a_gateway_restart(node_opcua_station, erp, gateways,
                                                          tmp_path):
    st = await node_opcua_station()
    state = tmp_path / "gw-state"
    gw1 = await gateways(_body(st, erp.url), state_dir=state)
    await wait_connected(gw1, "node7")
    await erp.wait_for(lambda r: len(_steps(r)) >= 5, 60)
    await gw1.stop()
    await asyncio.sleep(1.5)  # ~15 samples the gateway does not see live
    gw2 = await gateways(_body(st, erp.url), state_dir=state)
    await wait_connected(gw2, "node7")
    await erp.wait_for(lambda r: metric(gw2.metrics.source_backfilled, "node7") >= 10, 60)
    seen = len(_steps(erp))
    await erp.wait_for(lambda r: len(_steps(r)) >= seen + 5, 60)
    steps = sorted(_steps(erp))
    assert len(steps) == len(set(steps)), "a sample was stored twice"
    assert steps == list(range(steps[0], steps[0] + len(steps))), f"samples skipped: {steps}"
    assert sum(e["backfilled"] for e in events_of(erp, "machine.reading")) == \
        metric(gw2.metrics.source_backfilled, "node7")


async def test_node_opcua_onboarding_untrusted_gateway_until_trusted(
    node_opcua_station, opcua_certs, erp, gateways
):
    """A plant server rejects an unknown client certificate; once its administrator trusts
    it, the gateway connects by itself (retried, not a dead component)."""
    st = await node_opcua_station("--strict")
    c = opcua_certs
    gw = await gateways(_body(
        st, erp.url,
        security=f"{{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {c.client_cert},"
                 f" key_file: {c.client_key}, server_cert_file: {st.server_cert}}}"))
    status = gw.status["node7"]
    rejected = st.pki / "rejected"
    await eventually(lambda: status.state == "retrying" and any(rejected.glob("*")), timeout=60,
                     what="the server to reject the gateway certificate")
    assert "trust its certificate" in (status.error or "")
    assert str(c.client_cert) in (status.error or "")
    for f in rejected.glob("*"):  # what the administrator does
        shutil.move(str(f), st.pki / "trusted" / "certs" / f.name)
    await wait_connected(gw, "node7", timeout=90)
    await erp.wait_for(lambda r: len(_steps(r)) >= 3, 60)
