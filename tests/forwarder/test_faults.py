"""Forwarder: a fault of the sink is not a fault of the event; dead letters are neutral for
the circuit breaker; refused credentials pause the sink and probe with backoff.

A real outbox and a real forwarder; the sink answers what the test scripts (the HTTP
sink's own mapping of statuses to outcomes is tested in ``tests/sinks/http/``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge.components import Outcome, OutcomeKind, StoredEvent
from edge.config import SinkConfigBase
from edge.delivery import send_in_key_order
from edge.forwarder import Forwarder
from edge.outbox import Outbox, queries
from tests.support import eventually, metric, reading, result, sink_yaml

Answer = Callable[[StoredEvent], Outcome]


class ScriptedSink:
    """One request per event, keys in order like the built-in sinks; ``answer`` decides."""

    def __init__(self, answer: Answer, *, sink_id: str = "erp", latency_s: float = 0.0,
                 dead_letter_blocks: bool = True) -> None:
        self.id = sink_id
        self.answer = answer
        self.latency_s = latency_s
        self.dead_letter_blocks = dead_letter_blocks
        self.requests: list[tuple[float, str, OutcomeKind]] = []  # (monotonic, id, kind)
        self.delivered: list[str] = []

    def accepts(self, event_type: str) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, batch: list[StoredEvent]) -> list[Outcome]:
        async def one(events: list[StoredEvent]) -> list[Outcome]:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            ev = events[0]
            outcome = self.answer(ev)
            self.requests.append((time.monotonic(), ev.id, outcome.kind))
            if outcome.kind in (OutcomeKind.delivered, OutcomeKind.duplicate):
                self.delivered.append(ev.id)
            return [outcome]

        by_seq = await send_in_key_order([[ev] for ev in batch], one, 8,
                                         dead_letter_blocks=self.dead_letter_blocks)
        return [by_seq[ev.seq] for ev in batch]


@dataclass
class Rig:
    sink: ScriptedSink
    outbox: Outbox
    forwarder: Forwarder
    task: asyncio.Task[None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> Any:
        return self.outbox.metrics

    async def dead_letters(self) -> list[dict[str, Any]]:
        return await self.outbox.read(queries.dlq_list)

    async def queued(self) -> int:
        return (await self.outbox.stats())["events"]

    async def drained(self) -> bool:
        return await self.queued() == 0

    async def audit(self, state: str) -> list[tuple[str, str, str]]:
        return await self.outbox.read(lambda c: c.execute(
            "SELECT actor, reason, detail FROM audit WHERE state = ? ORDER BY rowid",
            (state,)).fetchall())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await rig(sink, **sink_config)`` → a started forwarder over a fresh outbox."""
    made: list[Rig] = []

    async def make(sink: ScriptedSink, **config: Any) -> Rig:
        cfg = SinkConfigBase.model_validate({
            "id": sink.id, "type": "scripted",
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.3},
            "circuit_breaker": {"failure_threshold": 3, "open_s": 0.3, "max_open_s": 2},
            **config})
        outbox = Outbox(tmp_path / f"state-{len(made)}", router=lambda ev: [sink.id])
        await outbox.open()
        r = Rig(sink, outbox, Forwarder(sink, cfg, outbox, outbox.metrics))
        r.task = asyncio.create_task(r.forwarder.run())
        made.append(r)
        return r

    try:
        yield make
    finally:
        for r in made:
            r.forwarder.stop()
            if r.task is not None:
                await r.task
            await r.outbox.close()


def faults_total(r: Rig, code: str) -> float:
    return metric(r.metrics.sink_faults, r.sink.id, code)


# --------------------------------------------------------------------------- sink faults


async def test_sink_faults_keep_every_row_alarm_and_never_become_dead_letters(rig):
    """301, 501, 520 for a while: every event stays queued (even with max_attempts: 2),
    the alarm says the sink is at fault, and one delivery clears it. Before, a sink fault
    was not handled at all (the lane failed on it) and no alarm existed."""
    portal = {"on": True}
    statuses = iter([301, 501, 520] * 1000)

    def answer(ev: StoredEvent) -> Outcome:
        if portal["on"]:
            return Outcome.sink_fault(f"HTTP {(s := next(statuses))}", s, "<html>portal</html>")
        return Outcome.delivered(200)

    r = await rig(ScriptedSink(answer), retry={"initial_backoff_s": 0.02, "max_backoff_s": 0.1,
                                               "max_attempts": 2})
    ids = await r.outbox.submit([result(f"L{n}", n) for n in range(10)])
    # faults count against the breaker: three failed batches open it
    await eventually(lambda: r.forwarder.breaker.state != "closed", what="the circuit to open")
    assert faults_total(r, "501") >= 3
    status = r.forwarder.status()
    assert status["alarm"]["code"] == "sink_fault"
    assert "not the event" in status["alarm"]["message"] and status["alarm"]["since"]
    assert status["paused"] is None
    # a sink fault is not an attempt of the event: a real retry later still gets all of
    # its max_attempts
    assert max(attempts for _, _, attempts in await r.outbox.read(lambda c: c.execute(
        "SELECT seq, sink, attempts FROM deliveries").fetchall())) == 0
    assert faults_total(r, "301") + faults_total(r, "501") + faults_total(r, "520") >= 3
    assert await r.dead_letters() == []
    portal["on"] = False
    await eventually(lambda: len(set(r.sink.delivered)) == 10, what="all delivered")
    assert sorted(set(r.sink.delivered)) == sorted(ids)
    await eventually(r.drained, what="every row recorded as delivered")
    assert await r.dead_letters() == []
    assert r.forwarder.status()["alarm"] is None
    assert r.forwarder.status()["up"] is True


