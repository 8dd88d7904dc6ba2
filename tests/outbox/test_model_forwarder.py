"""Model-based test of the forwarder half: the real ``Forwarder`` over a real outbox, two
sinks that answer what hypothesis draws, checked against a plain-Python model after every
step.

The forwarder's lanes are driven turn by turn (``Forwarder.step``, the body of a lane's
loop) with a controlled clock shared by the forwarder, its circuit breaker and the
outbox's lease: what is due, what waits for a Retry-After, a backoff or an open circuit
is decided by the product code, and the test decides only when time passes and when each
lane takes its turn. A sink's ``send`` blocks until a rule answers it, so several lanes of
several sinks can hold leases at once.

Rules: submit (two sources, four classes, ordering keys, derived holds, MQTT-style
messages with and without the DUP flag); a lane's turn (``erp`` parks dead letters,
``qms`` continues; two lanes each); a sink's answer per event (delivered, 409 duplicate,
503 retry, 429 with Retry-After, 400/422 dead letter, 302/401 sink fault, or ``send``
raising); the clock moving on; budget pressure (a squeezed disk budget: audit pruning,
``low`` expiry, backpressure) and its relief; a crash and restart (leases dropped without
completing; a storm-guard pause and a Retry-After pause are kept) with a config change
(``qms`` removed or added back, ``erp``'s route for ``production.count`` removed or added
back) and, while stopped, the CLI's reroute or discard of a sink's rows; operator replay
and discard of dead letters; sink resume (as ``Gateway.resume_sink``); a receiver answering 404 to
everything for a while (the storm guard).

Invariants, after every step:
- every (event, sink) is in exactly one state (pending, in flight, delivered,
  dead-lettered, expired, discarded, rerouted) and the database agrees: delivery rows,
  dead letters, the events table and the outbox's in-flight sets;
- each state change of an event has its audit row: per event and sink the audit rows are
  exactly the model's, and they form a legal path (stored → retry* → delivered |
  dead_lettered → replayed → … ; rerouted in/out; expired; discarded);
- the audit ``seq`` only grows: the rows written since the last step are numbered
  contiguously above every seq seen before (no gap, no reuse). The hash-chain check
  comes with the tamper-evident trail; there is no chain to verify yet;
- per key and sink nothing is sent while an earlier event of the key is unsent, in
  flight, retrying or parked (a dead letter parks its key unless the sink continues), and
  the delivered sequence is the ingest order (replayed and rerouted events excepted);
- no identity is reused (event seq, event id, dead-letter id);
- no event is sent before its ``next_at`` nor before a Retry-After of its sink; a retry's
  ``next_at`` lies between Retry-After and the backoff cap;
- ``critical``/``high`` (and ``normal``) events are never expired; an expired event was
  neither in flight nor dead-lettered;
- a sink paused by the dead-letter storm guard sends nothing until resumed; an open
  circuit sends nothing, a half-open one or an auth pause sends one event (the probe);
- both pauses outlive a restart: the outbox stores a storm-guard pause exactly while the
  model has one (a sink no longer configured included) and a Retry-After end no earlier
  than the model's; a restarted forwarder is paused by the storm guard exactly when the
  model says, with its ``since`` and alarm as before, and not before the Retry-After end.

``EDGE_MODEL_EXAMPLES`` and ``EDGE_MODEL_STEPS`` size the run (the same variables as
``test_model.py``); the default, 60 sequences of 40 steps, takes about 15 s here. A
long run (shrinking a failure found there can take minutes)::

    EDGE_MODEL_EXAMPLES=500 EDGE_MODEL_STEPS=50 pytest --timeout 0 \\
        tests/outbox/test_model_forwarder.py
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.components import Outcome, OutcomeKind, StoredEvent, Submission
from edge.config import OutboxConfig, SinkConfigBase
from edge.delivery import send_in_key_order
from edge.errors import OutboxFullError
from edge.events import Event, make_event
from edge.forwarder import Forwarder
from edge.outbox import Outbox, audit, pauses, queries
from edge.telemetry import Metrics
from tests.support import metric

EXAMPLES = int(os.environ.get("EDGE_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("EDGE_MODEL_STEPS", "40"))

SINKS = ("erp", "qms")
TYPES = {"quality.hold": "critical", "inspection.result": "high",
         "production.count": "normal", "machine.reading": "low"}
TOGGLED = "production.count"  # the route of erp a config change removes and adds back
ROUTES = {"erp": set(TYPES), "qms": {"quality.hold", "inspection.result"}}
KEYS = ["lot:A", "lot:B", None]
LANES = 2
MAX_BACKOFF_S = 20.0
MAX_ATTEMPTS = {"erp": 3, "qms": None}

# the sink's answer for one event, as an HTTP sink would map the receiver's response
ANSWERS: dict[str, Outcome] = {
    "ok": Outcome.delivered(200),
    "dup": Outcome.duplicate(409),
    "503": Outcome.retry("service unavailable", 503),
    "429_5": Outcome.retry("too many requests", 429, retry_after_s=5.0),
    "429_90": Outcome.retry("too many requests", 429, retry_after_s=90.0),
    "400": Outcome.dead_letter("bad request", 400, body='{"error":"bad"}'),
    "422": Outcome.dead_letter("unprocessable", 422),
    "404": Outcome.dead_letter("not found", 404),
    "302": Outcome.sink_fault("redirect not followed", 302),
    "401": Outcome.sink_fault("credentials refused", 401),
}
ANSWER_NAMES = sorted(ANSWERS)
# a third of the requests get one answer for every event (a receiver in one mood: an
# outage), a third a mix, a third 404 for everything (a wrong base URL: the storm guard)
SCRIPTS = st.one_of(st.sampled_from(ANSWER_NAMES).map(lambda n: [n] * 4),
                    st.lists(st.sampled_from(ANSWER_NAMES), min_size=4, max_size=4),
                    st.just(["404"] * 4))
QUEUED = {"pending", "inflight"}
FINAL = {"delivered", "expired", "discarded", "rerouted"}


def _note(what: str) -> None:
    """Count a case in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    with contextlib.suppress(InvalidArgument):  # outside a test run
        event(what)


