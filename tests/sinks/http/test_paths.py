"""Path templates (DESIGN "Safety at the edges"): every value rendered into a URL path is
exactly one percent-encoded segment; ``.``, ``..``, empty or missing values are refused for
that event (dead letter "unsafe path value") and never sent.

The receiver is a bare HTTP/1.1 server (``tests.sinks.http.support.RawReceiver``) that
records each request target byte for byte, as it came off the socket (a framework would
decode ``%2F`` before we could look).
"""

from __future__ import annotations

from typing import Any

from edge.components import OutcomeKind
from edge.events import Event, make_event
from tests.sinks.http.support import RawReceiver, open_sink, stored

ROUTES = '[{events: [quality.hold], method: PUT, path: "/lots/{data.lot_id}/status"}]'


async def _send(values: list[Any]) -> tuple[list[tuple[str, str]], list[Any]]:
    receiver = await RawReceiver().start()
    try:
        holds = [_hold(f"K{i}", value) for i, value in enumerate(values)]
        async with open_sink(receiver.url, routes=ROUTES) as sink:
            outcomes = await sink.send(stored(holds))
        return receiver.seen, outcomes
    finally:
        await receiver.stop()


_MISSING = object()


def _hold(key: str, lot_id: Any) -> Event:
    data = {"reason": "SPC rule 1"} if lot_id is _MISSING else {"lot_id": lot_id}
    return make_event(type="quality.hold", site="test-site", source="qc", data=data,
                      ordering_key=f"lot:{key}")


async def test_each_value_is_one_percent_encoded_segment():
    values = ["a/b", "%2e%2e", "Ünï cødé", "a?b#c", "...", "L-17", 42, "a\\b"]
    seen, outcomes = await _send(values)
    assert [o.kind for o in outcomes] == [OutcomeKind.delivered] * len(values)
    assert sorted(seen) == sorted([
        ("PUT", "/api/v1/lots/a%2Fb/status"),
        ("PUT", "/api/v1/lots/%252e%252e/status"),
        ("PUT", "/api/v1/lots/%C3%9Cn%C3%AF%20c%C3%B8d%C3%A9/status"),
        ("PUT", "/api/v1/lots/a%3Fb%23c/status"),
        ("PUT", "/api/v1/lots/.../status"),
        ("PUT", "/api/v1/lots/L-17/status"),
        ("PUT", "/api/v1/lots/42/status"),
        ("PUT", "/api/v1/lots/a%5Cb/status"),
    ])


async def test_dot_segments_empty_missing_and_structured_values_are_never_sent():
    """Before, ``..`` sent ``PUT /api/v1/status`` and ``.`` sent ``PUT /api/v1/lots/status``."""
    values = ["..", ".", "", _MISSING, {"a": 1}, ["x"], "ok"]
    seen, outcomes = await _send(values)
    assert seen == [("PUT", "/api/v1/lots/ok/status")]
    refused = outcomes[:-1]
    assert [o.kind for o in refused] == [OutcomeKind.dead_letter] * len(refused)
    assert all(o.reason.startswith("unsafe path value: ") for o in refused), refused
    assert "'..'" in refused[0].reason and "data.lot_id" in refused[0].reason
    assert outcomes[-1].kind is OutcomeKind.delivered


async def test_an_unsafe_value_parks_its_key_for_the_rest_of_the_send():
    receiver = await RawReceiver().start()
    try:
        first, later = _hold("A", ".."), _hold("A", "A")
        async with open_sink(receiver.url, routes=ROUTES) as sink:
            outcomes = await sink.send(stored([first, later]))
        assert receiver.seen == []
        assert outcomes[0].kind is OutcomeKind.dead_letter
        assert outcomes[1].kind is OutcomeKind.retry and not outcomes[1].attempted
    finally:
        await receiver.stop()
