"""A relay rides out a restart of its NATS server (a private ``nats-server -js``, stopped
for longer than the lease TTL): it stops delivering when it cannot renew its leases,
takes its partitions again when the server is back, and every event arrives, in lot
order."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge.config import load_config_text
from edge.relay.relay import Relay
from edge.sim.erp import ErpReceiver
from tests.relay.conftest import NATS_URL, Tier, check_order
from tests.support import eventually


async def test_relay_survives_a_server_restart_without_loss_or_reordering(
        nats_servers, tmp_path: Path) -> None:
    import nats

    server = nats_servers()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    tier = Tier(js, "restart", "EV_RESTART", "trestart")
    await js.add_stream(name=tier.stream, subjects=[f"{tier.prefix}.>"])
    text = tier.relay_yaml("http://127.0.0.1:1", relay_id="r1").replace(
        NATS_URL, server.url).replace(
        "  lease_ttl_s: 3\n", "  lease_ttl_s: 3\n  reconnect_wait_s: 0.2\n")
    async with ErpReceiver(latency_s=0.01) as erp:
        cfg = load_config_text(text.replace("http://127.0.0.1:1", erp.url), base_dir=tmp_path)
        relay = Relay(cfg)  # type: ignore[arg-type]
        await relay.start()
        published = []
        try:
            for i in range(100):
                published.append(await tier.publish(f"L{i % 6}", i))
            await eventually(lambda: len(set(erp.ids())) >= 30, timeout=30)
            server.stop()
            await asyncio.sleep(4.5)  # longer than the lease TTL
            assert relay.ownership is not None
            assert not any(relay.ownership.holds(p) for p in range(tier.partitions))
            server.start()
            await eventually(lambda: nc.is_connected, timeout=30, what="test client back")
            for i in range(100, 160):
                published.append(await tier.publish(f"L{i % 6}", i))
            await eventually(lambda: len(set(erp.ids())) >= 160, timeout=60,
                             what="every event after the restart")
        finally:
            relay.stop()
            await relay.close()
            await nc.close()
        report = check_order(published, erp.events)
        assert report["lost"] == 0 and report["order_violations"] == 0, report