async def test_a_captive_portal_does_not_empty_the_backlog_into_the_dead_letter_queue(rig):
    """The field incident, at the forwarder: 301/501/520, then 401, while production goes
    on at 100 events/s; when the network is back every event is delivered, none is a dead
    letter, and the backlog was not hammered (the breaker and the auth pause held)."""
    phase = {"now": "redirects"}
    statuses = iter([301, 501, 520] * 10_000)

    def answer(ev: StoredEvent) -> Outcome:
        if phase["now"] == "redirects":
            s = next(statuses)
            return Outcome.sink_fault(f"HTTP {s}", s)
        if phase["now"] == "login":
            return Outcome.sink_fault("HTTP 401 Unauthorized", 401)
        return Outcome.delivered(200)

    r = await rig(ScriptedSink(answer), max_in_flight=4, lease_batch=20,
                  retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "max_attempts": 3},
                  circuit_breaker={"failure_threshold": 3, "open_s": 0.2, "max_open_s": 1})
    produced: list[str] = []
    for step in range(30):  # 1.5 s of redirects, then 1.5 s of 401, 100 events/s
        if step == 15:
            phase["now"] = "login"
        produced += await r.outbox.submit([result(f"L{step}-{i}", i) for i in range(5)])
        await asyncio.sleep(0.05)  # production's pace
    await eventually(lambda: (r.forwarder.status()["paused"] or {}).get("code") == "auth",
                     what="the auth pause")
    assert r.forwarder.status()["alarm"]["code"] == "auth"
    requests_while_faulted = len(r.sink.requests)
    assert requests_while_faulted < len(produced)  # not every event was tried even once
    phase["now"] = "up"
    await eventually(lambda: len(set(r.sink.delivered)) == len(produced), timeout=30,
                what="every event delivered")
    await eventually(r.drained, what="every row recorded as delivered")
    assert await r.dead_letters() == []
    assert sorted(set(r.sink.delivered)) == sorted(produced)
    assert r.forwarder.status()["paused"] is None and r.forwarder.status()["alarm"] is None


async def test_dead_letters_do_not_keep_the_circuit_closed(rig):
    """A receiver that dead-letters some events and fails the others is not healthy: the
    circuit opens after ``failure_threshold`` batches. Before, any dead letter in a batch
    counted as a success, so the breaker stayed closed until the whole backlog had been
    sent (half of it into the dead-letter table)."""

    def answer(ev: StoredEvent) -> Outcome:
        if ev.doc["data"]["n"] % 2:
            return Outcome.dead_letter("HTTP 404 Not Found", 404)
        return Outcome.retry("HTTP 503", 503)

    # retried events come back late: every lease is fresh events, half of them dead letters
    r = await rig(ScriptedSink(answer), lease_batch=10, max_in_flight=1,
                  retry={"initial_backoff_s": 60, "max_backoff_s": 60},
                  storm_guard={"enabled": False})
    await r.outbox.submit([reading(n) for n in range(400)])
    await eventually(lambda: r.forwarder.breaker.state != "closed", timeout=10,
                what="the circuit to open")
    assert metric(r.metrics.sink_circuit_open, "erp") == 1
    # three failed batches of ten, not the whole backlog of 400 first
    assert len(r.sink.requests) <= 40, len(r.sink.requests)


async def test_a_probe_answered_by_a_dead_letter_does_not_close_the_circuit(rig):
    """The circuit is open; something that answers 404 for everything appears (a portal).
    Each probe costs one event and the circuit stays open. Before, the first dead-lettered
    probe closed the circuit and the whole backlog followed it into the dead-letter table."""
    phase = {"now": "down"}

    def answer(ev: StoredEvent) -> Outcome:
        if phase["now"] == "down":
            return Outcome.retry("connection refused")
        return Outcome.dead_letter("HTTP 404 Not Found", 404)

    r = await rig(ScriptedSink(answer), storm_guard={"enabled": False},
                  circuit_breaker={"failure_threshold": 1, "open_s": 0.3, "max_open_s": 1})
    await r.outbox.submit([reading(n) for n in range(100)])
    await eventually(lambda: r.forwarder.breaker.state == "open", what="the circuit to open")
    phase["now"] = "portal"
    await eventually(r.dead_letters, what="a probe dead-lettered")
    await asyncio.sleep(1.0)  # a window in which the circuit must not close
    assert r.forwarder.breaker.state != "closed"
    assert len(await r.dead_letters()) <= 6  # one per probe interval, not the backlog


