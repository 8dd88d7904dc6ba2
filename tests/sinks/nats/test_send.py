"""``NatsSink.send`` against the machine's NATS JetStream (127.0.0.1:4222): every test makes
its own uniquely named stream with unique subjects and deletes it afterwards.

What a consumer relies on: the stored body byte for byte, the headers, the partition in
the subject, JetStream's dedupe by ``Nats-Msg-Id``, one key's events in stream order, and
an outcome for every failure that keeps the event (a missing stream is a sink fault, then
delivery once it exists) or dead-letters only the event that cannot be published.
"""

from __future__ import annotations

import asyncio
import json

import orjson

from edge.components import OutcomeKind, StoredEvent
from edge.nats.subjects import partition_of
from tests.nats.support import MACHINE_NATS, machine_stream, unique
from tests.sinks.nats.support import event, open_sink, read_stream, stored


def _subject(prefix: str) -> str:
    return prefix + ".{site}.p{partition}.{type}"


async def test_events_are_published_with_body_headers_and_partition_subject():
    prefix = unique("t")
    events = stored([event("inspection.result", f"L{n % 3}", n, result="pass")
                     for n in range(9)] + [event("machine.reading", None, 9, value=1.5)])
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink(name, _subject(prefix)) as sink:
        outcomes = await sink.send(events)
        assert [o.kind for o in outcomes] == [OutcomeKind.delivered] * len(events)
        msgs = await read_stream(js, name)
    assert len(msgs) == len(events)
    by_id = {m.headers["Nats-Msg-Id"]: m for m in msgs}
    for ev in events:
        msg = by_id[ev.id]
        assert msg.body == ev.body  # the stored envelope as is
        part = partition_of(ev.ordering_key, ev.id, 4)
        assert msg.subject == f"{prefix}.test-site.p{part}.{ev.type}"
        assert msg.headers["X-Correlation-ID"] == ev.correlation_id
        assert msg.headers["Edge-Event-Type"] == ev.type
        assert msg.headers["Edge-Body-Sha256"] == ev.sha256  # a relay checks it
        if ev.ordering_key is None:
            assert "Edge-Ordering-Key" not in msg.headers
        else:
            assert msg.headers["Edge-Ordering-Key"] == ev.ordering_key
    # one lot, one partition: the relay of that partition sees all of its events
    parts = {m.subject for m in msgs if m.headers.get("Edge-Ordering-Key") == "lot:L1"}
    assert len(parts) == 1


async def test_a_resend_with_the_same_id_is_deduplicated_by_jetstream():
    prefix = unique("t")
    events = stored([event("inspection.result", "A", n) for n in range(5)])
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink(name, _subject(prefix)) as sink:
        first = await sink.send(events)
        again = await sink.send(events)  # e.g. a PubAck lost with the connection
        msgs = await read_stream(js, name)
    assert [o.kind for o in first] == [OutcomeKind.delivered] * 5
    assert [o.kind for o in again] == [OutcomeKind.duplicate] * 5
    assert "Nats-Msg-Id" in again[0].reason
    assert len(msgs) == 5


async def test_one_keys_events_keep_their_order_while_keys_go_in_parallel():
    prefix = unique("t")
    events = stored([event("inspection.result", f"L{n % 5}", n) for n in range(200)])
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink(name, _subject(prefix), extra="max_in_flight_requests: 16") as sink:
        outcomes = await sink.send(events)
        msgs = await read_stream(js, name)
    assert all(o.kind is OutcomeKind.delivered for o in outcomes)
    for lot in range(5):
        ns = [m.doc["data"]["n"] for m in msgs if m.doc["data"]["lot_id"] == f"L{lot}"]
        assert ns == sorted(ns) and len(ns) == 40


async def test_a_missing_stream_is_a_sink_fault_naming_the_subject_then_delivery():
    prefix = unique("t")
    name = unique("EDGE_TEST_")
    events = stored([event("inspection.result", "A", 0), event("inspection.result", "A", 1)])
    async with open_sink(name, _subject(prefix)) as sink:
        first = await sink.send(events)
        assert first[0].kind is OutcomeKind.sink_fault
        assert f"{prefix}.test-site." in first[0].reason and name in first[0].reason
        assert "create" in first[0].reason
        assert first[1].attempted is False  # its key waits behind the first
        # plant IT creates the stream: the same events go through
        async with machine_stream([prefix + ".>"]) as (js, made):
            # machine_stream picks its own name; point the sink at it
            sink.config.stream = made
            second = await sink.send(events)
            msgs = await read_stream(js, made)
    assert [o.kind for o in second] == [OutcomeKind.delivered] * 2
    assert [m.doc["data"]["n"] for m in msgs] == [0, 1]


async def test_a_subject_of_another_stream_is_a_sink_fault_not_a_publish_there():
    prefix = unique("t")
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink("SOME_OTHER_STREAM", _subject(prefix)) as sink:
        [outcome] = await sink.send(stored([event("inspection.result", "A", 0)]))
        msgs = await read_stream(js, name)
    assert outcome.kind is OutcomeKind.sink_fault
    assert "SOME_OTHER_STREAM" in outcome.reason
    assert msgs == []


def _with(ev: StoredEvent, **doc: object) -> StoredEvent:
    body = orjson.loads(ev.body)
    body.update(doc)
    return StoredEvent(ev.seq, ev.id, ev.type, ev.event_class, ev.ordering_key, 0,
                       json.dumps(body).encode())


