"""``Resolution.kind`` is an ``OutcomeKind``; a kind's name is taken for it, anything else
is refused when the resolution is built, not when its transaction runs."""

from __future__ import annotations

import pytest

from edge.components import OutcomeKind
from edge.outbox import Resolution


@pytest.mark.parametrize("kind", list(OutcomeKind))
def test_a_kind_or_its_name_gives_the_kind(kind: OutcomeKind) -> None:
    assert Resolution(1, "e1", kind).kind is kind
    assert Resolution(1, "e1", kind.value).kind is kind  # type: ignore[arg-type]


def test_a_name_that_is_no_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="dead_lettered"):
        Resolution(1, "e1", "dead_lettered")  # type: ignore[arg-type]  # an audit state
