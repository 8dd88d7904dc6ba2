"""Delivery mode per route: ``delivery: {scheduled: {every_s: N}}`` holds a route's events
until the end of the period they were stored in, then sends them together in batches;
realtime routes of the same sink are not delayed by them, and per-key order holds.

The sink driven directly (``open_sink``) shows what one ``send`` decides; the whole
gateway (real outbox, forwarder and stand-in ERP on loopback) shows the rows waiting
without being leased over and over, and one batch per period arriving. Assertions are on
batching and arrival order, never on how long anything took; the only time bound checked
is that nothing arrives before its period ended.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from edge.components import OutcomeKind, StoredEvent
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.sinks.http.config import ScheduledDelivery
from tests.sinks.http.support import event, open_sink, stored
from tests.support import eventually, reading, result, sink_yaml, sub


def scheduled_routes(every_s: float) -> str:
    return ("[{events: [machine.reading], method: POST, path: /readings, max_batch: 100, "
            f"delivery: {{scheduled: {{every_s: {every_s:g}}}}}}}, "
            "{events: ['*'], method: POST, path: /events, max_batch: 100}]")


def at(events: list[StoredEvent], received_at: float) -> list[StoredEvent]:
    return [replace(ev, received_at=received_at) for ev in events]


def ns(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["n"] for e in events]


# ------------------------------------------------------------------ the sink, one send


async def test_an_event_of_a_running_period_is_deferred_to_its_end(erp):
    now = time.time()
    due = (now // 3600 + 1) * 3600
    async with open_sink(erp.url, routes=scheduled_routes(3600)) as sink:
        outcomes = await sink.send(at(stored([
            event("machine.reading", None, 1, value=1.0),
            event("inspection.result", "L1", 2, result="pass")]), now))
    deferred, sent = outcomes
    assert (deferred.kind, deferred.attempted) == (OutcomeKind.retry, False)
    assert deferred.defer_s is not None and 0 < deferred.defer_s <= due - now
    assert deferred.reason.startswith("scheduled delivery: sent with the batch at ")
    assert deferred.reason.endswith(time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(due)))
    assert sent.kind is OutcomeKind.delivered  # the realtime route is not delayed
    assert [(r.path, ns(r.events)) for r in erp.requests] == [("/events", [2])]


async def test_events_of_an_ended_period_are_sent_together(erp):
    ended = time.time() - 3600
    async with open_sink(erp.url, routes=scheduled_routes(900)) as sink:
        outcomes = await sink.send(at(stored([
            event("machine.reading", None, n, value=float(n)) for n in range(5)]), ended))
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered] * 5
    assert [(r.path, ns(r.events)) for r in erp.requests] == [("/readings", [0, 1, 2, 3, 4])]


async def test_an_event_without_a_storage_time_is_due(erp):
    async with open_sink(erp.url, routes=scheduled_routes(3600)) as sink:
        [outcome] = await sink.send(stored([event("machine.reading", None, 1, value=1.0)]))
    assert outcome.kind is OutcomeKind.delivered


async def test_a_deferred_event_holds_the_later_events_of_its_key(erp):
    async with open_sink(erp.url, routes=scheduled_routes(3600)) as sink:
        outcomes = await sink.send(at(stored([
            event("machine.reading", "L1", 1, value=1.0),
            event("inspection.result", "L1", 2, result="pass"),
            event("inspection.result", "L2", 3, result="pass")]), time.time()))
    assert [o.kind for o in outcomes] == [OutcomeKind.retry, OutcomeKind.retry,
                                          OutcomeKind.delivered]
    assert outcomes[0].defer_s is not None
    assert outcomes[1].attempted is False and outcomes[1].defer_s is None
    assert ns(erp.events) == [3]


async def test_a_body_its_schema_refuses_is_dead_lettered_at_once_not_a_period_later(
        erp, tmp_path):
    schema = tmp_path / "reading.json"
    schema.write_text('{"properties": {"data": {"required": ["signal"]}}}')
    routes = ("[{events: [machine.reading], path: /readings, max_batch: 100, "
              f"schema_file: '{schema}', delivery: {{scheduled: {{every_s: 3600}}}}}}]")
    async with open_sink(erp.url, routes=routes) as sink:
        outcomes = await sink.send(at(stored([
            event("machine.reading", None, 1, value=1.0),
            event("machine.reading", None, 2, value=2.0, signal="t")]), time.time()))
    assert [o.kind for o in outcomes] == [OutcomeKind.dead_letter, OutcomeKind.retry]
    assert outcomes[0].reason == "schema reading.json: data: 'signal' is a required property"


@pytest.mark.parametrize(("every_s", "received_at", "due"), [
    (900, 1_800_000_000.0, 1_800_000_900.0),  # on a boundary: the next one
    (900, 1_800_000_899.9, 1_800_000_900.0),
    (3600, 1_800_001_234.5, 1_800_003_600.0),
    (1, 10.25, 11.0),
])
def test_the_period_ends_at_a_multiple_of_every_s_since_the_epoch(every_s, received_at, due):
    delivery = ScheduledDelivery.model_validate({"scheduled": {"every_s": every_s}})
    assert delivery.due_at(received_at) == due


@pytest.mark.parametrize(("delivery", "message"), [
    ("scheduled", "routes[0].delivery: a scheduled route needs its period: delivery: "
                  "{scheduled: {every_s: 900}}"),
    ("{scheduled: {every_s: 0.5}}", "routes[0].delivery.scheduled.every_s: Input should be "
                                    "greater than or equal to 1"),
    ("{scheduled: {every_s: 90000}}", "routes[0].delivery.scheduled.every_s: Input should "
                                      "be less than or equal to 86400"),
    ("{scheduled: {every: 60}}", "routes[0].delivery.scheduled.every: unknown key "
                                 "(allowed: every_s)"),
    ("{schedule: {every_s: 60}}", "routes[0].delivery: must be realtime or {scheduled: "
                                  "{every_s: N}}, got keys schedule"),
    ("batch", "routes[0].delivery: must be realtime or {scheduled: {every_s: N}}, got "
              "'batch'"),
])
def test_delivery_config_errors_name_the_option(delivery, message):
    text = "site: s\n" + sink_yaml("http://127.0.0.1:9", routes=(
        f"[{{events: ['*'], path: /e, delivery: {delivery}}}]"))
    with pytest.raises(ConfigError) as err:
        load_config_text(text)
    assert message in str(err.value)


def test_realtime_is_the_default():
    text = "site: s\n" + sink_yaml("http://127.0.0.1:9")
    assert load_config_text(text).sinks[0].routes[0].delivery == "realtime"


# ------------------------------------------------------------------ the whole gateway


async def test_each_period_arrives_as_one_batch_and_never_before_it_ended(gateways, erp):
    gw = await gateways(sink_yaml(erp.url, routes=scheduled_routes(1)))
    for first, count in ((0, 5), (5, 3)):
        stored_after = time.time()
        await gw.pipeline.submit([reading(n) for n in range(first, first + count)])
        await erp.wait_for(lambda e, n=first + count: len(e.events) == n)
        batch = erp.requests[-1]
        # one commit, one period: the period's events arrive in one request, in order
        assert (batch.path, ns(batch.events)) == ("/readings",
                                                  list(range(first, first + count)))
        assert batch.at >= math.floor(stored_after) + 1  # not before its period ended
    assert [r.path for r in erp.requests] == ["/readings", "/readings"]


async def test_a_scheduled_event_keeps_its_place_in_its_keys_order(gateways, erp):
    """A result of lot A stored after a scheduled reading of lot A waits for the reading's
    batch; lot B's result does not."""
    gw = await gateways(sink_yaml(erp.url, routes=scheduled_routes(1)))
    await gw.pipeline.submit([sub("machine.reading", key="lot:A", n=1),
                              sub("inspection.result", key="lot:A", n=2),
                              sub("inspection.result", key="lot:B", n=3)])
    await erp.wait_for(lambda e: len(e.events) == 3)
    assert [(r.path, ns(r.events)) for r in erp.requests] == [
        ("/events", [3]), ("/readings", [1]), ("/events", [2])]


