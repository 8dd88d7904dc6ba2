"""Helpers for sink tests: a sink block with fast retries and event builders."""

from __future__ import annotations

import textwrap
from typing import Any

from edge.components import Submission
from edge.events import make_event


def sink_yaml(url: str, *, max_batch: int = 1, extra: str = "", routes: str | None = None,
              sink_id: str = "erp") -> str:
    routes = routes or f'[{{events: ["*"], method: POST, path: /events, max_batch: {max_batch}}}]'
    return textwrap.dedent(f"""\
        sinks:
          - id: {sink_id}
            type: http
            url: {url}
            retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.3}}
            circuit_breaker: {{failure_threshold: 5, open_s: 0.2, max_open_s: 0.5}}
            routes: {routes}
        """) + textwrap.indent(textwrap.dedent(extra), " " * 4)


def result(lot: str, n: int = 0, **data: Any) -> Submission:
    return Submission(make_event(
        type="inspection.result", site="test-site", source="line1",
        data={"lot_id": lot, "result": "pass", "n": n, **data}, ordering_key=f"lot:{lot}"))


def reading(n: int = 0) -> Submission:
    return Submission(make_event(type="machine.reading", site="test-site", source="line1",
                                 data={"value": float(n), "n": n}))
