"""What a network blip costs the ``opcua`` source: seconds from the link's return until the
source is connected again, behind a loopback TCP relay that cuts the link.

Two kinds of cut, ``--rounds`` times each, ``--cut-s`` seconds long:

  reset      the relay closes every connection and stops listening (the far end reboots):
             reconnect attempts are refused at once
  blackhole  the relay keeps connections open and accepts new ones but forwards nothing
             (a link down behind a router): an attempt hears nothing until it gives up

and ``handshake``: a station with a ResultReady/ack handshake raises a result while a
``reset`` cut is on; the figure is the time from the link's return until the gateway has
stored the result and written the ack (ResultReady false again) — how long the line
waits for a part it produced during the blip.

Measured for the gateway's reconnect (``GatewayClient``) and, in the same run against the
same station, for asyncua 2.1's own reconnect loop (the baseline: ``Client``'s
``_reconnect_with_backoff``, 1 s doubling, each attempt bounded by the request timeout).

Run:  python -m bench.bench_opcua_blip [--rounds 3] [--cut-s 4]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from asyncua import Client

from bench.common import machine_line
from edge.app import Gateway
from edge.config import load_config_text
from edge.sim.erp import ErpReceiver
from edge.sim.opcua_station import start_station
from edge.sim.tcp_relay import TcpRelay
from edge.sources.opcua import client as opcua_client

TRIGGER = """\
    triggers:
      - node: "{ready}"
        when: true
        event: inspection.result
        ordering_key: "lot:{{lot_id}}"
        sampling_ms: 0
        read: {{lot_id: "{lot}", serial: "{serial}", result: "{result}"}}
        ack: {{node: "{ready}", value: false}}
"""


async def _measure(mode: str, rounds: int, cut_s: float) -> list[float]:
    handshake = mode == "handshake"
    station = await start_station(auto=False)
    relay = await TcpRelay.start(station.port)
    erp = ErpReceiver()
    await erp.start()
    tmp = tempfile.mkdtemp()
    body = textwrap.dedent(f"""\
        site: bench
        state_dir: {tmp}/state
        api: {{enabled: false}}
        sources:
          - id: station7
            type: opcua
            endpoint: {relay.url()}
            monitored:
              - {{node: "{station.node_id('Temperature')}", sampling_ms: 0}}
    """)
    if handshake:
        body += TRIGGER.format(
            ready=station.node_id("ResultReady"), lot=station.node_id("LotId"),
            serial=station.node_id("Serial"), result=station.node_id("Result"))
    body += textwrap.dedent(f"""\
        sinks:
          - id: erp
            type: http
            url: {erp.url}
            routes:
              - {{events: ["*"], method: POST, path: /events}}
    """)
    gw = Gateway(load_config_text(body, base_dir=Path(tmp)))
    await gw.start()
    status = gw.status["station7"]
    out = []
    try:
        while not status.connected:
            await asyncio.sleep(0.02)
        for _ in range(rounds):
            await relay.cut("reset" if handshake else mode)  # type: ignore[arg-type]
            cut_at = time.monotonic()
            while status.connected and time.monotonic() - cut_at < cut_s:
                await asyncio.sleep(0.02)
            if handshake:
                await station.publish_result()  # the part made during the blip
            await asyncio.sleep(max(0.0, cut_s - (time.monotonic() - cut_at)))
            await relay.restore()
            back = time.monotonic()
            if handshake:
                while await station.read("ResultReady") and time.monotonic() - back < 300:
                    await asyncio.sleep(0.02)
            else:
                while not status.connected and time.monotonic() - back < 120:
                    await asyncio.sleep(0.02)
            out.append(time.monotonic() - back)
            await asyncio.sleep(3.0)  # settle: subscriptions restored, keep-alives flowing
    finally:
        await gw.stop()
        await erp.stop()
        await relay.close()
        await station.stop()
    return out


async def main(args: argparse.Namespace) -> None:
    print(machine_line())
    print(f"cut {args.cut_s:g} s, {args.rounds} rounds per kind; seconds from the link's "
          "return to connected, or for handshake to the ack (median, max)")
    ours = opcua_client.GatewayClient._reconnect_with_backoff
    for mode in ("reset", "blackhole", "handshake"):
        opcua_client.GatewayClient._reconnect_with_backoff = (  # type: ignore[method-assign]
            Client._reconnect_with_backoff)
        base = await _measure(mode, args.rounds, args.cut_s)
        opcua_client.GatewayClient._reconnect_with_backoff = ours  # type: ignore[method-assign]
        gw = await _measure(mode, args.rounds, args.cut_s)
        print(f"{mode:9s}  gateway {statistics.median(gw):5.1f} s (max {max(gw):5.1f})   "
              f"asyncua's own loop (baseline) {statistics.median(base):5.1f} s "
              f"(max {max(base):5.1f})", flush=True)
        from bench.results import record

        until = "the held result is acked" if mode == "handshake" else "connected again"
        record("opcua_blip", figure=f"{mode}: link back → {until} (median)",
               value=round(statistics.median(gw), 2), unit="s",
               baseline="asyncua 2.1's own reconnect loop, median",
               baseline_value=round(statistics.median(base), 2),
               note=f"cut {args.cut_s:g} s, {args.rounds} rounds; max {max(gw):.1f} s "
                    f"(baseline max {max(base):.1f} s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cut-s", type=float, default=4.0)
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(main(p.parse_args()))
