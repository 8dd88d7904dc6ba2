"""``validate_data``'s compiled check gives pydantic's result for the records it takes, and
takes the ordinary records of the busy types (the ingest hot path)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import InputError
from edge.events import catalogue
from edge.events.catalogue import CATALOGUE, validate_data

VALUES: list[Any] = [
    None, "", " ", "x", "L-0001", " padded ", "OK", "nok", "Pass", "1", "0", "true", "Released",
    "hold", "procurement", "\u00fcml\u00e4ut", "\udc80", 0, 1, -1, 7, 1000, 1001, 2 ** 53,
    -(2 ** 53), 2 ** 63, 0.0, -0.0, 1.5, 10.0, -3.25, 1e300, math.nan, math.inf, -math.inf,
    True, False, [], ["L1"], [1, None], {}, {"a": None}, b"raw",
]


def _record(event_type: str) -> st.SearchStrategy[dict[str, Any]]:
    names = [*CATALOGUE[event_type].model.model_fields, "extra_a", "extra_b"]
    return st.dictionaries(st.sampled_from(names), st.sampled_from(VALUES), max_size=len(names))


def _shown(d: dict[str, Any]) -> str:
    return repr([(k, type(v).__name__, v) for k, v in d.items()])  # nan, -0.0, 1 vs 1.0


@pytest.mark.parametrize("event_type", sorted(CATALOGUE))
@settings(max_examples=400, deadline=None, database=None)
@given(data=st.data())
def test_the_fast_check_agrees_with_the_model(event_type: str, data: st.DataObject) -> None:
    record = data.draw(_record(event_type))
    spec = CATALOGUE[event_type]
    try:
        expected: dict[str, Any] | None = catalogue._validate_model(event_type, spec.model,
                                                                     dict(record))
    except InputError:
        expected = None
    fast = catalogue._FAST.get(event_type)
    got = fast.check(dict(record)) if fast is not None else None
    if got is not None:
        assert expected is not None, f"the fast path accepted what the model refuses: {record}"
        assert _shown(got) == _shown(expected)
    assert (_shown(validate_data(event_type, dict(record))) == _shown(expected)
            if expected is not None else _raises(event_type, record))


def _raises(event_type: str, record: dict[str, Any]) -> bool:
    with pytest.raises(InputError):
        validate_data(event_type, dict(record))
    return True


@pytest.mark.parametrize("event_type", ["inspection.result", "machine.reading",
                                        "production.count", "material.receipt",
                                        "nonconformance", "quality.hold"])
def test_ordinary_records_take_the_fast_path(event_type: str) -> None:
    example = dict(CATALOGUE[event_type].example)
    fast = catalogue._FAST[event_type]
    assert fast.check(example) == catalogue._validate_model(
        event_type, CATALOGUE[event_type].model, example)


def test_declined_records_keep_the_models_errors() -> None:
    with pytest.raises(InputError) as err:
        validate_data("inspection.result", {"lot_id": "L1", "result": "pass", "lower": 2.0,
                                            "upper": 1.0})
    assert err.value.reason == "invalid_data"
    assert "lower (2) is above upper (1)" in err.value.detail
    with pytest.raises(InputError, match="lot_id: required field is missing"):
        validate_data("inspection.result", {"result": "pass"})
