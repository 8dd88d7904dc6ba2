"""Backoff, Retry-After parsing, circuit breaker, dead-letter storm guard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from edge.retry import CircuitBreaker, StormGuard, backoff_s, parse_retry_after


def test_full_jitter_is_bounded_by_the_capped_exponential():
    assert backoff_s(1, 1.0, 300, rng=lambda: 1.0) == 1.0
    assert backoff_s(5, 1.0, 300, rng=lambda: 1.0) == 16.0
    assert backoff_s(30, 1.0, 300, rng=lambda: 1.0) == 300.0
    assert backoff_s(30, 1.0, 300, rng=lambda: 0.0) == 0.0
    assert backoff_s(10_000, 1.0, 300, rng=lambda: 0.5) == 150.0


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("120") == 120.0
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True),
                             now=now.timestamp()) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_breaker_opens_after_threshold_probes_and_doubles():
    t = [0.0]
    cb = CircuitBreaker(3, 10.0, 40.0, clock=lambda: t[0])
    assert not cb.record_failure() and not cb.record_failure()
    assert cb.record_failure() and cb.state == "open" and cb.wait_s() == 10.0
    t[0] = 10.0
    assert cb.state == "half_open"
    assert cb.start_probe() and not cb.start_probe()  # one probe at a time
    assert cb.record_failure(probe=True) and cb.wait_s() == 20.0  # failed probe: longer wait
    t[0] = 30.0
    assert cb.start_probe()
    assert cb.record_failure(probe=True) and cb.wait_s() == 40.0  # capped
    cb.record_success()
    assert cb.state == "closed" and cb.failures == 0


def test_late_failures_of_requests_sent_before_the_circuit_opened_do_not_extend_it():
    """Four requests in flight fail together: the circuit opens once, for ``open_s``. The
    old breaker took every failure while open for a failed probe and doubled the wait per
    request (10 s → 80 s), so delivery resumed long after the receiver was back."""
    t = [0.0]
    cb = CircuitBreaker(1, 10.0, 120.0, clock=lambda: t[0])
    assert cb.record_failure()  # the first of the burst opens it
    t[0] = 0.2
    assert [cb.record_failure() for _ in range(3)] == [False, False, False]
    assert cb.wait_s() == 9.8 and cb.state == "open"
    t[0] = 10.0
    assert cb.state == "half_open"
    assert not cb.record_failure()  # a straggler after the wait, while no probe is out
    assert cb.wait_s() == 0.0 and cb.start_probe()
    assert not cb.record_failure()  # ... nor while the probe is out: only its verdict counts
    assert cb.state == "half_open"
    cb.record_success()  # the probe got through: closed, no doubling left behind
    assert cb.state == "closed"
    assert cb.record_failure() and cb.wait_s() == 10.0


def test_a_probe_answered_without_a_verdict_waits_one_interval_without_doubling():
    t = [0.0]
    cb = CircuitBreaker(1, 5.0, 60.0, clock=lambda: t[0])
    cb.record_failure()
    t[0] = 5.0
    assert cb.start_probe()
    cb.record_no_verdict()  # e.g. the probe event was dead-lettered
    assert cb.state == "open" and cb.wait_s() == 5.0 and not cb.probing


def test_trip_opens_at_once_and_probe_now_lets_the_next_probe_go():
    t = [0.0]
    cb = CircuitBreaker(5, 10.0, 60.0, clock=lambda: t[0])
    assert cb.trip() and cb.state == "open" and cb.wait_s() == 10.0
    assert not cb.trip()  # already open: unchanged
    t[0] = 10.0
    assert cb.start_probe() and cb.record_failure(probe=True) and cb.wait_s() == 20.0
    t[0] = 12.0
    cb.probe_now()
    assert cb.state == "half_open" and cb.start_probe()
    assert cb.record_failure(probe=True) and cb.wait_s() == 20.0  # doubling starts over


def test_storm_guard_fires_on_one_dead_letter_status_from_many_events():
    guard = StormGuard(window=20, min_share=0.9, min_events=10)
    assert guard.needed == 18
    fired = [guard.observe(404, f"e{n}") for n in range(17)]
    fired += [guard.observe(None, "ok1"), guard.observe(None, "ok2")]  # two deliveries
    assert fired == [None] * 19
    assert guard.observe(404, "e17") == 404  # 18 of the last 20


def test_storm_guard_ignores_mixed_statuses_a_few_events_and_a_short_history():
    mixed = StormGuard(20, 0.9, 10)
    assert all(mixed.observe(status, f"e{n}") is None
               for n, status in enumerate([404, 410, 422, 400] * 10))
    few = StormGuard(20, 0.9, 10)  # the same five events replayed over and over
    assert all(few.observe(404, f"e{n % 5}") is None for n in range(60))
    short = StormGuard(20, 0.9, 10)
    assert all(short.observe(404, f"e{n}") is None for n in range(19))
    healthy = StormGuard(20, 0.9, 10)  # an occasional dead letter between deliveries
    assert all(healthy.observe(404 if n % 4 == 0 else None, f"e{n}") is None
               for n in range(1000))


def test_storm_guard_window_slides_and_reset_needs_a_full_window_again():
    guard = StormGuard(10, 0.8, 3)
    for n in range(10):
        guard.observe(None, f"ok{n}")
    assert [guard.observe(410, f"e{n}") for n in range(8)][-1] == 410  # 8 of the last 10
    guard.reset()
    assert [guard.observe(410, f"f{n}") for n in range(9)] == [None] * 9
    assert guard.observe(410, "f9") == 410
