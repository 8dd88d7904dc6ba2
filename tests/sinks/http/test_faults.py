"""The response policy of ``HttpSink.send`` against a real receiver on loopback (DESIGN
table), with the sink faults: credentials refused after one refresh, redirects, and the
statuses no table row lists. A sink fault keeps the rows (the forwarder requeues them and
alarms); it never dead-letters and never splits a batch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.components import OutcomeKind
from edge.sim.erp import ErpReceiver
from tests.sinks.http.support import RawReceiver, event, open_sink, stored


def _one(n: int = 0):
    return stored([event("inspection.result", "A", n)])


@pytest.mark.parametrize(("status", "kind"), [
    (200, OutcomeKind.delivered), (201, OutcomeKind.delivered), (204, OutcomeKind.delivered),
    (409, OutcomeKind.duplicate),
    (408, OutcomeKind.retry), (425, OutcomeKind.retry), (429, OutcomeKind.retry),
    (500, OutcomeKind.retry), (502, OutcomeKind.retry), (503, OutcomeKind.retry),
    (504, OutcomeKind.retry),
    (400, OutcomeKind.dead_letter), (404, OutcomeKind.dead_letter),
    (410, OutcomeKind.dead_letter), (413, OutcomeKind.dead_letter),
    (422, OutcomeKind.dead_letter), (418, OutcomeKind.dead_letter),
    (401, OutcomeKind.sink_fault), (403, OutcomeKind.sink_fault),
    (405, OutcomeKind.sink_fault), (407, OutcomeKind.sink_fault),
    (415, OutcomeKind.sink_fault), (421, OutcomeKind.sink_fault),
    (301, OutcomeKind.sink_fault), (302, OutcomeKind.sink_fault),
    (307, OutcomeKind.sink_fault), (308, OutcomeKind.sink_fault),
    (501, OutcomeKind.sink_fault), (505, OutcomeKind.sink_fault),
    (507, OutcomeKind.sink_fault), (511, OutcomeKind.sink_fault),
    (520, OutcomeKind.sink_fault), (521, OutcomeKind.sink_fault),
    (522, OutcomeKind.sink_fault), (523, OutcomeKind.sink_fault),
    (524, OutcomeKind.sink_fault), (599, OutcomeKind.sink_fault),
])
async def test_every_status_gets_its_row_of_the_table(erp, status, kind):
    body = "" if status == 204 else f'{{"why":"status {status}"}}'
    erp.fail_next(1, status, body=body)
    async with open_sink(erp.url) as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is kind
    assert outcome.status == status
    assert len(erp.requests) == 1  # nothing followed, nothing repeated
    if kind not in (OutcomeKind.delivered, OutcomeKind.duplicate):
        assert outcome.body == body  # the receiver's answer, for /status and the DLQ


@pytest.mark.parametrize("status", [301, 501, 520])
async def test_a_sink_fault_keeps_the_event_and_the_reason_names_the_status(erp, status):
    """Before, 301, 501 and 520 dead-lettered the event as if the ERP had judged it."""
    erp.fail_next(1, status, body="maintenance page", retry_after="30")
    async with open_sink(erp.url) as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.sink_fault
    assert outcome.kind is not OutcomeKind.dead_letter
    assert str(status) in outcome.reason and outcome.body == "maintenance page"
    assert outcome.retry_after_s == 30


async def test_a_redirect_is_not_followed_and_its_target_is_named_without_a_query():
    receiver = await RawReceiver(
        b"HTTP/1.1 301 Moved Permanently\r\n"
        b"Location: https://erp2.example.com/api/v2/events?sig=abc\r\n"
        b"Content-Length: 5\r\n\r\nmoved").start()
    try:
        async with open_sink(receiver.url) as sink:
            [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.sink_fault and outcome.status == 301
        assert "not followed" in outcome.reason
        assert "https://erp2.example.com/api/v2/events" in outcome.reason
        assert "sig" not in outcome.reason  # a signed location is a credential
        assert receiver.seen == [("POST", "/api/v1/events")]
    finally:
        await receiver.stop()


async def test_a_batch_answered_with_a_sink_fault_is_not_split(erp):
    erp.fail_next(1, 520)
    lease = stored([event("inspection.result", lot, n) for n, lot in enumerate("ABCDE")])
    async with open_sink(erp.url, max_batch=100) as sink:
        outcomes = await sink.send(lease)
    assert [o.kind for o in outcomes] == [OutcomeKind.sink_fault] * 5
    assert [len(r.events) for r in erp.requests] == [5]


async def test_401_after_the_bearer_file_was_reread_is_a_sink_fault(tmp_path: Path):
    """The token file is read again once (it was rotated, but to another wrong token): two
    requests, then the sink is faulted, not the event. Before: a dead letter."""
    token = tmp_path / "token"
    token.write_text("old")
    erp = await ErpReceiver(
        require_auth=lambda h: h.get("authorization") == "Bearer right").start()
    try:
        async with open_sink(erp.url, extra="auth: {type: bearer, token_file: token}",
                             base_dir=tmp_path) as sink:
            token.write_text("newer\n")
            [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.sink_fault and outcome.status == 401
        assert [r.headers["authorization"] for r in erp.requests] == [
            "Bearer old", "Bearer newer"]
        assert erp.events == []
    finally:
        await erp.stop()


async def test_403_gets_one_credential_refresh_too_then_is_a_sink_fault(erp, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("old")
    erp.fail_next(2, 403, body="forbidden")
    async with open_sink(erp.url, extra="auth: {type: bearer, token_file: token}",
                         base_dir=tmp_path) as sink:
        token.write_text("rotated")
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.sink_fault and outcome.status == 403
    assert [r.headers["authorization"] for r in erp.requests] == [
        "Bearer old", "Bearer rotated"]


async def test_a_403_is_delivered_after_the_refresh_when_the_new_credential_works(
        erp, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("old")
    erp.fail_next(1, 403)
    async with open_sink(erp.url, extra="auth: {type: bearer, token_file: token}",
                         base_dir=tmp_path) as sink:
        token.write_text("rotated")
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.delivered
    assert [r.status for r in erp.requests] == [403, 200]


async def test_oauth2_403_refetches_the_token_once_then_is_a_sink_fault(tmp_path: Path):
    (tmp_path / "secret").write_text("s3cret")
    erp = await ErpReceiver(oauth_client=("gateway", "s3cret")).start()
    try:
        erp.fail_next(2, 403)
        async with open_sink(erp.url, base_dir=tmp_path, extra=f"""\
                auth:
                  type: oauth2_client_credentials
                  token_url: {erp.url}/oauth/token
                  client_id: gateway
                  client_secret_file: secret
                """) as sink:
            [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.sink_fault and outcome.status == 403
        assert erp.tokens_issued == 2
        assert [r.status for r in erp.requests] == [403, 403]
    finally:
        await erp.stop()


async def test_a_token_endpoint_refusing_the_client_is_a_sink_fault(tmp_path: Path):
    """A wrong client secret: the sink's credential, not the event. The event stays."""
    (tmp_path / "secret").write_text("wrong")
    erp = await ErpReceiver(oauth_client=("gateway", "s3cret")).start()
    try:
        async with open_sink(erp.url, base_dir=tmp_path, extra=f"""\
                auth:
                  type: oauth2_client_credentials
                  token_url: {erp.url}/oauth/token
                  client_id: gateway
                  client_secret_file: secret
                """) as sink:
            [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.sink_fault and outcome.status == 401
        assert "token endpoint answered 401" in outcome.reason
        assert "s3cret" not in outcome.reason and "wrong" not in outcome.reason
        assert erp.requests == []
    finally:
        await erp.stop()


async def test_timeout_and_refused_connection_are_retried():
    slow = await ErpReceiver(latency_s=1.0).start()
    try:
        async with open_sink(slow.url, extra="timeout_s: 0.2") as sink:
            [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.retry and outcome.reason.startswith("timeout")
        port = slow.port
    finally:
        await slow.stop()
    async with open_sink(f"http://127.0.0.1:{port}") as sink:
        [outcome] = await sink.send(_one())
    assert outcome.kind is OutcomeKind.retry and outcome.reason.startswith("connection")


async def test_an_answer_that_never_finishes_is_cut_at_timeout_s():
    """``timeout_s`` bounds the whole request. httpx's own timeouts restart with every byte
    read, so before, a receiver trickling one byte every 50 ms held the request (and its
    lane) for as long as it kept trickling."""
    receiver = await RawReceiver(trickle_s=0.05).start()
    try:
        async with open_sink(receiver.url, extra="timeout_s: 0.5") as sink:
            async with asyncio.timeout(30):  # a guard against hanging, not a measurement
                [outcome] = await sink.send(_one())
        assert outcome.kind is OutcomeKind.retry
        assert outcome.reason == "timeout: no complete answer within timeout_s"
        assert receiver.seen == [("POST", "/api/v1/events")]
    finally:
        await receiver.stop()


async def test_a_413_batch_is_split_down_to_the_event_that_is_too_large(erp):
    erp.reject(lambda e: e["data"].get("huge"), 413)
    lease = stored([event("inspection.result", lot, n, huge=(n == 2))
                    for n, lot in enumerate("ABCD")])
    async with open_sink(erp.url, max_batch=100) as sink:
        outcomes = await sink.send(lease)
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered, OutcomeKind.delivered,
                                          OutcomeKind.dead_letter, OutcomeKind.delivered]
    assert outcomes[2].status == 413