# --------------------------------------------------------------------------- auth pause


async def test_refused_credentials_pause_the_sink_probe_with_backoff_and_a_delivery_ends_it(
        rig):
    """401 after the credential refresh: paused at once (no threshold), alarm ``auth``,
    audited, one probe at a time with a growing wait; every row kept; the first delivery
    after the credentials were fixed ends the pause and the alarm."""
    refused = {"on": True}

    def answer(ev: StoredEvent) -> Outcome:
        if refused["on"]:
            return Outcome.sink_fault("HTTP 401 Unauthorized", 401, '{"error":"invalid_token"}')
        return Outcome.delivered(200)

    r = await rig(ScriptedSink(answer), max_in_flight=4, lease_batch=5,
                  circuit_breaker={"failure_threshold": 5, "open_s": 0.2, "max_open_s": 0.8},
                  retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.02, "max_attempts": 1})
    ids = await r.outbox.submit([result(f"L{n}", n) for n in range(40)])
    await eventually(lambda: r.forwarder.status()["paused"], what="the auth pause")
    paused = r.forwarder.status()["paused"]
    assert paused["code"] == "auth" and "credentials" in paused["reason"]
    assert r.forwarder.status()["alarm"]["code"] == "auth"
    assert r.forwarder.status()["up"] is False
    assert metric(r.metrics.sink_paused, "erp") == 1
    await eventually(lambda: len(r.sink.requests) >= 10, timeout=10, what="probes")
    first_after = len(r.sink.requests)
    await asyncio.sleep(1.5)  # a window in which the probes must not become a stream
    probes = r.sink.requests[first_after:]
    assert len(probes) <= 4  # one probe per wait (0.8 s at most), not a stream
    await eventually(lambda: len(r.sink.requests) > first_after, what="the next probe")
    [audit] = await r.audit("sink_paused")
    assert audit[0] == "gateway" and "credentials" in audit[1] and '"auth"' in audit[2]
    assert await r.dead_letters() == [] and await r.queued() == 40
    assert faults_total(r, "401") >= 1
    refused["on"] = False
    await eventually(lambda: len(set(r.sink.delivered)) == 40, timeout=15, what="delivery")
    assert sorted(set(r.sink.delivered)) == sorted(ids)
    status = r.forwarder.status()
    assert status["paused"] is None and status["alarm"] is None and status["up"] is True
    assert metric(r.metrics.sink_paused, "erp") == 0


async def test_resume_lets_an_auth_paused_sink_probe_at_once(rig):
    refused = {"on": True}

    def answer(ev: StoredEvent) -> Outcome:
        return (Outcome.sink_fault("HTTP 403 Forbidden", 403) if refused["on"]
                else Outcome.delivered(200))

    r = await rig(ScriptedSink(answer),
                  circuit_breaker={"failure_threshold": 5, "open_s": 30, "max_open_s": 60})
    await r.outbox.submit([result("L1")])
    await eventually(lambda: r.forwarder.status()["paused"], what="the auth pause")
    refused["on"] = False
    await asyncio.sleep(0.5)
    assert r.sink.delivered == []  # the next probe is 30 s away
    assert r.forwarder.resume(by="ops", reason="client secret rotated") is True
    assert r.forwarder.resume() is False
    await eventually(lambda: r.sink.delivered, timeout=5, what="the probe after resume")
    assert r.forwarder.status()["paused"] is None


async def test_a_captive_portal_in_front_of_the_erp_dead_letters_nothing(gateways, erp):
    """The field incident end to end (real HTTP sink, real loopback ERP): redirects and
    unlisted 5xx, then 401, while results keep arriving at 100 events/s. Before, 2,497 of
    2,500 results ended in the dead-letter queue; now none does, and all arrive once the
    portal is gone."""
    gw = await gateways(sink_yaml(erp.url, max_batch=20, extra="""\
        retry: {initial_backoff_s: 0.05, max_backoff_s: 0.5, max_attempts: 3}
        circuit_breaker: {failure_threshold: 3, open_s: 0.3, max_open_s: 1}
        """))
    produced: list[str] = []
    for step, status in enumerate([301] * 5 + [501] * 5 + [520] * 5 + [401] * 10):
        erp.outage(True, status=status)
        produced += await gw.pipeline.submit([result(f"L{step}-{i}", i) for i in range(10)])
        await asyncio.sleep(0.1)  # production's pace
    fwd = gw.forwarders["erp"]
    await eventually(lambda: (fwd.status()["paused"] or {}).get("code") == "auth",
                     what="the auth pause")
    assert fwd.status()["alarm"]["code"] == "auth"
    assert (await gw.outbox.stats())["dead_letters"] == 0
    erp.outage(False)
    await erp.wait_for(lambda e: set(e.ids()) == set(produced), within_s=30)
    await eventually(lambda: fwd.status()["alarm"] is None, what="the alarm cleared")
    st = await gw.outbox.stats()
    assert st["dead_letters"] == 0
    assert {r.status for r in erp.requests} >= {301, 401, 200}  # the breaker skipped some
