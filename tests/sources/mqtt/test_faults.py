"""Write failures under real MQTT traffic: order kept, nothing acked before it is stored.

The MQTT source runs in-process against a private mosquitto, over a real outbox in a
temporary directory. Faults are injected where the real thing cannot be made to fail on
cue: a storage error inside one outbox transaction (the outbox's chain semantics stay
real), or an ingest that refuses writes for a while. An ``Acks`` recorder wraps the
source's acknowledgement step and checks that each message is acked once, and only after
the commit that stored it (or its quarantine record) returned.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.components import ComponentContext, Submission
from edge.config import load_config_text
from edge.errors import OutboxStorageError
from edge.outbox import Outbox, queries
from edge.pipeline import Pipeline
from edge.sources.mqtt.source import MqttSource, _Inbound
from edge.telemetry import Metrics
from tests.fixtures.mosquitto import Broker, inspection, start_publisher
from tests.support import eventually, metric, mqtt_source_yaml

pytestmark = pytest.mark.mqtt


def message_id(payload: bytes | bytearray) -> str:
    try:
        return str(orjson.loads(payload).get("msg_id"))
    except orjson.JSONDecodeError:
        return payload.decode(errors="replace")


class Recorder:
    """The ingest the source sees: forwards to the real pipeline and records what
    committed; ``fail_submits`` / ``fail_quarantines`` make calls fail before they reach
    the outbox (nothing stored), with the exception that function returns (or None)."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.committed: list[str] = []  # message ids, in commit order
        self.quarantined: list[bytes] = []
        self.fail_submits: Callable[[], BaseException | None] = lambda: None
        self.fail_quarantines: Callable[[], BaseException | None] = lambda: None
        self.refused = 0

    async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                     ) -> list[str]:
        err = self.fail_submits()
        if err is not None:
            self.refused += 1
            raise err
        ids = await self.inner.submit(items, chain=chain)
        self.committed.extend(str(s.event.data.get("message_id")) for s in items)
        return ids

    async def quarantine(self, source: str, reason: str, raw: bytes,
                         meta: dict[str, Any] | None = None, detail: str = "") -> None:
        err = self.fail_quarantines()
        if err is not None:
            self.refused += 1
            raise err
        await self.inner.quarantine(source, reason, raw, meta, detail)
        self.quarantined.append(raw)

    async def wait_accepting(self) -> None:
        await self.inner.wait_accepting()

    async def audit(self, state: str, *, source: str, reason: str | None = None,
                    detail: dict[str, Any] | None = None) -> None:
        await self.inner.audit(state, source=source, reason=reason, detail=detail)


class Acks:
    """Wraps ``MqttSource._ack``: every acked message must have been committed before."""

    def __init__(self, source: MqttSource, ingest: Recorder) -> None:
        self.acked: list[str] = []
        self.early: list[str] = []
        inner = source._ack

        def ack(items: list[_Inbound]) -> None:
            conn = source._conn
            for m in items:
                if conn is None or not conn.connected or m.conn is not conn:
                    continue  # not acked (a dead connection's message is redelivered)
                mid = message_id(m.msg.payload)
                self.acked.append(mid)
                if mid not in ingest.committed and m.msg.payload not in ingest.quarantined:
                    self.early.append(mid)
            inner(items)

        source._ack = ack  # type: ignore[method-assign]


@asynccontextmanager
async def running_source(broker: Broker, state: Path, *, extra: str = "",
                         ingest: Callable[[Pipeline], Recorder] = Recorder,
                         ) -> AsyncIterator[tuple[MqttSource, Recorder, Acks, Outbox]]:
    """An MQTT source (client id ``edge-test-line1``, persistent session) storing into a
    real outbox under ``state``; stopped and closed on exit."""
    cfg = load_config_text(f"site: test-site\nstate_dir: {state}\n"
                           + mqtt_source_yaml(broker.url, extra=extra))
    metrics = Metrics()
    outbox = Outbox(state, cfg.outbox, metrics, router=lambda ev: ["erp"])
    await outbox.open()
    recorder = ingest(Pipeline(outbox))
    ctx = ComponentContext(site="test-site", state_dir=str(state), metrics=metrics,
                           ingest=recorder)
    source = MqttSource(cfg.sources[0], ctx)
    acks = Acks(source, recorder)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.status()["connected"] or task.done(),
                         what="the source to connect")
        yield source, recorder, acks, outbox
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await outbox.close()


