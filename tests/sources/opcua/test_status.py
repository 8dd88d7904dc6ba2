"""``OpcUaSource.status()``: what the source is doing, as the demo and operators read it —
connected or why not, the gaps it knows of and the backfill reading one back."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, free_port, http_sink_yaml

pytestmark = pytest.mark.opcua


def _body(endpoint: str, node: str, erp_url: str) -> str:
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {endpoint}
            publishing_ms: 100
            watchdog_s: 0.5
            reconnect_max_s: 1
            backfill: {{first_sample_wait_s: 5, page_values: 10}}
            monitored:
              - {{node: "{node}", sampling_ms: 0, queue_size: 100}}
        sinks:
    """) + http_sink_yaml(erp_url)


def _slow_history(station: Any, delay_s: float) -> None:
    """Every HistoryRead call on the station takes ``delay_s`` longer."""
    storage = station.server.iserver.history_manager.storage
    read = storage.read_node_history

    async def slow(*args: Any, **kw: Any) -> Any:
        await asyncio.sleep(delay_s)
        return await read(*args, **kw)

    storage.read_node_history = slow


async def test_status_shows_the_connection_the_gap_and_the_backfill(
        opcua_station, erp, gateways, tmp_path):
    st = await opcua_station()
    node = st.node_id("Temperature")
    state = tmp_path / "gw-state"
    gw1 = await gateways(_body(st.endpoint, node, erp.url), state_dir=state)
    await wait_connected(gw1, "station7")
    status = gw1.sources["station7"].status()
    assert status == {
        "connected": True, "endpoint": st.endpoint, "last_error": None, "open_gaps": {},
        "backfill_running": [], "monitored": 1, "triggers": 0, "historizing": 1}
    await st.write("Temperature", 21.0)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 21.0
                                     for e in events_of(r, "machine.reading")), 30)
    await gw1.stop()

    # Written while the gateway is down: a gap from the watermark, read back slowly.
    for i in range(40):
        await st.write("Temperature", 100.0 + i)
    _slow_history(st, 0.3)
    gw2 = await gateways(_body(st.endpoint, node, erp.url), state_dir=state)
    src = gw2.sources["station7"]
    await eventually(lambda: src.status()["backfill_running"] == [node], timeout=30,
                     what="the backfill of the gap to show")
    status = src.status()
    orjson.dumps(status)  # JSON as it is
    start = datetime.fromisoformat(status["open_gaps"][node].replace("Z", "+00:00"))
    assert start <= datetime.now(UTC)
    await eventually(lambda: not src.status()["open_gaps"], timeout=60,
                     what="the gap to be read back")
    assert src.status()["backfill_running"] == []

    await st.stop()  # the server goes away: not connected, and why
    await eventually(lambda: not src.status()["connected"], timeout=30,
                     what="the loss to show")
    await eventually(lambda: src.status()["last_error"], timeout=30,
                     what="a reason to show")


async def test_status_names_why_a_source_never_connected(erp, gateways):
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"  # nothing listens there
    gw = await gateways(_body(endpoint, "ns=2;s=Station7.Temperature", erp.url))
    src = gw.sources["station7"]
    reason = await eventually(lambda: src.status()["last_error"], timeout=30,
                              what="the failed connect to show")
    assert endpoint in reason and not src.status()["connected"]
