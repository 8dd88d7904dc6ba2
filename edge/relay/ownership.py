"""Which relay delivers which partition: leases in a JetStream key-value bucket.

Contract:
- Each partition has at most one owner: the bucket key ``p<n>`` is created by the relay
  that takes it (create fails while it exists) and renewed by compare-and-set on its
  revision every ``lease_ttl_s / 3``; the bucket's ``max_age`` is ``lease_ttl_s``, so the
  key of a relay that died (kill -9, a lost machine) vanishes and another relay takes the
  partition over.
- An owner stops delivering a partition as soon as it cannot prove its lease: when a
  renewal fails, or when its last successful renewal is older than ``lease_ttl_s``
  minus a margin (a relay that was paused or cut off stops before its key expires, so
  two relays never deliver one partition at once while their clocks run alike).
- Relays announce themselves (``member.<relay_id>``, same TTL); each aims at
  ``ceil(partitions / members)`` partitions: one above its share gives partitions back
  (after its leased events were recorded), one below takes free ones.
- ``on_take(p)`` runs before a partition is delivered (it recreates the partition's
  consumers at their ack floor, so every unacknowledged event comes again, in stream
  order); ``on_drop(p, graceful)`` runs when it is given back or lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from edge.telemetry import log_event

__all__ = ["Ownership"]

log = logging.getLogger(__name__)

MARGIN = 0.25  # of the TTL: stop delivering this much before the key can expire


class Ownership:
    def __init__(
        self,
        js: Any,
        bucket: str,
        relay_id: str,
        partitions: int,
        ttl_s: float,
        on_take: Callable[[int], Awaitable[None]],
        on_drop: Callable[[int, bool], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.js = js
        self.bucket = bucket
        self.relay_id = relay_id
        self.partitions = partitions
        self.ttl_s = ttl_s
        self.on_take = on_take
        self.on_drop = on_drop
        self.clock = clock
        self.kv: Any = None
        self.owned: dict[int, int] = {}  # partition → revision of our key
        self.renewed_at: dict[int, float] = {}
        self.members = 1
        self._stopping = asyncio.Event()

    async def setup(self) -> None:
        from nats.js.errors import BucketNotFoundError

        try:
            self.kv = await self.js.key_value(self.bucket)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(bucket=self.bucket, history=1,
                                                     ttl=self.ttl_s)

    def holds(self, partition: int) -> bool:
        """True while this relay may deliver ``partition`` (see the module contract)."""
        at = self.renewed_at.get(partition)
        return (partition in self.owned and at is not None
                and self.clock() - at < self.ttl_s * (1 - MARGIN))

    async def run(self) -> None:
        """Renew, rebalance and take over until ``stop()``; then give everything back."""
        try:
            while not self._stopping.is_set():
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - NATS away: leases lapse, retry
                    log_event(log, logging.WARNING, "partition leases not renewed",
                              relay=self.relay_id, error=repr(err))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ttl_s / 3):
                        await self._stopping.wait()
        finally:
            await self.release_all()

    def stop(self) -> None:
        self._stopping.set()

    async def tick(self) -> None:
        await self._announce()
        await self._renew()
        target = math.ceil(self.partitions / max(1, self.members))
        extra = len(self.owned) - target
        for partition in sorted(self.owned, reverse=True)[:max(0, extra)]:
            await self._give_back(partition)
        if len(self.owned) < target:
            await self._take_free(target)

    async def _announce(self) -> None:
        from nats.js.errors import NoKeysError

        await self.kv.put(f"member.{self.relay_id}", str(time.time()).encode())
        try:
            keys = await self.kv.keys()  # (server-side filters need NATS 2.10)
        except NoKeysError:
            keys = []
        self.members = max(1, sum(1 for k in keys if k.startswith("member.")))

    async def _renew(self) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        for partition, revision in list(self.owned.items()):
            # the key lives lease_ttl_s from when the server wrote it, at the earliest when
            # the request left: the lease is counted from then, not from the answer
            sent_at = self.clock()
            try:
                self.owned[partition] = await self.kv.update(
                    f"p{partition}", self.relay_id.encode(), last=revision)
                self.renewed_at[partition] = sent_at
            except KeyWrongLastSequenceError:
                await self._lost(partition, "its lease was taken (it had expired)")
            except Exception:
                if not self.holds(partition):
                    await self._lost(partition, "its lease could not be renewed in time")
                raise

    async def _take_free(self, target: int) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        start = sum(self.relay_id.encode()) % self.partitions  # relays start apart
        for i in range(self.partitions):
            if len(self.owned) >= target or self._stopping.is_set():
                return
            partition = (start + i) % self.partitions
            if partition in self.owned:
                continue
            sent_at = self.clock()
            try:
                revision = await self.kv.create(f"p{partition}", self.relay_id.encode())
            except KeyWrongLastSequenceError:
                continue  # another relay owns it
            self.owned[partition] = revision
            self.renewed_at[partition] = sent_at
            try:
                await self.on_take(partition)
            except Exception as err:  # noqa: BLE001 - give it back; retried next tick
                log_event(log, logging.ERROR, "could not start a partition; giving it back",
                          relay=self.relay_id, partition=partition, error=repr(err))
                await self._give_back(partition)
                continue
            log_event(log, logging.INFO, "partition taken", relay=self.relay_id,
                      partition=partition, owned=len(self.owned), members=self.members)

    async def _give_back(self, partition: int) -> None:
        revision = self.owned.pop(partition, None)
        self.renewed_at.pop(partition, None)
        await self.on_drop(partition, True)
        if revision is not None:
            with contextlib.suppress(Exception):
                await self.kv.delete(f"p{partition}", last=revision)
        log_event(log, logging.INFO, "partition given back", relay=self.relay_id,
                  partition=partition)

    async def _lost(self, partition: int, why: str) -> None:
        self.owned.pop(partition, None)
        self.renewed_at.pop(partition, None)
        log_event(log, logging.WARNING, "partition lost: " + why, relay=self.relay_id,
                  partition=partition)
        await self.on_drop(partition, False)

    async def release_all(self) -> None:
        for partition in list(self.owned):
            with contextlib.suppress(Exception):
                await self._give_back(partition)
        with contextlib.suppress(Exception):
            await self.kv.delete(f"member.{self.relay_id}")
