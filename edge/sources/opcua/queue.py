"""The bounded notification queue of the ``opcua`` source.

``NotificationQueue`` sits between asyncua's publish loop and one consumer task. Its
``put_nowait`` never blocks and never raises (asyncua's publish loop also carries the
keep-alives): when full it drops the OLDEST notification and reports it, never a ``Gap``
marker and never asyncua's end-of-subscription ``None``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

__all__ = ["Gap", "NotificationQueue"]


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
