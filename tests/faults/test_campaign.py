"""The fault campaign: the gateway killed with ``kill -9`` at random moments while the ERP
misbehaves, the gateway is frozen (SIGSTOP/SIGCONT) and mosquitto restarts; the checker
then reads what the ERP applied (README of this folder).

Short form here (20 cycles, in ``make test``); ``make faults`` runs the long form
(``EDGE_FAULT_CYCLES=500``, about an hour). Before the campaign, each ERP fault is shown to
be real and seen: a bare HTTP client that mishandles it is caught by the checker, one
that handles it as the response policy says is not.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.checker import Expectation, Report, check
from tests.faults.erp import FaultyErp
from tests.faults.harness import Campaign, fault_cycles
from tests.fixtures.mosquitto import find_mosquitto

ERP_FAULTS = ["5xx", "429_seconds", "429_date", "slow", "reset", "lost_after_apply", "down",
              "422", "3xx", "401"]
CAMPAIGN_FAULTS = [*ERP_FAULTS, "sigstop", "broker_restart"]


# --------------------------------------------------------------------------- the campaign


async def run_campaign(tmp_path: Path, cycles: int,
                       cycle_s: tuple[float, float] = (0.5, 2.0)) -> Report:
    # 50 parts/s (6 per lot and second, dozens unconfirmed at every kill): the gateway
    # drains most of what piled up during a fault and a restart before the next kill, so
    # the check at the end waits seconds, not minutes, on these two noisy cores
    async with Campaign(tmp_path, rate=50.0) as c:
        await c.start_gateway()
        await c.run_cycles(cycles, faults=CAMPAIGN_FAULTS, cycle_s=cycle_s)
        report = await c.finish(timeout_s=180)
    print(f"seed {c.seed}: {report.summary()}")
    print(f"faults applied: {dict(c.faults)}; counts: {report.counts}")
    for note in report.notes:
        print(note)
    return report


@pytest.mark.mqtt
async def test_kill_9_cycles_with_erp_and_process_faults_keep_every_promise(
        tmp_path: Path) -> None:
    """Nothing confirmed is lost, nothing is applied under two ids, every lot arrives in
    order across routes with its derived events, no retry is early, every request carries
    its headers."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    report = await run_campaign(tmp_path, 20, cycle_s=(0.2, 1.0))  # ~50 s here
    report.assert_clean()
    assert report.counts["acknowledged"] > 0 and report.counts["cycles"] == 20


@pytest.mark.faults_long
@pytest.mark.skipif(not os.environ.get("EDGE_FAULT_CYCLES"),
                    reason="long form: make faults (EDGE_FAULT_CYCLES=500)")
async def test_fault_campaign_long_form(tmp_path: Path) -> None:
    report = await run_campaign(tmp_path, fault_cycles(500))
    report.assert_clean()


# --------------------------------------------------------------------------- each ERP fault


def one(i: int, lot: str = "L1") -> dict[str, Any]:
    eid = f"01900000-0000-7000-8000-{i:012d}"
    return {"id": eid, "type": "inspection.result", "correlation_id": eid,
            "data": {"message_id": f"m{i}", "lot_id": lot}}


def expect(*ids: int) -> list[Expectation]:
    return [Expectation("test", f"m{i}", "lot:L1", i) for i in ids]


