"""A blip costs a blip, and a source that cannot get back says why: the link to a real
asyncua station runs through a TCP relay on loopback that the test cuts and restores."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, http_sink_yaml

pytestmark = pytest.mark.opcua


def _body(endpoint: str, st, erp_url: str) -> str:
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {endpoint}
            publishing_ms: 50
            watchdog_s: 0.5
            connect_timeout_s: 1
            monitored:
              - {{node: "{st.node_id('Temperature')}", sampling_ms: 0, ordering_key: "t"}}
        sinks:
    """) + http_sink_yaml(erp_url)


def _condition(gw) -> str:
    found = [c["message"] for c in gw.status["station7"].to_dict()["conditions"]
             if c["code"] == "reconnect"]
    return found[0] if found else ""


@pytest.mark.parametrize(("mode", "reason"), [
    ("reset", "connection refused"),  # the far side closes: each attempt fails at once
    ("blackhole", "no answer within 1 s"),  # nothing answers: each attempt is cut short
])
async def test_a_cut_link_says_why_and_the_source_is_back_when_the_link_is(
    opcua_station, erp, gateways, relay_to, mode, reason
):
    st = await opcua_station()
    relay = await relay_to(st.port)
    gw = await gateways(_body(relay.url(), st, erp.url))
    await wait_connected(gw, "station7")
    await st.write("Temperature", 20.5)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 20.5
                                     for e in events_of(r, "machine.reading")), 30)

    for round_ in (1, 2):  # the second outage must be noticed like the first
        await relay.cut(mode)
        await eventually(lambda: reason in _condition(gw), timeout=60,
                         what=f"the reason {reason!r} in /status (outage {round_})")
        assert not gw.status["station7"].connected
        report = await gw.status_report()
        shown = [c for comp in report["components"] if comp["id"] == "station7"
                 for c in comp["conditions"]]
        assert shown and reason in shown[0]["message"]

        await relay.restore()
        await wait_connected(gw, "station7", timeout=60)
        await eventually(lambda: _condition(gw) == "", timeout=30, what="the reason to be cleared")
        value = 21.5 + round_
        await st.write("Temperature", value)
        await erp.wait_for(lambda r, v=value: any(e["data"]["value"] == v
                                                  for e in events_of(r, "machine.reading")), 30)


async def test_a_login_refused_on_reconnect_is_shown_as_critical_until_it_is_accepted(
    opcua_station, opcua_certs, erp, gateways, relay_to, tmp_path
):
    """The station's administrator changes the gateway's password while the link is down:
    the reconnect is refused, and /status says so (not just "reconnecting")."""
    c = opcua_certs
    st = await opcua_station(security=["Basic256Sha256"], cert_file=c.server_cert,
                             key_file=c.server_key, users={"gw": "first-password-1"})
    relay = await relay_to(st.port)
    secret = tmp_path / "station7.pw"
    secret.write_text("first-password-1")
    secret.chmod(0o600)
    body = _body(relay.url(), st, erp.url).replace(
        "    publishing_ms: 50\n",
        "    publishing_ms: 50\n"
        "    username: gw\n"
        f"    password_file: {secret}\n"
        "    security: {policy: Basic256Sha256, mode: SignAndEncrypt, "
        f"cert_file: {c.client_cert}, key_file: {c.client_key}, "
        f"server_cert_file: {c.server_cert}}}\n")
    gw = await gateways(body)
    try:
        await wait_connected(gw, "station7")
    except AssertionError:
        raise AssertionError(gw.status["station7"].error) from None

    st.users["gw"] = "second-password-2"
    await relay.cut("reset")
    await relay.restore()
    await eventually(lambda: "refused the login of gw" in _condition(gw), timeout=60,
                     what="the refused login in /status")
    report = await gw.status_report()
    shown = [c for comp in report["components"] if comp["id"] == "station7"
             for c in comp["conditions"] if c["code"] == "reconnect"]
    assert shown[0]["severity"] == "critical"
    assert "second-password-2" not in str(report) and "first-password-1" not in str(report)

    st.users["gw"] = "first-password-1"  # the administrator puts it back
    await wait_connected(gw, "station7", timeout=60)
    await eventually(lambda: _condition(gw) == "", timeout=30, what="the reason to be cleared")


async def test_values_lost_on_the_way_back_are_replayed_before_newer_ones(
    opcua_station, erp, gateways, relay_to
):
    """Publish responses lost on the way back (the server sent them, the gateway never got
    them) are asked for again after the reconnect (Republish on the transferred
    subscription) and committed before the values the server queued meanwhile. The node
    does not historize: the replay is the only way back for those values."""
    st = await opcua_station()
    relay = await relay_to(st.port)
    body = _body(relay.url(), st, erp.url).replace(
        f"node: \"{st.node_id('Temperature')}\"", f"node: \"{st.node_id('SpindleSpeed')}\"")
    gw = await gateways(body)
    await wait_connected(gw, "station7")
    await st.write("SpindleSpeed", 1000.0)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 1000.0
                                     for e in events_of(r, "machine.reading")), 30)

    relay.drop_downstream = True
    for v in (1001.0, 1002.0):
        await st.write("SpindleSpeed", v)
        await asyncio.sleep(0.3)  # a publish each: sent by the server, lost on the way
    await relay.cut("reset")
    relay.drop_downstream = False
    await st.write("SpindleSpeed", 1003.0)  # queued on the server while the link is down
    await relay.restore()
    await wait_connected(gw, "station7", timeout=60)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 1003.0
                                     for e in events_of(r, "machine.reading")), 30)
    await st.write("SpindleSpeed", 1004.0)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 1004.0
                                     for e in events_of(r, "machine.reading")), 30)
    values = [e["data"]["value"] for e in events_of(erp, "machine.reading")]
    assert values == [v for v in values if v >= 1000.0]  # nothing else on this node
    assert values[-5:] == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0], values
