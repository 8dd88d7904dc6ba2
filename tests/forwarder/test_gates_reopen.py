"""A sink recovers from whatever happens to its requests: the sink-wide concurrency limit,
the "circuit open: do not send" gate and the probe never stay shut.

A user relies on: a request cancelled while it waits for a slot, a request whose sender
raises, a turn of a lane that fails, and a lane busy with a hung request do not leave the
sink sending nothing while its backlog grows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge.components import EventClass, Outcome, OutcomeKind, StoredEvent
from edge.concurrency import AdaptiveConcurrency
from edge.config import SinkConfigBase
from edge.delivery import send_in_key_order
from edge.forwarder import Forwarder
from edge.outbox import Outbox
from tests.support import eventually, result

Answer = Callable[[StoredEvent], Awaitable[Outcome]]


def stored(seq: int, key: str | None = None) -> StoredEvent:
    return StoredEvent(seq, f"e{seq}", "inspection.result", EventClass.high, key, 0, b"{}")


async def deliver(ev: StoredEvent) -> Outcome:
    return Outcome.delivered(200)


# --------------------------------------------------------------------------- the limit


async def test_a_request_cancelled_as_its_slot_frees_up_ends_cancelled_and_frees_the_slot():
    """The slot a release hands on is taken by the next live waiter, not lost, and the
    cancelled one sees its cancellation (not an error that would hide it)."""
    limiter = AdaptiveConcurrency(1, adaptive=False)
    holder = await limiter.acquire()
    cancelled = asyncio.ensure_future(limiter.acquire())
    waiting = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    limiter.release(holder, None)  # before the cancelled waiter has run
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    started = await asyncio.wait_for(waiting, 1)
    assert limiter.in_flight == 1
    limiter.release(started, None)
    assert limiter.in_flight == 0
    await asyncio.wait_for(limiter.acquire(), 1)  # and the next request gets it at once


async def test_a_call_cancelled_mid_request_gives_every_slot_back():
    limiter = AdaptiveConcurrency(2, adaptive=False)
    hang = asyncio.Event()

    async def hung(events: list[StoredEvent]) -> list[Outcome]:
        await hang.wait()
        return [Outcome.delivered(200)] * len(events)

    call = asyncio.ensure_future(send_in_key_order([[stored(i)] for i in range(6)], hung,
                                                   limiter))
    await eventually(lambda: limiter.in_flight == 2, what="both slots taken")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert limiter.in_flight == 0
    outcomes = await asyncio.wait_for(send_in_key_order(
        [[stored(i)] for i in range(6)], lambda evs: _answer(evs, deliver), limiter), 5)
    assert all(o.kind is OutcomeKind.delivered for o in outcomes.values())


async def _answer(events: list[StoredEvent], answer: Answer) -> list[Outcome]:
    return [await answer(ev) for ev in events]


async def test_a_request_that_raises_is_retried_alone_while_the_others_are_delivered():
    """One request's failure does not cancel the requests beside it (some already on
    the wire): their events are delivered, and only its own are retried."""
    limiter = AdaptiveConcurrency(4, adaptive=False)
    sent: list[int] = []

    async def flaky(events: list[StoredEvent]) -> list[Outcome]:
        await asyncio.sleep(0.01)
        if events[0].seq == 2:
            raise RuntimeError("connection pool bug")
        sent.extend(ev.seq for ev in events)
        return [Outcome.delivered(200)] * len(events)

    requests = [[stored(1, "lot:A")], [stored(2, "lot:B")], [stored(3, "lot:B")],
                [stored(4, "lot:C")], [stored(5)]]
    outcomes = await send_in_key_order(requests, flaky, limiter)
    assert outcomes[2].kind is OutcomeKind.retry and "connection pool bug" in outcomes[2].reason
    assert outcomes[3].kind is OutcomeKind.retry and not outcomes[3].attempted  # order of lot:B
    assert {s for s, o in outcomes.items() if o.kind is OutcomeKind.delivered} == {1, 4, 5}
    assert sorted(sent) == [1, 4, 5] and limiter.in_flight == 0


# --------------------------------------------------------------------------- the forwarder


@dataclass
class LimitedSink:
    """A sink with a sink-wide limiter (like the built-in ones); ``answer`` decides."""

    answer: Answer
    id: str = "erp"
    concurrency: AdaptiveConcurrency = field(default_factory=lambda: AdaptiveConcurrency(4))
    delivered: list[str] = field(default_factory=list)

    def accepts(self, event_type: str) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, batch: list[StoredEvent]) -> list[Outcome]:
        async def one(events: list[StoredEvent]) -> list[Outcome]:
            outcome = await self.answer(events[0])
            if outcome.kind is OutcomeKind.delivered:
                self.delivered.append(events[0].id)
            return [outcome]

        by_seq = await send_in_key_order([[ev] for ev in batch], one, self.concurrency)
        return [by_seq[ev.seq] for ev in batch]


@pytest.fixture
async def forwarders(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await forwarders(sink, run=True, **sink_config)`` → (outbox, forwarder)."""
    made: list[tuple[Outbox, Forwarder, asyncio.Task[None] | None]] = []

    async def make(sink: LimitedSink, *, run: bool = True, **config: Any
                   ) -> tuple[Outbox, Forwarder]:
        cfg = SinkConfigBase.model_validate({
            "id": sink.id, "type": "scripted", "lease_batch": 10,
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.2},
            "circuit_breaker": {"failure_threshold": 2, "open_s": 0.1, "max_open_s": 0.5},
            **config})
        outbox = Outbox(tmp_path / f"state-{len(made)}", router=lambda ev: [sink.id])
        await outbox.open()
        fwd = Forwarder(sink, cfg, outbox, outbox.metrics)
        task = asyncio.create_task(fwd.run()) if run else None
        made.append((outbox, fwd, task))
        return outbox, fwd

    try:
        yield make
    finally:
        for outbox, fwd, task in made:
            fwd.stop()
            if task is not None:
                await task
            await outbox.close()


