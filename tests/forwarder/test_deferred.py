"""A sink may hold an event back on purpose (``Outcome.deferred``: a route that sends once
per period): the forwarder records the delay as the row's next send time in the outcome's
transaction, counts no attempt, writes no audit row, tells neither the circuit breaker nor
the storm guard, and the row is not leased again until it is due; its key waits behind it.

The real ``Forwarder`` over a real outbox, driven turn by turn (``Forwarder.step``) with a
controlled clock shared by both, like the forwarder's model test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.components import Outcome, OutcomeKind, StoredEvent
from edge.config import OutboxConfig, SinkConfigBase
from edge.delivery import send_in_key_order
from edge.forwarder import Forwarder
from edge.outbox import Outbox
from edge.telemetry import Metrics
from tests.support import metric, sub

HOLD_S = 900.0


@dataclass
class DeferringSink:
    """Holds back ``machine.reading`` until the clock reaches ``due``; delivers the rest."""

    clock: Clock
    due: float
    id: str = "erp"
    sent: list[list[str]] = field(default_factory=list)  # event types per send call
    delivered: list[int] = field(default_factory=list)  # seqs, in delivery order

    def accepts(self, event_type: str) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        self.sent.append([ev.type for ev in batch])

        async def one(events: list[StoredEvent]) -> list[Outcome]:
            ev = events[0]
            wait = self.due - self.clock()
            if ev.type == "machine.reading" and wait > 0:
                return [Outcome.deferred("scheduled delivery: sent with the batch", wait)]
            self.delivered.append(ev.seq)
            return [Outcome.delivered(200)]

        by_seq = await send_in_key_order([[ev] for ev in batch], one, 1)
        return [by_seq[ev.seq] for ev in batch]


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    clock: Clock
    outbox: Outbox
    sink: DeferringSink
    fwd: Forwarder

    async def rows(self) -> dict[int, tuple[float, int, str | None]]:
        """seq → (next_at, attempts, last_error) of the sink's delivery rows."""
        rows = await self.outbox.read(lambda c: c.execute(
            "SELECT seq, next_at, attempts, last_error FROM deliveries WHERE sink = 'erp' "
            "AND done = 0"
        ).fetchall())
        return {seq: (next_at, attempts, err) for seq, next_at, attempts, err in rows}

    async def audit_states(self) -> list[str]:
        rows = await self.outbox.read(lambda c: c.execute(
            "SELECT state FROM audit WHERE sink = 'erp' ORDER BY seq").fetchall())
        return [state for (state,) in rows]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = Clock(1_800_000_000.0)
    outbox = Outbox(tmp_path, OutboxConfig(commit_interval_ms=0, synchronous="normal"),
                    Metrics(), router=lambda event: ["erp"], maintenance_interval_s=3600,
                    clock=clock)
    await outbox.open()
    sink = DeferringSink(clock, due=clock.now + HOLD_S)
    config = SinkConfigBase.model_validate({
        "id": "erp", "type": "scripted", "max_in_flight": 1, "lease_batch": 10,
        "circuit_breaker": {"failure_threshold": 1, "open_s": 10, "max_open_s": 40},
        "storm_guard": {"window_outcomes": 4, "min_share": 0.5, "min_events": 2}})
    fwd = Forwarder(sink, config, outbox, outbox.metrics, clock=clock)
    fwd.breaker.clock = clock
    try:
        yield Rig(clock, outbox, sink, fwd)
    finally:
        await outbox.close()


