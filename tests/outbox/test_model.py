"""Model-based test of the outbox: hypothesis drives random sequences of operations and
checks the outbox against a plain-Python model after every step.

Operations: submit (keys, classes, MQTT messages with and without the DUP flag), lease,
complete a lease with any outcome (delivered, dead letter, retry now or much later),
low-class expiry, a crash (close without completing leases) and reopen, operator replay
and discard of dead letters. Invariants: every stored event is in exactly one state and
the database agrees; per key the sink gets events in ingest order (a lease never holds an
event while an earlier one of its key is pending, in flight, retrying or parked); no seq
is ever given twice; ``critical``/``high`` events are never expired; a redelivered
message maps to the event its first copy made.

``EDGE_MODEL_EXAMPLES`` (default 25) and ``EDGE_MODEL_STEPS`` (default 30) size the run;
CI runs the default. A long run lifts the suite's 300 s per-test timeout::

    EDGE_MODEL_EXAMPLES=1000 EDGE_MODEL_STEPS=50 pytest --timeout 0 tests/outbox/test_model.py
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.components import StoredEvent, Submission
from edge.events import make_event
from edge.outbox import Outbox, Resolution, audit, queries

EXAMPLES = int(os.environ.get("EDGE_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("EDGE_MODEL_STEPS", "30"))
KEYS = ["lot:A", "lot:B", None]
TYPES = {"quality.hold": "critical", "inspection.result": "high",
         "machine.reading": "low"}
FAR = 10 ** 9  # a retry that is not due during the test


@dataclass
class ModelEvent:
    seq: int
    id: str
    key: str | None
    cls: str
    state: str = "pending"  # pending | inflight | retry_later | dead | delivered | expired
    #                         | discarded


class OutboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.outbox = self._open()
        self.events: dict[str, ModelEvent] = {}  # by event id
        self.seqs_given: set[int] = set()
        self.leases: list[list[StoredEvent]] = []
        self.first_of_payload: dict[str, str] = {}  # content hash → newest event id
        self.delivered_order: dict[str, list[int]] = {}  # key → seqs in delivery order

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _open(self) -> Outbox:
        ob = Outbox(Path(self.dir.name), router=lambda ev: ["erp"],
                    maintenance_interval_s=3600)
        self._run(ob.open())
        return ob

    def teardown(self) -> None:
        self._run(self.outbox.close())
        self.loop.close()
        self.dir.cleanup()

    # ------------------------------------------------------------------ rules

    @rule(kind=st.sampled_from(sorted(TYPES)), key=st.sampled_from(KEYS),
          n=st.integers(1, 3))
    def submit(self, kind: str, key: str | None, n: int) -> None:
        # no lot_id in data: the key is exactly the one drawn (None: no order constraint)
        data: dict[str, Any] = {"value": 1} if kind == "machine.reading" else {
            "reason": "r", "result": "pass"}
        items = [Submission(make_event(type=kind, site="s", source="m", data=data,
                                       ordering_key=key if kind != "machine.reading" else None))
                 for _ in range(n)]
        ids = self._run(self.outbox.submit(items))
        for item, eid in zip(items, ids, strict=True):
            self._stored(eid, item.event.ordering_key, TYPES[kind])

    @rule(payload=st.integers(0, 3), dup=st.booleans())
    def message(self, payload: int, dup: bool) -> None:
        """An MQTT message without a station id: content-hash key, DUP flag as given."""
        body = f'{{"value":{payload}}}'
        item = Submission(make_event(type="machine.reading", site="s", source="mqtt",
                                     data={"value": payload}),
                          hashlib.sha256(body.encode()).hexdigest(), redelivery_only=True,
                          redelivered=dup, redelivery_horizon=1000)
        [eid] = self._run(self.outbox.submit([item]))
        first = self.first_of_payload.get(body)
        if dup and first is not None:
            assert eid == first, "a redelivery must map to the stored copy"
            return
        assert eid == item.event.id, "only a redelivery may be matched"
        self.first_of_payload[body] = eid
        self._stored(eid, None, "low")

    def _stored(self, eid: str, key: str | None, cls: str) -> None:
        row = self._run(self.outbox.read(lambda c: c.execute(
            "SELECT seq FROM events WHERE id = ?", (eid,)).fetchone()))
        assert row is not None
        seq = int(row[0])
        assert seq not in self.seqs_given, f"seq {seq} given twice"
        self.seqs_given.add(seq)
        self.events[eid] = ModelEvent(seq, eid, key, cls)

    @rule(limit=st.integers(1, 6))
    def lease(self, limit: int) -> None:
        batch = self._run(self.outbox.lease("erp", limit))
        if not batch:
            return
        leased = {ev.id for ev in batch}
        for ev in batch:
            m = self.events[ev.id]
            assert m.state == "pending", f"leased an event that is {m.state}"
            if m.key is not None:
                for other in self.events.values():
                    if other.key == m.key and other.seq < m.seq and other.id not in leased:
                        assert other.state in ("delivered", "expired", "discarded"), (
                            f"{m.key}: seq {m.seq} leased while seq {other.seq} is "
                            f"{other.state}")
            m.state = "inflight"
        self.leases.append(batch)

    @precondition(lambda self: self.leases)
    @rule(pick=st.integers(0, 10), outcomes=st.lists(
        st.sampled_from(["delivered", "dead_letter", "retry_now", "retry_later"]),
        min_size=6, max_size=6))
    def complete(self, pick: int, outcomes: list[str]) -> None:
        batch = self.leases.pop(pick % len(self.leases))
        res = []
        blocked: set[str] = set()
        for ev, outcome in zip(batch, outcomes, strict=False):
            if ev.ordering_key in blocked:
                outcome = "not_attempted"  # the sink keeps key order inside a batch
            if outcome in ("dead_letter", "retry_now", "retry_later", "not_attempted") and \
                    ev.ordering_key is not None:
                blocked.add(ev.ordering_key)
            res.append(self._resolution(ev, outcome))
        res += [self._resolution(ev, "not_attempted") for ev in batch[len(outcomes):]]
        self._run(self.outbox.complete("erp", res))

    def _resolution(self, ev: StoredEvent, outcome: str) -> Resolution:
        m = self.events[ev.id]
        kind = {"delivered": "delivered", "dead_letter": "dead_letter"}.get(outcome, "retry")
        r = Resolution(ev.seq, ev.id, kind, 200 if kind == "delivered" else 503, outcome,
                       attempted=outcome != "not_attempted", ordering_key=ev.ordering_key,
                       next_at=time.time() + FAR if outcome == "retry_later" else 0.0)
        if outcome == "delivered":
            m.state = "delivered"
            if m.key is not None:
                self.delivered_order.setdefault(m.key, []).append(m.seq)
        elif outcome == "dead_letter":
            m.state = "dead"
        elif outcome == "retry_later":
            m.state = "retry_later"
        else:
            m.state = "pending"
        return r

    @rule()
    def expire_low(self) -> None:
        n = self._run(self.outbox.expire_low(100 << 20))
        expired = [m for m in self.events.values()
                   if m.cls == "low" and m.state in ("pending", "retry_later")]
        assert n == len(expired), f"expired {n}, the model expected {len(expired)}"
        for m in expired:
            m.state = "expired"

    @rule()
    def crash_and_reopen(self) -> None:
        """The process dies: leases vanish without completing; rows become deliverable."""
        self._run(self.outbox.close())
        self.outbox = self._open()
        for batch in self.leases:
            for ev in batch:
                self.events[ev.id].state = "pending"
        self.leases.clear()

    @rule()
    def sweep(self) -> None:
        """The deferred delete runs at any point between the other steps."""
        self._run(self.outbox.sweep())
        left = self._run(self.outbox.read(queries.pending_sweep))
        assert left == 0, f"{left} delivered rows left after a sweep"

    @precondition(lambda self: any(m.state == "dead" for m in self.events.values()))
    @rule(replay=st.booleans())
    def operator(self, replay: bool) -> None:
        dead = self._run(self.outbox.read(queries.dlq_list))
        first = dead[0]
        if replay:
            self._run(self.outbox.dlq_replay(ids=[first["id"]], actor="op", reason="fixed"))
            self.events[first["event_id"]].state = "pending"
        else:
            self._run(self.outbox.dlq_discard(ids=[first["id"]], actor="op", reason="no"))
            self.events[first["event_id"]].state = "discarded"

    # ------------------------------------------------------------------ invariants

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        queued, dead, swept_later = self._run(self.outbox.read(lambda c: (
            {r[0] for r in c.execute(
                "SELECT e.id FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.done = 0")},
            {r[0] for r in c.execute("SELECT event_id FROM dead_letters")},
            {r[0] for r in c.execute(
                "SELECT e.id FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.done = 1")})))
        # a row waiting for the sweep is a delivery the model saw, never anything else
        for eid in swept_later:
            assert self.events[eid].state == "delivered", f"{eid} marked done while " \
                f"{self.events[eid].state}"
        for m in self.events.values():
            if m.state in ("pending", "inflight", "retry_later"):
                assert m.id in queued and m.id not in dead, f"{m.id} should be queued"
            elif m.state == "dead":
                assert m.id in dead and m.id not in queued, f"{m.id} should be a dead letter"
            else:
                assert m.id not in queued and m.id not in dead, f"{m.id} is {m.state}"

    @invariant()
    def each_key_is_delivered_in_ingest_order(self) -> None:
        for key, seqs in self.delivered_order.items():
            assert seqs == sorted(seqs), f"{key} delivered out of order: {seqs}"

    @invariant()
    def audit_chain_verifies(self) -> None:
        res = self._run(self.outbox.read(audit.verify_db))
        assert res.ok, res.message

    @invariant()
    def protected_classes_are_never_expired(self) -> None:
        assert not any(m.state == "expired" and m.cls != "low" for m in self.events.values())


OutboxMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS,
                                           deadline=None)
test_outbox_model = OutboxMachine.TestCase