def sink_config(sink: str) -> SinkConfigBase:
    return SinkConfigBase.model_validate({
        "id": sink, "type": "scripted", "max_in_flight": LANES,
        "lease_batch": 4 if sink == "erp" else 3, "live_share": 0.25,
        "retry": {"initial_backoff_s": 1.0, "max_backoff_s": MAX_BACKOFF_S,
                  "max_attempts": MAX_ATTEMPTS[sink]},
        "circuit_breaker": {"failure_threshold": 3, "open_s": 10, "max_open_s": 40},
        "storm_guard": {"window_outcomes": 6, "min_share": 0.8, "min_events": 4},
        "on_dead_letter": "park" if sink == "erp" else "continue",
    })


# --------------------------------------------------------------------------- the sink


@dataclass
class Call:
    batch: list[StoredEvent]
    at: float
    future: asyncio.Future[Any]
    returned: list[Outcome] | None = None


class ScriptedSink:
    """A sink whose ``send`` waits until the test answers; keeps key order inside a call
    like the built-in sinks (``send_in_key_order``); an event whose type no route of the
    sink accepts any more is ``unrouted``, as the HTTP sink does."""

    def __init__(self, sink_id: str, routes: set[str], clock: Any) -> None:
        self.id = sink_id
        self.routes = routes
        self.clock = clock
        self.calls: list[Call] = []
        self.called = asyncio.Event()

    def accepts(self, event_type: str) -> bool:
        return event_type in self.routes

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        call = Call(list(batch), self.clock(), asyncio.get_running_loop().create_future())
        self.calls.append(call)
        self.called.set()
        script = await call.future
        answers = iter(script)

        async def one(events: list[StoredEvent]) -> list[Outcome]:
            ev = events[0]
            if not self.accepts(ev.type):
                return [Outcome.unrouted(f"no route of sink {self.id} matches {ev.type}")]
            return [next(answers)]

        by_seq = await send_in_key_order([[ev] for ev in call.batch], one, 1,
                                         dead_letter_blocks=self.id == "erp")
        call.returned = [by_seq[ev.seq] for ev in call.batch]
        return call.returned


# --------------------------------------------------------------------------- the model


@dataclass
class Row:
    """One (event, sink) in the model."""

    state: str = "pending"  # pending | inflight | dead | delivered | expired | discarded
    #                         | rerouted
    not_before: float = 0.0
    attempts: int = 0
    exempt: bool = False  # replayed or rerouted in: may arrive after later events of its key
    log: list[str] = field(default_factory=list)  # the audit states expected, in order


@dataclass
class Ev:
    id: str
    seq: int | None  # None: unrouted at ingest, never stored
    key: str | None
    cls: str
    type: str
    rows: dict[str, Row] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # event-level audit rows (sink NULL)

    @property
    def stored(self) -> bool:
        return any(r.state in QUEUED or r.state == "dead" for r in self.rows.values())


def legal_path(initial: str, states: list[str]) -> str:
    """Walk one (event, sink)'s audit states; return where they end, or raise."""
    at = initial
    for s in states:
        nxt = {
            ("queued", "retry"): "queued",
            ("queued", "delivered"): "done",
            ("queued", "dead_lettered"): "dead",
            ("queued", "discarded"): "done",
            ("queued", "rerouted_out"): "done",
            ("queued", "rerouted_in"): "queued",  # merged into the queued row
            ("queued", "expired"): "done",
            ("dead", "replayed"): "queued",
            ("dead", "discarded"): "done",
            ("dead", "rerouted_in"): "dead",  # the event keeps its dead letter there
            ("none", "rerouted_in"): "queued",
            ("done", "rerouted_in"): "queued",
        }.get((at, s))
        assert nxt is not None, f"illegal audit path {initial} {states}: {s!r} after {at}"
        at = nxt
    return at


class ForwarderMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.now = time.time()
        self.configured = ["erp", "qms"]
        self.routes = {s: set(r) for s, r in ROUTES.items()}
        self.events: dict[str, Ev] = {}
        self.seqs_given: set[int] = set()
        self.max_dead_letter_id = 0
        self.max_audit_seq = 0
        self.first_of_message: dict[tuple[str, int], str] = {}  # (source, payload) → id
        self.busy: dict[tuple[str, int], tuple[asyncio.Task[Any], Call]] = {}
        self.hold: dict[str, float] = dict.fromkeys(SINKS, 0.0)  # Retry-After of the sink
        self.storm: dict[str, bool] = dict.fromkeys(SINKS, False)
        self.storm_since: dict[str, float] = {}  # when the storm guard paused the sink
        self.delivered: dict[tuple[str, str], list[tuple[int, bool]]] = {}
        self.audit_pruned = False
        self.squeezed = False
        self.expiry_seen = 0  # audit seq of the last expiry the model took in
        self.n = 0
        self.sends = 0
        self.outbox: Outbox
        self.sinks: dict[str, ScriptedSink] = {}
        self.fwds: dict[str, Forwarder] = {}
        self._start()

    # ------------------------------------------------------------------ plumbing

    def clock(self) -> float:
        return self.now

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _route(self, event: Event) -> list[str]:
        return [s for s in self.configured if event.type in self.routes[s]]

    def _start(self) -> None:
        self.outbox = Outbox(Path(self.dir.name), OutboxConfig(commit_interval_ms=0, synchronous="normal"),
                             Metrics(), router=self._route, maintenance_interval_s=3600,
                             clock=self.clock)
        self._run(self.outbox.open())
        self.budget_bytes = self.outbox.budget.budget_bytes
        self.squeezed = False
        self.sinks, self.fwds = {}, {}
        for s in self.configured:
            sink = ScriptedSink(s, self.routes[s], self.clock)
            fwd = Forwarder(sink, sink_config(s), self.outbox, self.outbox.metrics,
                            clock=self.clock)
            fwd.breaker.clock = self.clock
            self.sinks[s], self.fwds[s] = sink, fwd

    def _crash(self) -> None:
        tasks = [t for t, _ in self.busy.values()]
        for t in tasks:
            t.cancel()
        if tasks:
            self._run(asyncio.wait(tasks))
        self.busy.clear()
        self._run(self.outbox.close())
        for ev in self.events.values():
            for row in ev.rows.values():
                if row.state == "inflight":
                    row.state = "pending"

    def teardown(self) -> None:
        _note(f"sends {min(self.sends // 5 * 5, 30)}+")
        with contextlib.suppress(Exception):
            self._crash()
        self.loop.close()
        self.dir.cleanup()

    def _db(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return self._run(self.outbox.read(lambda c: c.execute(sql, args).fetchall()))

    # ------------------------------------------------------------------ ingest

    def _body(self, kind: str) -> dict[str, Any]:
        self.n += 1
        if kind == "machine.reading":
            return {"value": self.n}
        if kind == "production.count":
            return {"count": self.n}
        return {"lot": "L", "result": "fail", "n": self.n}

    def _submit(self, items: list[Submission]) -> list[str] | None:
        try:
            return list(self._run(self.outbox.submit(items)))
        except OutboxFullError:
            assert not self.outbox.accepting, "refused while accepting"
            return None

    def _stored(self, ids: list[str], items: list[Submission]) -> None:
        seqs = dict(self._db("SELECT id, seq FROM events"))
        prev_seq = None
        for item, eid in zip(items, ids, strict=True):
            ev = item.event
            if eid != ev.id:
                continue  # matched (or dropped with its matched cause): checked by caller
            assert eid not in self.events, f"event id {eid} given twice"
            sinks = self._route(ev)
            seq = seqs.get(eid)
            m = Ev(eid, seq, ev.ordering_key, TYPES[ev.type], ev.type)
            if not sinks:
                assert seq is None, "an event no sink routes was stored"
                m.log = ["unrouted"]
            else:
                assert seq is not None, "a routed event was not stored"
                assert seq not in self.seqs_given, f"seq {seq} given twice"
                assert prev_seq is None or seq > prev_seq, "storage order is not call order"
                if item.derived:
                    assert seq == prev_seq + 1 if prev_seq else True, \
                        "a derived event is not stored right after its cause"
                self.seqs_given.add(seq)
                prev_seq = seq
                m.log = ["stored"]
                m.rows = {s: Row() for s in sinks}
            self.events[eid] = m

    @rule(kind=st.sampled_from(sorted(TYPES)), key=st.sampled_from(KEYS),
          n=st.integers(1, 3), source=st.sampled_from(["line1", "line2"]),
          derive=st.booleans())
    def submit(self, kind: str, key: str | None, n: int, source: str, derive: bool) -> None:
        items: list[Submission] = []
        for _ in range(n):
            items.append(Submission(make_event(type=kind, site="s", source=source,
                                               data=self._body(kind), ordering_key=key)))
            if derive and kind == "inspection.result":
                items.append(Submission(make_event(
                    type="quality.hold", site="s", source=source,
                    data={"lot": "L", "reason": "fail"}, ordering_key=key), derived=True))
        ids = self._submit(items)
        if ids is None:
            return
        assert ids == [i.event.id for i in items], "nothing here may be matched"
        self._stored(ids, items)

    @rule(payload=st.integers(0, 2), dup=st.booleans(),
          source=st.sampled_from(["line1", "line2"]), derive=st.booleans())
    def message(self, payload: int, dup: bool, source: str, derive: bool) -> None:
        """An MQTT message without a station id (content-hash key), DUP flag as given; a
        failing result derives a hold."""
        data = {"lot": f"M{payload}", "result": "fail", "payload": payload}
        key = hashlib.sha256(orjson.dumps(data)).hexdigest()
        items = [Submission(make_event(type="inspection.result", site="s", source=source,
                                       data=data, ordering_key=f"lot:M{payload}"),
                            key, redelivery_only=True, redelivered=dup,
                            redelivery_horizon=1000)]
        if derive:
            items.append(Submission(make_event(
                type="quality.hold", site="s", source=source,
                data={"lot": f"M{payload}", "reason": "fail"},
                ordering_key=f"lot:M{payload}"), derived=True))
        ids = self._submit(items)
        if ids is None:
            return
        first = self.first_of_message.get((source, payload))
        if dup and first is not None:
            _note("redelivery matched")
            assert ids[0] == first, "a redelivery must map to the stored copy"
            assert all(i == "" for i in ids[1:]), "a redelivery's derived event was stored"
            return
        assert ids == [i.event.id for i in items], "only a redelivery may be matched"
        self.first_of_message[(source, payload)] = ids[0]
        self._stored(ids, items)

    # ------------------------------------------------------------------ lanes

    def _free_lanes(self) -> list[tuple[str, int]]:
        return [(s, i) for s in self.fwds for i in range(LANES) if (s, i) not in self.busy]

    @precondition(lambda self: self._free_lanes())
    @rule(pick=st.integers(0, 7))
    def turn(self, pick: int) -> None:
        self._turn(pick)

    @precondition(lambda self: self._free_lanes())
    @rule(pick=st.integers(0, 7))
    def another_turn(self, pick: int) -> None:
        self._turn(pick)

    def _turn(self, pick: int) -> None:
        """A lane takes one turn of its loop: it leases and sends, or finds it must wait."""
        lanes = self._free_lanes()
        sink_id, lane = lanes[pick % len(lanes)]
        fwd, sink = self.fwds[sink_id], self.sinks[sink_id]
        circuit, paused = fwd.breaker.state, fwd.pause
        before = len(sink.calls)
        sink.called.clear()
        task = self.loop.create_task(fwd.step(lane))

        async def sent_or_done() -> None:
            waiter = asyncio.ensure_future(sink.called.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

        self._run(sent_or_done())
        if task.done():
            task.result()
            assert len(sink.calls) == before
            return
        call = sink.calls[-1]
        self.sends += 1
        _note(f"send while {circuit}" + (f", paused {paused.code}" if paused else ""))
        self.busy[(sink_id, lane)] = (task, call)
        self._check_send(sink_id, call, circuit, paused)

    @precondition(lambda self: not any(self.storm.values()))
    @rule(sink=st.sampled_from(SINKS))
    def wrong_base_url(self, sink: str) -> None:
        """A receiver that answers 404 to everything for a while (a wrong base URL): fresh
        events without a key for ``sink``, and its lanes' turns answered with 404 until the
        storm guard pauses it or nothing more is sent (circuit open, nothing due). Built
        from the turn and answer rules, so a storm, and a restart while it holds, are
        reached in most runs."""
        if sink not in self.fwds:
            return
        items = [Submission(make_event(type="inspection.result", site="s", source="line1",
                                       data=self._body("inspection.result")))
                 for _ in range(6)]
        ids = self._submit(items)
        if ids is None:
            return
        self._stored(ids, items)
        for _ in range(6):
            lanes = self._free_lanes()
            mine = [i for i, (s, _) in enumerate(lanes) if s == sink]
            if self.storm[sink] or not mine:
                return
            lane = lanes[mine[0]]
            self._turn(mine[0])
            if lane not in self.busy:
                return  # nothing was sent
            self._answer(sorted(self.busy).index(lane), ["404"] * 4, 1)

    def _check_send(self, sink: str, call: Call, circuit: str, paused: Any) -> None:
        batch = call.batch
        assert batch, "an empty send"
        assert circuit != "open", f"{sink} sent while its circuit was open"
        assert not self.storm[sink], f"{sink} sent while paused by the storm guard"
        if circuit == "half_open" or paused is not None:
            assert len(batch) == 1, f"{sink}: a probe of {len(batch)} events"
        assert self.now >= self.hold[sink], f"{sink} sent before its Retry-After"
        in_batch: set[str] = set()
        for ev in batch:
            m = self.events[ev.id]
            row = m.rows.get(sink)
            assert row is not None and row.state == "pending", (
                f"{sink} sent {ev.seq}, which is {row.state if row else 'not routed'}")
            assert self.now >= row.not_before, (
                f"{sink} sent {ev.seq} at {self.now - row.not_before:.1f} s before its "
                "next attempt was due")
            assert ev.attempts == row.attempts, f"{ev.seq}: attempts {ev.attempts} != " \
                f"{row.attempts}"
            if m.key is not None:
                for other in self.events.values():
                    o = other.rows.get(sink)
                    if (other.key != m.key or o is None or other.seq is None
                            or other.seq >= (m.seq or 0) or other.id in in_batch):
                        continue
                    ok = o.state in FINAL or (o.state == "dead" and sink == "qms")
                    assert ok, (f"{sink}: {m.key} seq {m.seq} sent while seq {other.seq} "
                                f"is {o.state}")
            in_batch.add(ev.id)
        for ev in batch:
            self.events[ev.id].rows[sink].state = "inflight"

    @precondition(lambda self: self.busy)
    @rule(pick=st.integers(0, 7), script=SCRIPTS, fail=st.integers(0, 11))
    def answer(self, pick: int, script: list[str], fail: int) -> None:
        self._answer(pick, script, fail)

    @precondition(lambda self: self.busy)
    @rule(pick=st.integers(0, 7), script=SCRIPTS, fail=st.integers(0, 11))
    def another_answer(self, pick: int, script: list[str], fail: int) -> None:
        self._answer(pick, script, fail)

    def _answer(self, pick: int, script: list[str], fail: int) -> None:
        """The receiver answers one request: an outcome per event, or ``send`` raises."""
        key = sorted(self.busy)[pick % len(self.busy)]
        task, call = self.busy.pop(key)
        sink = key[0]
        t = self.now
        if fail == 0:
            call.future.set_exception(RuntimeError("sink bug"))
        else:
            call.future.set_result([ANSWERS[n] for n in script])
        self._run(task)
        fwd = self.fwds[sink]
        if call.returned is None:  # send raised: a retryable failure of the whole batch
            outcomes = [Outcome.retry("sink error")] * len(call.batch)
        else:
            outcomes = call.returned
        storm = fwd.pause if fwd.pause is not None and fwd.pause.code == "storm_guard" else None
        if storm is not None:
            _note("storm guard pause")
            if not self.storm[sink]:
                self.storm_since[sink] = storm.since
            self.storm[sink] = True
        if fwd.pause is not None and fwd.pause.code == "auth":
            _note("auth pause")
        after = max((o.retry_after_s or 0.0) for o in outcomes if o.attempted) \
            if any(o.attempted for o in outcomes) else 0.0
        if after:
            self.hold[sink] = max(self.hold[sink], t + after)
        db = {(seq): (next_at, attempts) for seq, next_at, attempts in self._db(
            "SELECT seq, next_at, attempts FROM deliveries WHERE sink = ? AND done = 0",
            (sink,))}
        for ev, o in zip(call.batch, outcomes, strict=True):
            m = self.events[ev.id]
            row = m.rows[sink]
            assert row.state == "inflight"
            row.state = "pending"
            kind = o.kind
            if (kind is OutcomeKind.dead_letter and storm is not None
                    and (o.status if o.status is not None else o.reason) == storm.key):
                kind = OutcomeKind.sink_fault  # held by the storm guard: the row stays
            if kind in (OutcomeKind.delivered, OutcomeKind.duplicate):
                row.state = "delivered"
                row.log.append("delivered")
                if m.key is not None:
                    self.delivered.setdefault((m.key, sink), []).append(
                        (m.seq or 0, row.exempt))
                continue
            if kind is OutcomeKind.retry and o.attempted:
                row.attempts += 1
                limit = MAX_ATTEMPTS[sink]
                if limit is not None and row.attempts >= limit:
                    kind = OutcomeKind.dead_letter
            if kind is OutcomeKind.dead_letter:
                row.state = "dead"
                row.log.append("dead_lettered")
                continue
            assert m.seq in db, f"{sink} {m.seq}: {o.kind.value} {o.status}, expected " \
                "the row to stay queued, it is gone"
            assert db[m.seq][1] == row.attempts, f"{sink} {m.seq}: attempts " \
                f"{db[m.seq][1]}, model {row.attempts}"
            if kind is OutcomeKind.sink_fault or (kind is OutcomeKind.retry and o.attempted):
                row.log.append("retry")
                next_at, _ = db[m.seq]
                ra = o.retry_after_s or 0.0
                assert t + ra <= next_at + 1e-6, f"{sink} {m.seq}: retry before Retry-After"
                assert next_at <= t + max(MAX_BACKOFF_S, ra) + 1e-6, \
                    f"{sink} {m.seq}: backoff above its cap"
                row.not_before = next_at
            elif kind is OutcomeKind.unrouted:
                row.not_before = db[m.seq][0]
        self._check_dead_letter_ids()

    def _check_dead_letter_ids(self) -> None:
        ids = [r[0] for r in self._db("SELECT id FROM dead_letters WHERE id > ?",
                                      (self.max_dead_letter_id,))]
        if ids:
            self.max_dead_letter_id = max(ids)

    @rule(dt=st.sampled_from([0.5, 3.0, 12.0, 45.0, 400.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    # ------------------------------------------------------------------ budget

    @rule(factor=st.sampled_from([0.4, 0.75, 1.2]), keep=st.integers(0, 3))
    def budget_pressure(self, factor: float, keep: int) -> None:
        """The disk budget shrinks under the outbox: bookkeeping goes, then ``low`` rows,
        then new events are refused (mostly only for this step, sometimes until relief)."""
        db, wal = self._run(self.outbox.read(queries.used_parts, self.outbox.path))
        self.outbox.budget.budget_bytes = max(4096, int((db + wal) * factor))
        self.squeezed = True
        self._check_budget()
        if keep:
            self.budget_relief()

    @rule()
    def sweep(self) -> None:
        """The deferred delete of delivered rows runs between any two steps."""
        self._run(self.outbox.sweep())
        assert self._db("SELECT COUNT(*) FROM deliveries WHERE done = 1")[0][0] == 0

    @precondition(lambda self: self.squeezed)
    @rule()
    def budget_relief(self) -> None:
        self.outbox.budget.budget_bytes = self.budget_bytes
        self.squeezed = False
        self._check_budget()
        assert self.outbox.accepting, "still refusing with the budget back"

    def _check_budget(self) -> None:
        pruned = metric(self.outbox.metrics.audit_pruned, "budget")
        self._run(self.outbox._check_budget())
        if metric(self.outbox.metrics.audit_pruned, "budget") > pruned:
            self.audit_pruned = True
        found = self._db("SELECT seq, event_id FROM audit WHERE state = 'expired' AND seq > ?",
                         (self.expiry_seen,))
        expired = {eid for _, eid in found}
        self.expiry_seen = max([self.expiry_seen, *(seq for seq, _ in found)])
        if expired:
            _note("low expired")
        if not self.outbox.accepting:
            _note("backpressure")
        for eid in expired:
            m = self.events[eid]
            assert m.cls == "low", f"a {m.cls} event was expired"
            for sink, row in m.rows.items():
                assert row.state not in ("inflight", "dead"), \
                    f"expired an event that is {row.state} for {sink}"
                if row.state == "pending":
                    row.state = "expired"
            m.log.append("expired")

    # ------------------------------------------------------------------ restart

    @rule(change=st.sampled_from(["none", "drop_qms", "add_qms", "drop_route",
                                  "add_route"]),
          op=st.sampled_from(["none", "reroute", "discard"]),
          frm=st.sampled_from(SINKS), to=st.sampled_from(SINKS))
    def crash_and_restart(self, change: str, op: str, frm: str, to: str) -> None:
        """The process dies (leases vanish; a storm-guard pause and a Retry-After hold are
        stored and stay, an auth pause and the circuit do not); it starts again with a changed config, maybe after an operator's reroute or
        discard of a sink's rows (``edge outbox reroute|discard``, gateway stopped)."""
        self._crash()
        if any(self.storm.values()):
            _note("restart while paused by the storm guard")
        if any(h > self.now for h in self.hold.values()):
            _note("restart within a Retry-After")
        if change == "drop_qms" and "qms" in self.configured:
            self.configured.remove("qms")
        elif change == "add_qms" and "qms" not in self.configured:
            self.configured.append("qms")
        elif change == "drop_route":
            self.routes["erp"].discard(TOGGLED)
        elif change == "add_route":
            self.routes["erp"].add(TOGGLED)
        if op == "reroute" and to in self.configured:
            self._cli(lambda c: queries.reroute_sink(c, from_sink=frm, to_sink=to,
                                                     actor="op", reason="sink replaced"))
            self._model_reroute(frm, to)
        elif op == "discard":
            self._cli(lambda c: queries.discard_sink(c, sink=frm, actor="op",
                                                     reason="sink retired"))
            for m in self.events.values():
                row = m.rows.get(frm)
                if row is not None and row.state == "pending":
                    row.state = "discarded"
                    row.log.append("discarded")
        self._start()

    def _cli(self, fn: Any) -> None:
        conn = sqlite3.connect(self.outbox.path, isolation_level=None)
        try:
            with queries.transaction(conn):
                fn(conn)
        finally:
            conn.close()

    def _model_reroute(self, frm: str, to: str) -> None:
        """What an operator means by "move the rows of ``frm`` to ``to``": every queued row
        of ``frm`` becomes a row of ``to``, unless the event already has one there (queued
        or dead-lettered: it keeps that state); ``frm == to`` changes nothing."""
        if frm == to:
            return
        for m in self.events.values():
            row = m.rows.get(frm)
            if row is None or row.state != "pending":
                continue
            row.state = "rerouted"
            row.log.append("rerouted_out")
            target = m.rows.get(to)
            if target is not None and target.state in ("pending", "dead"):
                _note(f"reroute into a {target.state} row")
                target.log.append("rerouted_in")
                continue
            if target is None:
                target = m.rows[to] = Row(log=[])
            target.state, target.attempts, target.not_before = "pending", 0, 0.0
            target.exempt = True
            target.log.append("rerouted_in")

    # ------------------------------------------------------------------ operators

    @precondition(lambda self: any(r.state == "dead" for m in self.events.values()
                                   for r in m.rows.values()))
    @rule(pick=st.integers(0, 7), replay=st.booleans())
    def dead_letter_action(self, pick: int, replay: bool) -> None:
        dead = self._run(self.outbox.read(queries.dlq_list))
        dl = dead[pick % len(dead)]
        row = self.events[dl["event_id"]].rows[dl["sink"]]
        assert row.state == "dead"
        if replay:
            assert self._run(self.outbox.dlq_replay(ids=[dl["id"]], actor="op",
                                                    reason="fixed")) == 1
            row.state, row.attempts, row.not_before, row.exempt = "pending", 0, 0.0, True
            row.log.append("replayed")
        else:
            assert self._run(self.outbox.dlq_discard(ids=[dl["id"]], actor="op",
                                                     reason="wrong")) == 1
            row.state = "discarded"
            row.log.append("discarded")

    @precondition(lambda self: any(f.pause is not None for f in self.fwds.values()))
    @rule(pick=st.integers(0, 1))
    def resume(self, pick: int) -> None:
        """``edge sink resume`` (as ``Gateway.resume_sink``: audited, then resumed)."""
        paused = [s for s, f in self.fwds.items() if f.pause is not None]
        sink = paused[pick % len(paused)]
        fwd = self.fwds[sink]
        self._run(self.outbox.sink_resumed(sink, actor="op", reason="fixed", detail={
            "sink": sink, "pause": fwd.pause.code if fwd.pause else None}))
        assert fwd.resume(by="op", reason="fixed")
        self.storm[sink] = False
        self.storm_since.pop(sink, None)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        queued = set(self._db("SELECT e.id, d.sink FROM deliveries d "
                              "JOIN events e ON e.seq = d.seq WHERE d.done = 0"))
        n_rows = self._db("SELECT COUNT(*) FROM deliveries WHERE done = 0")[0][0]
        assert n_rows == len(queued), "a delivery row without its event"
        # rows waiting for the sweep are deliveries the model saw, never anything else
        for eid, sink in self._db("SELECT e.id, d.sink FROM deliveries d "
                                  "JOIN events e ON e.seq = d.seq WHERE d.done = 1"):
            assert self.events[eid].rows[sink].state == "delivered", \
                f"{eid} marked done for {sink} while {self.events[eid].rows[sink].state}"
        dead_rows = self._db("SELECT event_id, sink FROM dead_letters")
        dead = set(dead_rows)
        assert len(dead) == len(dead_rows), "an event dead-lettered twice for one sink"
        # an event whose rows are all delivered has left the outbox (its row goes with
        # the sweep)
        stored = {r[0] for r in self._db(
            "SELECT id FROM events e WHERE EXISTS (SELECT 1 FROM deliveries d "
            "WHERE d.seq = e.seq AND d.done = 0) OR EXISTS (SELECT 1 FROM dead_letters x "
            "WHERE x.seq = e.seq)")}
        want_q, want_d, want_e = set(), set(), set()
        for m in self.events.values():
            for sink, row in m.rows.items():
                if row.state in QUEUED:
                    want_q.add((m.id, sink))
                elif row.state == "dead":
                    want_d.add((m.id, sink))
            if m.stored:
                want_e.add(m.id)
        assert not queued & dead, f"queued and dead-lettered at once: {queued & dead}"
        assert queued == want_q, f"queued: extra {queued - want_q}, missing {want_q - queued}"
        assert dead == want_d, f"dead letters: extra {dead - want_d}, missing {want_d - dead}"
        assert stored == want_e, f"events: extra {stored - want_e}, missing {want_e - stored}"
        for sink in SINKS:
            inflight = set(self.outbox.inflight(sink))
            want = {m.seq for m in self.events.values()
                    if sink in m.rows and m.rows[sink].state == "inflight"}
            assert inflight == want, f"{sink} in flight: {inflight} != {want}"

    @invariant()
    def every_change_is_audited_on_a_legal_path(self) -> None:
        rows = self._db("SELECT seq, event_id, sink, state, detail FROM audit ORDER BY seq")
        if rows:
            seqs = [r[0] for r in rows]
            new = [s for s in seqs if s > self.max_audit_seq]
            assert new == list(range(self.max_audit_seq + 1, self.max_audit_seq + 1
                                     + len(new))), f"audit seq gap or reuse: {new}"
            self.max_audit_seq = max(self.max_audit_seq, seqs[-1])
        level: dict[str, list[str]] = {}
        per_sink: dict[tuple[str, str], list[str]] = {}
        stored_sinks: dict[str, list[str]] = {}
        for _, eid, sink, state, detail in rows:
            if eid is None or state == "duplicate_dropped":  # a copy matched: not a change
                continue
            if state == "rerouted":
                frm = orjson.loads(detail)["from"]
                per_sink.setdefault((eid, frm), []).append("rerouted_out")
                per_sink.setdefault((eid, sink), []).append("rerouted_in")
            elif sink is None:
                level.setdefault(eid, []).append(state)
                if state == "stored":
                    stored_sinks[eid] = orjson.loads(detail)["sinks"]
            else:
                per_sink.setdefault((eid, sink), []).append(state)
        for m in self.events.values():
            pruned = self.audit_pruned and not m.stored
            got = level.get(m.id, [])
            if pruned:
                assert m.log[len(m.log) - len(got):] == got, f"{m.id}: {got} vs {m.log}"
            else:
                assert got == m.log, f"{m.id}: event audit {got}, model {m.log}"
            for sink, row in m.rows.items():
                got = per_sink.get((m.id, sink), [])
                if pruned:
                    assert row.log[len(row.log) - len(got):] == got, \
                        f"{m.id}/{sink}: audit {got} is not a suffix of {row.log}"
                    continue
                assert got == row.log, f"{m.id}/{sink} seq {m.seq}: audit {got}, " \
                    f"model {row.log}"
                initial = "queued" if sink in stored_sinks.get(m.id, []) else "none"
                end = legal_path(initial, got + (["expired"] if "expired" in m.log
                                                  and row.state == "expired" else []))
                want = {"pending": "queued", "inflight": "queued", "dead": "dead"}.get(
                    row.state, "done")
                assert end == want, f"{m.id}/{sink}: audit path ends {end}, model {row.state}"

    @invariant()
    def audit_chain_verifies(self) -> None:
        res = self._run(self.outbox.read(audit.verify_db))
        assert res.ok, res.message

    @invariant()
    def pauses_are_kept(self) -> None:
        stored = self._run(self.outbox.read(pauses.load_pauses))
        for sink in SINKS:
            mine = stored.get(sink, {})
            guard = mine.get("storm_guard")
            assert (guard is not None) == self.storm[sink], \
                f"{sink}: stored storm-guard pause {guard}, model {self.storm[sink]}"
            if guard is not None:
                assert guard["since"] == self.storm_since[sink], f"{sink}: stored since moved"
            if self.hold[sink] > self.now:
                until = pauses.retry_after_until(mine.get("retry_after"))
                assert until >= self.hold[sink], \
                    f"{sink}: stored Retry-After end {until}, model {self.hold[sink]}"
        for sink, fwd in self.fwds.items():
            pause = fwd.pause if fwd.pause is not None and fwd.pause.code == "storm_guard" \
                else None
            assert (pause is not None) == self.storm[sink], \
                f"{sink}: storm-guard pause {pause}, model {self.storm[sink]}"
            if pause is not None:
                since = self.storm_since[sink]
                assert pause.since == since, f"{sink}: pause since {pause.since} != {since}"
                assert fwd.alarm is not None and fwd.alarm.code == "storm_guard" \
                    and fwd.alarm.since == since, f"{sink}: alarm {fwd.alarm}"
                assert metric(fwd.metrics.sink_paused, sink) == 1
            if self.hold[sink] > self.now:
                assert fwd.paused_until >= self.hold[sink], \
                    f"{sink}: paused until {fwd.paused_until}, model {self.hold[sink]}"

    @invariant()
    def each_key_is_delivered_in_ingest_order(self) -> None:
        for (key, sink), seqs in self.delivered.items():
            plain = [s for s, exempt in seqs if not exempt]
            assert plain == sorted(plain), f"{key} to {sink} out of order: {seqs}"


ForwarderMachine.TestCase.settings = settings(max_examples=EXAMPLES,
                                              stateful_step_count=STEPS, deadline=None)
test_forwarder_model = ForwarderMachine.TestCase