async def test_a_value_that_is_not_a_subject_token_dead_letters_only_that_event():
    prefix = unique("t")
    good, bad, after, other = stored([event("inspection.result", "A", 0),
                                      event("inspection.result", "A", 1),
                                      event("inspection.result", "A", 2),
                                      event("inspection.result", "B", 3)])
    bad = _with(bad, source="line 1 *")
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink(name, prefix + ".{source}.p{partition}.{type}") as sink:
        outcomes = await sink.send([good, bad, after, other])
        msgs = await read_stream(js, name)
    kinds = [o.kind for o in outcomes]
    assert kinds[0] is OutcomeKind.delivered
    assert kinds[1] is OutcomeKind.dead_letter and "invalid subject" in outcomes[1].reason
    assert "{source}" in outcomes[1].reason
    assert outcomes[2].attempted is False  # parked behind its key's dead letter
    assert kinds[3] is OutcomeKind.delivered  # another lot flows on
    assert sorted(m.doc["data"]["n"] for m in msgs) == [0, 3]


async def test_an_ordering_key_with_a_line_break_never_forges_a_header():
    prefix = unique("t")
    ev = event("inspection.result", "A", 0)
    [raw] = stored([ev])
    forged = StoredEvent(1, raw.id, raw.type, raw.event_class, "lot:A\r\nNats-Msg-Id: x", 0,
                         raw.body)
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink(name, _subject(prefix)) as sink:
        [outcome] = await sink.send([forged])
        msgs = await read_stream(js, name)
    assert outcome.kind is OutcomeKind.dead_letter
    assert "unsafe header value" in outcome.reason
    assert msgs == []


async def test_a_message_the_stream_refuses_as_too_large_is_a_dead_letter():
    prefix = unique("t")
    small, big = stored([event("inspection.result", "A", 0),
                         event("inspection.result", "B", 1, note="x" * 2000)])
    async with machine_stream([prefix + ".>"], max_msg_size=1500) as (js, name), \
            open_sink(name, _subject(prefix)) as sink:
        outcomes = await sink.send([small, big])
        msgs = await read_stream(js, name)
    assert outcomes[0].kind is OutcomeKind.delivered
    assert outcomes[1].kind is OutcomeKind.dead_letter
    assert "refuses the message" in outcomes[1].reason
    assert [m.doc["data"]["n"] for m in msgs] == [0]


async def test_a_full_stream_that_discards_new_is_a_sink_fault_and_keeps_the_event():
    from nats.js.api import DiscardPolicy

    prefix = unique("t")
    events = stored([event("inspection.result", "A", n) for n in range(3)])
    async with machine_stream([prefix + ".>"], max_msgs=2,
                              discard=DiscardPolicy.NEW) as (js, name), \
            open_sink(name, _subject(prefix)) as sink:
        outcomes = await sink.send(events)
    assert [o.kind for o in outcomes[:2]] == [OutcomeKind.delivered] * 2
    assert outcomes[2].kind is OutcomeKind.sink_fault
    assert "maximum messages" in outcomes[2].reason


async def test_events_the_sink_no_longer_carries_are_unrouted():
    prefix = unique("t")
    async with machine_stream([prefix + ".>"]) as (js, name), \
            open_sink(name, _subject(prefix), extra="events: [quality.*]") as sink:
        assert sink.accepts("quality.hold") and not sink.accepts("inspection.result")
        [outcome] = await sink.send(stored([event("inspection.result", "A", 0)]))
    assert outcome.kind is OutcomeKind.unrouted


async def test_create_stream_makes_the_stream_once_and_leaves_an_existing_one_alone():
    prefix = unique("t")
    name = unique("EDGE_TEST_")
    extra = ("create_stream: {storage: memory, max_age_s: 3600, duplicate_window_s: 300, "
             "discard: new, max_msgs: 1000}\n")
    import nats

    nc = await nats.connect(MACHINE_NATS)
    js = nc.jetstream()
    try:
        async with open_sink(name, prefix + ".{site}.p{partition}.{type}", extra=extra) as sink:
            [outcome] = await sink.send(stored([event("inspection.result", "A", 0)]))
            assert outcome.kind is OutcomeKind.delivered
        info = await js.stream_info(name)
        assert info.config.subjects == [f"{prefix}.test-site.*.>"]
        assert info.config.duplicate_window == 300
        assert info.config.max_msgs == 1000
        assert info.state.messages == 1
        # a second start finds it and changes nothing
        async with open_sink(name, prefix + ".{site}.p{partition}.{type}",
                             extra=extra.replace("1000", "5")) as sink:
            [outcome] = await sink.send(stored([event("inspection.result", "A", 1)]))
            assert outcome.kind is OutcomeKind.delivered
        info = await js.stream_info(name)
        assert info.config.max_msgs == 1000 and info.state.messages == 2
    finally:
        try:
            await js.delete_stream(name)
        except Exception:  # noqa: BLE001  not created: nothing to delete
            pass
        await nc.close()


async def test_an_unreachable_server_makes_every_event_a_retry():
    from tests.support import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    async with open_sink("S", "t.{site}.p{partition}.{type}", url=url) as sink:
        outcomes = await asyncio.wait_for(
            sink.send(stored([event("inspection.result", "A", n) for n in range(3)])), 30)
    assert [o.kind for o in outcomes] == [OutcomeKind.retry] * 3
    assert "connection" in outcomes[0].reason
