"""Per-key order with keys in parallel; outages drain with zero loss; breaker and pauses."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from tests.support import eventually, metric, reading, result, sink_yaml


def _per_key(events: list[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for e in events:
        out[e["ordering_key"]].append(e["data"]["n"])
    return out


async def test_per_key_order_kept_while_another_key_retries(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.reject(lambda e: e["ordering_key"] == "lot:A", 503, times=4)
    items = []
    for n in range(10):
        items += [result("A", n), result("B", n)]
    await gw.pipeline.submit(items)
    # B flows while A is being retried
    await erp.wait_for(lambda e: _per_key(e.events).get("lot:B") == list(range(10)))
    assert len(_per_key(erp.events).get("lot:A", [])) < 10
    await erp.wait_for(lambda e: len(e.events) == 20, within_s=15)
    assert _per_key(erp.events)["lot:A"] == list(range(10))
    assert len(set(erp.ids())) == 20


async def test_per_key_order_in_batches_with_a_failing_batch(gateways, erp):
    gw = await gateways(sink_yaml(erp.url, max_batch=10))
    erp.fail_next(3, 502)
    items = [result(f"L{n % 3}", n) for n in range(60)]
    await gw.pipeline.submit(items)
    await erp.wait_for(lambda e: len(e.events) == 60, within_s=15)
    for key, ns in _per_key(erp.events).items():
        assert ns == sorted(ns), key


async def test_a_long_outage_drains_with_zero_loss_and_order_kept(gateways, erp):
    """Ten minutes of production at 10 events/s (6,000 events), compressed: the ERP is down
    while they are produced, then comes back; every event arrives once, in order per lot."""
    gw = await gateways(sink_yaml(erp.url, max_batch=100))
    erp.outage(True)
    produced: list[str] = []
    for minute in range(10):
        batch = [result(f"L{(minute * 600 + i) // 50}", minute * 600 + i) for i in range(600)]
        for i in range(0, 600, 60):
            produced += await gw.pipeline.submit(batch[i:i + 60])
            await asyncio.sleep(0.01)  # production's pace
    await eventually(lambda: gw.forwarders["erp"].breaker.state != "closed")
    assert metric(gw.metrics.sink_circuit_open, "erp") == 1
    requests_during_outage = len(erp.requests)
    erp.outage(False)
    await erp.wait_for(lambda e: len(e.events) >= 6000, within_s=60)
    await eventually(lambda: gw.outbox.inflight("erp") == set())
    assert sorted(erp.ids()) == sorted(produced)  # nothing lost, nothing doubled
    for key, ns in _per_key(erp.events).items():
        assert ns == sorted(ns), key
    await gw.outbox.sweep()  # delivered events leave the file with the deferred delete
    st = await gw.outbox.stats()
    assert st["events"] == 0
    # the breaker kept the ERP from being hammered while it was down
    assert requests_during_outage < 60


async def test_retry_after_pauses_the_whole_sink(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.fail_next(1, 429, retry_after="2")
    await gw.pipeline.submit([result("A", 0)])
    await erp.wait_for(lambda e: len(e.requests) == 1)
    t0 = erp.requests[0].at
    await gw.pipeline.submit([result("B", 1), reading(2)])  # other keys wait too
    await erp.wait_for(lambda e: len(e.events) == 3, within_s=15)
    assert all(r.at - t0 >= 2.0 for r in erp.requests[1:])


async def test_critical_events_overtake_a_telemetry_backlog(gateways, erp):
    gw = await gateways(sink_yaml(erp.url, max_batch=20,
                                  extra="lease_batch: 20\nmax_in_flight: 1"))
    erp.outage(True)
    await gw.pipeline.submit([reading(n) for n in range(400)])
    await eventually(lambda: gw.forwarders["erp"].breaker.state != "closed")
    from edge.components import Submission
    from edge.events import make_event

    [hold] = await gw.pipeline.submit([Submission(make_event(
        type="quality.hold", site="test-site", source="qc",
        data={"lot_id": "L9", "reason": "SPC rule 1"}, ordering_key="lot:L9"))])
    erp.outage(False)
    await erp.wait_for(lambda e: len(e.events) >= 1, within_s=15)
    assert erp.events[0]["id"] == hold
    assert erp.events[0]["class"] == "critical"
    await erp.wait_for(lambda e: len(e.events) == 401, within_s=30)


async def test_drain_rate_limit_spreads_a_backlog(gateways, erp):
    gw = await gateways(sink_yaml(erp.url, max_batch=50, extra="rate_limit_per_s: 100"))
    erp.outage(True)
    await gw.pipeline.submit([reading(n) for n in range(300)])
    await eventually(lambda: gw.forwarders["erp"].breaker.state != "closed")
    erp.outage(False)
    start = time.monotonic()
    await erp.wait_for(lambda e: len(e.events) == 300, within_s=30)
    # 300 events at 100/s with a 100-event burst cannot take less than ~2 s
    assert time.monotonic() - start >= 1.5
