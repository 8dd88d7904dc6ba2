"""OPC UA faults of the fault campaign: the station's server restarted (kill -9 and clean
stop, asyncua and node-opcua) while results flow, with gateway kill -9 cycles mixed in.

What a handshake station saw acknowledged (the gateway wrote ResultReady=false after its
commit) is the OPC UA analogue of a PUBACK: every acknowledged part must reach the ERP
once, per lot in part order, with its derived events — judged by the campaign's checker
beside the MQTT traffic of the same gateway. The historized Temperature is judged by
``tests.faults.opcua.check_samples``: every sample the server still holds in history
arrives once and in source-time order; a sample the restarted server no longer holds
(in-memory history) may be missing only inside a gap the gateway reported; nothing
arrives that the station never wrote.

Short forms run in ``make test``; ``EDGE_FAULT_CYCLES`` (``make faults``) lengthens them
(station restarts = cycles / 10).
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.faults.checker import Expectation, Report
from tests.faults.harness import Campaign, fault_cycles, write_report
from tests.faults.opcua import (
    AsyncuaStation,
    Journal,
    NodeOpcuaStation,
    SampleFigures,
    audit_states,
    check_samples,
    gap_windows,
    read_history,
)

SOURCE = "station7"
# a station restart plus the results after it take a few seconds: scale the test timeout
_LONG = int(os.environ.get("EDGE_FAULT_CYCLES") or 0)
pytestmark = [pytest.mark.opcua, pytest.mark.mqtt,
              pytest.mark.timeout(300 + _LONG // 10 * 30)]


def _restarts(short: int) -> int:
    """Station restarts: ``short`` in ``make test``, cycles / 10 in the long form."""
    return max(short, fault_cycles(0) // 10)


def _expectations(journal: Journal) -> list[Expectation]:
    """Every part the station showed: acknowledged ones must arrive; a part raised but not
    acknowledged may (its result can be committed before the ack was lost)."""
    acked = set(journal.acked)
    held: set[str] = set()
    out = []
    for n in sorted(journal.parts):
        p = journal.parts[n]
        derived: tuple[str, ...] = ()
        if p.measured > 10.05:  # the campaign's spec limit: a nonconformance, a lot hold
            derived = ("nonconformance",) + (() if p.lot in held else ("quality.hold",))
            held.add(p.lot)
        out.append(Expectation("opcua", p.serial, f"lot:{p.lot}", p.part, derived,
                               required=n in acked))
    return out


async def _results_flow(station: Any, more: int = 3, timeout: float = 90) -> None:
    """Wait until the station saw ``more`` further parts acknowledged."""
    start = len(station.journal().acked)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(station.journal().acked) < start + more:
        if loop.time() > deadline:
            raise AssertionError(f"no {more} parts acknowledged within {timeout} s "
                                 f"(station log: {station.tail(500)})")
        await asyncio.sleep(0.2)


async def _faults(c: Campaign, station: Any, *, restarts: int, kills: int,
                  rng: random.Random) -> None:
    """Station restarts (kill -9 or clean stop, randomly) and gateway kill -9 cycles in a
    random order; some gateway kills land while the station is down. At least one station
    restart happens under a running gateway, so its reconnect and re-created subscription
    are always exercised (the judge asks for them)."""
    steps = ["station"] * restarts + ["gateway"] * kills
    rng.shuffle(steps)
    stations_left, live_restarts = restarts, 0
    for step in steps:
        if step == "station":
            how = rng.choice(("kill9", "stop"))
            down = rng.uniform(0.0, 1.0)
            stations_left -= 1
            may_kill_gateway = kills and (live_restarts or stations_left)
            if rng.random() < 0.3 and may_kill_gateway:  # the gateway dies in the outage too
                await (station.kill9() if how == "kill9" else station.stop())
                await c.kill9()
                c.faults["kill9"] += 1
                await asyncio.sleep(down)
                await c.start_gateway()
                await station.start()
                station.restarts[how] += 1
            else:
                await station.restart(how, down_s=down)
                live_restarts += 1
            c.faults[f"opcua_{how}"] += 1
        else:
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            await c.kill9()
            c.faults["kill9"] += 1
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await c.start_gateway()
        c.cycles += 1
        await _results_flow(station, more=2)


async def _samples(c: Campaign, station: Any, timeout: float = 90) -> SampleFigures:
    """Let the gateway catch up with the station's Temperature (every sample the server
    still holds delivered, every other one reported), stop the station, judge."""
    node = station.node_id("Temperature")
    db = c.state_dir / "outbox.db"

    def judge(history: list[Any]) -> SampleFigures:
        readings = [e for e in c.erp.applied
                    if e.get("type") == "machine.reading" and e.get("source") == SOURCE]
        return check_samples(station.journal(), readings, history, gap_windows(db, node))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    history = await read_history(station.endpoint, node)
    while True:
        figures = judge(history)
        if not figures.problems or loop.time() > deadline:
            break
        await asyncio.sleep(1.0)
        history = await read_history(station.endpoint, node)
    await station.stop()
    return judge(history)


async def _finish(c: Campaign, station: Any) -> tuple[Report, SampleFigures]:
    await _results_flow(station, more=2)
    figures = await _samples(c, station)
    journal = station.journal()
    expected = _expectations(journal)
    c.expect_many(expected)
    owed = {e.message_id for e in expected if e.required}
    try:
        await c.erp.wait_for(lambda erp: owed <= erp.applied_message_ids(), 120)
    except TimeoutError:
        pass  # the checker names what is missing
    report = await c.finish()
    states = audit_states(db) if (db := c.state_dir / "outbox.db").exists() else {}
    report.counts["opcua"] = {
        "station": station.kind, "history": station.history,
        "restarts": dict(station.restarts), "parts": len(journal.parts),
        "acknowledged": len(owed),
        "applied": len(owed & c.erp.applied_message_ids()),
        "gap_audit_rows": states.get("gap", 0),
        "subscription_recreated": states.get("subscription_recreated", 0),
        "trigger_missed": states.get("trigger_missed", 0),
        "samples": figures.summary(),
    }
    print(report.summary())
    print("opcua:", report.counts["opcua"])
    for note in report.notes:
        print(note)
    if os.environ.get("EDGE_FAULT_REPORT"):  # again, with the OPC UA figures
        write_report(Path(os.environ["EDGE_FAULT_REPORT"]), report)
    return report, figures


def _assert_clean(report: Report, figures: SampleFigures, station: Any) -> None:
    report.assert_clean()
    assert not figures.problems, f"{figures.summary()}\n{figures.problems}"
    o = report.counts["opcua"]
    assert sum(station.restarts.values()) >= 1 and o["acknowledged"] >= 5, o
    # every outage of the station was noticed and its gap reported, not papered over
    assert o["gap_audit_rows"] >= 1 and o["subscription_recreated"] >= 1, o
    assert figures.delivered > 0 and figures.gaps_reported >= 1, figures.summary()


async def _station_campaign(tmp_path: Path, station: Any, *, restarts: int,
                            kills: int) -> None:
    """Results and MQTT traffic flow while the station restarts ``restarts`` times and the
    gateway is killed ``kills`` times; then the checker and the sample check."""
    await station.start()
    try:
        async with Campaign(tmp_path, lots=4, rate=40.0,
                            extra_sources=station.source_yaml(SOURCE)) as c:
            await c.start_gateway()
            await c.gateway.await_line("opcua connected")
            c.start_publishing()
            await _results_flow(station)
            await _faults(c, station, restarts=restarts, kills=kills, rng=c.rng)
            report, figures = await _finish(c, station)
    finally:
        await station.kill9()
    _assert_clean(report, figures, station)


async def test_asyncua_station_restarts_while_results_flow_with_gateway_kill9(tmp_path: Path):
    # The SQLite history survives a clean restart, but a sample written in the last moment
    # before a kill -9 may never reach it (asyncua saves history behind the write): such a
    # sample is missing inside a reported gap, as with in-memory history.
    await _station_campaign(tmp_path, AsyncuaStation(tmp_path / "opcua", history="sqlite"),
                            restarts=_restarts(2), kills=_restarts(2) // 2)


async def test_node_opcua_station_restarts_lose_their_history_and_the_gap_is_reported(
        tmp_path: Path):
    why = NodeOpcuaStation.available()
    if why is not None:
        pytest.skip(why)
    await _station_campaign(tmp_path, NodeOpcuaStation(tmp_path / "opcua",
                                                       result_period_ms=100),
                            restarts=_restarts(1), kills=_restarts(1) // 4)
