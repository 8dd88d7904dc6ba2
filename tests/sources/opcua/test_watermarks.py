"""A gateway killed right after its first start still knows where each historized node's
committed samples end: the watermarks file names a node as soon as its first sample is
committed, not at the next periodic flush. (The fault campaign found a gateway killed
within seconds of connecting, then restarted, start the node live and lose the samples
written in between without a gap or an audit row.)"""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime

import orjson
import pytest

from tests.fixtures.opcua import events_of, wait_connected
from tests.support import eventually, http_sink_yaml

pytestmark = pytest.mark.opcua


def _body(endpoint: str, node: str, erp_url: str) -> str:
    return textwrap.dedent(f"""\
        sources:
          - id: station7
            type: opcua
            endpoint: {endpoint}
            publishing_ms: 100
            watchdog_s: 0.5
            backfill: {{first_sample_wait_s: 5}}
            monitored:
              - {{node: "{node}", sampling_ms: 0, queue_size: 100, ordering_key: "t"}}
        sinks:
    """) + http_sink_yaml(erp_url)


def _values(erp) -> set[float]:
    return {e["data"]["value"] for e in events_of(erp, "machine.reading")}


async def test_first_committed_sample_is_on_disk_before_the_periodic_flush(
        opcua_station, erp, gateways, tmp_path, monkeypatch):
    # The periodic flush does not come within the test: only the first-sample save can.
    monkeypatch.setattr("edge.sources.opcua.backfill.WATERMARK_FLUSH_S", 3600.0)
    st = await opcua_station()
    node = st.node_id("Temperature")
    state = tmp_path / "gw-state"
    wm_file = state / "opcua" / "station7.watermarks.json"
    gw1 = await gateways(_body(st.endpoint, node, erp.url), state_dir=state)
    await wait_connected(gw1, "station7")
    await st.write("Temperature", 21.0)
    await erp.wait_for(lambda r: 21.0 in _values(r), 30)

    def names_node() -> bool:
        try:
            return node in orjson.loads(wm_file.read_bytes())["nodes"]
        except (FileNotFoundError, ValueError, KeyError):
            return False

    await eventually(names_node, timeout=30, what="the watermarks file to name the node")
    on_disk = wm_file.read_bytes()  # what a kill -9 now would leave behind
    await gw1.stop()
    wm_file.write_bytes(on_disk)  # as if killed: no orderly save on the way out

    # Written while the gateway is down; read back after its restart.
    gap = [await st.write("Temperature", 100.0 + i) for i in range(20)]
    while datetime.now(UTC) <= gap[-1]:
        await asyncio.sleep(0.01)
    gw2 = await gateways(_body(st.endpoint, node, erp.url), state_dir=state)
    await wait_connected(gw2, "station7")
    await st.write("Temperature", 500.0)  # the first live sample ends the gap
    want = {100.0 + i for i in range(20)} | {500.0}
    await erp.wait_for(lambda r: want <= _values(r), 60)
    got = [e["data"]["value"] for e in events_of(erp, "machine.reading")]
    assert len(got) == len(set(got)), f"a sample was stored twice: {got}"
    # read back from the history (the newest of them is the current value: it arrives live)
    assert sum(1 for e in events_of(erp, "machine.reading") if e["backfilled"]) >= 19
