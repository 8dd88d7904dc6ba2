"""Adaptive request concurrency, end to end: a real gateway (outbox, forwarder lanes, HTTP
sink) against the stand-in ERP on loopback answering in 50 ms.

A user relies on: a per-event route over many lots keeps many requests in flight without
any configuration (far more than the fixed 8 of before), one lot's requests never overlap
and arrive in order, and when the ERP rate-limits (429 + Retry-After) the sink sends fewer
requests at once and never comes back early. Figures (events/s) are in
bench/bench_adaptive.py, not here: these tests count, they do not time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from typing import Any

from edge.sim.erp import Answer, RequestRecord
from tests.support import eventually, result, sink_yaml

LATENCY_S = 0.05


def max_overlap(records: list[RequestRecord]) -> int:
    """The most requests the ERP was working on at one moment (arrival → answer)."""
    edges = sorted([(r.mono, 1) for r in records] + [(r.answered_mono, -1) for r in records],
                   key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def lot_of(record: RequestRecord) -> str:
    [event] = record.events
    return str(event["data"]["lot_id"])


def assert_lots_in_order(records: list[RequestRecord]) -> None:
    """Per lot: no two requests overlap at the ERP, and accepted events arrive in order."""
    by_lot: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in records:
        by_lot[lot_of(r)].append(r)
    for lot, rs in by_lot.items():
        rs.sort(key=lambda r: r.mono)
        for a, b in zip(rs, rs[1:], strict=False):
            assert b.mono >= a.answered_mono, f"two requests of {lot} overlapped"
        accepted = [r.events[0]["data"]["n"] for r in rs if r.applied]
        assert accepted == sorted(accepted), f"{lot} out of order: {accepted}"


async def test_a_per_event_route_over_many_lots_keeps_far_more_requests_in_flight(
        gateways, erp):
    """One event per request, 400 lots, no concurrency settings: the ERP sees far more
    requests at once than the fixed limit of 8 of before (max_connections was 8 too)."""
    erp.latency_s = LATENCY_S
    lots, per_lot = 400, 5
    gw = await gateways(sink_yaml(erp.url))
    await gw.pipeline.submit([result(f"L{lot:03d}", n) for n in range(per_lot)
                              for lot in range(lots)])
    await erp.wait_for(lambda e: len(e.events) == lots * per_lot, within_s=120)
    applied = [r for r in erp.requests if r.applied]
    assert len(applied) == lots * per_lot and len(set(erp.ids())) == lots * per_lot
    assert max_overlap(erp.requests) >= 24  # three times the old fixed limit
    assert_lots_in_order(erp.requests)
    status = gw.forwarders["erp"].status()["concurrency"]
    assert status["ceiling"] == 128 and status["adaptive"] is True
    assert gw.metrics.registry.get_sample_value("edge_sink_concurrency", {"sink": "erp"}) \
        == status["limit"]


async def test_without_adaptive_concurrency_the_fixed_limit_holds_for_the_whole_sink(
        gateways, erp):
    """``adaptive_concurrency: false``: ``max_in_flight_requests`` is the fixed limit of the
    whole sink, all lanes together (4 lanes of 200 events each here)."""
    erp.latency_s = LATENCY_S
    gw = await gateways(sink_yaml(erp.url, extra="adaptive_concurrency: false\n"
                                               "max_in_flight_requests: 6\n"
                                               "lease_batch: 200\n"))
    await gw.pipeline.submit([result(f"L{lot:03d}", 0) for lot in range(300)])
    await erp.wait_for(lambda e: len(e.events) == 300, within_s=60)
    assert max_overlap(erp.requests) <= 6
    assert gw.forwarders["erp"].status()["concurrency"]["limit"] == 6


async def test_under_rate_limiting_the_limit_drops_and_no_request_comes_before_its_retry_after(
        gateways, erp):
    """The ERP takes 60 requests a second and answers 429 with ``Retry-After: 1`` above
    that. The sink's limit comes down, nothing of a lot is sent again before the
    Retry-After its 429 gave has passed, and every event arrives once, in lot order."""
    erp.latency_s = LATENCY_S
    window = {"start": 0.0, "count": 0}
    per_second = 60

    async def rate_limit(events: list[dict[str, Any]], headers: dict[str, str]
                         ) -> Answer | None:
        now = time.monotonic()
        if now - window["start"] >= 1.0:
            window.update(start=now, count=0)
        window["count"] += 1
        if window["count"] > per_second:
            return Answer(429, {"Retry-After": "1"}, '{"error": "rate limited"}',
                          fault="rate limit")
        return None

    erp.intercept = rate_limit
    lots = 150
    gw = await gateways(sink_yaml(erp.url))
    limiter = gw.forwarders["erp"].concurrency
    assert limiter is not None
    limits: list[tuple[float, int]] = []

    async def watch() -> None:
        while True:
            limits.append((time.monotonic(), limiter.limit))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        await gw.pipeline.submit([result(f"L{lot:03d}", n) for n in range(2)
                                  for lot in range(lots)])
        await erp.wait_for(lambda e: len(e.events) == 2 * lots, within_s=120)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    refused = [r for r in erp.requests if r.status == 429]
    assert refused, "the ERP never rate-limited: the test proves nothing"
    # the limit came down after the first 429
    first = refused[0].answered_mono
    before = max(limit for t, limit in limits if t <= first)
    after = min(limit for t, limit in limits if t > first)
    assert after < before and limiter.cuts >= 1
    # no request of a lot before the Retry-After its 429 gave
    for r in refused:
        assert r.not_before_mono is not None
        early = [x for x in erp.requests
                 if lot_of(x) == lot_of(r) and r.answered_mono < x.mono < r.not_before_mono]
        assert not early, f"{lot_of(r)} sent again {r.not_before_mono - early[0].mono:.3f} s " \
                          "before its Retry-After"
    assert sorted(erp.ids()) == sorted(set(erp.ids()))  # each event accepted once
    assert_lots_in_order(erp.requests)
    await eventually(lambda: gw.forwarders["erp"].status()["paused_for_s"] == 0)


async def test_a_receiver_that_is_down_is_not_sent_the_rest_of_a_lease(gateways, erp):
    """The ERP answers every request 503 (no Retry-After) after 50 ms. A lane holding 200
    per-event requests stops after a few failures instead of sending all of them one
    after the other; the events stay queued and arrive once the ERP is back."""
    erp.latency_s = LATENCY_S
    erp.outage(True)
    gw = await gateways(sink_yaml(erp.url, extra="""\
        max_in_flight: 1
        lease_batch: 200
        circuit_breaker: {failure_threshold: 1, open_s: 2, max_open_s: 2}
        """))
    await gw.pipeline.submit([result(f"L{lot:03d}", 0) for lot in range(200)])
    await eventually(lambda: gw.forwarders["erp"].breaker.state != "closed",
                     what="the circuit open")
    await eventually(lambda: not gw.outbox.inflight("erp"), what="the lease given back")
    assert len(erp.requests) <= 24, f"{len(erp.requests)} requests sent to a receiver " \
                                    "that answered 503 to each"
    erp.outage(False)
    await erp.wait_for(lambda e: len(set(e.ids())) == 200, within_s=60)
    assert len(erp.events) == 200
