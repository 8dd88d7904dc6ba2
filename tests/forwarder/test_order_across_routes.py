"""Per-lot order across routes under faults, measured from outside (DESIGN invariant 4).

A real mosquitto, a real gateway with the spec-limit rule, and the stand-in ERP refusing a
random tenth of requests with 503. Results go batched to ``POST /events``; the rule's
nonconformances one by one to ``POST /nonconformances``; holds to ``PUT /lots/{lot}/hold``.
The checker reads what the ERP applied: per lot, every event must arrive in ingest order
— each result in publish order, and the events derived from a result right after it
(nonconformance, then hold), whatever routes, batches, splits and retries were involved.
Before the fix, a lease ``[result#1, hold#2, result#3]`` reached the ERP as ``POST [1,3]``
then ``PUT [2]``, and derived events landed after the rest of their MQTT batch.
"""

from __future__ import annotations

import asyncio
import random
import textwrap
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from edge.sim.erp import ErpReceiver
from tests.fixtures.mosquitto import Broker, inspection, start_publisher, wait_connected
from tests.support import mqtt_source_yaml

pytestmark = pytest.mark.mqtt

LOTS = 24
PER_LOT = 40
# the order a failing part's events are stored in (docs/quality.md: a failure that opens a
# hold episode is followed by the hold, the lot status, a supplier case, notifications)
RANK = {"inspection.result": 0, "nonconformance": 1, "quality.hold": 2, "lot.status": 3,
        "supplier.case": 4, "notification": 5}
AUDIENCES = ["procurement", "planning"]  # the default notify list, in its order


def gateway_yaml(broker_url: str, erp_url: str) -> str:
    return mqtt_source_yaml(broker_url) + textwrap.dedent(f"""\
        rules:
          - {{type: spec_limits, field: measured, upper: 10.05}}
        sinks:
          - id: erp
            type: http
            url: {erp_url}
            retry: {{initial_backoff_s: 0.02, max_backoff_s: 0.2}}
            circuit_breaker: {{failure_threshold: 1000, open_s: 0.2, max_open_s: 0.5}}
            routes:
              - {{events: [quality.hold], method: PUT, path: "/lots/{{data.lot_id}}/hold"}}
              - {{events: [nonconformance], method: POST, path: /nonconformances}}
              - {{events: ["*"], method: POST, path: /events, max_batch: 50}}
        """)


def order_violations(applied: list[dict[str, Any]], publish_order: dict[str, list[str]]
                     ) -> list[str]:
    """Per lot, the rank of each first-applied event must grow: (message position, kind)."""
    position = {mid: i for mids in publish_order.values() for i, mid in enumerate(mids)}
    by_event_id: dict[str, int] = {}
    for ev in applied:
        if ev["type"] == "inspection.result":
            by_event_id[ev["id"]] = position[ev["data"]["message_id"]]
    last: dict[str, tuple[int, int, int]] = {}
    seen: set[str] = set()
    problems = []
    for ev in applied:
        if ev["id"] in seen:
            continue  # a repeat of an applied event (same Idempotency-Key) is not an order
        seen.add(ev["id"])
        data = ev["data"]
        cause = ev["id"] if ev["type"] == "inspection.result" else (
            data.get("inspection_event_id") or data["cause_event_id"])
        if cause not in by_event_id:
            problems.append(f"{ev['type']} {ev['id']} arrived before its cause {cause}")
            continue
        audience = data.get("audience")
        rank = (by_event_id[cause], RANK[ev["type"]],
                AUDIENCES.index(audience) if audience in AUDIENCES else 0)
        lot = data["lot_id"]
        if lot in last and rank <= last[lot]:
            problems.append(f"lot {lot}: {ev['type']} {rank} after {last[lot]}")
        last[lot] = rank
    return problems


async def test_each_lot_arrives_in_ingest_order_across_routes_under_5xx(
        mosquitto: Broker, erp: ErpReceiver, gateways: Callable[..., Any]) -> None:
    rng = random.Random(7)
    erp.reject(lambda e: rng.random() < 0.1, 503)
    gw = await gateways(gateway_yaml(mosquitto.url, erp.url))
    await wait_connected(gw)
    pub = await start_publisher(mosquitto.url)
    publish_order: dict[str, list[str]] = defaultdict(list)
    failing = 0
    for n in range(PER_LOT):
        for lot in range(LOTS):
            mid = f"L{lot}-{n:03d}"
            bad = rng.random() < 0.1
            failing += bad
            topic, payload = inspection(mid, lot=f"L{lot}", value=10.2 if bad else 10.01)
            pub.publish(topic, payload, mid)
            publish_order[f"L{lot}"].append(mid)
    assert await asyncio.to_thread(pub.wait_acked, 30)
    total = LOTS * PER_LOT
    await erp.wait_for(lambda r: sum(1 for e in r.events if e["type"] == "inspection.result"
                                     and r.accepted_ids[e["id"]]) >= total, 60)
    await erp.wait_for(lambda r: sum(1 for e in r.events if e["type"] == "nonconformance")
                       >= failing, 30)
    rejected = sum(1 for r in erp.requests if r.status == 503)
    assert rejected > 10, "the fault injection did not bite"
    assert order_violations(erp.events, publish_order) == []
    delivered = {e["data"]["message_id"] for e in erp.events if e["type"] == "inspection.result"}
    assert delivered == {m for mids in publish_order.values() for m in mids}
