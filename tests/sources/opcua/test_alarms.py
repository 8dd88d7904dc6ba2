"""OPC UA Alarms & Conditions end to end: a real asyncua station raises, acknowledges and
clears alarms → the gateway's event subscription → ``machine.alarm`` events at the ERP,
classed by severity, filtered on the server, refreshed (ConditionRefresh) after a
reconnect without storing a condition twice."""

from __future__ import annotations

import textwrap
from datetime import datetime
from typing import Any

import orjson
import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, http_sink_yaml, metric

pytestmark = pytest.mark.opcua


def _body(endpoint: str, erp_url: str, *, alarm: str = "") -> str:
    """One source with one ``alarms`` entry (``alarm``: more keys of the entry)."""
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {endpoint}
            publishing_ms: 50
            watchdog_s: 0.5
            connect_timeout_s: 1
            reconnect_max_s: 2
            alarms:
              - static: {{station: Station7}}
        """) + textwrap.indent(textwrap.dedent(alarm), "        ") + "sinks:\n" \
        + http_sink_yaml(erp_url)


def alarms(erp: Any) -> list[dict[str, Any]]:
    return events_of(erp, "machine.alarm")


def _by_id(erp: Any, event_id: str) -> list[dict[str, Any]]:
    return [e for e in alarms(erp) if e["data"]["event_id"] == event_id]


async def _audit(gw: Any, state: str) -> list[tuple[str | None, dict[str, Any]]]:
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT reason, detail FROM audit WHERE event_id IS NULL AND state = ? ORDER BY seq",
        (state,)).fetchall())
    return [(r[0], orjson.loads(r[1]) if r[1] else {}) for r in rows]


async def test_alarms_become_events_classed_by_severity_and_filtered_on_the_server(
    opcua_station, erp, gateways
):
    st = await opcua_station()
    gw = await gateways(_body(st.endpoint, erp.url, alarm="""\
          select: {input: InputNode}
          where: {min_severity: 300}
          severity_classes:
            - {min: 900, class: critical, name: emergency}
            - {min: 500, class: high}
            - {min: 300, class: normal, name: warning}
        """))
    await wait_connected(gw, "station7")
    # the first connect's refresh ends before the station raises anything: "connected"
    # comes first, and a refresh still running would return the alarms raised below
    await eventually(lambda: _audit(gw, "alarms_refreshed"), what="the first refresh")

    hot = await st.raise_alarm("Overheat", severity=950, message="Temperature above 80 C")
    await st.raise_alarm("Drift", severity=100, source="SpindleSpeed")  # below the where
    speed = await st.raise_alarm("Vibration", severity=600, source="SpindleSpeed")
    warn = await st.raise_alarm("Coolant", severity=300, event_type="OffNormalAlarmType")
    acked = await st.acknowledge_alarm("Overheat")
    cleared = await st.clear_alarm("Overheat")
    await erp.wait_for(lambda r: any(e["data"]["event_id"] == cleared for e in alarms(r)), 30)

    got = {e["data"]["event_id"]: e for e in alarms(erp)}
    assert set(got) == {hot, speed, warn, acked, cleared}, "the Drift alarm passed the where"
    raised = got[hot]
    assert raised["data"] == {
        "event_id": hot, "severity": 950, "severity_class": "emergency",
        "source": "Station7.Temperature", "source_node": st.node_id("Temperature"),
        "condition": "Overheat", "condition_id": "ns=2;s=Station7.Alarms.Overheat",
        "event_type": "i=2915", "message": "Temperature above 80 C",
        "time": raised["data"]["time"], "active": True, "acked": False, "retain": True,
        "station": "Station7"}
    assert raised["source_ts"] == raised["data"]["time"]
    assert raised["class"] == "critical" and raised["ordering_key"] == "alarm:Station7.Temperature"
    assert got[speed]["class"] == "high" and got[speed]["data"]["severity_class"] == "high"
    assert got[warn]["class"] == "normal" and got[warn]["data"]["severity_class"] == "warning"
    assert got[warn]["data"]["event_type"] == "i=10637"  # OffNormalAlarmType: a subtype
    assert got[acked]["data"]["acked"] is True and got[acked]["data"]["active"] is True
    assert got[cleared]["data"]["active"] is False and got[cleared]["data"]["retain"] is False
    # one alarm's changes arrive in the order they happened
    overheat = [e["data"]["event_id"] for e in alarms(erp)
                if e["data"].get("condition") == "Overheat"]
    assert overheat == [hot, acked, cleared]
    assert not any(e["data"].get("refresh") for e in alarms(erp))
    # the first connect refreshed (nothing was retained yet)
    [(why, detail)] = await _audit(gw, "alarms_refreshed")
    assert why == "connected" and detail["conditions"] == 0


async def test_after_a_reconnect_the_refresh_resends_conditions_stored_once(
    opcua_station, erp, gateways, relay_to
):
    """An alarm raised while the link is down arrives after the reconnect; the refresh
    re-sends the conditions the gateway already has, and none is stored twice."""
    st = await opcua_station()
    relay = await relay_to(st.port)
    gw = await gateways(_body(relay.url(), erp.url))
    await wait_connected(gw, "station7")
    first = await st.raise_alarm("Overheat", severity=800)
    await erp.wait_for(lambda r: _by_id(r, first), 30)

    await relay.cut("reset")
    await eventually(lambda: not gw.status["station7"].connected, timeout=30,
                     what="the gateway to notice the cut")
    during = await st.raise_alarm("Vibration", severity=600, source="SpindleSpeed")
    await relay.restore()
    await wait_connected(gw, "station7", timeout=60)
    await eventually(lambda: _audit(gw, "alarm_gap"), timeout=30, what="an alarm_gap row")
    rounds = await eventually(
        lambda: _rounds_after_connect(gw), timeout=30, what="a refresh after the reconnect")
    await erp.wait_for(lambda r: _by_id(r, during), 30)

    [(reason, gap)] = await _audit(gw, "alarm_gap")
    assert reason == "connection_lost" and gap["refresh"] == "requested"
    assert datetime.fromisoformat(gap["from"]) < datetime.fromisoformat(gap["to"])
    [(_, refreshed)] = rounds
    # both retained conditions re-sent; the one stored before the cut is a duplicate
    assert refreshed["conditions"] == 2 and refreshed["duplicates"] >= 1
    # a later alarm of the same source (same ordering key) comes after anything stored
    # for the refresh
    sentinel = await st.raise_alarm("Overheat", severity=700)
    await erp.wait_for(lambda r: _by_id(r, sentinel), 30)
    delivered = [e["data"]["event_id"] for e in alarms(erp)]
    assert sorted(delivered) == sorted({first, during, sentinel}), "a condition was stored twice"
    assert all(n == 1 for n in erp.accepted_ids.values())


async def _rounds_after_connect(gw: Any) -> list[tuple[str | None, dict[str, Any]]]:
    return [r for r in await _audit(gw, "alarms_refreshed") if r[0] != "connected"]


async def test_a_restarted_server_resends_its_active_alarms_marked_as_refresh(
    opcua_station, erp, gateways
):
    """The station restarts (its subscriptions are gone): asyncua re-creates the
    subscription, the source refreshes, and an alarm that became active meanwhile arrives
    with ``refresh: true``; the window is audited."""
    st = await opcua_station()
    port = st.port
    gw = await gateways(_body(st.endpoint, erp.url))
    await wait_connected(gw, "station7")
    before = await st.raise_alarm("Overheat", severity=800)
    await erp.wait_for(lambda r: _by_id(r, before), 30)

    await st.stop()
    await eventually(lambda: not gw.status["station7"].connected, timeout=30,
                     what="the gateway to notice the restart")
    st2 = await opcua_station(port=port)
    active = await st2.raise_alarm("Vibration", severity=600, source="SpindleSpeed")
    await erp.wait_for(lambda r: _by_id(r, active), 60)

    [event] = _by_id(erp, active)
    assert event["data"]["refresh"] is True and event["data"]["active"] is True
    assert event["class"] == "high"
    gaps = await eventually(lambda: _audit(gw, "alarm_gap"), timeout=30, what="alarm_gap")
    assert gaps[0][1]["refresh"] == "requested"
    assert len(_by_id(erp, before)) == 1


async def test_a_server_without_condition_refresh_is_tolerated_and_says_so(
    opcua_station, erp, gateways
):
    st = await opcua_station(condition_refresh=False)
    gw = await gateways(_body(st.endpoint, erp.url))
    await wait_connected(gw, "station7")
    [(status, _)] = await eventually(lambda: _audit(gw, "alarm_refresh_unsupported"),
                                     timeout=30, what="alarm_refresh_unsupported")
    assert status == "BadNothingToDo"
    condition = [c for c in gw.status["station7"].to_dict()["conditions"]
                 if c["code"] == "alarm_refresh"]
    assert condition and "does not support ConditionRefresh" in condition[0]["message"]

    raised = await st.raise_alarm("Overheat", severity=800)
    await erp.wait_for(lambda r: _by_id(r, raised), 30)  # alarms still flow


async def test_an_overflowing_alarm_queue_is_counted_and_refilled_by_a_refresh(
    opcua_station, erp, gateways
):
    """More alarm events in one publish than the gateway's alarm queue holds
    (``queue_max`` 100): the oldest are dropped and counted, and once the queue drained a
    refresh brings every condition's current state back: each reaches the ERP once."""
    st = await opcua_station()
    names = [f"A{i}" for i in range(10)]
    for name in names:
        await st.define_alarm(name)
    gw = await gateways(_body(st.endpoint, erp.url).replace(
        "publishing_ms: 50", "publishing_ms: 1000\n    queue_max: 100"))
    await wait_connected(gw, "station7")
    await eventually(lambda: _audit(gw, "alarms_refreshed"), timeout=30,
                     what="the first refresh")
    last: dict[str, str] = {}
    for name in names:  # 300 events in about one publishing interval
        for severity in range(500, 530):
            last[name] = await st.raise_alarm(name, severity=severity)
    await erp.wait_for(lambda r: all(_by_id(r, i) for i in last.values()), 60)

    dropped = metric(gw.metrics.source_dropped, "station7", "alarm_queue_full")
    assert dropped > 0
    [(_, drops)] = await eventually(lambda: _audit(gw, "dropped"), timeout=30,
                                    what="the dropped row")
    assert drops["count"] == dropped and drops["queue_max"] == 100
    async def queue_full_rounds() -> list[dict[str, Any]]:
        return [d for why, d in await _audit(gw, "alarms_refreshed") if why == "queue_full"]

    rounds = await eventually(queue_full_rounds, timeout=30, what="the queue_full refresh")
    assert rounds[0]["conditions"] == 10, rounds
    assert rounds[0]["stored"] >= 1  # the newest states of the first alarms were dropped
    assert all(len(_by_id(erp, i)) == 1 for i in last.values())
    refreshed = {e["data"]["event_id"] for e in alarms(erp) if e["data"].get("refresh")}
    assert refreshed and refreshed <= set(last.values())


