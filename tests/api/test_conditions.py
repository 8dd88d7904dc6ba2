"""A component's own conditions (a station whose result cannot be stored, a refused
login) reach /status and the summary plant IT reads, and disappear when cleared."""

from __future__ import annotations

from edge.api.summary import problems
from edge.app import ComponentStatus


def test_a_condition_is_reported_until_cleared_and_keeps_its_since():
    st = ComponentStatus(id="station7", kind="source", type="opcua", state="running",
                         connected=True)
    st.set_condition("result_unstored", "result of ResultReady cannot be stored", "critical")
    first = st.to_dict()["conditions"]
    assert [c["code"] for c in first] == ["result_unstored"]
    st.set_condition("result_unstored", "result of ResultReady cannot be stored (2 tries)",
                     "critical")
    again = st.to_dict()["conditions"]
    assert again[0]["since"] == first[0]["since"]
    assert again[0]["message"].endswith("(2 tries)")

    found = problems({"components": [st.to_dict()]})
    assert [(p.severity, p.subject) for p in found] == [("critical", "source station7")]

    st.set_condition("result_unstored", None)
    assert st.to_dict()["conditions"] == []
    assert problems({"components": [st.to_dict()]}) == []