async def test_waiting_rows_are_leased_once_and_realtime_events_go_past_them(gateways, erp):
    """Every lane keeps leasing while readings wait for their period (an hour here): the
    readings are not leased again, count no attempt and write no audit row; a result
    stored after them is delivered at once."""
    if 3600 - time.time() % 3600 < 60:  # the hour ends too soon for this test
        await asyncio.sleep(3600 - time.time() % 3600 + 1)
    gw = await gateways(sink_yaml(erp.url, routes=scheduled_routes(3600)))
    leased: Counter[int] = Counter()
    calls = [0]
    lease = gw.outbox.lease

    async def counting(sink: str, limit: int, **kw: Any) -> list[StoredEvent]:
        batch = await lease(sink, limit, **kw)
        calls[0] += 1
        leased.update(ev.seq for ev in batch)
        return batch

    gw.outbox.lease = counting
    ids = await gw.pipeline.submit([reading(n) for n in range(5)])
    [realtime] = await gw.pipeline.submit([result("A", 5)])
    await erp.wait_for(lambda e: realtime in e.ids())
    seen = calls[0]
    await eventually(lambda: calls[0] >= seen + 12, what="a dozen more leases")
    rows = await gw.outbox.read(lambda c: c.execute(
        "SELECT d.seq, d.attempts, d.last_error FROM deliveries d "
        "JOIN events e ON e.seq = d.seq WHERE e.id IN (?,?,?,?,?)", ids).fetchall())
    assert len(rows) == 5
    assert all(attempts == 0 and err.startswith("scheduled delivery: sent with the batch at ")
               for _, attempts, err in rows)
    assert {leased[seq] for seq, _, _ in rows} == {1}  # each leased once, not over and over
    retries = await gw.outbox.read(lambda c: c.execute(
        "SELECT COUNT(*) FROM audit WHERE state = 'retry'").fetchone()[0])
    assert retries == 0
    assert [r.path for r in erp.requests] == ["/events"]
