"""Support for the quality tests: events of a lot as sources submit them, what the outbox
stored, and a gateway config with the ``quality:`` section and ``capa`` rules.

``with_quality`` stands in for ``edge.config`` until it declares ``quality:`` and accepts
``capa`` items in ``rules:`` (``edge.rules.RuleConfig``): it adds them to a loaded config
the way the loader will, so the gateway reads them through the same attributes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from edge.components import Submission
from edge.events import make_event
from edge.rules import CapaRule, QualityConfig, SpecLimitsRule

SPEC = SpecLimitsRule(type="spec_limits", lower=9.95, upper=10.05)


def receipt(lot: str, supplier: str | None = "acme", **data: Any) -> Submission:
    body = {"lot_id": lot, **({"supplier": supplier} if supplier else {}), **data}
    return Submission(make_event(type="material.receipt", site="test-site", source="wms",
                                 data=body))


def result(lot: str, measured: float = 10.0, serial: str = "S1", *, result: str = "pass",
           characteristic: str = "bore", source: str = "line1", at: float | None = None,
           dedupe: str | None = None, redelivered: bool = False, **data: Any) -> Submission:
    """An inspection result (``at``: its source time, epoch seconds)."""
    ev = make_event(type="inspection.result", site="test-site", source=source,
                    data={"lot_id": lot, "serial": serial, "result": result,
                          "measured": measured, "characteristic": characteristic, **data},
                    source_ts=datetime.fromtimestamp(at, UTC) if at is not None else None)
    return Submission(ev, dedupe, redelivery_only=dedupe is not None, redelivered=redelivered,
                      redelivery_horizon=100)


def failing(lot: str, serial: str = "S1", **kw: Any) -> Submission:
    return result(lot, 10.2, serial, **kw)


def status(lot: str, state: str, *, by: str = "qms", reason: str = "decided in the QMS",
           type_: str = "lot.status") -> Submission:
    data = {"lot_id": lot, "reason": reason, "decided_by": by}
    if type_ == "lot.status":
        data["status"] = state
    return Submission(make_event(type=type_, site="test-site", source="qms-downlink",
                                 data=data))


def stored(path: str | Path, *types: str) -> list[dict[str, Any]]:
    """The stored events (envelopes) in outbox order, of ``types`` when given."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT body FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()
    docs = [orjson.loads(r[0]) for r in rows]
    return [d for d in docs if not types or d["type"] in types]


def rules_keys(path: str | Path) -> dict[str, str]:
    """Dedupe key → event id of what the rules stored under a key."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, event_id FROM dedupe WHERE source = 'rules'"))
    finally:
        conn.close()


def audit_rows(path: str | Path, prefix: str = "lot_") -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT state, actor, reason, event_id, detail FROM audit "
                            "WHERE state LIKE ? ORDER BY seq", (prefix + "%",)).fetchall()
    finally:
        conn.close()
    return [{"state": s, "actor": a, "reason": r, "event_id": e,
             "detail": orjson.loads(d) if d else None} for s, a, r, e, d in rows]


def types_of(docs: Sequence[dict[str, Any]]) -> list[str]:
    return [d["type"] for d in docs]


def with_quality(cfg: Any, *, rules: Sequence[Any] = (),
                 quality: QualityConfig | None = None) -> Any:
    """``cfg`` with ``rules`` added and ``quality`` set (see the module docstring)."""
    update: dict[str, Any] = {"rules": [*cfg.rules, *rules]}
    if quality is not None:
        update["quality"] = quality
    return cfg.model_copy(update=update)


def capa(n: int = 3, window_s: float = 3600.0, by: Sequence[str] = ("supplier", "characteristic")
         ) -> CapaRule:
    return CapaRule(type="capa", nonconformances=n, window_s=window_s, by=list(by))


class Subscriber:
    """A plain paho subscriber on its own thread, as a line controller would be: every
    message on ``topic`` as (topic, envelope, retained)."""

    def __init__(self, port: int, topic: str, client_id: str = "line-controller") -> None:
        import queue
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: queue.Queue[tuple[str, dict[str, Any], bool]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, orjson.loads(m.payload), bool(m.retain)))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    async def get(self, timeout: float = 20.0) -> tuple[str, dict[str, Any], bool]:
        import asyncio

        return await asyncio.to_thread(self.messages.get, timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
