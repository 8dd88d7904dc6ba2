"""Gap recovery for the ``opcua`` source: HistoryRead pages and persisted watermarks.

``history_pages`` reads the raw history of one node strictly between two timestamps, page
by page, so a long gap never sits in memory at once. It follows continuation points and,
for servers that truncate a page without one (asyncua does when NumValuesPerNode cuts the
result), continues from the last timestamp it got. It stops after ``max_values``; an
unfinished continuation point is released.

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
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
from asyncua import Client, ua

from edge.telemetry import log_event

__all__ = ["Watermarks", "history_pages"]

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
