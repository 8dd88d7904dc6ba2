"""The background integrity check in the words of ``/status``, the page and ``edge status``:
no verdict to give (deferred, could not run) is a warning an operator sees, never silence
and never an alarm about the data."""

from __future__ import annotations

from edge.api.summary import overall, problems


def _report(**check: object) -> dict[str, object]:
    return {"outbox": {"accepting": True, "integrity": check}}


def test_a_deferred_or_failed_to_run_check_is_a_warning_and_a_pass_is_nothing() -> None:
    deferred = problems(_report(state="deferred", next_attempt_at="2026-11-30T10:00:00Z",
                                started_at="2026-11-30T09:50:00Z"))
    assert [(p.severity, p.subject) for p in deferred] == [("warning", "outbox")]
    assert "gave way to intake" in deferred[0].message
    assert "2026-11-30T10:00:00Z" in deferred[0].message
    error = problems(_report(state="error", problem="database is locked"))
    assert "could not run" in error[0].message and "database is locked" in error[0].message
    assert overall(error) == "degraded"
    for state in ("running", "passed", "stopped"):
        assert problems(_report(state=state)) == []
