"""Fixtures of the relay tests: a uniquely named stream, buckets and dead-letter stream on
the machine's NATS JetStream (127.0.0.1:4222), removed afterwards; event envelopes as a
gateway's nats sink publishes them; an order checker."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from edge.nats.subjects import partition_of, render_subject
from tests.nats.support import MACHINE_NATS, nats_servers

__all__ = ["NATS_URL", "Tier", "check_order", "first_violation", "nats_servers", "tier"]

NATS_URL = MACHINE_NATS


@dataclass
class Tier:
    """One test's JetStream names and a publisher of envelopes."""

    js: Any
    tag: str
    stream: str
    prefix: str
    partitions: int = 4

    @property
    def subject(self) -> str:
        return self.prefix + ".{site}.p{partition}.{type}"

    @property
    def filter(self) -> str:
        return self.prefix + ".*.p{partition}.>"

    def relay_yaml(self, erp_url: str, *, relay_id: str, extra: str = "",
                   sink: str | None = None, state_dir: str = "state") -> str:
        from tests.support import http_sink_yaml

        sinks = sink or http_sink_yaml(erp_url, routes='[{events: ["*"], method: POST, '
                                       'path: /events}]')
        return (f"site: relay-{self.tag}\nstate_dir: {state_dir}\n"
                "relay:\n"
                f"  servers: [{NATS_URL}]\n"
                f"  stream: {self.stream}\n"
                f"  partitions: {self.partitions}\n"
                f"  filter: \"{self.filter}\"\n"
                f"  owners_bucket: OWN_{self.tag}\n"
                f"  parked_bucket: PARK_{self.tag}\n"
                f"  dlq_stream: DLQ_{self.tag}\n"
                f"  dlq_subject: dlq.{self.tag}\n"
                f"  relay_id: {relay_id}\n"
                "  lease_ttl_s: 3\n"
                "  listen: 127.0.0.1:0\n"
                f"{extra}"
                "sinks:\n" + sinks)

    async def publish(self, lot: str, n: int, *, site: str = "s1",
                      type_: str = "inspection.result", sha256: str | None = None
                      ) -> dict[str, Any]:
        """Publish one envelope of ``lot`` (ordering key ``lot:<lot>``) as the nats sink
        does; returns it."""
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        ev: dict[str, Any] = {"id": str(uuid.uuid4()), "type": type_, "schema_version": 1, "site": site,
              "source": "line1", "source_ts": now, "received_ts": now,
              "ordering_key": f"lot:{lot}", "class": "high",
              "correlation_id": str(uuid.uuid4()),
              "data": {"lot_id": lot, "n": n, "result": "pass"}, "payload_sha256": "0" * 64,
              "backfilled": False}
        p = partition_of(ev["ordering_key"], ev["id"], self.partitions)
        subject = render_subject(self.subject, {"site": site, "partition": p,
                                                "type": type_})
        body = orjson.dumps(ev)
        headers = {"Nats-Msg-Id": ev["id"],
                   "Edge-Body-Sha256": sha256 or hashlib.sha256(body).hexdigest()}
        await self.js.publish(subject, body, headers=headers)
        return ev


@pytest.fixture
async def tier() -> AsyncIterator[Tier]:
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    tag = uuid.uuid4().hex[:10]
    t = Tier(js, tag, f"EV_{tag}", f"t{tag}")
    await js.add_stream(name=t.stream, subjects=[f"{t.prefix}.>"])
    try:
        yield t
    finally:
        for stream in (t.stream, f"DLQ_{tag}", f"KV_OWN_{tag}", f"KV_PARK_{tag}"):
            try:
                await js.delete_stream(stream)
            except Exception:  # noqa: BLE001 - not created by this test
                pass
        await nc.close()


def check_order(published: list[dict[str, Any]], received: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """Lost events, duplicates (by id) and per-lot order of first arrivals."""
    first: list[str] = []
    seen: set[str] = set()
    dups = 0
    for ev in received:
        if ev["id"] in seen:
            dups += 1
            continue
        seen.add(ev["id"])
        first.append(ev["id"])
    lost = [e["id"] for e in published if e["id"] not in seen]
    position = {eid: i for i, eid in enumerate(first)}
    order_violations = 0
    by_lot: dict[str, list[dict[str, Any]]] = {}
    for e in published:
        by_lot.setdefault(e["ordering_key"], []).append(e)
    for events in by_lot.values():
        got = [position[e["id"]] for e in events if e["id"] in position]
        order_violations += sum(1 for a, b in zip(got, got[1:], strict=False) if a > b)
    return {"lost": len(lost), "duplicates": dups, "order_violations": order_violations}


def first_violation(published: list[dict[str, Any]], received: list[dict[str, Any]]) -> str:
    """The first pair of a lot's events whose first arrivals are out of order, with the
    arrival positions, for an assertion message."""
    position: dict[str, int] = {}
    for i, ev in enumerate(received):
        position.setdefault(ev["id"], i)
    by_lot: dict[str, list[dict[str, Any]]] = {}
    for e in published:
        by_lot.setdefault(e["ordering_key"], []).append(e)
    for lot, events in by_lot.items():
        got = [(position[e["id"]], e["data"]["n"]) for e in events if e["id"] in position]
        for (pa, na), (pb, nb) in zip(got, got[1:], strict=False):
            if pa > pb:
                copies = {n: [i for i, ev in enumerate(received) if ev["data"]["n"] == n]
                          for n in (na, nb)}
                return (f"{lot}: n={na} first arrived at {pa}, after n={nb} at {pb}; "
                        f"all arrivals {copies}")
    return "none"
