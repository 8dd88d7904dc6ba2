"""``HttpSink.send`` against a real HTTP receiver on loopback: per-key order across routes,
batches, groups and splits (DESIGN invariant 4), and every request's identity (invariant 3).

The sink is driven directly (``tests.sinks.http.support.open_sink``: no outbox, no
forwarder), so a test sees exactly what one ``send`` did.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pytest

from edge.components import OutcomeKind
from edge.delivery import blocks_key
from edge.events import Event
from tests.sinks.http.support import event, open_sink, stored

HOLD_AND_EVENTS = ('[{events: [lot.status, quality.hold], method: PUT, '
                   'path: "/lots/{data.lot_id}/status"}, '
                   '{events: ["*"], method: POST, path: /events, max_batch: 100}]')


def ns(records: Sequence[dict[str, Any]]) -> list[int]:
    return [e["data"]["n"] for e in records]


# ------------------------------------------------------------------ order across routes


async def test_a_hold_between_two_inspections_of_its_lot_arrives_between_them(erp):
    """The issue's lease: [inspection#1, hold#2, inspection#3] of one lot. Before, the
    inspections shared one open batch and the ERP saw POST [1,3] then PUT [2]."""
    async with open_sink(erp.url, routes=HOLD_AND_EVENTS) as sink:
        outcomes = await sink.send(stored([
            event("inspection.result", "L1", 1), event("quality.hold", "L1", 2),
            event("inspection.result", "L1", 3)]))
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered] * 3
    assert [(r.method, r.path, ns(r.events)) for r in erp.requests] == [
        ("POST", "/events", [1]), ("PUT", "/lots/L1/status", [2]), ("POST", "/events", [3])]


async def test_other_lots_still_share_the_open_batch(erp):
    """Only the key whose later request exists starts a new batch; other keys keep joining."""
    async with open_sink(erp.url, routes=HOLD_AND_EVENTS) as sink:
        await sink.send(stored([
            event("inspection.result", "A", 1), event("inspection.result", "B", 2),
            event("quality.hold", "A", 3), event("inspection.result", "B", 4),
            event("inspection.result", "A", 5), event("machine.reading", None, 6)]))
    posts = [ns(r.events) for r in erp.requests if r.method == "POST"]
    assert posts == [[1, 2, 4], [5, 6]]  # the new request is the open batch from then on
    assert ns(erp.events).index(3) < ns(erp.events).index(5)


async def test_a_dead_letter_in_a_split_batch_parks_the_rest_of_its_key(erp):
    """Splitting a refused batch: once an element of a key is not delivered, later elements
    of that key in the batch are not sent. Before, only a retry stopped them."""
    erp.reject(lambda e: e["data"].get("bad"), 422)
    async with open_sink(erp.url, max_batch=100) as sink:
        outcomes = await sink.send(stored([
            event("inspection.result", "A", 1, bad=True), event("inspection.result", "A", 2),
            event("inspection.result", "B", 3), event("inspection.result", "B", 4)]))
    assert [o.kind for o in outcomes] == [OutcomeKind.dead_letter, OutcomeKind.retry,
                                          OutcomeKind.delivered, OutcomeKind.delivered]
    assert outcomes[1].attempted is False
    assert ns(erp.events) == [3, 4]


async def test_on_dead_letter_continue_lets_the_key_flow_past_a_dead_letter(erp):
    erp.reject(lambda e: e["data"].get("bad"), 422)
    async with open_sink(erp.url, max_batch=100, extra="on_dead_letter: continue") as sink:
        outcomes = await sink.send(stored([
            event("inspection.result", "A", 1, bad=True), event("inspection.result", "A", 2)]))
    assert [o.kind for o in outcomes] == [OutcomeKind.dead_letter, OutcomeKind.delivered]
    assert ns(erp.events) == [2]


MIXED_ROUTES = ('[{events: [lot.status, quality.hold], method: PUT, '
                'path: "/lots/{data.lot_id}/status"}, '
                '{events: [nonconformance.*], method: POST, path: /ncs, max_batch: 3}, '
                '{events: [inspection.*, machine.*], method: POST, path: /events, max_batch: 4}]')
TYPES = ["inspection.result"] * 6 + ["quality.hold", "lot.status", "nonconformance.opened",
                                     "nonconformance.opened", "machine.reading", "other.note"]


def _generated_lease(rng: random.Random, size: int) -> list[Event]:
    """Hostile traffic: four lots and unkeyed readings over three routes, unrouted types,
    unsafe path values, and events the receiver refuses (422) or cannot take now (503)."""
    out = []
    for n in range(size):
        type_ = rng.choice(TYPES)
        lot = None if type_ == "machine.reading" else rng.choice("ABCD")
        roll = rng.random()
        data: dict[str, Any] = {}
        if roll < 0.08:
            data["verdict"] = "bad"
        elif roll < 0.13:
            data["verdict"] = "busy"
        elif roll < 0.18 and type_ in ("quality.hold", "lot.status"):
            data["lot_id"] = rng.choice(["..", ".", ""])
        out.append(event(type_, lot, n, **data))
    return out


@pytest.mark.parametrize("on_dead_letter", ["park", "continue"])
async def test_generated_leases_keep_each_keys_order_whatever_routes_and_failures(
        erp, on_dead_letter):
    """Whatever routes, batches, groups and splits are involved, the receiver applies each
    key's events in seq order, and nothing after a not-delivered event of a key (retried,
    unrouted, dead-lettered when parking) is applied in that send."""
    erp.reject(lambda e: e["data"].get("verdict") == "bad", 422)
    erp.reject(lambda e: e["data"].get("verdict") == "busy", 503)
    park = on_dead_letter == "park"
    kinds: set[OutcomeKind] = set()
    async with open_sink(erp.url, routes=MIXED_ROUTES,
                         extra=f"on_dead_letter: {on_dead_letter}\n"
                               "max_in_flight_requests: 4") as sink:
        for seed in range(25):
            rng = random.Random(seed)
            lease = stored(_generated_lease(rng, rng.randint(1, 60)))
            before = len(erp.events)
            outcomes = await sink.send(lease)
            assert len(outcomes) == len(lease)
            applied: dict[str | None, list[str]] = defaultdict(list)
            for e in erp.events[before:]:
                applied[e["ordering_key"]].append(e["id"])
            expected: dict[str | None, list[str]] = defaultdict(list)
            stopped: set[str] = set()
            for ev, o in zip(lease, outcomes, strict=True):
                kinds.add(o.kind)
                key = ev.ordering_key
                if key in stopped:  # refused with its request, or not sent at all
                    assert o.kind is not OutcomeKind.delivered, (seed, ev.seq, o)
                    continue
                if o.kind is OutcomeKind.delivered:
                    expected[key].append(ev.id)
                elif key is not None and blocks_key(o, park):
                    stopped.add(key)
            # unkeyed events promise no order: compare them as a set
            assert sorted(applied.pop(None, [])) == sorted(expected.pop(None, [])), seed
            assert dict(applied) == dict(expected), seed
    assert {OutcomeKind.delivered, OutcomeKind.dead_letter, OutcomeKind.retry,
            OutcomeKind.unrouted} <= kinds


# ------------------------------------------------------------------ identity


async def test_one_event_on_a_batched_route_carries_its_event_id(erp):
    """A batch of one (a live event, a probe) is keyed by its event id, not a batch hash."""
    async with open_sink(erp.url, max_batch=100) as sink:
        [only] = stored([event("inspection.result", "A", 1)])
        await sink.send([only])
    [req] = erp.requests
    assert req.headers["idempotency-key"] == only.id
    assert [e["id"] for e in req.events] == [only.id]  # still a JSON array


async def test_split_halves_keep_ids_and_a_batch_keeps_its_key_across_attempts(erp):
    erp.fail_next(1, 503)
    erp.reject(lambda e: e["data"].get("bad"), 422)
    lease = stored([event("inspection.result", lot, n, bad=(n == 3))
                    for n, lot in enumerate("ABCD")])
    async with open_sink(erp.url, max_batch=100) as sink:
        first = await sink.send(lease)
        assert {o.kind for o in first} == {OutcomeKind.retry}
        await sink.send(lease)
    keys = [r.headers["idempotency-key"] for r in erp.requests]
    # 503 and 422 on the whole batch (same key), then [A,B] and [C,D], then [C] and [D]
    assert [len(r.events) for r in erp.requests] == [4, 4, 2, 2, 1, 1]
    assert keys[0] == keys[1] and keys[0].startswith("batch-")
    assert keys[2].startswith("batch-") and keys[3].startswith("batch-")
    assert keys[4:] == [lease[2].id, lease[3].id]
    for r in erp.requests:  # every element of every request carries its own id
        assert all(e["id"] for e in r.events)


async def test_batch_key_is_stable_for_the_same_events(erp):
    lease = stored([event("inspection.result", "A", n) for n in range(3)])
    for _ in range(2):  # a restart in between: a new sink, the same events
        async with open_sink(erp.url, max_batch=10) as sink:
            await sink.send(lease)
    a, b = (r.headers["idempotency-key"] for r in erp.requests)
    assert a == b and a.startswith("batch-")
