"""HTTP sink response policy against a real HTTP server on loopback (DESIGN.md table)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from edge.outbox import queries
from tests.support import eventually, metric, result, sink_yaml


async def test_same_idempotency_key_on_every_attempt_across_5xx(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.fail_next(3, 503)
    [eid] = await gw.pipeline.submit([result("A")])
    await erp.wait_for(lambda e: len(e.events) == 1)
    assert [r.status for r in erp.requests] == [503, 503, 503, 200]
    keys = {r.headers["idempotency-key"] for r in erp.requests}
    assert keys == {eid}
    for r in erp.requests:
        assert r.headers["x-correlation-id"] == eid  # a new chain starts at the event
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", r.headers["traceparent"])
        assert r.headers["traceparent"][3:35] == eid.replace("-", "")
    assert erp.events[0]["id"] == eid


async def test_retry_on_every_retryable_status(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    for status in (408, 425, 429, 500, 502, 503, 504):
        erp.fail_next(1, status)
    await gw.pipeline.submit([result("A")])
    await erp.wait_for(lambda e: len(e.events) == 1, within_s=20)
    assert [r.status for r in erp.requests] == [408, 425, 429, 500, 502, 503, 504, 200]


async def test_429_retry_after_seconds_is_never_retried_early(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.fail_next(1, 429, retry_after="2")
    await gw.pipeline.submit([result("A")])
    await erp.wait_for(lambda e: len(e.events) == 1, within_s=15)
    first, second = erp.requests
    assert second.at - first.at >= 2.0


async def test_503_retry_after_http_date_is_never_retried_early(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    not_before = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    erp.fail_next(1, 503, retry_after=format_datetime(not_before, usegmt=True))
    await gw.pipeline.submit([result("A")])
    await erp.wait_for(lambda e: len(e.events) == 1, within_s=15)
    assert erp.requests[1].at >= not_before.timestamp()


async def test_422_goes_to_the_dead_letter_table_with_its_body(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.reject(lambda e: e["data"].get("bad"), 422, body='{"error":"lot unknown in ERP"}')
    [bad, good] = await gw.pipeline.submit([result("A", bad=True), result("B")])
    await erp.wait_for(lambda e: len(e.events) == 1)
    await eventually(lambda: metric(gw.metrics.events_dead_lettered, "erp") == 1)
    [dl] = await gw.outbox.read(queries.dlq_list)
    assert dl["event_id"] == bad and dl["status"] == 422
    assert dl["response_body"] == '{"error":"lot unknown in ERP"}'
    assert [r.status for r in erp.requests].count(422) == 1  # not retried
    assert erp.ids() == [good]


async def test_other_4xx_dead_letter_without_retry(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.fail_next(1, 404, body="no such endpoint")
    [eid] = await gw.pipeline.submit([result("A")])
    await eventually(lambda: metric(gw.metrics.events_dead_lettered, "erp") == 1)
    [dl] = await gw.outbox.read(queries.dlq_list)
    assert (dl["event_id"], dl["status"], dl["response_body"]) == (eid, 404, "no such endpoint")


async def test_409_counts_as_delivered_duplicate(gateways, erp):
    gw = await gateways(sink_yaml(erp.url))
    erp.fail_next(1, 409, body="already exists")
    [eid] = await gw.pipeline.submit([result("A")])
    await eventually(lambda: metric(gw.metrics.events_delivered, "erp") == 1)
    assert metric(gw.metrics.events_duplicate, "erp") == 1
    await gw.outbox.sweep()  # delivered events leave the file with the deferred delete
    st = await gw.outbox.stats()
    assert st["events"] == 0 and st["dead_letters"] == 0


async def test_batch_split_isolates_one_bad_event(gateways, erp):
    # `continue`: the later events of the bad event's lot flow on (with the default `park`
    # they wait for the operator; tests/sinks/http/test_send.py covers that)
    gw = await gateways(sink_yaml(erp.url, max_batch=50, extra="on_dead_letter: continue"))
    items = [result(f"L{i % 4}", i, bad=(i == 13)) for i in range(30)]
    erp.reject(lambda e: e["data"].get("bad"), 422)
    ids = await gw.pipeline.submit(items)
    await erp.wait_for(lambda e: len(e.events) == 29, within_s=15)
    await eventually(lambda: metric(gw.metrics.events_dead_lettered, "erp") == 1)
    [dl] = await gw.outbox.read(queries.dlq_list)
    assert dl["event_id"] == ids[13]
    assert sorted(erp.ids()) == sorted(i for n, i in enumerate(ids) if n != 13)
    refused = [len(r.events) for r in erp.requests if r.status == 422]
    assert refused[0] > 1 and refused[-1] == 1  # a whole batch first, then halves


async def test_max_attempts_turns_the_last_retry_into_a_dead_letter(gateways, erp):
    gw = await gateways(sink_yaml(erp.url, extra="retry: {initial_backoff_s: 0.01, "
                                             "max_backoff_s: 0.05, max_attempts: 3}"))
    erp.outage(True)
    [eid] = await gw.pipeline.submit([result("A")])
    await eventually(lambda: metric(gw.metrics.events_dead_lettered, "erp") == 1)
    [dl] = await gw.outbox.read(queries.dlq_list)
    assert dl["event_id"] == eid and dl["reason"].startswith("gave up after 3 attempts")
    assert len(erp.requests) == 3


async def test_connection_refused_is_retried_until_the_receiver_appears(gateways, erp):
    from edge.sim.erp import ErpReceiver

    port = erp.port
    await erp.stop()
    gw = await gateways(sink_yaml(f"http://127.0.0.1:{port}"))
    [eid] = await gw.pipeline.submit([result("A")])
    await eventually(lambda: (gw.forwarders["erp"].last_error or "").startswith("connection"))
    late = await ErpReceiver(port=port).start()
    try:
        await late.wait_for(lambda e: len(e.events) == 1, within_s=15)
        assert late.ids() == [eid]
    finally:
        await late.stop()


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(gateways, erp,
                                                                             caplog):
    caplog.set_level(logging.INFO, logger="edge.forwarder")
    gw = await gateways(sink_yaml(erp.url))
    erp.outage(True)
    await gw.pipeline.submit([result("A")])
    fwd = gw.forwarders["erp"]
    await eventually(lambda: fwd.down_since is not None)
    probes_before = len(erp.requests)
    # probes every 0.2-0.5 s, each one failing: the outage goes on for several of them
    await eventually(lambda: len(erp.requests) - probes_before >= 3)
    erp.outage(False)
    await erp.wait_for(lambda e: len(e.events) == 1, within_s=10)
    await eventually(lambda: fwd.down_since is None)
    lines = [r.getMessage() for r in caplog.records if r.name == "edge.forwarder"]
    assert sum("circuit open" in m for m in lines) == 1
    assert sum("still down" in m for m in lines) == 0  # reminders come once a minute
    assert sum("circuit closed" in m for m in lines) == 1


async def test_after_a_retry_after_no_new_request_of_the_lease_starts(gateways, erp):
    """A 429 with Retry-After asks the client to wait: the other requests of the same lease
    (other lots, not retries) are not sent meanwhile; they go once the pause is over."""
    gw = await gateways(sink_yaml(erp.url, extra="max_in_flight_requests: 1\n"))
    erp.fail_next(1, 429, retry_after="2")
    await gw.pipeline.submit([result(f"L{i}") for i in range(8)])
    await erp.wait_for(lambda e: len(e.events) == 8, within_s=20)
    refused = erp.requests[0]
    assert refused.status == 429
    during = [r for r in erp.requests[1:] if r.at < refused.at + 2.0]
    assert not during, f"{len(during)} request(s) sent while the receiver asked to wait"