async def test_a_lane_whose_turn_fails_goes_on_delivering(forwarders, monkeypatch):
    sink = LimitedSink(deliver)
    outbox, fwd = await forwarders(sink, max_in_flight=1)
    account = fwd._account
    failures = [RuntimeError("a bug in one turn")]

    def account_once_failing(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return account(*args)

    monkeypatch.setattr(fwd, "_account", account_once_failing)
    await outbox.submit([result("L1", n=1)])
    await eventually(lambda: not failures, what="the failing turn")
    await outbox.submit([result("L2", n=2)])
    await eventually(lambda: len(sink.delivered) == 2, what="both events delivered", timeout=10)


async def test_any_free_lane_probes_a_half_open_circuit(forwarders):
    """A lane busy with a request that hangs does not keep the circuit open: another
    lane sends the probe, and its delivery opens the gate for every lane."""
    up = False

    async def answer(ev: StoredEvent) -> Outcome:
        return Outcome.delivered(200) if up else Outcome.retry("HTTP 503", status=503)

    sink = LimitedSink(answer)
    outbox, fwd = await forwarders(sink, run=False, max_in_flight=2)
    await outbox.submit([result(f"L{i}", n=i) for i in range(4)])
    # the receiver fails: the circuit opens, the gate shuts
    await turns(fwd, 0, lambda: fwd.breaker.state != "closed")
    assert sink.concurrency.refusal() is not None
    up = True
    fwd.breaker.probe_now()
    # lane 0 is busy (a hung request): lane 1 takes the turns, the probe first
    await turns(fwd, 1, lambda: fwd.breaker.state == "closed")
    assert sink.concurrency.refusal() is None
    await turns(fwd, 1, lambda: len(sink.delivered) == 4)


async def turns(fwd: Forwarder, lane: int, until: Callable[[], bool]) -> None:
    """Turns of ``lane`` until ``until()``; a turn that finds nothing due (rows waiting
    for their retry) or is told to wait is followed by a short wait."""
    async with asyncio.timeout(10):
        while not until():
            if await fwd.step(lane) != 0.0:
                await asyncio.sleep(0.02)


async def test_a_gate_left_shut_with_the_circuit_closed_does_not_stop_the_sink(forwarders):
    """The "circuit open: do not send" gate of the sink's limiter is shut only while this
    forwarder's circuit is open: one left shut (an earlier forwarder of the same sink)
    does not hold every request back."""
    sink = LimitedSink(deliver)
    sink.concurrency.paused = "the sink's circuit is open (the receiver is failing)"
    outbox, _ = await forwarders(sink)
    await outbox.submit([result(f"L{i}", n=i) for i in range(5)])
    await eventually(lambda: len(sink.delivered) == 5, what="everything delivered", timeout=10)
