"""Gap recovery for the ``opcua`` source: HistoryRead pages and persisted watermarks.

``history_pages`` reads the raw history of one node strictly between two timestamps, page
by page, so a long gap never sits in memory at once. It follows continuation points and,
for servers that truncate a page without one (asyncua does when NumValuesPerNode cuts the
result), continues from the last timestamp it got. It stops after ``max_values``; an
unfinished continuation point is released.

``BackfillMixin`` is the gap half of ``OpcUaSource``: a ``Gap`` marker opens a gap per
historizing node at its last live sample, the first live sample after the marker closes
it, and one task reads each closed gap back (HistoryRead), submits the values as
``backfilled`` events and audits the result.

``Watermarks`` keeps, per monitored node, the source timestamp up to which samples are
known to be stored (the start of an open gap while one is being backfilled), in
``<state_dir>/opcua/<source id>.watermarks.json``. After a gateway restart the source
backfills from there, so an update or reboot of the gateway loses no historized sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from asyncua import Client, ua

from edge.components import ComponentContext, Submission
from edge.errors import InputError
from edge.sources.opcua_queue import Gap, iso, source_ts
from edge.telemetry import log_event

if TYPE_CHECKING:
    from prometheus_client import Counter

    from edge.sources.opcua_config import OpcUaSourceConfig
    from edge.sources.opcua_nodes import Resolved

__all__ = ["BackfillMixin", "Watermarks", "history_pages"]

log = logging.getLogger("edge.sources.opcua")


async def history_pages(
    client: Client,
    node_id: ua.NodeId,
    start: datetime,
    end: datetime,
    *,
    page_values: int,
    max_values: int,
    timeout_s: float,
) -> AsyncIterator[list[ua.DataValue]]:
    """Yield lists of DataValues with start < SourceTimestamp < end, oldest first.

    Raises ``ua.UaStatusCodeError`` when the server refuses (e.g. BadHistoryOperation
    Unsupported) and network errors as they are.
    """
    cursor = start  # StartTime of the next request (without a continuation point)
    after = start  # yield only values newer than this (exclusive lower bound)
    continuation: bytes | None = None
    total = 0
    try:
        while total < max_values:
            details = ua.ReadRawModifiedDetails()
            details.IsReadModified = False
            details.StartTime = cursor
            details.EndTime = end
            details.NumValuesPerNode = min(page_values, max_values - total)
            details.ReturnBounds = False
            rv = ua.HistoryReadValueId()
            rv.NodeId = node_id
            rv.ContinuationPoint = continuation
            params = ua.HistoryReadParameters()
            params.HistoryReadDetails = details
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            params.ReleaseContinuationPoints = False
            params.NodesToRead.append(rv)
            async with asyncio.timeout(timeout_s):
                result = (await client.uaclient.history_read(params))[0]
            result.StatusCode.check()
            values = list(getattr(result.HistoryData, "DataValues", None) or [])
            continuation = result.ContinuationPoint or None
            total += len(values)
            page = []
            last = after
            for dv in values:
                ts = _aware(dv.SourceTimestamp or dv.ServerTimestamp)
                if ts is None or ts <= after or ts >= end:
                    continue
                page.append(dv)
                last = max(last, ts)
            if page:
                yield page
            if continuation is not None:
                continue
            if len(values) < details.NumValuesPerNode or last <= after:
                return  # the server has no more in the range
            # Truncated without a continuation point: ask again from the last timestamp.
            cursor = after = last
    finally:
        if continuation is not None:
            await _release(client, node_id, continuation, timeout_s)


async def _release(client: Client, node_id: ua.NodeId, cp: bytes, timeout_s: float) -> None:
    details = ua.ReadRawModifiedDetails()
    rv = ua.HistoryReadValueId()
    rv.NodeId = node_id
    rv.ContinuationPoint = cp
    params = ua.HistoryReadParameters()
    params.HistoryReadDetails = details
    params.ReleaseContinuationPoints = True
    params.NodesToRead.append(rv)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            await client.uaclient.history_read(params)


def _aware(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


class Watermarks:
    """Per-node "stored up to" timestamps, persisted atomically (write + rename)."""

    def __init__(self, path: Path, endpoint: str) -> None:
        self.path = path
        self.endpoint = endpoint
        self.values: dict[str, datetime] = {}
        self._saved: dict[str, datetime] = {}

    def load(self) -> dict[str, datetime]:
        """Read the file; a missing, foreign or damaged file yields {} (logged)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            log_event(log, logging.WARNING, "cannot read opcua watermarks; no restart backfill",
                      path=str(self.path), error=str(err))
            return {}
        try:
            doc = orjson.loads(raw)
            if doc.get("endpoint") != self.endpoint:
                return {}
            out = {k: datetime.fromisoformat(v) for k, v in doc.get("nodes", {}).items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
            log_event(log, logging.WARNING, "damaged opcua watermarks ignored",
                      path=str(self.path), error=str(err))
            return {}
        self.values = dict(out)
        self._saved = dict(out)
        return out

    def dirty(self) -> bool:
        return self.values != self._saved

    async def save(self) -> None:
        """Write the file if anything changed (off the event loop)."""
        if not self.dirty():
            return
        snapshot = dict(self.values)
        doc = {"endpoint": self.endpoint,
               "nodes": {k: v.isoformat() for k, v in snapshot.items()}}
        await asyncio.to_thread(self._write, orjson.dumps(doc))
        self._saved = snapshot

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class BackfillMixin:
    """The gap half of ``OpcUaSource`` (state lives in ``OpcUaSource.__init__``)."""

    if TYPE_CHECKING:
        id: str
        cfg: OpcUaSourceConfig
        ctx: ComponentContext
        _client: Client | None
        _resolved: Resolved | None
        _history: list[bool]
        _last_ts: dict[int, datetime]
        _gap_open: dict[int, tuple[datetime, float]]
        _jobs: dict[int, tuple[datetime, datetime]]
        _jobs_ready: asyncio.Event
        _watermarks: Watermarks
        _m_backfilled: Counter

        async def _audit(self, state: str, *, reason: str | None = None,
                         detail: dict[str, Any] | None = None) -> None: ...

        async def _submit(self, subs: Sequence[Submission]) -> list[str]: ...

        def _sample(self, idx: int, dv: ua.DataValue, value: Any, ts: datetime,
                    backfilled: bool = False) -> Submission: ...

        async def _quarantine_sample(self, idx: int, dv: ua.DataValue, value: Any,
                                     ts: datetime, err: InputError) -> None: ...

    def _open_gap(self, mark: Gap) -> None:
        now = time.monotonic()
        starts = mark.starts if mark.starts is not None else self._last_ts
        for idx, ts in starts.items():
            if self._history[idx] and idx not in self._gap_open:
                self._gap_open[idx] = (ts, now)
        self._jobs_ready.set()  # wake the loop so first-sample timeouts are tracked

    def _add_job(self, idx: int, start: datetime, end: datetime) -> None:
        if end <= start:
            return  # no change since the gap opened
        old = self._jobs.get(idx)
        if old is not None:
            start, end = min(start, old[0]), max(end, old[1])
        self._jobs[idx] = (start, end)
        self._jobs_ready.set()

    def _advance_watermark(self, idx: int, ts: datetime) -> None:
        key = self.cfg.monitored[idx].node
        if idx in self._gap_open or idx in self._jobs:
            return  # keep the gap start until the backfill is done
        old = self._watermarks.values.get(key)
        if old is None or ts > old:
            self._watermarks.values[key] = ts

    async def _backfill_loop(self) -> None:
        if not any(self._history):
            return
        wait_s = self.cfg.backfill.first_sample_wait_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if self._gap_open else None):
                    await self._jobs_ready.wait()
            self._jobs_ready.clear()
            stale = [i for i, (_, at) in self._gap_open.items()
                     if time.monotonic() - at > wait_s]
            if stale:
                end = await self._server_time()
                for idx in stale:
                    start, _ = self._gap_open.pop(idx)
                    self._add_job(idx, start, end)
            while self._jobs:
                idx = next(iter(self._jobs))
                start, end = self._jobs.pop(idx)
                await self._backfill(idx, start, end)

    async def _server_time(self) -> datetime:
        assert self._client is not None
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                ts = await self._client.get_node(
                    ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerStatus_CurrentTime))).read_value()
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        except (OSError, TimeoutError, ua.UaError, ConnectionError):
            return datetime.now(UTC)

    async def _backfill(self, idx: int, start: datetime, end: datetime) -> None:
        assert self._client is not None and self._resolved is not None
        cfg = self.cfg
        node = cfg.monitored[idx].node
        limit = end - timedelta(seconds=cfg.backfill.max_gap_s)
        if start < limit:
            log_event(log, logging.WARNING, "opcua gap longer than backfill.max_gap_s; "
                      "reading only its newest part", source=self.id, node=node,
                      gap_start=iso(start), read_from=iso(limit))
            await self._audit("backfill_truncated", reason="max_gap_s",
                              detail={"node": node, "gap_start": iso(start),
                                      "read_from": iso(limit)})
            start = limit
        read = stored = 0
        newest = start
        try:
            async for page in history_pages(
                self._client, self._resolved[node].node_id, start, end,
                page_values=cfg.backfill.page_values, max_values=cfg.backfill.max_values,
                timeout_s=cfg.timeout_s,
            ):
                subs: list[Submission] = []
                for dv in page:
                    ts = source_ts(dv)
                    value = dv.Value.Value if dv.Value is not None else None
                    try:
                        subs.append(self._sample(idx, dv, value, ts, backfilled=True))
                    except InputError as err:
                        await self._quarantine_sample(idx, dv, value, ts, err)
                    newest = max(newest, ts)
                read += len(page)
                if subs:
                    ids = await self._submit(subs)
                    new = sum(1 for s, i in zip(subs, ids, strict=True) if i == s.event.id)
                    stored += new
                    self._m_backfilled.inc(new)
        except (OSError, TimeoutError, ConnectionError) as err:
            # Connection trouble: keep the unread rest for after the reconnect.
            self._add_job(idx, newest, end)
            log_event(log, logging.WARNING, "opcua backfill interrupted; will resume",
                      source=self.id, node=node, error=repr(err))
            await asyncio.sleep(1.0)
            return
        except ua.UaError as err:
            self.ctx.metrics.source_errors.labels(self.id, "history_read_failed").inc()
            log_event(log, logging.WARNING, "opcua backfill failed: the server refused "
                      "HistoryRead", source=self.id, node=node, error=repr(err))
            await self._audit("backfill_failed", reason=type(err).__name__,
                              detail={"node": node, "from": iso(start), "to": iso(end)})
            return
        self._watermarks.values[node] = max(self._watermarks.values.get(node, end), end)
        log_event(log, logging.INFO, "opcua backfilled", source=self.id, node=node,
                  read=read, stored=stored, duplicates=read - stored,
                  gap_from=iso(start), gap_to=iso(end))
        await self._audit("backfilled", detail={"node": node, "from": iso(start),
                                                "to": iso(end), "read": read,
                                                "stored": stored})

    async def _flush_watermarks(self) -> None:
        if not any(self._history):
            return
        while True:
            await asyncio.sleep(5.0)
            try:
                await self._watermarks.save()
            except OSError as err:
                log_event(log, logging.WARNING, "cannot save opcua watermarks",
                          source=self.id, error=str(err))
