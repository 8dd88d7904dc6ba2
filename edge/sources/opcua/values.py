"""The bounded notification queue of the ``opcua`` source and value conversions.

``NotificationQueue`` sits between asyncua's publish loop and one consumer task. Its
``put_nowait`` never blocks and never raises (asyncua's publish loop also carries the
keep-alives): when full it drops the OLDEST notification and reports it, never a ``Gap``
marker and never asyncua's end-of-subscription ``None``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from asyncua import ua

__all__ = ["OVERFLOW_BITS", "Gap", "NotificationQueue", "iso", "jsonable",
           "sample_key", "source_ts", "status_name"]

OVERFLOW_BITS = 0x0480  # InfoType=DataValue + Overflow: the server's item queue dropped


class Gap:
    """Marker in a notification queue: a subscription was (re)created at this point."""

    __slots__ = ("reason", "starts")

    def __init__(self, reason: str, starts: dict[int, datetime] | None = None) -> None:
        self.reason = reason
        self.starts = starts  # explicit gap starts (restart); None: the last live samples


class NotificationQueue:
    """Bounded FIFO from asyncua's publish callback to one consumer task.

    ``put_nowait`` never blocks and never raises: when full it drops the oldest
    notification (never a ``Gap`` marker) and calls ``on_drop()``. Duck-types the parts
    of ``asyncio.Queue`` asyncua uses (``put_nowait``, ``get_nowait``, ``get``).
    """

    def __init__(self, maxsize: int, on_drop: Callable[[], None]) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self.dropped = 0

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Any) -> None:
        if len(self._items) >= self.maxsize:
            self._drop_oldest()
        self._items.append(item)
        self._ready.set()

    def _drop_oldest(self) -> None:
        for i, old in enumerate(self._items):
            if old is not None and not isinstance(old, Gap):
                del self._items[i]
                self.dropped += 1
                self._on_drop()
                return

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    async def get_batch(self, limit: int) -> list[Any]:
        first = await self.get()
        items = [first]
        pop = self._items.popleft
        while self._items and len(items) < limit:
            items.append(pop())
        return items


def jsonable(v: Any) -> Any:
    """An OPC UA value as JSON-friendly data (arrays, structures, texts, ids, bytes)."""
    t = type(v)
    if v is None or t is float or t is int or t is bool or t is str:
        return v
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, ua.LocalizedText):
        return v.Text
    if isinstance(v, ua.QualifiedName):
        return f"{v.NamespaceIndex}:{v.Name}"
    if isinstance(v, ua.NodeId):
        return v.to_string()
    if isinstance(v, ua.StatusCode):
        return v.name
    if isinstance(v, uuid.UUID):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)
                if f.name != "Encoding"}
    return str(v)


_STATUS_NAMES: dict[int, str] = {}


def status_name(code: ua.StatusCode | None) -> str:
    """``Good``, ``BadSensorFailure``, ``Good|Overflow`` … (cached per code)."""
    value = 0 if code is None else code.value
    name = _STATUS_NAMES.get(value)
    if name is None:
        name = ua.StatusCode(ua.UInt32(value & 0xFFFF0000)).name
        if value & OVERFLOW_BITS == OVERFLOW_BITS:
            name += "|Overflow"
        if len(_STATUS_NAMES) < 4096:
            _STATUS_NAMES[value] = name
    return name


def source_ts(dv: ua.DataValue) -> datetime:
    """SourceTimestamp, else ServerTimestamp, else now; always timezone-aware UTC."""
    ts = dv.SourceTimestamp or dv.ServerTimestamp
    if ts is None:
        return datetime.now(UTC)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def sample_key(node: str, ts: datetime, value: Any, status: ua.StatusCode | None) -> str:
    """Identity of one sample: ``<node>@<source timestamp>#<digest of value and status>``.

    The timestamp alone is not enough: a server may report a second value in the same
    clock tick, or a new status (``UncertainLastUsableValue``) with the old timestamp; those
    are different samples. The same sample read live and again by HistoryRead gives the
    same key (the status's InfoBits — Overflow — are left out: they describe the queue,
    not the sample). ``value`` is the JSON-friendly form (``jsonable``)."""
    code = 0 if status is None else status.value & 0xFFFF0000
    digest = hashlib.blake2b(orjson.dumps([value, code], default=str,
                                          option=orjson.OPT_SORT_KEYS),
                             digest_size=6).hexdigest()
    return f"{node}@{iso(ts)}#{digest}"


def iso(ts: datetime) -> str:
    """ISO-8601 with ``Z``, as in the event envelope (also part of dedupe keys)."""
    return ts.isoformat().replace("+00:00", "Z")