async def send(client: httpx.AsyncClient, erp: FaultyErp, event: dict[str, Any], *,
               key: str | None = None, path: str = "/events") -> httpx.Response | None:
    """One request as the gateway makes it; None when the connection failed."""
    headers = {"Idempotency-Key": key or event["id"],
               "X-Correlation-ID": event["correlation_id"],
               "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    try:
        return await client.post(erp.url + path, json=event, headers=headers)
    except httpx.TransportError:
        return None


@pytest.fixture
async def faulty_erp() -> Any:
    async with FaultyErp(seed=1) as erp:
        yield erp


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(timeout=httpx.Timeout(1.0)) as c:
        yield c


@pytest.mark.parametrize("fault", ["429_seconds", "429_date"])
async def test_429_retry_after_in_both_forms_catches_an_early_retry(
        fault: str, faulty_erp: FaultyErp, client: httpx.AsyncClient) -> None:
    await faulty_erp.set_fault(fault, retry_after_s=1)
    first = await send(client, faulty_erp, one(1))
    assert first is not None and first.status_code == 429 and first.headers["retry-after"]
    await send(client, faulty_erp, one(1))  # at once: early
    assert len(check(expect(1), faulty_erp).early_retries) == 1
    rec = faulty_erp.requests[0]
    assert rec.not_before_mono is not None and rec.not_before_mono >= rec.answered_mono + 1
    await faulty_erp.clear()
    await asyncio.sleep(max(0.0, rec.not_before_mono - time.monotonic()) + 0.05)
    ok = await send(client, faulty_erp, one(1))
    assert ok is not None and ok.status_code == 200
    report = check(expect(1), faulty_erp)
    assert len(report.early_retries) == 1 and not report.lost  # the late one is fine


@pytest.mark.parametrize("fault,status", [("5xx", 503), ("3xx", 307), ("401", 401)])
async def test_a_client_that_gives_up_on_a_refusal_is_caught_losing(
        fault: str, status: int, faulty_erp: FaultyErp, client: httpx.AsyncClient) -> None:
    await faulty_erp.set_fault(fault)
    resp = await send(client, faulty_erp, one(1))
    assert resp is not None and resp.status_code == status
    assert check(expect(1), faulty_erp).lost  # never applied
    await faulty_erp.clear()
    resp = await send(client, faulty_erp, one(1))  # the retry the policy asks for
    assert resp is not None and resp.status_code == 200
    check(expect(1), faulty_erp).assert_clean()


async def test_422_refuses_only_the_named_types(faulty_erp: FaultyErp,
                                                client: httpx.AsyncClient) -> None:
    await faulty_erp.set_fault("422", types=["nonconformance"])
    result = one(1)
    nc = {**one(2), "type": "nonconformance",
          "data": {"lot_id": "L1", "inspection_event_id": result["id"]}}
    ok = await send(client, faulty_erp, result)
    refused = await send(client, faulty_erp, nc, path="/nonconformances")
    assert ok is not None and ok.status_code == 200
    assert refused is not None and refused.status_code == 422
    exps = [Expectation("test", "m1", "lot:L1", 1, ("nonconformance",))]
    assert check(exps, faulty_erp).lost == ["nonconformance derived from test m1"]
    report = check(exps, faulty_erp, allow_dead_letter_types=["nonconformance"])
    report.assert_clean()
    assert len(report.dead_lettered) == 1


async def test_reset_and_down_never_reach_the_erp(faulty_erp: FaultyErp,
                                                  client: httpx.AsyncClient) -> None:
    for fault in ("reset", "down"):
        await faulty_erp.set_fault(fault)
        assert await send(client, faulty_erp, one(1)) is None
    assert faulty_erp.requests == []
    assert check(expect(1), faulty_erp).lost
    await faulty_erp.clear()
    resp = await send(client, faulty_erp, one(1))
    assert resp is not None and resp.status_code == 200
    check(expect(1), faulty_erp).assert_clean()


async def test_lost_after_apply_catches_a_retry_under_a_new_key(
        faulty_erp: FaultyErp, client: httpx.AsyncClient) -> None:
    """The ERP applied it, the client never heard: a retry under the same key is a
    redelivery; one under a new event id (what a gateway without stable ids would send) is
    a duplicate."""
    await faulty_erp.set_fault("lost_after_apply")
    assert await send(client, faulty_erp, one(1)) is None
    assert faulty_erp.requests[0].applied
    await faulty_erp.clear()
    await send(client, faulty_erp, one(1))
    report = check(expect(1), faulty_erp)
    report.assert_clean()
    assert report.redeliveries == 1
    again = {**one(99), "data": {"message_id": "m1", "lot_id": "L1"}}
    await send(client, faulty_erp, again)
    assert len(check(expect(1), faulty_erp).duplicates) == 1


async def test_slow_answers_outlast_a_client_timeout_but_are_applied(
        faulty_erp: FaultyErp) -> None:
    await faulty_erp.set_fault("slow", latency_s=0.5)
    async with httpx.AsyncClient(timeout=httpx.Timeout(0.1)) as impatient:
        assert await send(impatient, faulty_erp, one(1)) is None
    await faulty_erp.receiver.wait_for(lambda r: len(r.events) == 1, 5)
    check(expect(1), faulty_erp).assert_clean()


async def test_a_share_of_requests_is_faulted(faulty_erp: FaultyErp,
                                              client: httpx.AsyncClient) -> None:
    await faulty_erp.set_fault("5xx", share=0.5)
    statuses = [r.status_code for i in range(20)
                if (r := await send(client, faulty_erp, one(i))) is not None]
    assert 0 < statuses.count(503) < 20 and statuses.count(200) > 0
