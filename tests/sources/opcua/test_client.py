"""The reconnect of the opcua source: how soon it tries again, what it says when it cannot,
and the guard that fails loudly when asyncua's private parts move."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from asyncua import ua

from edge.errors import FatalStartupError
from edge.sources.opcua import client as opcua_client
from edge.sources.opcua.client import describe_failure, reconnect_delays


def _schedule(max_delay_s: float, until_s: float) -> list[tuple[float, float]]:
    """(time of the attempt, pause after it) for an outage, with a fake clock."""
    now = [0.0]
    delays = reconnect_delays(max_delay_s, rng=random.Random(7), clock=lambda: now[0])
    out = []
    while now[0] < until_s:
        pause = next(delays)
        out.append((now[0], pause))
        now[0] += pause
    return out


def test_a_blip_is_retried_within_a_second_and_a_long_outage_backs_off_to_the_cap():
    plan = _schedule(30, 600)
    first = [p for _, p in plan[:3]]
    assert first[0] <= 0.1 and first == sorted(first)  # starts small and grows
    assert all(p <= 1.0 for t, p in plan if t < 59)  # a link back in the first minute
    late = [p for t, p in plan if t > 200]
    assert max(late) <= 30 and min(late) >= 15  # capped, jittered between half and all
    assert len({round(p, 6) for p in late}) > 1  # jitter: a fleet does not move in step


def test_the_cap_applies_from_the_start_when_it_is_small():
    assert all(p <= 0.5 for _, p in _schedule(0.5, 120))


CFG = SimpleNamespace(username="gw", connect_timeout_s=3.0, timeout_s=10.0)


@pytest.mark.parametrize(("exc", "says", "severity"), [
    (ua.uaerrors.BadUserAccessDenied(), "refused the login of gw", "critical"),
    (ua.uaerrors.BadCertificateTimeInvalid(), "validity period", "critical"),
    (ua.uaerrors.BadTooManySessions(), "no free session", "critical"),
    (ua.uaerrors.BadSecurityChecksFailed(), "secure channel was refused", "critical"),
    (TimeoutError(), "no answer within 3 s", "warning"),
    (ConnectionRefusedError(111, "refused"), "connection refused", "warning"),
    (ConnectionResetError(104, "reset"), "connection failed (ConnectionResetError", "warning"),
])
def test_each_reconnect_failure_says_why(exc, says, severity):
    reason, sev = describe_failure(exc, CFG)
    assert says in reason and sev == severity


def test_no_answer_names_the_bound_the_attempt_really_had():
    short = SimpleNamespace(username=None, connect_timeout_s=3.0, timeout_s=2.0)
    assert "no answer within 2 s" in describe_failure(TimeoutError(), short)[0]


def test_the_installed_asyncua_is_the_one_the_source_was_written_against():
    opcua_client.check_internals()  # the pinned version: nothing moved
    assert opcua_client.internals_digests() == opcua_client._INTERNALS


def test_a_moved_internal_stops_the_source_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(opcua_client._INTERNALS, "Subscription._deliver", "0" * 16)
    with pytest.raises(FatalStartupError, match="Subscription._deliver is changed"):
        opcua_client.check_internals()


def test_security_warnings_name_what_is_unsafe(opcua_certs, tmp_path: Path):
    from edge.sources.opcua.config import OpcUaSourceConfig
    from edge.sources.opcua.security import security_warnings

    (tmp_path / "pw").write_text("a-long-enough-password")
    (tmp_path / "pw").chmod(0o600)
    plain = OpcUaSourceConfig.model_validate({
        "id": "s", "type": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840",
        "username": "gw", "password_file": str(tmp_path / "pw"),
        "monitored": [{"node": "ns=2;s=X"}]})
    assert any("unencrypted" in w for w in security_warnings(plain))

    key = tmp_path / "key.pem"
    key.write_bytes(Path(opcua_certs.client_key).read_bytes())
    key.chmod(0o644)
    secure = OpcUaSourceConfig.model_validate({
        "id": "s", "type": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840",
        "security": {"policy": "Basic256Sha256", "mode": "SignAndEncrypt",
                     "cert_file": str(opcua_certs.client_cert), "key_file": str(key),
                     "server_cert_file": str(opcua_certs.server_cert)},
        "monitored": [{"node": "ns=2;s=X"}]})
    found = security_warnings(secure)
    assert any("can be read by other users" in w for w in found)
    assert not any("expires" in w or "expired" in w for w in found)
    key.chmod(0o600)
    soon = datetime.now(UTC) + timedelta(days=10_000)
    found = security_warnings(secure, now=soon)
    assert not any("other users" in w for w in found)
    assert any("server_cert_file" in w and "expired" in w for w in found)


async def test_an_unknown_item_in_the_notification_queue_is_counted_and_logged(
    opcua_station, erp, gateways, caplog
):
    """asyncua may one day put other things into the queue the source reads (its internals
    are pinned, not promised): such an item is counted and logged, not silently skipped."""
    import textwrap

    from tests.fixtures.opcua import events_of, wait_connected
    from tests.support import eventually, http_sink_yaml, metric

    st = await opcua_station()
    gw = await gateways(textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {st.endpoint}
            publishing_ms: 50
            monitored:
              - {{node: "{st.node_id('Temperature')}", sampling_ms: 0}}
        sinks:
    """) + http_sink_yaml(erp.url))
    await wait_connected(gw, "station7")
    source = gw.sources["station7"]
    source._mon_q.put_nowait(object())  # what asyncua's publish loop would hand over
    await eventually(lambda: metric(gw.metrics.source_errors, "station7",
                                    "unknown_notification") == 1,
                     timeout=30, what="the unknown item to be counted")
    assert "unknown item in the notification queue" in caplog.text
    await st.write("Temperature", 25.0)  # and the source goes on
    await erp.wait_for(lambda r: any(e["data"]["value"] == 25.0
                                     for e in events_of(r, "machine.reading")), 30)