async def test_a_deferred_event_waits_as_its_next_send_time_without_an_attempt(rig):
    await rig.outbox.submit([sub("machine.reading", n=1), sub("machine.reading", n=2),
                             sub("inspection.result", key="lot:A", n=3)])
    assert await rig.fwd.step(0) == 0.0
    assert rig.sink.sent == [["machine.reading", "machine.reading", "inspection.result"]]
    rows = await rig.rows()
    assert sorted(rows) == [1, 2]  # the result was delivered, the readings wait
    for next_at, attempts, last_error in rows.values():
        assert next_at == pytest.approx(rig.clock.now + HOLD_S)
        assert attempts == 0
        assert last_error == "scheduled delivery: sent with the batch"
    # no retry audited, nothing for the breaker, the storm guard or the alarms
    assert await rig.audit_states() == ["delivered"]
    assert rig.fwd.breaker.state == "closed" and rig.fwd.alarm is None
    assert rig.fwd.pause is None
    assert metric(rig.outbox.metrics.delivery_attempts, "erp", "retry") == 0


async def test_a_deferred_event_is_not_leased_again_until_it_is_due(rig):
    await rig.outbox.submit([sub("machine.reading", n=1), sub("machine.reading", n=2)])
    await rig.fwd.step(0)
    for _ in range(5):  # the lane's idle turns: nothing to lease
        rig.clock.now += HOLD_S / 10
        assert await rig.fwd.step(0) is None
    assert len(rig.sink.sent) == 1
    rig.clock.now = rig.sink.due  # the period ends: both go, together
    assert await rig.fwd.step(0) == 0.0
    assert rig.sink.sent[1:] == [["machine.reading", "machine.reading"]]
    assert rig.sink.delivered == [1, 2]
    assert await rig.rows() == {}
    assert await rig.audit_states() == ["delivered", "delivered"]


async def test_later_events_of_a_deferred_events_key_wait_behind_it(rig):
    """Per-key order (DESIGN invariant 4): a held-back event holds its key; other keys go."""
    await rig.outbox.submit([sub("machine.reading", key="lot:A", n=1),
                             sub("inspection.result", key="lot:A", n=2),
                             sub("inspection.result", key="lot:B", n=3)])
    await rig.fwd.step(0)
    assert rig.sink.delivered == [3]
    rows = await rig.rows()
    assert rows[1][0] == pytest.approx(rig.clock.now + HOLD_S)
    assert rows[2] == (0.0, 0, None)  # never attempted: unchanged, waits for its key
    rig.clock.now += 1
    assert await rig.fwd.step(0) is None  # the key's head is not due: nothing of lot:A
    rig.clock.now = rig.sink.due
    await rig.fwd.step(0)
    assert rig.sink.delivered == [3, 1, 2]


async def test_a_deferred_outcome_counts_no_attempt_even_with_max_attempts(tmp_path):
    """``retry.max_attempts: 1`` turns the first retry into a dead letter; a deferral is no
    attempt, however often it happens."""
    clock = Clock(1_800_000_000.0)
    outbox = Outbox(tmp_path, OutboxConfig(commit_interval_ms=0, synchronous="normal"),
                    Metrics(), router=lambda event: ["erp"], maintenance_interval_s=3600,
                    clock=clock)
    await outbox.open()
    try:
        sink = DeferringSink(clock, due=clock.now + HOLD_S)
        config = SinkConfigBase.model_validate({
            "id": "erp", "type": "scripted", "retry": {"max_attempts": 1}})
        fwd = Forwarder(sink, config, outbox, outbox.metrics, clock=clock)
        await outbox.submit([sub("machine.reading", n=1)])
        for _ in range(3):
            await fwd.step(0)
            clock.now = sink.due  # the row is due again...
            sink.due += HOLD_S  # ...and the sink holds it back again
        rows = await outbox.read(lambda c: c.execute(
            "SELECT attempts FROM deliveries").fetchall())
        assert rows == [(0,)]
        assert len(sink.sent) == 3
        dead = await outbox.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM dead_letters").fetchone()[0])
        assert dead == 0
    finally:
        await outbox.close()


def test_deferred_is_a_retry_that_was_not_attempted():
    o = Outcome.deferred("later", 12.5)
    assert (o.kind, o.attempted, o.defer_s, o.retry_after_s) == (
        OutcomeKind.retry, False, 12.5, None)
    assert Outcome.deferred("late already", -3).defer_s == 0.0