def stored_message_ids(outbox: Outbox) -> list[str]:
    """``data.message_id`` of every stored event, by outbox sequence."""
    conn = sqlite3.connect(outbox.path)
    try:
        rows = conn.execute("SELECT body FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [orjson.loads(b)["data"].get("message_id") for (b,) in rows]


def quarantine_count(outbox: Outbox) -> int:
    conn = sqlite3.connect(outbox.path)
    try:
        return int(conn.execute("SELECT count(*) FROM quarantine").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- order


async def test_storage_order_is_arrival_order_when_one_batch_fails(
        mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One outbox transaction fails (an I/O error) while later batches of the same lot
    are already queued behind it: storage order must still be arrival order."""
    real = queries.insert_event_batches
    failed: list[int] = []

    def insert_event_batches(conn: sqlite3.Connection, payloads: list[Any]) -> Any:
        ids = {p[0].event.data.get("message_id") for batch, _ in payloads for p in batch}
        if "o0030" in ids and not failed:
            failed.append(len(ids))
            time.sleep(0.3)  # the next batches queue up behind this transaction meanwhile
            raise sqlite3.OperationalError("disk I/O error")
        return real(conn, payloads)

    monkeypatch.setattr(queries, "insert_event_batches", insert_event_batches)
    async with running_source(mosquitto, tmp_path / "state",
                              extra="max_batch: 5\n") as (
            source, ingest, acks, outbox):
        pub = await start_publisher(mosquitto.url)
        ids = [f"o{i:04d}" for i in range(120)]
        for n, i in enumerate(ids):  # paced: batches go into transactions of their own
            pub.publish(*inspection(i, lot="L1"), i)
            if n % 5 == 4:
                await asyncio.sleep(0.02)
        assert await asyncio.to_thread(pub.wait_acked, 15)
        pub.stop()
        await eventually(lambda: source.counts["acked"] == len(ids), what="every message acked")
        assert failed, "the injected fault never fired"
        assert stored_message_ids(outbox) == ids  # arrival order, each once
        assert acks.acked == ids and not acks.early  # once each, after its commit
        assert source.counts["stored"] == len(ids) and source.counts["quarantined"] == 0


# --------------------------------------------------------------------------- storage faults


async def test_a_storage_fault_stops_acking_until_the_outbox_recovers(
        mosquitto: Broker, tmp_path: Path) -> None:
    """Invariant 1: while writes fail, no message is acked and none is quarantined in
    its place; the broker keeps them, and a later run stores each exactly once."""
    state = tmp_path / "state"
    ids = [f"s{i:03d}" for i in range(40)]
    messages = [inspection(i, lot=f"L{n % 3}") for n, i in enumerate(ids)]
    poison = (messages[0][0], b"not json")
    async with running_source(mosquitto, state) as (source, ingest, acks, outbox):
        broken = OutboxStorageError("outbox storage fault: database disk image is malformed")
        ingest.fail_submits = ingest.fail_quarantines = lambda: broken
        pub = await start_publisher(mosquitto.url)
        for n, (topic, payload) in enumerate(messages[:20]):
            pub.publish(topic, payload, ids[n])
        pub.publish(*poison, "poison")
        for n, (topic, payload) in enumerate(messages[20:], 20):
            pub.publish(topic, payload, ids[n])
        assert await asyncio.to_thread(pub.wait_acked, 15)  # the broker has them all
        pub.stop()
        errors = source.ctx.metrics.source_errors
        await eventually(lambda: metric(errors, "line1", "outbox_write") >= 3,
                         what="repeated write attempts")
        assert source.counts["received"] == 41
        assert acks.acked == [] and source.counts["acked"] == 0
        assert source.counts["quarantined"] == 0 and quarantine_count(outbox) == 0
        assert stored_message_ids(outbox) == []
        assert source.status()["unacked"] == 41
    # The process ends (here: the source stops) while the store is still broken. The
    # broker kept every message: the next run, with a healthy store, gets them again.
    async with running_source(mosquitto, state) as (source, ingest, acks, outbox):
        await eventually(lambda: source.counts["acked"] == 41, what="all stored and acked")
        assert stored_message_ids(outbox) == ids
        assert quarantine_count(outbox) == 1 and source.counts["quarantined"] == 1
        assert sorted(acks.acked) == sorted([*ids, "not json"]) and not acks.early
        assert source.counts["stored"] == 40 and source.counts["duplicates"] == 0


async def test_a_corrupt_page_inside_the_outbox_is_not_quarantined_and_acked(
        mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the real outbox: SQLite reports a corrupt page in the middle of
    the events insert. Before, the writer treated it as that op's own failure, the source
    quarantined every message as ``internal_error`` and acked it; now the transaction
    fails as a storage fault, nothing is acked or quarantined, and once the page reads
    again every message is stored once, in order."""
    real = queries.insert_event_batches
    corrupt = {"on": True}

    def insert_event_batches(conn: sqlite3.Connection, payloads: list[Any]) -> Any:
        if corrupt["on"]:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real(conn, payloads)

    monkeypatch.setattr(queries, "insert_event_batches", insert_event_batches)
    ids = [f"c{i:03d}" for i in range(30)]
    async with running_source(mosquitto, tmp_path / "state") as (
            source, ingest, acks, outbox):
        pub = await start_publisher(mosquitto.url)
        for i in ids:
            pub.publish(*inspection(i, lot="L1"), i)
        assert await asyncio.to_thread(pub.wait_acked, 15)
        pub.stop()
        await eventually(lambda: outbox.storage_fault is not None, what="the storage fault")
        errors = source.ctx.metrics.source_errors
        await eventually(lambda: metric(errors, "line1", "outbox_write") >= 3,
                         what="several retries while the page stays unreadable")
        assert acks.acked == [] and quarantine_count(outbox) == 0
        corrupt["on"] = False
        await eventually(lambda: source.counts["acked"] == len(ids), timeout=40,
                         what="every message stored and acked")
        assert stored_message_ids(outbox) == ids and quarantine_count(outbox) == 0
        assert acks.acked == ids and not acks.early


async def test_a_quarantine_record_that_cannot_be_written_is_neither_acked_nor_dropped(
        mosquitto: Broker, tmp_path: Path) -> None:
    """An unusable message is acked only once its quarantine record is committed: when
    that write fails for any reason, the message stays unacked and is retried."""
    failures = [RuntimeError("cannot serialise meta"), sqlite3.DatabaseError("boom"),
                OutboxStorageError("io")]

    def next_failure() -> BaseException | None:
        return failures.pop(0) if failures else None

    async with running_source(mosquitto, tmp_path / "state") as (source, ingest, acks, outbox):
        ingest.fail_quarantines = next_failure
        pub = await start_publisher(mosquitto.url)
        topic = inspection("x")[0]
        pub.publish(topic, b"not json", "poison")
        pub.publish(*inspection("after"), "after")
        assert await asyncio.to_thread(pub.wait_acked, 15)
        pub.stop()
        await eventually(lambda: ingest.refused >= 1, what="a failed quarantine write")
        assert acks.acked == []  # neither the poison message nor the one behind it
        await eventually(lambda: source.counts["acked"] == 2, timeout=20,
                         what="quarantined after the retries, then acked")
        assert ingest.refused == 3 and quarantine_count(outbox) == 1
        assert acks.acked == ["not json", "after"] and not acks.early
        metrics = source.ctx.metrics
        assert metric(metrics.source_dropped, "line1", "unstorable") == 0
        assert metric(metrics.source_errors, "line1", "quarantine_write") == 2


async def test_a_record_that_breaks_its_batch_is_quarantined_alone_in_order(
        mosquitto: Broker, tmp_path: Path) -> None:
    """A bug that one record triggers (not an outbox error) quarantines that record as
    ``internal_error``; the rest of its batch is stored, in arrival order."""

    class Buggy(Recorder):
        async def submit(self, items: Sequence[Submission], *, chain: str | None = None
                         ) -> list[str]:
            if any(s.event.data.get("message_id") == "b005" for s in items):
                raise ValueError("cannot serialise this record")
            return await super().submit(items, chain=chain)

    async with running_source(mosquitto, tmp_path / "state", extra="max_batch: 50\n",
                              ingest=Buggy) as (source, ingest, acks, outbox):
        pub = await start_publisher(mosquitto.url)
        ids = [f"b{i:03d}" for i in range(30)]
        for i in ids:
            pub.publish(*inspection(i, lot="L1"), i)
        assert await asyncio.to_thread(pub.wait_acked, 15)
        pub.stop()
        await eventually(lambda: source.counts["acked"] == 30, what="all acked")
        assert stored_message_ids(outbox) == [i for i in ids if i != "b005"]
        assert source.counts["quarantined"] == 1 and quarantine_count(outbox) == 1
        assert acks.acked == ids and not acks.early
