"""Support for the ``nats`` sink tests: one sink built through the config loader and driven
directly (no outbox, no forwarder), events as a lease hands them over, and a reader of
everything a stream holds."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edge.components import ComponentContext, StoredEvent
from edge.config import load_config_text
from edge.events import Event, make_event
from edge.sinks.nats.sink import NatsSink
from edge.telemetry import Metrics
from tests.nats.support import MACHINE_NATS

__all__ = ["StreamMsg", "event", "nats_sink_yaml", "open_sink", "read_stream", "stored"]


def nats_sink_yaml(stream: str, subject: str, *, url: str = MACHINE_NATS, extra: str = "",
                   sink_id: str = "js") -> str:
    """A ``sinks:`` block with one ``nats`` sink and fast retries."""
    return (f"sinks:\n  - id: {sink_id}\n    type: nats\n    servers: [\"{url}\"]\n"
            f"    stream: {stream}\n    subject: \"{subject}\"\n    partitions: 4\n"
            "    connect_timeout_s: 2\n    reconnect_wait_s: 0.2\n"
            "    retry: {initial_backoff_s: 0.05, max_backoff_s: 0.5}\n"
            "    circuit_breaker: {failure_threshold: 5, open_s: 0.2, max_open_s: 1}\n"
            + textwrap.indent(textwrap.dedent(extra), " " * 4))


@asynccontextmanager
async def open_sink(stream: str, subject: str, *, url: str = MACHINE_NATS, extra: str = "",
                    base_dir: Path | None = None, site: str = "test-site"
                    ) -> AsyncIterator[NatsSink]:
    """A started ``NatsSink`` built from a config block through the config loader."""
    text = f"site: {site}\n" + nats_sink_yaml(stream, subject, url=url, extra=extra)
    cfg = load_config_text(text, base_dir=base_dir)
    sink = NatsSink(cfg.sinks[0], ComponentContext(site=site, state_dir=".",
                                                   metrics=Metrics()))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def event(type_: str, lot: str | None, n: int, *, source: str = "line1", **data: Any) -> Event:
    """An event numbered ``n`` (``data.n``); with a lot, ordering key ``lot:<lot>``."""
    body = {"n": n, **data}
    if lot is not None:
        body.setdefault("lot_id", lot)
    return make_event(type=type_, site="test-site", source=source, data=body,
                      ordering_key=f"lot:{lot}" if lot is not None else None)


def stored(events: Sequence[Event], first_seq: int = 1) -> list[StoredEvent]:
    """Events as a lease hands them to a sink: in outbox order, seq ascending."""
    return [StoredEvent(first_seq + i, ev.id, ev.type, ev.event_class, ev.ordering_key, 0,
                        body, sha256=hashlib.sha256(body).hexdigest())
            for i, ev in enumerate(events) for body in (ev.to_json(),)]


@dataclass
class StreamMsg:
    seq: int
    subject: str
    headers: dict[str, str]
    body: bytes

    @property
    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.body)
        return doc


async def read_stream(js: Any, stream: str) -> list[StreamMsg]:
    """Every message of ``stream`` in stream order."""
    from nats.js.errors import NotFoundError

    info = await js.stream_info(stream)
    out: list[StreamMsg] = []
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        out.append(StreamMsg(msg.seq, msg.subject, dict(msg.headers or {}), msg.data or b""))
    return out
