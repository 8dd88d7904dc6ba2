"""Prompt recovery: after an outage, delivery resumes within one probe interval of the
receiver coming back; requests in flight when the circuit opened do not lengthen it.

Real gateway, real HTTP sink, real loopback ERP.
"""

from __future__ import annotations

from tests.support import eventually, result, sink_yaml

OPEN_S = 2.0


async def test_delivery_resumes_within_one_probe_interval_after_the_erp_is_back(
        gateways, erp):
    """Four lanes have requests in flight when the ERP goes down; the first failure opens
    the circuit for ``open_s``. Before, each late failure of the other lanes counted as a
    failed probe and doubled the wait (2 → 16 s here, 10 → 80 s with the defaults), so
    delivery resumed long after the ERP was back."""
    gw = await gateways(sink_yaml(erp.url, extra=f"""\
        max_in_flight: 4
        lease_batch: 5
        adaptive_concurrency: false  # all 20 requests on the wire at once (64 fixed)
        retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.1}}
        circuit_breaker: {{failure_threshold: 1, open_s: {OPEN_S}, max_open_s: 60}}
        """))
    erp.latency_s = 0.3  # every lane's request is in flight when the first one fails
    erp.outage(True)
    await gw.pipeline.submit([result(f"L{n}", n) for n in range(40)])
    fwd = gw.forwarders["erp"]
    await erp.wait_for(lambda e: len(e.requests) >= 20, within_s=10)  # 4 lanes x 5 events
    # ... and their failures have reached the forwarder
    await eventually(lambda: not gw.outbox.inflight("erp"), what="the failures recorded")
    assert fwd.breaker.state == "open"
    # the late failures of the other lanes are not failed probes: the next probe is due
    # within one open interval (each counted as one would have doubled it, 2 → 16 s)
    assert fwd.breaker.wait_s() <= OPEN_S, fwd.breaker.wait_s()
    erp.outage(False)
    await erp.wait_for(lambda e: len(e.events) >= 1, within_s=30)
    await erp.wait_for(lambda e: len(set(e.ids())) == 40, within_s=30)
