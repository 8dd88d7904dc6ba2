"""Helpers for outbox tests: build events and submissions quickly."""

from __future__ import annotations

from typing import Any

from edge.components import Submission
from edge.events import make_event


def sub(type_: str = "inspection.result", *, key: str | None = None, cls: str | None = None,
        dedupe: str | None = None, source: str = "line1", **data: Any) -> Submission:
    if type_ == "inspection.result":
        data.setdefault("lot_id", "L1")
        data.setdefault("result", "pass")
    if type_ == "machine.reading":
        data.setdefault("value", 1.0)
    return Submission(
        make_event(type=type_, site="test-site", source=source, data=data, ordering_key=key,
                   event_class=cls),
        dedupe,
    )
