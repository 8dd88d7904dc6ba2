"""Model-based test of the relay's queue (``edge.relay.queue.RelayQueue``): hypothesis
drives random interleavings of arrivals, leases by concurrent lanes, outcomes (delivered,
retry, dead letter, not attempted, in the per-key order ``send_in_key_order`` keeps),
operator replays of parked lots and the clock, against an in-memory JetStream (messages
that record their acks, a dead-letter store with compare-and-set parked entries).

Checked after every step:
- a leased event's earlier events of its key were all delivered, or lead it in the same
  lease (the sink sends those in order) — never one while an earlier one is leased,
  waiting or parked (invariant 4);
- an event of a parked key is never leased, except the key's own dead letters in replay;
- an event is acknowledged only once its outcome is final: delivered, or stored in the
  dead-letter store (invariant 2);
and at the end, after every parked lot was replayed and the receiver accepts everything:
every event was delivered, in per-key order, and acknowledged; twice only when a
takeover (the relay killed, another taking its partition from the ack floor) brought it
back.

``EDGE_MODEL_EXAMPLES`` / ``EDGE_MODEL_STEPS`` raise the effort as for the outbox models.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.components import OutcomeKind, StoredEvent
from edge.outbox.queries import Resolution
from edge.relay.deadletters import DeadLetterEntry, ParkState
from edge.relay.queue import Feed, RelayQueue

KEYS = ["lot:A", "lot:B", "lot:C"]
EXAMPLES = int(os.environ.get("EDGE_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("EDGE_MODEL_STEPS", "40"))


@dataclass
class Meta:
    @dataclass
    class Seq:
        stream: int

    sequence: Seq


@dataclass
class FakeMsg:
    seq: int
    data: bytes
    subject: str = "t.s1.p0.inspection.result"
    headers: dict[str, str] = field(default_factory=dict)
    acked: int = 0

    @property
    def metadata(self) -> Meta:
        return Meta(Meta.Seq(self.seq))

    async def ack(self) -> None:
        self.acked += 1


class FakeDead:
    """The dead-letter stream and the parked bucket, in memory, with revisions."""

    def __init__(self) -> None:
        self.entries_: list[DeadLetterEntry] = []
        self.parked: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._seq = itertools.count(1)
        self._rev = itertools.count(1)

    async def put(self, sink: str, *, event_id: str, key: str | None, body: bytes,
                  source_subject: str, source_seq: int, kind: str, reason: str,
                  status: int | None = None, answer: str | None = None,
                  behind: str | None = None) -> int:
        seq = next(self._seq)
        self.entries_.append(DeadLetterEntry(seq, f"dlq.{sink}", body, {
            "Edge-Kind": kind, "Edge-Sink": sink, "Edge-Event-Id": event_id,
            "Edge-Ordering-Key": key or "", "Edge-Source-Subject": source_subject}))
        return seq

    async def entries(self, sink: str | None = None, key: str | None = None
                      ) -> list[DeadLetterEntry]:
        return [e for e in self.entries_ if e.headers["Edge-Sink"] == sink
                and (e.headers["Edge-Ordering-Key"] or e.headers["Edge-Event-Id"]) == key]

    async def remove(self, seq: int) -> None:
        self.entries_ = [e for e in self.entries_ if e.seq != seq]

    async def park(self, sink: str, key: str, *, event_id: str, reason: str) -> None:
        if (sink, key) not in self.parked:
            self.parked[(sink, key)] = (next(self._rev), {
                "sink": sink, "key": key, "state": "parked", "event_id": event_id,
                "followers": 0})

    async def state(self, sink: str, key: str) -> ParkState | None:
        got = self.parked.get((sink, key))
        if got is None:
            return None
        rev, doc = got
        return ParkState(sink, key, doc["state"], rev, dict(doc))

    async def set_state(self, park: ParkState, state: str, **extra: Any) -> bool:
        got = self.parked.get((park.sink, park.key))
        if got is None or got[0] != park.revision:
            return False
        doc = dict(park.doc, state=state, **extra)
        rev = next(self._rev)
        self.parked[(park.sink, park.key)] = (rev, doc)
        park.revision, park.state, park.doc = rev, state, doc
        return True

    async def unpark(self, park: ParkState) -> bool:
        got = self.parked.get((park.sink, park.key))
        if got is None or got[0] != park.revision:
            return False
        del self.parked[(park.sink, park.key)]
        return True


def body(key: str, n: int) -> bytes:
    return orjson.dumps({"id": f"{key}#{n}", "type": "inspection.result", "class": "high",
                         "ordering_key": key, "data": {"n": n}})


class QueueModel(RuleBasedStateMachine):
    PARK = True  # the sink's on_dead_letter: park (False: continue)

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 1000.0
        self.dead = FakeDead()
        self.queue = RelayQueue(self.dead, fetch_batch=10, max_pending=1000,  # type: ignore[arg-type]
                                clock=lambda: self.now)
        self.feed = Feed("erp", 0, None)
        self.queue.feeds["erp"] = {0: self.feed}
        self.seq = itertools.count(1)
        self.count: dict[str, int] = dict.fromkeys(KEYS, 0)
        self.msgs: dict[str, FakeMsg] = {}  # event id → its message
        self.delivered: list[str] = []  # event ids, first deliveries in order
        self.leases: list[list[StoredEvent]] = []  # outstanding, in lease order
        self.resent: set[str] = set()  # delivered events a takeover brought back
        self.judged: set[str] = set()  # events that were dead-lettered once

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.loop.close()

    # ------------------------------------------------------------------ rules

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 3))
    def arrive(self, key: str, n: int) -> None:
        msgs = []
        for _ in range(n):
            i = self.count[key]
            self.count[key] += 1
            msg = FakeMsg(next(self.seq), body(key, i))
            self.msgs[f"{key}#{i}"] = msg
            msgs.append(msg)
        self.run(self.queue._add(self.feed, msgs))

    @rule(limit=st.integers(1, 6))
    def lease(self, limit: int) -> None:
        batch = self.run(self.queue.lease("erp", limit, park=self.PARK))
        parked = {k for (_, k), (_, doc) in self.dead.parked.items() if doc["state"] == "parked"}
        done = set(self.delivered)
        for i, ev in enumerate(batch):
            key, n = ev.id.split("#")
            earlier = {f"{key}#{j}" for j in range(int(n))}
            in_batch = {e.id for e in batch[:i]}
            missing = earlier - done - in_batch
            if not self.PARK:  # a dead letter lets its key go on
                missing -= self.judged
            assert not missing, f"{ev.id} leased before {sorted(missing)}"
            assert key not in parked, f"{ev.id} leased while its key is parked"
        if batch:
            self.leases.append(batch)

    @precondition(lambda self: bool(self.leases))
    @rule(which=st.integers(0, 10), outcomes=st.lists(
        st.sampled_from(["delivered", "retry", "dead_letter", "not_attempted"]),
        min_size=6, max_size=6))
    def complete(self, which: int, outcomes: list[str]) -> None:
        batch = self.leases.pop(which % len(self.leases))
        blocked: set[str] = set()
        resolutions = []
        for ev, kind in zip(batch, itertools.cycle(outcomes), strict=False):
            key = ev.ordering_key or ""
            if key in blocked:
                kind = "not_attempted"  # what send_in_key_order answers
            r = {
                "delivered": Resolution(ev.seq, ev.id, OutcomeKind.delivered, 200),
                "retry": Resolution(ev.seq, ev.id, OutcomeKind.retry, 503,
                                    next_at=self.now + 5),
                "dead_letter": Resolution(ev.seq, ev.id, OutcomeKind.dead_letter, 422,
                                          "judged"),
                "not_attempted": Resolution(ev.seq, ev.id, OutcomeKind.retry,
                                            attempted=False),
            }[kind]
            if kind == "dead_letter":
                self.judged.add(ev.id)
            if kind != "delivered":
                if self.PARK or kind != "dead_letter":
                    blocked.add(key)
            elif ev.id not in self.delivered:
                self.delivered.append(ev.id)
            else:  # only a takeover sends an event again
                assert ev.id in self.resent, f"{ev.id} delivered twice"
            resolutions.append(r)
        self.run(self.queue.complete("erp", resolutions))

    @rule()
    def takeover(self) -> None:
        """The relay dies (kill -9: its leases vanish unanswered) and another takes the
        partition: a fresh queue, fed from the consumer recreated at the ack floor + 1,
        so every message above the floor comes again, acknowledged or not."""
        by_seq = sorted(self.msgs.items(), key=lambda kv: kv[1].seq)
        floor = 0
        for _, msg in by_seq:
            if not msg.acked:
                break
            floor = msg.seq
        self.leases.clear()
        self.queue = RelayQueue(self.dead, fetch_batch=10, max_pending=1000,  # type: ignore[arg-type]
                                clock=lambda: self.now)
        # the previous consumer had delivered every message so far
        self.feed = Feed("erp", 0, None, recheck_until=max(m.seq for _, m in by_seq)
                         if by_seq else 0)
        self.queue.feeds["erp"] = {0: self.feed}
        self.queue.note_parked("erp", [k for (_, k) in self.dead.parked])
        again = []
        for eid, msg in by_seq:
            if msg.seq > floor:
                if eid in self.delivered:
                    self.resent.add(eid)
                copy = FakeMsg(msg.seq, msg.data)
                self.msgs[eid] = copy
                copy.acked = msg.acked  # the acknowledgement happened; only the copy is new
                again.append(copy)
        self.run(self.queue._add(self.feed, again))

    @rule(seconds=st.sampled_from([1.0, 6.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: bool(self.dead.entries_))
    @rule(key=st.sampled_from(KEYS))
    def replay(self, key: str) -> None:
        """`edge relay dlq replay`: marks the key (creates the entry when it is not
        parked), then the owning relay's scan carries it out."""
        park = self.run(self.dead.state("erp", key))
        if park is not None and park.state != "parked":
            return
        if park is None:
            if not self.run(self.dead.entries("erp", key)):
                return
            self.run(self.dead.park("erp", key, event_id="", reason=""))
            park = self.run(self.dead.state("erp", key))
            assert park is not None
        assert self.run(self.dead.set_state(park, "replay", by="qa"))
        self.run(self.queue.operate(self.feed, park))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def acked_only_when_final(self) -> None:
        stored = {e.headers["Edge-Event-Id"] for e in self.dead.entries_}
        for eid, msg in self.msgs.items():
            if msg.acked:
                assert eid in self.delivered or eid in stored, f"{eid} acked early"

    @invariant()
    def delivered_in_key_order(self) -> None:
        last: dict[str, int] = {}
        for eid in self.delivered:
            if not self.PARK and eid in self.judged:
                continue  # with continue, a replayed dead letter comes after later events
            key, n = eid.split("#")
            assert int(n) > last.get(key, -1), f"{eid} out of order"
            last[key] = int(n)

    # ------------------------------------------------------------------ the end

    def drain(self) -> None:
        """Every lot replayed, every outstanding lease answered, the receiver accepting."""
        for _ in range(200):
            for batch in self.leases:
                self.run(self.queue.complete("erp", [
                    Resolution(ev.seq, ev.id, OutcomeKind.retry, attempted=False)
                    for ev in batch]))
            self.leases.clear()
            for key in KEYS:
                park = self.run(self.dead.state("erp", key))
                if park is None and self.run(self.dead.entries("erp", key)):
                    self.run(self.dead.park("erp", key, event_id="", reason=""))
                    park = self.run(self.dead.state("erp", key))
                if park is not None:
                    if park.state == "parked":
                        self.run(self.dead.set_state(park, "replay"))
                    self.run(self.queue.operate(self.feed, park))
            self.now += 10
            batch = self.run(self.queue.lease("erp", 50, park=self.PARK))
            if not batch and not self.feed.rows and not self.dead.parked:
                break
            for ev in batch:
                if ev.id in self.delivered:
                    assert ev.id in self.resent, f"{ev.id} delivered twice"
                else:
                    self.delivered.append(ev.id)
            self.run(self.queue.complete("erp", [
                Resolution(ev.seq, ev.id, OutcomeKind.delivered, 200) for ev in batch]))
        self.delivered_in_key_order()
        expected = {f"{k}#{i}" for k, c in self.count.items() for i in range(c)}
        assert set(self.delivered) == expected, sorted(expected - set(self.delivered))
        assert all(m.acked for m in self.msgs.values()), "every event acknowledged"
        assert self.dead.entries_ == [] and self.dead.parked == {}


class DrainingModel(QueueModel):
    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            super().teardown()


class ContinueModel(DrainingModel):
    PARK = False


_SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestRelayQueueModel = DrainingModel.TestCase
TestRelayQueueModel.settings = _SETTINGS
TestRelayQueueModelContinue = ContinueModel.TestCase
TestRelayQueueModelContinue.settings = _SETTINGS
