"""Alarms against node-opcua: an implementation of Alarms & Conditions independent of
asyncua (type-checked select clauses, real ConditionRefresh, condition branches). The
station is a small node-opcua server written here; it takes commands on stdin (``raise
SEVERITY MESSAGE``, ``ack``, ``clear``) and answers each with the EventId it fired."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, free_port, http_sink_yaml, stop_async_process

pytestmark = pytest.mark.opcua

SERVER_JS = r"""
"use strict";
const readline = require("readline");
const { OPCUAServer, OPCUACertificateManager, DataType, StatusCodes } = require("node-opcua");

async function main() {
    const port = parseInt(process.argv[2], 10);
    const certificateManager = new OPCUACertificateManager({
        rootFolder: process.argv[3], automaticallyAcceptUnknownCertificate: true });
    await certificateManager.initialize();
    const server = new OPCUAServer({ port, host: "127.0.0.1", hostname: "127.0.0.1",
                                     serverCertificateManager: certificateManager });
    await server.initialize();
    const addressSpace = server.engine.addressSpace;
    addressSpace.installAlarmsAndConditionsService();
    const ns = addressSpace.getOwnNamespace();
    const serverObj = addressSpace.rootFolder.objects.server;
    const station = ns.addObject({ browseName: "Station7", nodeId: "s=Station7",
                                   organizedBy: addressSpace.rootFolder.objects,
                                   eventSourceOf: serverObj, eventNotifier: 1 });
    const temp = ns.addVariable({ componentOf: station, browseName: "Temperature",
                                  nodeId: "s=Station7.Temperature", dataType: "Double",
                                  value: { dataType: DataType.Double, value: 20 } });
    const alarm = ns.instantiateAlarmCondition("AlarmConditionType", {
        componentOf: station, conditionSource: station, browseName: "Overheat",
        conditionName: "Overheat",
        nodeId: "s=Station7.Alarms.Overheat", inputNode: temp,
        optionals: ["ConfirmedState", "Confirm"] });
    await server.start();
    console.log(JSON.stringify({ endpoint: `opc.tcp://127.0.0.1:${port}`,
                                 namespace: ns.namespaceUri }));
    let severity = 500;
    const rl = readline.createInterface({ input: process.stdin });
    rl.on("line", (line) => {
        const [cmd, arg, ...rest] = line.trim().split(" ");
        if (cmd === "raise") {
            severity = parseInt(arg, 10);
            alarm.activateAlarm();
            alarm.raiseNewCondition({ message: rest.join(" "), severity,
                                      quality: StatusCodes.Good, retain: true });
        } else if (cmd === "ack") {
            const branch = alarm.currentBranch();
            alarm.acknowledgeAndAutoConfirmBranch(branch, "seen");
        } else if (cmd === "clear") {
            alarm.deactivateAlarm();
            alarm.raiseNewCondition({ message: "back to normal", severity,
                                      quality: StatusCodes.Good, retain: true });
        }
        console.log(JSON.stringify({ event_id: alarm.currentBranch().getEventId()
                                                     .toString("hex") }));
    });
}
main().catch((err) => { console.error(err); process.exit(1); });
"""


class NodeAlarmStation:
    def __init__(self, proc: asyncio.subprocess.Process, endpoint: str) -> None:
        self.proc = proc
        self.endpoint = endpoint

    async def command(self, line: str) -> str:
        """Send one command; the EventId (hex) the station fired for it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(30):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise RuntimeError("node-opcua alarm station ended")
                if raw.startswith(b'{"event_id"'):
                    return str(json.loads(raw)["event_id"])


@pytest.fixture
async def node_alarm_station(node_opcua_dir: Path, tmp_path: Path
                             ) -> AsyncIterator[NodeAlarmStation]:
    script = tmp_path / "alarm_station.js"
    script.write_text(SERVER_JS)
    port = free_port()
    errlog = tmp_path / "node-alarms.log"
    with open(errlog, "wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            "node", str(script), str(port), str(tmp_path / "pki"), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err_file, cwd=node_opcua_dir,
            env={**os.environ, "NODE_NO_WARNINGS": "1",
                 "NODE_PATH": str(node_opcua_dir / "node_modules")})
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(120):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    raise RuntimeError("node-opcua alarm station ended: "
                                       + errlog.read_text()[-2000:])
                if raw.startswith(b'{"endpoint"'):
                    info = json.loads(raw)
                    break
        yield NodeAlarmStation(proc, info["endpoint"])
    finally:
        with contextlib.suppress(Exception):
            await stop_async_process(proc, 10)


def _by_id(erp: Any, event_id: str) -> list[dict[str, Any]]:
    return [e for e in events_of(erp, "machine.alarm") if e["data"]["event_id"] == event_id]


async def test_node_opcua_alarms_arrive_classed_and_a_refresh_stores_nothing_twice(
    node_alarm_station, erp, gateways, relay_to
):
    st = node_alarm_station
    port = int(st.endpoint.rsplit(":", 1)[1])
    relay = await relay_to(port)
    gw = await gateways(textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {relay.url()}
            publishing_ms: 50
            watchdog_s: 0.5
            connect_timeout_s: 1
            reconnect_max_s: 2
            alarms:
              - where: {{min_severity: 200}}
                select: {{input: InputNode}}
        sinks:
        """) + http_sink_yaml(erp.url))
    await wait_connected(gw, "station7")

    low = await st.command("raise 100 barely warm")  # filtered by the server
    raised = await st.command("raise 850 Temperature above 80 C")
    await erp.wait_for(lambda r: _by_id(r, raised), 30)
    [event] = _by_id(erp, raised)
    data = event["data"]
    assert data["severity"] == 850 and data["severity_class"] == "critical"
    assert event["class"] == "critical"
    assert data["condition"] == "Overheat" and data["source"].endswith("Station7")
    assert data["condition_id"].endswith(";s=Station7.Alarms.Overheat")
    assert data["message"] == "Temperature above 80 C"
    assert data["active"] is True and data["acked"] is False and data["retain"] is True
    assert data["input"].endswith(";s=Station7.Temperature")
    assert data["event_type"] == "i=2915"
    assert not _by_id(erp, low)

    await relay.cut("reset")
    await eventually(lambda: not gw.status["station7"].connected, timeout=30,
                     what="the gateway to notice the cut")
    await relay.restore()
    await wait_connected(gw, "station7", timeout=60)

    async def refreshed_after_reconnect() -> list[Any]:
        rows = await gw.outbox.read(lambda c: c.execute(
            "SELECT reason, detail FROM audit WHERE state = 'alarms_refreshed' "
            "AND reason != 'connected'").fetchall())
        return [json.loads(r[1]) for r in rows]

    [detail] = await eventually(refreshed_after_reconnect, timeout=30,
                                what="a refresh after the reconnect")
    assert detail["conditions"] >= 1 and detail["stored"] == 0, detail
    cleared = await st.command("clear")
    await erp.wait_for(lambda r: _by_id(r, cleared), 30)
    assert len(_by_id(erp, raised)) == 1, "the refreshed condition was stored twice"
    assert _by_id(erp, cleared)[0]["data"]["active"] is False
