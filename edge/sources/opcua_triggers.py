"""Triggers of the ``opcua`` source: edge detection, ONE Read per edge, optional ack.

A trigger fires on a change of its node TO ``when`` (the first value after (re)connecting
counts as a change; its dedupe key ``trigger:<node>@<trigger SourceTimestamp>`` makes a
repeat of the same edge a duplicate). The group is read as soon as the notification is
processed, the result is mapped with ``edge.transforms.map`` (quarantined when unusable),
waits in a bounded queue until it is committed — never dropped after its Read — and then
the ack, if configured, is written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from asyncua import Client, ua
from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent

from edge.components import ComponentContext, Ingest, Submission
from edge.errors import InputError
from edge.events import Event
from edge.sources.opcua_queue import Gap, NotificationQueue, iso, jsonable, source_ts, status_name
from edge.telemetry import log_event

if TYPE_CHECKING:
    from prometheus_client import Counter

    from edge.sources.opcua_config import OpcUaSourceConfig
    from edge.sources.opcua_nodes import Resolved
    from edge.transforms.map import Mapper

__all__ = ["TriggersMixin"]

log = logging.getLogger("edge.sources.opcua")


class TriggersMixin:
    """The trigger half of ``OpcUaSource`` (state lives in ``OpcUaSource.__init__``)."""

    if TYPE_CHECKING:
        id: str
        cfg: OpcUaSourceConfig
        ctx: ComponentContext
        ingest: Ingest
        _client: Client | None
        _resolved: Resolved | None
        _trig_q: NotificationQueue
        _trig_out: asyncio.Queue[tuple[int, Submission]]
        _trig_mappers: list[Mapper]
        _m_dropped_trigger: Counter

        async def _audit(self, state: str, *, reason: str | None = None,
                         detail: dict[str, Any] | None = None) -> None: ...

        async def _submit(self, subs: Sequence[Submission]) -> list[str]: ...

        def _status_change(self, which: str, ev: StatusChangeEvent) -> None: ...

    def _recheck_triggers(self, why: str) -> None:
        """Schedule a re-read of every trigger node (``why``: ``connected``,
        ``reconnected``, ``subscription_recreated``); returns at once (called from the
        source's control loop)."""

    def _dropped_trigger(self) -> None:
        self._m_dropped_trigger.inc()
        log_event(log, logging.ERROR, "opcua trigger queue full; oldest trigger dropped",
                  source=self.id)

    async def _run_triggers(self) -> None:
        """Edge detection in arrival order; the Read happens right at the edge."""
        if not self.cfg.triggers:
            return
        prev: dict[int, Any] = {}
        unknown = object()
        while True:
            item = await self._trig_q.get()
            if isinstance(item, Gap):
                prev.clear()  # the next value may or may not be an edge: treat it as one
                continue
            if isinstance(item, StatusChangeEvent):
                self._status_change("triggers", item)
                continue
            if type(item) is not DataChangeEvent:
                continue
            mi = item.data.monitored_item
            idx = mi.ClientHandle - 1
            dv = mi.Value
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                continue  # no usable value: neither an edge nor a reset
            trig = self.cfg.triggers[idx]
            value = item.value
            fired = value == trig.when and prev.get(idx, unknown) != trig.when
            prev[idx] = value
            if fired:
                sub = await self._read_trigger(idx, source_ts(dv))
                if sub is not None:
                    await self._trig_out.put((idx, sub))

    async def _read_trigger(self, idx: int, ts: datetime) -> Submission | None:
        assert self._client is not None and self._resolved is not None
        trig = self.cfg.triggers[idx]
        names = list(trig.read)
        params = ua.ReadParameters()
        for name in names:
            params.NodesToRead.append(ua.ReadValueId(
                NodeId=self._resolved[trig.read[name]].node_id, AttributeId=ua.AttributeIds.Value))
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                values = await self._client.uaclient.read(params)
        except (OSError, TimeoutError, ConnectionError, ua.UaError) as err:
            self.ctx.metrics.source_errors.labels(self.id, "trigger_read_failed").inc()
            log_event(log, logging.WARNING, "opcua trigger fired but its read failed; result "
                      "not recorded", source=self.id, trigger=trig.node, trigger_ts=iso(ts),
                      error=repr(err))
            await self._audit("trigger_lost", reason="read_failed",
                              detail={"trigger": trig.node, "trigger_ts": iso(ts),
                                      "error": repr(err)})
            return None
        payload: dict[str, Any] = {}
        bad: dict[str, str] = {}
        for name, dv in zip(names, values, strict=True):
            if dv.StatusCode is not None and dv.StatusCode.is_bad():
                bad[name] = status_name(dv.StatusCode)
            else:
                payload[name] = jsonable(dv.Value.Value if dv.Value is not None else None)
        meta = {"trigger": trig.node, "trigger_ts": iso(ts)}
        raw = orjson.dumps({"read": payload, "bad": bad}, default=str)
        if bad:
            await self.ingest.quarantine(self.id, "bad_status", raw, meta,
                                         ", ".join(f"{k}: {v}" for k, v in bad.items()))
            return None
        try:
            event, dedupe = self._trig_mappers[idx].map(
                payload, source_ts=None if trig.source_ts else ts)
        except InputError as err:
            await self.ingest.quarantine(self.id, err.reason, raw, meta, err.detail)
            return None
        return Submission(event, dedupe or f"trigger:{trig.node}@{iso(ts)}")

    async def _submit_triggers(self) -> None:
        if not self.cfg.triggers:
            return
        while True:
            idx, sub = await self._trig_out.get()
            await self._submit([sub])
            ack = self.cfg.triggers[idx].ack
            if ack is not None:
                await self._write_ack(idx, sub.event, ack)

    async def _write_ack(self, idx: int, event: Event, ack: Any) -> None:
        assert self._client is not None and self._resolved is not None
        node = self._client.get_node(self._resolved[ack.node].node_id)
        try:
            vtype = self._resolved[ack.node].variant_type
            variant = ua.Variant(ack.value, vtype) if vtype not in (None, ua.VariantType.Null) \
                else ua.Variant(ack.value)
            async with asyncio.timeout(self.cfg.timeout_s):
                await node.write_value(ua.DataValue(variant))
        except (OSError, TimeoutError, ConnectionError, ua.UaError, ValueError) as err:
            self.ctx.metrics.source_errors.labels(self.id, "ack_failed").inc()
            log_event(log, logging.WARNING, "opcua ack write failed (the event is stored)",
                      source=self.id, ack_node=ack.node, event_id=event.id, error=repr(err))

