"""The relay delivers a JetStream stream through the gateway's sinks and forwarder: every
event once per key order, dead letters park their key until an operator replays, and
partitions move between relays without loss or reordering."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge.config import load_config_text
from edge.relay.relay import Relay
from edge.sim.erp import ErpReceiver
from tests.relay.conftest import Tier, check_order
from tests.support import eventually


def relay(tier: Tier, erp: ErpReceiver, tmp_path: Path, relay_id: str, **kw: Any) -> Relay:
    cfg = load_config_text(tier.relay_yaml(erp.url, relay_id=relay_id, **kw),
                           base_dir=tmp_path)
    return Relay(cfg)  # type: ignore[arg-type]


async def test_delivers_every_event_in_lot_order_and_acknowledges_it(
        tier: Tier, tmp_path: Path) -> None:
    async with ErpReceiver() as erp:
        published = [await tier.publish(f"L{i % 7}", i) for i in range(120)]
        r = relay(tier, erp, tmp_path, "r1")
        await r.start()
        try:
            await eventually(lambda: len(set(erp.ids())) >= 120, timeout=30,
                             what="all events at the ERP")
            assert check_order(published, erp.events) == {
                "lost": 0, "duplicates": 0, "order_violations": 0}
            assert sorted(r.ownership.owned) == list(range(tier.partitions))  # type: ignore[union-attr]
            import httpx

            async with httpx.AsyncClient(base_url=r.api.url) as client:
                # the ERP records an event when it receives it; the relay counts it once the
                # answer came back and the outcome was recorded: a moment later
                async def counted() -> bool:
                    st = (await client.get("/status")).json()
                    return bool(st["sinks"]["erp"]["delivered"] >= 120
                                and st["acknowledged"] >= 120)

                await eventually(counted, timeout=30, what="the relay's delivered count")
                status = (await client.get("/status")).json()
                assert status["owned"] == list(range(tier.partitions))
                assert status["sinks"]["erp"]["delivered"] >= 120
                assert status["fetched"] >= 120 and status["acknowledged"] >= 120
                assert (await client.get("/readyz")).status_code == 200
                assert (await client.get("/healthz")).json()["status"] == "ok"
                metrics = (await client.get("/metrics")).text
                assert f"edge_relay_partitions_owned {float(tier.partitions)}" in metrics

            async def acked() -> bool:
                for p in range(tier.partitions):
                    info = await tier.js.consumer_info(tier.stream, r.consumers[("erp", p)])
                    if info.num_ack_pending or info.num_pending:
                        return False
                return True

            for _ in range(100):
                if await acked():
                    break
                await asyncio.sleep(0.1)
            assert await acked(), "delivered events are acknowledged to JetStream"
        finally:
            r.stop()
            await r.close()


async def test_a_retried_event_holds_its_lot_not_the_others(tier: Tier, tmp_path: Path
                                                            ) -> None:
    async with ErpReceiver() as erp:
        # lot A's first event is refused with 503 five times; lot B flows meanwhile
        erp.reject(lambda e: e["data"]["lot_id"] == "A" and e["data"]["n"] == 0, 503, times=5)
        published = [await tier.publish("A", 0), await tier.publish("A", 1)]
        published += [await tier.publish("B", i) for i in range(2, 6)]
        r = relay(tier, erp, tmp_path, "r1")
        await r.start()
        try:
            await eventually(lambda: len(set(erp.ids())) >= 6, timeout=30)
            assert check_order(published, erp.events)["order_violations"] == 0
            refused = [q for q in erp.requests if q.status == 503]
            assert len(refused) == 5
            b_first = min(i for i, e in enumerate(erp.events) if e["data"]["lot_id"] == "B")
            a_first = min(i for i, e in enumerate(erp.events) if e["data"]["lot_id"] == "A")
            assert b_first < a_first, "lot B did not wait for lot A's retries"
        finally:
            r.stop()
            await r.close()


async def test_dead_letter_parks_its_lot_until_an_operator_replays(
        tier: Tier, tmp_path: Path) -> None:
    from edge.relay.deadletters import DeadLetters

    async with ErpReceiver() as erp:
        erp.reject(lambda e: e["data"]["lot_id"] == "A" and e["data"]["n"] == 1, 422)
        published = [await tier.publish("A", i) for i in range(4)]
        published += [await tier.publish("B", i) for i in range(4, 7)]
        r = relay(tier, erp, tmp_path, "r1")
        await r.start()
        try:
            await eventually(lambda: {e["data"]["n"] for e in erp.events} >= {0, 4, 5, 6},
                             timeout=30)
            dead = DeadLetters(tier.js, r.rc)
            await dead.setup()

            async def parked_entries() -> list[Any]:
                return await dead.entries("erp", "lot:A")

            for _ in range(100):
                if len(await parked_entries()) == 3:
                    break
                await asyncio.sleep(0.1)
            entries = await parked_entries()
            assert [e.kind for e in entries] == ["dead_letter", "parked", "parked"]
            assert entries[0].headers["Edge-Status"] == "422"
            assert {e["data"]["n"] for e in erp.events} == {0, 4, 5, 6}, \
                "lot A's later events wait behind its dead letter"
            # a new event of the parked lot is parked too, in order
            published.append(await tier.publish("A", 7))
            for _ in range(100):
                if len(await parked_entries()) == 4:
                    break
                await asyncio.sleep(0.1)
            assert len(await parked_entries()) == 4

            erp.clear_rejects()
            park = await dead.state("erp", "lot:A")
            assert park is not None and park.state == "parked"
            assert await dead.set_state(park, "replay", by="qa", why="fixed master data")
            await eventually(lambda: len(set(erp.ids())) >= 8, timeout=30,
                             what="the replayed lot at the ERP")
            assert check_order(published, erp.events) == {
                "lost": 0, "duplicates": 0, "order_violations": 0}
            for _ in range(100):
                if await dead.state("erp", "lot:A") is None:
                    break
                await asyncio.sleep(0.1)
            assert await dead.state("erp", "lot:A") is None, "the key flows again"
            assert await parked_entries() == []
            # and the lot's next event goes straight through
            published.append(await tier.publish("A", 8))
            await eventually(lambda: len(set(erp.ids())) >= 9, timeout=30)
        finally:
            r.stop()
            await r.close()


async def test_two_relays_share_the_partitions_and_take_over_a_stopped_one(
        tier: Tier, tmp_path: Path) -> None:
    async with ErpReceiver() as erp:
        r1 = relay(tier, erp, tmp_path, "r1")
        r2 = relay(tier, erp, tmp_path, "r2")
        await r1.start()
        await r2.start()
        try:
            own1, own2 = r1.ownership, r2.ownership
            assert own1 is not None and own2 is not None
            await eventually(lambda: len(own1.owned) == 2 and len(own2.owned) == 2,
                             timeout=30, what="two partitions each")
            assert not set(own1.owned) & set(own2.owned)
            published = [await tier.publish(f"L{i % 9}", i) for i in range(60)]
            await eventually(lambda: len(set(erp.ids())) >= 60, timeout=30)
            r1.stop()
            await r1.close()
            await eventually(lambda: len(own2.owned) == 4, timeout=30,
                             what="the survivor takes every partition")
            published += [await tier.publish(f"L{i % 9}", i) for i in range(60, 120)]
            await eventually(lambda: len(set(erp.ids())) >= 120, timeout=30)
            assert check_order(published, erp.events) == {
                "lost": 0, "duplicates": 0, "order_violations": 0}
        finally:
            r2.stop()
            await r2.close()


@pytest.mark.parametrize("retention", ["workqueue", "interest"])
async def test_a_stream_without_limits_retention_is_refused(tier: Tier, tmp_path: Path,
                                                            retention: str) -> None:
    from edge.errors import FatalStartupError

    await tier.js.delete_stream(tier.stream)
    await tier.js.add_stream(name=tier.stream, subjects=[f"{tier.prefix}.>"],
                             retention=retention)
    async with ErpReceiver() as erp:
        r = relay(tier, erp, tmp_path, "r1")
        with pytest.raises(FatalStartupError, match="limits retention"):
            await r.start()
        await r.nc.close()


async def test_a_gateway_with_other_partitions_is_reported_and_still_delivered(
        tier: Tier, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with ErpReceiver() as erp:
        r = relay(tier, erp, tmp_path, "r1")
        await r.start()
        try:
            wrong = Tier(tier.js, tier.tag, tier.stream, tier.prefix, partitions=3)
            events = [await wrong.publish(f"L{i}", i) for i in range(12)]
            await eventually(lambda: len(set(erp.ids())) >= len(events), timeout=30)
            assert any("event in the wrong partition" in rec.getMessage()
                       for rec in caplog.records)
        finally:
            r.stop()
            await r.close()


async def test_a_body_changed_after_ingest_is_dead_lettered_not_sent(tier: Tier,
                                                                      tmp_path: Path) -> None:
    """The nats sink sends the SHA-256 taken at ingest (``Edge-Body-Sha256``); the relay's
    forwarder checks the body against it before sending, as the gateway does."""
    from edge.relay.deadletters import DeadLetters

    async with ErpReceiver() as erp:
        r = relay(tier, erp, tmp_path, "r1")
        await r.start()
        try:
            bad = await tier.publish("A", 0, sha256="0" * 64)
            good = await tier.publish("B", 1)
            await eventually(lambda: good["id"] in erp.ids(), timeout=30)
            dead = DeadLetters(tier.js, r.rc)
            await dead.setup()

            async def dead_lettered() -> bool:
                return len(await dead.entries("erp", "lot:A")) == 1

            await eventually(dead_lettered, timeout=30)
            entry = (await dead.entries("erp", "lot:A"))[0]
            assert "integrity" in entry.headers["Edge-Reason"]
            assert bad["id"] not in erp.ids()
        finally:
            r.stop()
            await r.close()


async def test_a_relay_started_before_its_stream_waits_for_it(tier: Tier, tmp_path: Path
                                                              ) -> None:
    """Plant IT may create the stream after the relays were deployed: the relay waits
    (not ready, one line saying why) and delivers once the stream exists."""
    await tier.js.delete_stream(tier.stream)
    async with ErpReceiver() as erp:
        r = relay(tier, erp, tmp_path, "r1")
        starting = asyncio.create_task(r.start())
        try:
            await asyncio.sleep(1.5)
            assert not starting.done() and not r.started
            await tier.js.add_stream(name=tier.stream, subjects=[f"{tier.prefix}.>"])
            await asyncio.wait_for(starting, 60)
            ev = await tier.publish("A", 0)
            await eventually(lambda: ev["id"] in erp.ids(), timeout=30)
        finally:
            r.stop()
            if not starting.done():
                await starting
            await r.close()
