"""The ``nats`` sink inside the gateway as operators run it (``edge run``), against a private
``nats-server -js`` that is stopped mid-drain and started again: the events are retried
while it is down and all of them end up in the stream, each once, in order per lot, with
the outbox empty afterwards (DESIGN invariants 2 and 4)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from edge.outbox import Outbox
from tests.fixtures.gateway_process import GatewayProcess
from tests.nats.support import MACHINE_NATS, unique
from tests.sinks.nats.support import nats_sink_yaml, read_stream
from tests.support import eventually, result

N = 300


async def _stream_count(url: str, name: str) -> int:
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    except Exception:  # noqa: BLE001  not up (yet): nothing counted
        return 0
    try:
        info = await nc.jetstream().stream_info(name)
        return int(info.state.messages)
    except Exception:  # noqa: BLE001  the stream is made at the sink's first connection
        return 0
    finally:
        await nc.close()


async def test_a_server_stopped_mid_drain_loses_nothing_and_keeps_lot_order(
        nats_servers, tmp_path: Path):
    server = nats_servers()
    prefix, name = unique("t"), unique("EDGE_")
    state = tmp_path / "state"
    async with Outbox(state, router=lambda ev: ["js"]) as ob:
        ids = await ob.submit([result(f"L{n % 7}", n) for n in range(N)])
    cfg = tmp_path / "edge.yaml"
    # a slow drain (rate limit) so the server goes down with most of the backlog unsent
    cfg.write_text(f"site: test-site\nstate_dir: {state}\napi: {{enabled: false}}\n"
                   + nats_sink_yaml(name, prefix + ".{site}.p{partition}.{type}",
                                    url=server.url,
                                    extra="rate_limit_per_s: 150\ncreate_stream: {}\n"))
    gw = GatewayProcess(cfg).start()
    try:
        async def some() -> bool:
            return await _stream_count(server.url, name) >= 50

        await eventually(some, timeout=60, what="50 events in the stream")
        server.stop()
        mark = len(gw.lines)
        # the forwarder retries against a server that is down, events stay queued
        await gw.await_line("events stay queued for retry", timeout=60, after=mark)
        await asyncio.sleep(0.5)
        server.start()  # same port, same store: the stream and its messages are back

        async def all_in() -> bool:
            return await _stream_count(server.url, name) >= N

        await eventually(all_in, timeout=90, what=f"{N} events in the stream")

        def drained() -> bool:
            conn = sqlite3.connect(state / "outbox.db")
            try:
                return conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
            finally:
                conn.close()

        await eventually(drained, timeout=30, what="the outbox drained")
    finally:
        gw.stop()
    assert not any("Traceback" in line for line in gw.lines), "\n".join(gw.lines[-30:])
    import nats

    nc = await nats.connect(server.url)
    try:
        msgs = await read_stream(nc.jetstream(), name)
    finally:
        await nc.close()
    got = [m.headers["Nats-Msg-Id"] for m in msgs]
    assert sorted(got) == sorted(ids)  # every event, each once
    for lot in range(7):
        ns = [m.doc["data"]["n"] for m in msgs if m.doc["data"]["lot_id"] == f"L{lot}"]
        assert ns == sorted(ns)


async def test_a_missing_stream_alarms_in_status_and_delivers_once_it_exists(gateways):
    """The operator sees what to do (create the stream for this subject); nothing is
    dead-lettered meanwhile, and the stored events go out once plant IT created it."""
    import nats
    from nats.js.api import StreamConfig

    prefix, name = unique("t"), unique("EDGE_TEST_")
    gw = await gateways(nats_sink_yaml(name, prefix + ".{site}.p{partition}.{type}"))
    ids = await gw.pipeline.submit([result(f"L{n % 3}", n) for n in range(6)])
    fwd = gw.forwarders["js"]

    def alarmed() -> dict | None:
        return fwd.status()["alarm"]

    alarm = await eventually(alarmed, timeout=30, what="the sink's alarm")
    assert alarm["code"] == "sink_fault"
    assert f"{prefix}.test-site." in alarm["message"] and name in alarm["message"]
    nc = await nats.connect(MACHINE_NATS)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[prefix + ".>"]))
    try:
        async def all_in() -> bool:
            return (await js.stream_info(name)).state.messages == len(ids)

        await eventually(all_in, timeout=30, what="every event in the stream")
        await eventually(lambda: fwd.status()["alarm"] is None, timeout=30,
                         what="the alarm cleared")
        msgs = await read_stream(js, name)
        assert sorted(m.headers["Nats-Msg-Id"] for m in msgs) == sorted(ids)
    finally:
        await js.delete_stream(name)
        await nc.close()
