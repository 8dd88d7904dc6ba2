"""The handshake half of the OPC UA source against a real asyncua station: a station that
raised a result is always served (read, stored once, acknowledged) whatever fails on the
way, and two parts shown faster than the gateway can read them are never one event."""

from __future__ import annotations

import asyncio
import json
import textwrap
from typing import Any

import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, http_sink_yaml, metric

pytestmark = pytest.mark.opcua

BAD_SENSOR_FAILURE = 0x808C0000


def _config(st: Any, endpoint: str, erp_url: str, *, ack: bool = True,
            queue_size: int = 10, extra: str = "", trigger_extra: str = "") -> str:
    ack_line = f'ack: {{node: "{st.node_id("ResultReady")}", value: false}}' if ack else ""
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {endpoint}
            timeout_s: 3
            watchdog_s: 0.5
            reconnect_max_s: 1
            {extra}
            triggers:
              - node: "{st.node_id('ResultReady')}"
                when: true
                event: inspection.result
                ordering_key: "lot:{{lot_id}}"
                sampling_ms: 0
                queue_size: {queue_size}
                {trigger_extra}
                read:
                  lot_id: "{st.node_id('LotId')}"
                  serial: "{st.node_id('Serial')}"
                  result: "{st.node_id('Result')}"
                  measured: "{st.node_id('Measured')}"
                {ack_line}
        sinks:
        """) + http_sink_yaml(erp_url)


def _counter(gw: Any, name: str, *labels: str) -> float:
    return metric(getattr(gw.metrics, name), *labels)


async def _audit(gw: Any) -> list[tuple[str, str | None, dict[str, Any]]]:
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT state, reason, detail FROM audit WHERE event_id IS NULL ORDER BY seq"
    ).fetchall())
    return [(state, reason, json.loads(detail) if detail else {}) for state, reason, detail
            in rows]


async def _wait_audit(gw: Any, state: str, timeout: float = 60) -> list[dict[str, Any]]:
    async def rows() -> list[dict[str, Any]]:
        return [d for s, _, d in await _audit(gw) if s == state]

    found: list[dict[str, Any]] = await eventually(rows, timeout=timeout,
                                                   what=f"a {state!r} audit row")
    return found


async def _wait_acked(st: Any, timeout: float = 60) -> None:
    try:
        async with asyncio.timeout(timeout):
            await st.wait_acknowledged()
    except TimeoutError:
        pytest.fail("the gateway did not acknowledge the result (ResultReady still true)")


def _serials(erp: Any) -> list[str]:
    return [e["data"]["serial"] for e in events_of(erp, "inspection.result")]


def _conditions(gw: Any) -> dict[str, tuple[str, str, float]]:
    return dict(gw.status["station7"].conditions)


def _handshake_condition(gw: Any) -> str | None:
    found = [msg for code, (_, msg, _) in _conditions(gw).items() if code.startswith("trigger")]
    return found[0] if found else None


async def test_failed_group_read_is_retried_then_stored_and_acked(opcua_station, erp, gateways):
    st = await opcua_station(handshake=True)
    gw = await gateways(_config(st, st.endpoint, erp.url))
    await wait_connected(gw, "station7")

    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0,
                            ready=False)
    await st.refuse_reads("Serial")  # every Read of the group fails (a ServiceFault)
    await st.raise_ready()
    failed = ("source_errors", "station7", "trigger_read_failed")
    await eventually(lambda: _counter(gw, *failed) >= 2, timeout=60,
                     what="the read to fail and be retried")
    assert await st.read("ResultReady") is True  # not acknowledged: nothing was stored
    assert not events_of(erp, "inspection.result")
    rows = await _wait_audit(gw, "trigger_read_failed")
    assert rows[0]["trigger"] == st.node_id("ResultReady") and "retry_in_s" in rows[0]
    await eventually(lambda: _handshake_condition(gw) is not None, timeout=30,
                     what="the /status condition")
    assert "read" in (_handshake_condition(gw) or "")

    await st.accept_reads("Serial")
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)
    assert _serials(erp) == ["S-1"]
    await eventually(lambda: _handshake_condition(gw) is None, timeout=30,
                     what="the condition to clear")
    assert "trigger_lost" not in [s for s, _, _ in await _audit(gw)]

    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 2, 30)
    assert _serials(erp) == ["S-1", "S-2"]
    assert all(n == 1 for n in erp.accepted_ids.values())


async def test_failed_ack_is_retried_with_backoff_until_it_lands(opcua_station, erp, gateways):
    st = await opcua_station(handshake=True)
    gw = await gateways(_config(st, st.endpoint, erp.url))
    await wait_connected(gw, "station7")
    await st.refuse_writes("ResultReady")  # the ack write answers BadUserAccessDenied

    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0)
    failed = ("source_errors", "station7", "ack_failed")
    await eventually(lambda: _counter(gw, *failed) >= 3, timeout=90, what="the ack to be retried")
    assert await st.read("ResultReady") is True
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)
    # Every retry re-read the still raised result and committed it again: one event.
    assert _counter(gw, "events_received", "station7") == 1
    rows = await _wait_audit(gw, "trigger_ack_failed")
    assert rows[0]["ack_node"] == st.node_id("ResultReady") and rows[0]["event_id"]
    await eventually(lambda: _handshake_condition(gw) is not None, timeout=30,
                     what="the /status condition")
    assert "ack" in (_handshake_condition(gw) or "")

    await st.accept_writes("ResultReady")
    await _wait_acked(st)
    acked = await _wait_audit(gw, "trigger_acked")
    assert acked[0]["attempts"] >= 4 and acked[0]["event_id"] == rows[0]["event_id"]
    await eventually(lambda: _handshake_condition(gw) is None, timeout=30,
                     what="the condition to clear")

    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 2, 30)
    assert _serials(erp) == ["S-1", "S-2"]
    assert _counter(gw, "events_received", "station7") == 2
    assert all(n == 1 for n in erp.accepted_ids.values())


async def test_quarantined_result_is_acked_and_audited(opcua_station, erp, gateways):
    st = await opcua_station(handshake=True)
    gw = await gateways(_config(st, st.endpoint, erp.url))
    await wait_connected(gw, "station7")

    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0,
                            ready=False)
    await st.write("Measured", None, status=BAD_SENSOR_FAILURE)
    await st.raise_ready()
    await _wait_acked(st)  # kept in quarantine, so the station may go on
    rows = await _wait_audit(gw, "trigger_quarantined")
    assert rows[0]["trigger"] == st.node_id("ResultReady")
    assert rows[0]["quarantine_reason"] == "bad_status" and rows[0]["acked"] is True
    quarantined = await gw.outbox.read(lambda c: c.execute(
        "SELECT reason, detail FROM quarantine WHERE source = 'station7'").fetchall())
    assert quarantined == [("bad_status", "measured: BadSensorFailure")]

    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)
    assert _serials(erp) == ["S-2"]
    quarantined = await gw.outbox.read(lambda c: c.execute(
        "SELECT count(*) FROM quarantine WHERE source = 'station7'").fetchall())
    assert quarantined == [(1,)]  # re-reads of the same result did not quarantine it again


async def test_result_raised_as_the_link_fails_is_read_after_the_reconnect(
    opcua_station, erp, gateways, relay_to
):
    st = await opcua_station(handshake=True)
    link = await relay_to(st.port)
    gw = await gateways(_config(st, f"opc.tcp://127.0.0.1:{link.port}", erp.url))
    await wait_connected(gw, "station7")
    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)

    # The raise reaches the gateway, its Read does not reach the station: the link is
    # lost; after the reconnect the subscription is transferred without initial values,
    # so only a re-read finds the result still raised.
    link.drop_upstream = True
    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await eventually(lambda: not gw.status["station7"].connected, timeout=30,
                     what="the loss to be noticed")
    await link.cut("reset")
    await asyncio.sleep(0.5)  # the outage goes on for a moment (not a timing assertion)
    await link.restore()
    await wait_connected(gw, "station7", timeout=60)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 2, 30)
    assert _serials(erp) == ["S-1", "S-2"]

    await st.publish_result(serial="S-3", lot_id="L-1", result="pass", measured=3.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 3, 30)
    assert _serials(erp) == ["S-1", "S-2", "S-3"]
    assert all(n == 1 for n in erp.accepted_ids.values())
    states = [s for s, _, _ in await _audit(gw)]
    assert "reconnected" in states and "trigger_read_failed" in states
    assert "trigger_lost" not in states


async def test_result_raised_while_disconnected_is_read_after_the_reconnect(
    opcua_station, erp, gateways, relay_to
):
    st = await opcua_station(handshake=True)
    link = await relay_to(st.port)
    gw = await gateways(_config(st, f"opc.tcp://127.0.0.1:{link.port}", erp.url))
    await wait_connected(gw, "station7")
    await link.cut("reset")
    await eventually(lambda: not gw.status["station7"].connected, timeout=30,
                     what="the loss to be noticed")
    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0)
    await asyncio.sleep(0.5)  # the outage goes on for a moment (not a timing assertion)
    await link.restore()
    await wait_connected(gw, "station7", timeout=60)
    await _wait_acked(st)
    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 2, 30)
    assert _serials(erp) == ["S-1", "S-2"]
    assert all(n == 1 for n in erp.accepted_ids.values())


async def test_two_raises_within_one_publishing_interval_are_never_one_part(
    opcua_station, erp, gateways
):
    st = await opcua_station()  # no handshake: the station does not wait for the gateway
    gw = await gateways(_config(st, st.endpoint, erp.url, ack=False))
    await wait_connected(gw, "station7")
    await st.publish_result(serial="S-0", lot_id="L-1", result="pass", measured=1.0)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)
    await st.write("ResultReady", False)
    missed = ("source_dropped", "station7", "trigger_missed")

    # true → false → true before the gateway could read: part 1's values are gone.
    raised = await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.1)
    assert raised["Serial"] == "S-1"
    await st.write("ResultReady", False)
    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=1.2)
    await eventually(lambda: "S-2" in _serials(erp), timeout=60, what="part 2 to be stored")

    # The same with the trigger already down again when the gateway reads.
    await st.write("ResultReady", False)
    await st.publish_result(serial="S-3", lot_id="L-1", result="pass", measured=1.3)
    await st.write("ResultReady", False)
    await st.publish_result(serial="S-4", lot_id="L-1", result="pass", measured=1.4)
    await st.write("ResultReady", False)
    await eventually(lambda: "S-4" in _serials(erp), timeout=60, what="part 4 to be stored")

    # A sentinel after everything (same ordering key: FIFO), then compare.
    await st.publish_result(serial="S-5", lot_id="L-1", result="pass", measured=1.5)
    await erp.wait_for(lambda r: "S-5" in _serials(r), 30)
    serials = _serials(erp)
    assert len(serials) == len(set(serials)), f"a part was stored twice: {serials}"
    assert all(n == 1 for n in erp.accepted_ids.values())
    lost = [s for s in ("S-1", "S-3") if s not in serials]
    assert _counter(gw, *missed) == len(lost) >= 1, (serials, _counter(gw, *missed))
    rows = await _wait_audit(gw, "trigger_missed")
    assert sum(r["count"] for r in rows) == len(lost)
    assert all(r["trigger"] == st.node_id("ResultReady") and r["trigger_ts"] for r in rows)
    # Each stored part carries its own values (never a later part's under an earlier id).
    for e in events_of(erp, "inspection.result"):
        assert e["data"]["measured"] == pytest.approx(1.0 + int(e["data"]["serial"][2:]) / 10)


async def test_the_same_serial_raised_twice_is_stored_once_and_counted(
    opcua_station, erp, gateways
):
    st = await opcua_station()
    gw = await gateways(_config(st, st.endpoint, erp.url, ack=False,
                                trigger_extra='dedupe_key: "{serial}"'))
    await wait_connected(gw, "station7")
    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0)
    await erp.wait_for(lambda r: len(events_of(r, "inspection.result")) == 1, 30)
    await st.write("ResultReady", False)
    # The station shows part S-1 again (a corrected value, the same serial): one part.
    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.05)
    missed = ("source_dropped", "station7", "trigger_missed")
    await eventually(lambda: _counter(gw, *missed) == 1, timeout=60,
                     what="the repeat to be counted")
    await _wait_audit(gw, "trigger_missed")
    rows = [(r, d) for s, r, d in await _audit(gw) if s == "trigger_missed"]
    assert [r for r, _ in rows] == ["same_result"] and rows[0][1]["count"] == 1
    await st.write("ResultReady", False)
    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await erp.wait_for(lambda r: "S-2" in _serials(r), 30)
    assert _serials(erp) == ["S-1", "S-2"]
    assert _counter(gw, "events_received", "station7") == 2


async def test_trigger_queue_overflow_is_audited_and_the_station_still_served(
    opcua_station, erp, gateways
):
    st = await opcua_station(handshake=True)
    gw = await gateways(_config(st, st.endpoint, erp.url, queue_size=1000, extra="queue_max: 10"))
    await wait_connected(gw, "station7")
    # Hundreds of changes of the trigger within one publishing interval: more than the
    # gateway's trigger queue (100) holds; the last one raises a real result.
    await st.publish_result(serial="S-1", lot_id="L-1", result="pass", measured=1.0,
                            ready=False)
    for _ in range(300):
        await st.write("ResultReady", True)
        await st.write("ResultReady", False)
    await st.raise_ready()
    dropped = ("source_dropped", "station7", "trigger_queue_full")
    await eventually(lambda: _counter(gw, *dropped) > 0, timeout=60, what="the overflow")
    await _wait_acked(st)  # the raise after the storm is served all the same
    await erp.wait_for(lambda r: "S-1" in _serials(r), 30)
    await _wait_audit(gw, "trigger_dropped")
    rows = [(r, d) for s, r, d in await _audit(gw) if s == "trigger_dropped"]
    assert rows and {r for r, _ in rows} == {"trigger_queue_full"}
    assert sum(d["dropped"] for _, d in rows) == _counter(gw, *dropped)
    await st.publish_result(serial="S-2", lot_id="L-1", result="pass", measured=2.0)
    await _wait_acked(st)
    await erp.wait_for(lambda r: "S-2" in _serials(r), 30)
    assert _serials(erp) == ["S-1", "S-2"]
    assert all(n == 1 for n in erp.accepted_ids.values())
