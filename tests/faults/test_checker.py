"""The checker is not blind: each kind of broken promise, fed as synthetic ERP records, is
reported, and a clean record set is reported clean (redeliveries under the same key and
dead letters of an allowed type are not failures)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from edge.sim.erp import RequestRecord
from tests.faults.checker import Expectation, check

_ids = itertools.count(1)


def result(mid: str, lot: str = "L1", eid: str | None = None) -> dict[str, Any]:
    return {"id": eid or f"ev-{mid}", "type": "inspection.result",
            "correlation_id": eid or f"ev-{mid}",
            "data": {"message_id": mid, "lot_id": lot}}


def derived(kind: str, cause: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"{kind}-{next(_ids)}", "type": kind, "correlation_id": cause["id"],
            "data": {"lot_id": cause["data"]["lot_id"], "inspection_event_id": cause["id"]}}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def request(self, events: list[dict[str, Any]], status: int = 200, *,
                path: str = "/events", retry_after_s: float | None = None,
                headers: dict[str, str] | None = None, gap: float = 0.1) -> RequestRecord:
        self.t += gap
        key = events[0]["id"] if len(events) == 1 else "batch-" + "-".join(
            e["id"] for e in events)
        hdrs = {"idempotency-key": key, "x-correlation-id": events[0]["correlation_id"],
                "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
        if headers is not None:
            hdrs = headers
        rec = RequestRecord("POST", path, hdrs, events, status, mono=self.t,
                            answered_mono=self.t + 0.001, applied=200 <= status < 300)
        if retry_after_s is not None:
            rec.retry_after = str(retry_after_s)
            rec.not_before_mono = rec.answered_mono + retry_after_s
        return rec


def lot(n: int, name: str = "L1", fails: tuple[int, ...] = ()) -> list[Expectation]:
    return [Expectation("mqtt", f"{name}-{i}", f"lot:{name}", i,
                        ("nonconformance",) if i in fails else ()) for i in range(1, n + 1)]


def test_a_clean_run_with_redeliveries_and_derived_events_is_clean() -> None:
    c = Clock()
    r1, r2, r3 = (result(f"L1-{i}") for i in (1, 2, 3))
    nc = derived("nonconformance", r2)
    hold = derived("quality.hold", r2)
    records = [
        c.request([r1, r2]),
        c.request([nc], path="/nonconformances"),
        c.request([hold], path="/lots/L1/hold"),
        c.request([r3], 503),
        c.request([r3]),
        c.request([r3]),  # the answer was lost: applied again under the same key
    ]
    exps = lot(3, fails=(2,))
    exps[1] = Expectation("mqtt", "L1-2", "lot:L1", 2, ("nonconformance", "quality.hold"))
    report = check(exps, records)
    report.assert_clean()
    assert report.redeliveries == 1
    assert report.counts["applied_events"] == 5
    assert "lost 0" in report.summary()


def test_a_confirmed_message_never_applied_is_lost() -> None:
    c = Clock()
    records = [c.request([result("L1-1")]), c.request([result("L1-3")])]
    report = check(lot(3), records)
    assert len(report.lost) == 1 and "L1-2" in report.lost[0]
    with pytest.raises(AssertionError, match="lost"):
        report.assert_clean()


def test_an_unconfirmed_message_may_be_missing() -> None:
    c = Clock()
    exps = [*lot(1), Expectation("mqtt", "L1-2", "lot:L1", 2, required=False)]
    check(exps, [c.request([result("L1-1")])]).assert_clean()


def test_a_missing_derived_event_is_lost() -> None:
    c = Clock()
    report = check(lot(1, fails=(1,)), [c.request([result("L1-1")])])
    assert report.lost == ["nonconformance derived from mqtt L1-1"]


def test_one_message_under_two_event_ids_is_a_duplicate() -> None:
    c = Clock()
    records = [c.request([result("L1-1")]), c.request([result("L1-1", eid="other-id")])]
    report = check(lot(1), records)
    assert len(report.duplicates) == 1 and "L1-1" in report.duplicates[0]
    assert report.redeliveries == 0


def test_one_cause_derived_twice_under_two_ids_is_a_duplicate() -> None:
    c = Clock()
    r1 = result("L1-1")
    records = [c.request([r1]), c.request([derived("nonconformance", r1)]),
               c.request([derived("nonconformance", r1)])]
    report = check(lot(1, fails=(1,)), records)
    assert len(report.duplicates) == 1 and "nonconformance" in report.duplicates[0]


def test_two_messages_of_a_key_swapped_across_routes_is_an_order_violation() -> None:
    c = Clock()
    records = [c.request([result("L1-2")], path="/a"), c.request([result("L1-1")], path="/b")]
    report = check(lot(2), records)
    assert len(report.order_violations) == 1
    assert "L1-1" in report.order_violations[0]


def test_other_keys_interleave_freely() -> None:
    c = Clock()
    records = [c.request([result("L1-1")]), c.request([result("L2-1", "L2")]),
               c.request([result("L2-2", "L2")]), c.request([result("L1-2")])]
    check(lot(2) + lot(2, "L2"), records).assert_clean()


def test_a_repeat_of_an_earlier_event_is_not_an_order_violation() -> None:
    c = Clock()
    r1, r2 = result("L1-1"), result("L1-2")
    records = [c.request([r1]), c.request([r2]), c.request([r1])]
    report = check(lot(2), records)
    report.assert_clean()
    assert report.redeliveries == 1


def test_a_derived_event_after_the_next_message_of_its_key_is_an_order_violation() -> None:
    c = Clock()
    r1, r2 = result("L1-1"), result("L1-2")
    records = [c.request([r1, r2]), c.request([derived("quality.hold", r1)])]
    exps = lot(2)
    exps[0] = Expectation("mqtt", "L1-1", "lot:L1", 1, ("quality.hold",))
    report = check(exps, records)
    assert len(report.order_violations) == 1 and "quality.hold" in report.order_violations[0]


def test_a_derived_event_before_its_cause_is_an_order_violation() -> None:
    c = Clock()
    r1 = result("L1-1")
    records = [c.request([derived("nonconformance", r1)]), c.request([r1])]
    report = check(lot(1, fails=(1,)), records)
    assert len(report.order_violations) == 1


def test_a_retry_before_the_retry_after_elapsed_is_early() -> None:
    c = Clock()
    r1 = result("L1-1")
    records = [c.request([r1], 429, retry_after_s=2.0), c.request([r1], gap=1.0)]
    report = check(lot(1), records)
    assert len(report.early_retries) == 1 and "'2.0'" in report.early_retries[0]


def test_an_early_retry_after_a_crash_right_after_the_answer_is_excused() -> None:
    """A gateway killed before it could commit the 429 cannot know its Retry-After."""
    c = Clock()
    r1 = result("L1-1")
    records = [c.request([r1], 429, retry_after_s=2.0), c.request([r1], gap=1.0)]
    crash = records[0].answered_mono + 0.01
    report = check(lot(1), records, crashes=[crash])
    report.assert_clean()
    assert len(report.early_retries_after_crash) == 1
    late_crash = records[0].answered_mono + 0.8
    assert len(check(lot(1), records, crashes=[late_crash], crash_grace_s=0.5)
               .early_retries) == 1


def test_a_retry_after_the_retry_after_elapsed_is_not_early() -> None:
    c = Clock()
    r1 = result("L1-1")
    records = [c.request([r1], 429, retry_after_s=2.0), c.request([r1], gap=2.1)]
    check(lot(1), records).assert_clean()


def test_a_request_that_arrived_before_the_answer_is_no_early_retry() -> None:
    """Found in the 500-cycle campaign: a slow request of a killed gateway arrived 1.8 s
    before the restarted gateway's copy got its 429, and was recorded after it (records are
    kept in answer order). It was no reaction to that answer; one sent after it is."""
    c = Clock()
    r1 = result("L1-1")
    orphan = c.request([r1])
    answer = c.request([r1], 429, retry_after_s=2.0, gap=1.8)
    orphan.answered_mono = answer.answered_mono + 0.1  # answered late, recorded last
    check(lot(1), [answer, orphan]).assert_clean()
    early = c.request([r1], gap=0.5)
    assert len(check(lot(1), [answer, orphan, early]).early_retries) == 1


def test_an_event_of_a_refused_batch_sent_early_in_another_batch_is_early() -> None:
    c = Clock()
    r1, r2 = result("L1-1"), result("L1-2")
    records = [c.request([r1, r2], 429, retry_after_s=5.0), c.request([r2], gap=1.0),
               c.request([r1, r2], gap=5.0)]
    report = check(lot(2), records)
    assert len(report.early_retries) == 1 and r2["id"] in report.early_retries[0]


@pytest.mark.parametrize("header", ["idempotency-key", "x-correlation-id", "traceparent"])
def test_a_request_without_a_contract_header_is_reported(header: str) -> None:
    c = Clock()
    rec = c.request([result("L1-1")])
    del rec.headers[header]
    report = check(lot(1), [rec])
    assert len(report.missing_headers) == 1 and header in report.missing_headers[0]


def test_a_single_event_request_keyed_with_something_else_is_reported() -> None:
    c = Clock()
    rec = c.request([result("L1-1")])
    rec.headers["idempotency-key"] = "random-per-attempt"
    report = check(lot(1), [rec])
    assert len(report.missing_headers) == 1 and "not the event id" in report.missing_headers[0]


def test_a_dead_letter_of_an_allowed_type_is_counted_not_lost() -> None:
    c = Clock()
    r1 = result("L1-1")
    nc = derived("nonconformance", r1)
    records = [c.request([r1]), c.request([nc], 422, path="/nonconformances")]
    exps = lot(1, fails=(1,))
    assert check(exps, records).lost
    report = check(exps, records, allow_dead_letter_types=["nonconformance"])
    report.assert_clean()
    assert len(report.dead_lettered) == 1
