"""Test support in one place: waiting for a condition, reading a metric, ports, builders.

Tests import helpers from here (or from ``tests/fixtures``), never from another test
module. Wait for the condition a user relies on (``eventually``); never sleep-then-assert.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Callable
from typing import Any

from edge.components import Submission
from edge.events import make_event


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_yaml(port: int, *, token_file: str | None = None, hosts: list[str] | None = None,
             host: str = "127.0.0.1") -> str:
    token = f", token_file: {token_file}" if token_file else ""
    names = f", hosts: [{', '.join(repr(h) for h in hosts)}]" if hosts else ""
    listen = f"[{host}]" if ":" in host else host
    return f'api: {{listen: "{listen}:{port}"{token}{names}}}\n'


def submission(lot: str, *, type: str = "inspection.result", **data: Any) -> Submission:
    return Submission(make_event(type=type, site="test-site", source="line1",
                                 data={"lot_id": lot, **data}, ordering_key=f"lot:{lot}"))


async def eventually(check: Callable[[], Any], *, timeout: float = 20.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.05)


def metric(collector: Any, *labels: str) -> float:
    """The current value of a prometheus counter or gauge (``labels`` in declaration order).

    Reads through the public collection API, so a test does not depend on the client's
    private fields: ``metric(gw.metrics.sink_paused, "erp")``.
    """
    child = collector.labels(*labels) if labels else collector
    for family in child.collect():
        for sample in family.samples:
            if sample.name.endswith(("_created",)):
                continue
            return float(sample.value)
    raise AssertionError(f"no sample in {collector!r} for labels {labels!r}")
