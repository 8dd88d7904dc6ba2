"""The sink-wide adaptive concurrency limit (``edge.concurrency.AdaptiveConcurrency``):
AIMD on round-trip time and back pressure, with a fake clock.

A user relies on: the limit grows while the receiver keeps up, halves when it pushes back
(429, 503, timeouts), drops when the round trip rises clearly, recovers afterwards, and
stays between 1 and ``max_in_flight_requests``; ``adaptive_concurrency: false`` keeps it
fixed; a Retry-After stops every new request until it has passed.
"""

from __future__ import annotations

import asyncio

import pytest

from edge.components import Outcome
from edge.concurrency import AdaptiveConcurrency, pushes_back

OK = [Outcome.delivered(200)]
BUSY = [Outcome.retry("HTTP 429", status=429, retry_after_s=1.0)]
UNAVAILABLE = [Outcome.retry("HTTP 503", status=503)]
RTT = 0.05


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def full_round(limiter: AdaptiveConcurrency, clock: Clock, rtt: float = RTT,
                     answer: list[Outcome] = OK) -> None:
    """Every slot taken at once (the limit is reached), all answered ``rtt`` later."""
    started = [await limiter.acquire() for _ in range(limiter.limit)]
    clock.now += rtt
    for s in started:
        limiter.release(s, answer)


async def rounds(limiter: AdaptiveConcurrency, clock: Clock, n: int, rtt: float = RTT) -> None:
    for _ in range(n):
        await full_round(limiter, clock, rtt)


async def test_slow_start_doubles_the_limit_per_round_trip_until_the_ceiling():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=4, clock=clock)
    await full_round(limiter, clock)  # the first answers set the baseline
    seen = [limiter.limit]
    for _ in range(6):
        await full_round(limiter, clock)
        seen.append(limiter.limit)
    assert seen[:5] == [4, 8, 16, 32, 64] and seen[-1] == 64
    assert limiter.latency_cuts == limiter.cuts == 0


async def test_after_the_first_cut_the_limit_grows_by_one_per_round_trip():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=16, clock=clock)
    await full_round(limiter, clock, answer=UNAVAILABLE)  # ends slow start: 8
    await full_round(limiter, clock)  # the first answers set the baseline
    start = limiter.limit
    await rounds(limiter, clock, 10)
    assert limiter.limit == start + 10
    assert limiter.latency_cuts == 0


async def test_the_limit_does_not_grow_when_the_demand_does_not_reach_it():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=8, clock=clock)
    for _ in range(20):  # one request at a time: more slots would change nothing
        s = await limiter.acquire()
        clock.now += RTT
        limiter.release(s, OK)
    assert limiter.limit == 8


async def test_the_limit_never_exceeds_the_ceiling():
    clock = Clock()
    limiter = AdaptiveConcurrency(12, initial=4, clock=clock)
    await rounds(limiter, clock, 50)
    assert limiter.limit == 12
    s = [await limiter.acquire() for _ in range(12)]
    waiting = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    assert not waiting.done() and limiter.in_flight == 12  # the 13th waits
    limiter.release(s[0], OK)
    await waiting
    assert limiter.in_flight == 12


async def test_back_pressure_halves_the_limit_once_per_round_and_never_below_one():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=40, clock=clock)
    await full_round(limiter, clock, answer=UNAVAILABLE)
    # 40 requests of one round all answered 503: one cut, not 40
    assert limiter.limit == 20 and limiter.cuts == 1
    await full_round(limiter, clock, answer=BUSY)
    assert limiter.limit == 10
    for _ in range(10):
        await full_round(limiter, clock, answer=UNAVAILABLE)
    assert limiter.limit == 1


async def test_a_clear_rise_of_the_round_trip_time_cuts_the_limit():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=32, clock=clock)
    limiter.slow_start = False
    await rounds(limiter, clock, 5)
    before = limiter.limit
    for _ in range(3):  # the receiver queues: every answer three times as late
        await full_round(limiter, clock, rtt=RTT * 3)
    assert limiter.limit <= int((before + 1) * 0.75)
    assert limiter.latency_cuts == 1 and limiter.cuts == 0


async def test_one_slow_round_trip_holds_the_limit_without_cutting_it():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=32, clock=clock)
    limiter.slow_start = False
    await rounds(limiter, clock, 5)
    await full_round(limiter, clock, rtt=RTT * 3)  # a hiccup of a busy CPU
    await rounds(limiter, clock, 3)
    assert limiter.latency_cuts == 0 and limiter.limit >= 37


async def test_the_limit_recovers_after_the_receiver_stops_pushing_back():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=32, clock=clock)
    await rounds(limiter, clock, 3)
    for _ in range(4):
        await full_round(limiter, clock, answer=UNAVAILABLE)
    low = limiter.limit
    assert low <= 5
    await rounds(limiter, clock, 20)
    assert limiter.limit == low + 20


async def test_without_adaptive_concurrency_the_limit_is_the_ceiling_whatever_happens():
    clock = Clock()
    limiter = AdaptiveConcurrency(16, adaptive=False, clock=clock)
    assert limiter.limit == 16
    await full_round(limiter, clock, answer=UNAVAILABLE)
    await rounds(limiter, clock, 5, rtt=RTT * 10)
    assert limiter.limit == 16


async def test_a_retry_after_stops_every_new_request_until_it_has_passed():
    clock = Clock()
    limiter = AdaptiveConcurrency(16, clock=clock)
    assert limiter.refusal() is None
    s = await limiter.acquire()
    clock.now += RTT
    limiter.release(s, [Outcome.retry("HTTP 429", status=429, retry_after_s=2.0)])
    assert "Retry-After" in (limiter.refusal() or "")
    clock.now += 1.9
    assert limiter.refusal() is not None
    clock.now += 0.2
    assert limiter.refusal() is None


async def test_nothing_is_learned_from_requests_that_were_not_sent():
    clock = Clock()
    limiter = AdaptiveConcurrency(64, initial=8, clock=clock)
    for _ in range(5):
        started = [await limiter.acquire() for _ in range(8)]
        clock.now += 5.0  # a long wait, but nothing went on the wire
        for s in started:
            limiter.release(s, [Outcome.not_attempted()])
    assert limiter.limit == 8 and limiter.rtt_mean is None


async def test_a_waiter_cancelled_while_waiting_gives_its_place_back():
    limiter = AdaptiveConcurrency(1, adaptive=False)
    s = await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    limiter.release(s, OK)
    assert limiter.in_flight == 0
    await asyncio.wait_for(limiter.acquire(), 1)  # the slot is free again


def test_what_counts_as_pushing_back():
    assert pushes_back(BUSY) and pushes_back(UNAVAILABLE)
    assert pushes_back([Outcome.retry("timeout")])
    assert not pushes_back(OK)
    assert not pushes_back([Outcome.dead_letter("HTTP 422", status=422)])
    assert not pushes_back([Outcome.not_attempted()])  # never sent