async def test_a_refresh_larger_than_the_alarm_queue_stops_refreshing_and_says_so(
    opcua_station, erp, gateways
):
    """150 retained conditions and an alarm queue of 100: every refresh after a drop would
    overflow again. After three such refreshes the source stops refreshing for drops and
    names the cause (raise queue_max) instead of looping."""
    st = await opcua_station()
    names = [f"A{i:03d}" for i in range(150)]
    for name in names:
        await st.define_alarm(name)
    gw = await gateways(_body(st.endpoint, erp.url).replace(
        "publishing_ms: 50", "publishing_ms: 1000\n    queue_max: 100"))
    await wait_connected(gw, "station7")
    await eventually(lambda: _audit(gw, "alarms_refreshed"), timeout=30,
                     what="the first refresh")
    for name in names:
        await st.raise_alarm(name, severity=500)

    [(reason, _)] = await eventually(lambda: _audit(gw, "alarm_refresh_skipped"),
                                     timeout=60, what="alarm_refresh_skipped")
    assert reason == "queue_too_small"
    condition = [c for c in gw.status["station7"].to_dict()["conditions"]
                 if c["code"] == "alarm_queue"]
    assert condition and "raise queue_max" in condition[0]["message"]
    assert condition[0]["severity"] == "critical"
    rounds = [why for why, _ in await _audit(gw, "alarms_refreshed")]
    assert rounds.count("queue_full") == 3, rounds


async def test_after_a_gateway_restart_the_first_refresh_stores_nothing_twice(
    opcua_station, erp, gateways, tmp_path
):
    st = await opcua_station()
    state = tmp_path / "gw-state"
    gw1 = await gateways(_body(st.endpoint, erp.url), state_dir=state)
    await wait_connected(gw1, "station7")
    raised = await st.raise_alarm("Overheat", severity=800)
    await erp.wait_for(lambda r: _by_id(r, raised), 30)
    await gw1.stop()

    gw2 = await gateways(_body(st.endpoint, erp.url), state_dir=state)
    await wait_connected(gw2, "station7")
    async def second_run() -> list[Any]:  # one outbox: the first run's rows are there
        return (await _audit(gw2, "alarms_refreshed"))[1:]

    [(why, detail)] = await eventually(second_run, timeout=30,
                                       what="the first refresh of the second run")
    assert why == "connected"
    assert detail["conditions"] == 1 and detail["duplicates"] == 1 and detail["stored"] == 0
    cleared = await st.clear_alarm("Overheat")
    await erp.wait_for(lambda r: _by_id(r, cleared), 30)
    assert len(_by_id(erp, raised)) == 1
