"""Backoff, Retry-After parsing, circuit breaker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from edge.retry import CircuitBreaker, backoff_s, parse_retry_after


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
    assert cb.record_failure() and cb.wait_s() == 20.0  # failed probe: longer wait
    t[0] = 30.0
    assert cb.record_failure() and cb.wait_s() == 40.0  # capped
    cb.record_success()
    assert cb.state == "closed" and cb.failures == 0
