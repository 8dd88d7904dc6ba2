"""The JetStream tier end to end, as operators run it: two gateways (``edge run``, each
draining its outbox through the ``nats`` sink) → one stream → two relays (``edge relay``)
→ the ERP stand-in; one relay is killed with ``kill -9`` mid-stream. Checked at the ERP:
nothing lost, per-lot order of first arrivals kept, and every duplicate carries the
Idempotency-Key of the event it repeats (DESIGN invariants 2–4)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edge.outbox import Outbox
from edge.sim.erp import ErpReceiver
from tests.fixtures.gateway_process import GatewayProcess
from tests.relay.conftest import NATS_URL, Tier, check_order, first_violation
from tests.support import eventually, result

PER_GATEWAY = 400


def gateway_yaml(tier: Tier, state: Path, site: str) -> str:
    return (f"site: {site}\nstate_dir: {state}\napi: {{enabled: false}}\n"
            "sinks:\n  - id: js\n    type: nats\n"
            f"    servers: [\"{NATS_URL}\"]\n    stream: {tier.stream}\n"
            f"    subject: \"{tier.subject}\"\n    partitions: {tier.partitions}\n"
            # a steady stream over a few seconds, so the kill lands mid-stream
            "    rate_limit_per_s: 150\n"
            "    retry: {initial_backoff_s: 0.05, max_backoff_s: 0.5}\n")


async def test_two_gateways_two_relays_one_killed_nothing_lost_lot_order_kept(
        tier: Tier, tmp_path: Path) -> None:
    published: list[dict[str, Any]] = []
    gateways: list[GatewayProcess] = []
    relays: dict[str, GatewayProcess] = {}
    async with ErpReceiver() as erp:
        for name in ("r1", "r2"):
            cfg = tmp_path / f"{name}.yaml"
            cfg.write_text(tier.relay_yaml(erp.url, relay_id=name,
                                           state_dir=str(tmp_path / name)))
            relays[name] = GatewayProcess(cfg, verb="relay").start()
        for site in ("gw1", "gw2"):
            state = tmp_path / site
            async with Outbox(state, router=lambda ev: ["js"]) as ob:
                subs = [result(f"{site}-L{n % 12}", n) for n in range(PER_GATEWAY)]
                await ob.submit(subs)
            cfg = tmp_path / f"{site}.yaml"
            cfg.write_text(gateway_yaml(tier, state, site))
            gateways.append(GatewayProcess(cfg).start())
        try:
            await eventually(lambda: len(set(erp.ids())) >= 150, timeout=60,
                             what="the relays delivering")
            await eventually(lambda: all(any("partition taken" in line for line in r.lines)
                                         for r in relays.values()), timeout=30,
                             what="both relays delivering partitions: "
                             + "\n".join(relays["r1"].lines[-10:] + relays["r2"].lines[-10:]))
            total = 2 * PER_GATEWAY
            relays["r1"].kill9()
            at_kill = len(set(erp.ids()))
            assert at_kill < total, "the relay was killed mid-stream"
            await eventually(lambda: len(set(erp.ids())) >= total, timeout=120,
                             what=f"all {total} events at the ERP")
            await asyncio.sleep(1.0)  # late duplicates would arrive now
        finally:
            for gw in gateways:
                gw.stop()
            for r in relays.values():  # r1 too when the test failed before killing it
                r.stop()
        js_events = await _stream_events(tier)
        published = sorted(js_events, key=lambda e: e["_seq"])
        assert len(published) == total
        # order is judged per lot against the stream's order, which is the order each
        # gateway stored the lot's events in
        by_lot: dict[str, list[int]] = {}
        for e in published:
            by_lot.setdefault(e["ordering_key"], []).append(e["data"]["n"])
        assert len(by_lot) == 24
        for ns in by_lot.values():
            assert ns == sorted(ns), "each gateway published its lots in order"
        report = check_order(published, erp.events)
        print(f"at kill {at_kill}/{total}; {report}")
        assert report["lost"] == 0 and report["order_violations"] == 0, report
        for q in erp.requests:
            if q.applied and len(q.events) == 1:
                assert q.headers.get("idempotency-key") == q.events[0]["id"]
    for proc in (*gateways, relays["r2"]):
        assert not any("Traceback" in line for line in proc.lines), "\n".join(proc.lines[-40:])
    assert any("partition taken" in line for line in relays["r2"].lines)


async def _stream_events(tier: Tier) -> list[dict[str, Any]]:
    import orjson

    out = []
    info = await tier.js.stream_info(tier.stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await tier.js.get_msg(tier.stream, seq)
        ev = orjson.loads(msg.data)
        ev["_seq"] = seq
        out.append(ev)
    return out


async def test_a_frozen_relay_loses_its_partitions_and_does_not_send_when_it_wakes(
        tier: Tier, tmp_path: Path) -> None:
    """SIGSTOP one relay for twice the lease TTL (a frozen VM, a stalled disk): the other
    takes its partitions over; when it wakes it finds its leases gone and sends nothing
    of them, so lot order holds."""
    import signal

    relays: dict[str, GatewayProcess] = {}
    async with ErpReceiver() as erp:
        for name in ("r1", "r2"):
            cfg = tmp_path / f"{name}.yaml"
            cfg.write_text(tier.relay_yaml(erp.url, relay_id=name,
                                           state_dir=str(tmp_path / name)))
            relays[name] = GatewayProcess(cfg, verb="relay").start()
        published: list[dict[str, Any]] = []
        try:
            await eventually(lambda: all(any("partition taken" in line for line in r.lines)
                                         for r in relays.values()), timeout=30,
                             what="both relays delivering partitions")
            frozen = relays["r1"]
            assert frozen.proc is not None
            for i in range(40):
                published.append(await tier.publish(f"L{i % 8}", i))
            frozen.proc.send_signal(signal.SIGSTOP)
            for i in range(40, 200):
                published.append(await tier.publish(f"L{i % 8}", i))
                await asyncio.sleep(0.02)  # 3 s of traffic while r1 is frozen
            await asyncio.sleep(3.0)  # twice the lease TTL in all
            mark = len(frozen.lines)
            frozen.proc.send_signal(signal.SIGCONT)
            for i in range(200, 260):
                published.append(await tier.publish(f"L{i % 8}", i))
            await eventually(lambda: len(set(erp.ids())) >= len(published), timeout=60,
                             what="every event at the ERP")
            await frozen.await_line("partition lost", timeout=30, after=mark)
            await asyncio.sleep(1.0)
        finally:
            for r in relays.values():
                r.stop()
        report = check_order(published, erp.events)
        assert report["lost"] == 0 and report["order_violations"] == 0, (
            f"{report}: {first_violation(published, erp.events)}\n"
            + "\n".join(relays["r1"].lines[-60:] + ["----"] + relays["r2"].lines[-60:]))
    for proc in relays.values():
        assert not any("Traceback" in line for line in proc.lines), "\n".join(proc.lines[-40:])
