"""Delivery latency per sink and event type: the figure a per-type delivery SLA
("lot.status within 60 s") is judged on, from ingest to the receiver's confirmation.

Real gateway, real HTTP sink, real loopback ERP.
"""

from __future__ import annotations

from tests.support import eventually, reading, result, sample, sink_yaml

NAME = "edge_delivery_latency_seconds_count"


async def test_each_delivered_event_is_timed_under_its_sink_and_type(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    await gw.pipeline.submit([result("L1", 1), result("L1", 2), reading(3)])
    await eventually(lambda: len(erp.events) == 3, what="three events delivered")
    await eventually(lambda: sample(gw, NAME, sink="erp", type="machine.reading") == 1,
                     what="the reading timed")
    assert sample(gw, NAME, sink="erp", type="inspection.result") == 2


async def test_an_event_not_yet_delivered_is_not_timed(gateways, erp):
    erp.outage(True)
    gw = await gateways(sink_yaml(erp.url))
    await gw.pipeline.submit([result("L1", 1)])
    await erp.wait_for(lambda e: len(e.requests) >= 1, within_s=15)
    assert sample(gw, NAME, sink="erp", type="inspection.result") == 0
    erp.outage(False)
    await eventually(lambda: sample(gw, NAME, sink="erp", type="inspection.result") == 1,
                     what="the result timed once delivered")
