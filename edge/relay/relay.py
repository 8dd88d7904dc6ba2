"""``edge relay``: the cloud side of the JetStream tier.

Gateways publish every event to one stream (the ``nats`` sink, one subject per partition);
relays on one or more machines consume it and deliver through the gateway's own sinks and
``Forwarder`` (response policy, retries, breaker, storm guard, per-key order, dead letters)
on a ``RelayQueue`` instead of the SQLite outbox.

Contract:
- At start: connect (``relay`` connection keys) and find the stream, waiting while NATS
  is unreachable or the stream does not exist yet (``/readyz`` says 503 meanwhile);
  refused credentials, a TLS failure or a stream without ``limits`` retention (a consumer
  is recreated on takeover; interest or work-queue retention could drop events then) end
  the start. Then create the dead-letter stream and the two buckets when missing, start
  the sinks and one forwarder per sink.
- Partitions are shared by ``Ownership``. Taking one recreates its consumer per sink at
  the consumer's ack floor + 1, so every event not acknowledged by the previous owner is
  delivered again in stream order (duplicates only under the same Idempotency-Key).
- An event is acknowledged after its sink delivered it or after it was stored in the
  dead-letter stream; parked keys and operator replays: ``edge.relay.deadletters``.
- SIGTERM/SIGINT: give every partition back (leased events recorded first), stop the
  forwarders, close the sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from edge.app import _sink_config
from edge.components import ComponentContext, Sink
from edge.errors import FatalStartupError, RetryableStartupError
from edge.forwarder import Forwarder
from edge.nats.connection import NatsConnectError, connect
from edge.nats.subjects import partition_filter, partition_of
from edge.registry import Registry, default_registry
from edge.relay.config import RelayConfig, RelayFileConfigBase
from edge.relay.deadletters import DeadLetters
from edge.relay.ownership import Ownership
from edge.relay.queue import RelayQueue
from edge.telemetry import Metrics, log_event

__all__ = ["Relay", "default_relay_id"]

log = logging.getLogger(__name__)

SCAN_S = 2.0  # how often operator decisions on parked keys are looked for
STATUS_LOG_S = 60.0


def default_relay_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host or 'relay'}-{os.getpid()}"


class Relay:
    def __init__(self, config: RelayFileConfigBase, *, config_path: str | None = None,
                 registry: Registry | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.rc: RelayConfig = config.relay
        self.config_dir = str(Path(config_path).resolve().parent) if config_path else None
        self.registry = registry or default_registry()
        self.metrics = metrics or Metrics()
        self.relay_id = self.rc.relay_id or default_relay_id()
        self.sinks: dict[str, Sink] = {}
        self.forwarders: dict[str, Forwarder] = {}
        self.nc: Any = None
        self.js: Any = None
        self.queue: RelayQueue | None = None
        self.ownership: Ownership | None = None
        self.dead: DeadLetters | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.consumers: dict[tuple[str, int], str] = {}  # (sink, partition) → consumer
        self.started = False
        self.api: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        if self.rc.listen is not None:
            from edge.relay.api import RelayApi

            self.api = RelayApi(self, self.rc.listen)
            await self.api.start()  # a taken port fails before anything is consumed
        await self._reach_stream()
        if self._stop.is_set():
            return  # stopped while waiting for NATS or the stream
        self.dead = DeadLetters(self.js, self.rc)
        await self.dead.setup()
        self.ownership = Ownership(self.js, self.rc.owners_bucket, self.relay_id,
                                   self.rc.partitions, self.rc.lease_ttl_s,
                                   self._take, self._drop)
        await self.ownership.setup()
        self.queue = RelayQueue(self.dead, fetch_batch=self.rc.fetch_batch,
                                max_pending=self.rc.max_pending,
                                partitions=self.rc.partitions, holds=self.ownership.holds)
        for cfg in self.config.sinks:
            comp = self.registry.get("sink", cfg.type)
            ctx = ComponentContext(site=self.config.site, state_dir=self.config.state_dir,
                                   metrics=self.metrics)
            sink = comp.factory(cfg, ctx)
            await sink.start()
            self.sinks[cfg.id] = sink
            fwd = Forwarder(sink, _sink_config(cfg), self.queue, self.metrics)
            self.forwarders[cfg.id] = fwd
            self._tasks.append(asyncio.create_task(fwd.run(), name=f"relay-forward-{cfg.id}"))
        self._tasks.append(asyncio.create_task(self.ownership.run(), name="relay-ownership"))
        self._tasks.append(asyncio.create_task(self._scan_parked(), name="relay-parked"))
        self._tasks.append(asyncio.create_task(self._log_status(), name="relay-status"))
        self.started = True
        log_event(log, logging.INFO, "relay started", relay=self.relay_id,
                  api=self.api.url if self.api else None,
                  stream=self.rc.stream, partitions=self.rc.partitions,
                  sinks=",".join(self.sinks))

    async def _reach_stream(self) -> None:
        """Connect and find the stream, waiting (backoff up to 30 s, one log line per
        change of reason or per minute) while NATS is unreachable or the stream does not
        exist yet: relays may be deployed before the cluster or the stream. Refused
        credentials or TLS (``NatsConnectError`` auth/tls) and a stream with the wrong
        retention (``FatalStartupError``) are raised: waiting cannot fix them."""
        delay, logged, logged_at = 1.0, "", 0.0
        while not self._stop.is_set():
            try:
                if self.nc is None:
                    self.nc = await connect(self.rc, name=f"edge-relay-{self.relay_id}",
                                            config_dir=self.config_dir)
                    self.js = self.nc.jetstream()
                await self._check_stream()
                return
            except NatsConnectError as err:
                if err.code in ("auth", "tls"):
                    raise
                why = f"NATS not reachable ({err.message})"
            except RetryableStartupError as err:
                why = str(err)
            now = time.monotonic()
            if why != logged or now - logged_at >= 60.0:
                log_event(log, logging.WARNING, why + "; the relay waits and tries again",
                          relay=self.relay_id, retry_in_s=delay)
                logged, logged_at = why, now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            delay = min(delay * 2, 30.0)

    async def _check_stream(self) -> None:
        from nats.js.errors import NotFoundError

        try:
            info = await self.js.stream_info(self.rc.stream)
        except NotFoundError:
            raise RetryableStartupError(
                f"JetStream stream {self.rc.stream!r} does not exist: create it (README "
                "'Scaling out') or let a gateway's nats sink create it") from None
        retention = str(getattr(info.config.retention, "value", info.config.retention))
        if retention != "limits":
            raise FatalStartupError(
                f"stream {self.rc.stream!r} has {retention} retention; the relay needs "
                "limits retention (it re-reads a partition from its ack floor on takeover)")

    async def close(self) -> None:
        if self.ownership is not None:
            self.ownership.stop()
        for fwd in self.forwarders.values():
            fwd.stop()
        # ownership gives the partitions back first (leased events recorded), then the
        # forwarders finish
        for task in self._tasks:
            if task.get_name() in ("relay-parked", "relay-status"):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sink in self.sinks.values():
            with contextlib.suppress(Exception):
                await sink.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.api is not None:
            await self.api.close()
        log_event(log, logging.INFO, "relay stopped", relay=self.relay_id)

    # ------------------------------------------------------------------ partitions

    def consumer_base(self, sink: str, partition: int) -> str:
        return f"{self.rc.consumer_prefix}-{sink}-p{partition}"

    async def _previous_consumers(self) -> dict[str, Any]:
        """Every consumer of the stream, by name (read once per takeover)."""
        out: dict[str, Any] = {}
        offset = 0
        while True:
            page = await self.js.consumers_info(self.rc.stream, offset=offset)
            for info in page:
                out[info.name] = info
            if len(page) < 256:
                return out
            offset += len(page)

    async def _take(self, partition: int) -> None:
        """Create the partition's consumer of every sink at the previous owners' ack floor
        + 1 and feed the queue from it.

        Each owner gets a consumer of its own, named after its lease's revision
        (``<prefix>-<sink>-p<N>-e<revision>``): the consumers of earlier owners are read
        (floor, how far they got) and deleted, so a previous owner that is still alive (a
        frozen process waking up) fetches from a consumer that no longer exists and can
        never take events from this one."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        assert self.queue is not None and self.dead is not None
        assert self.ownership is not None
        epoch = self.ownership.owned[partition]
        parked = [p for p in await self.dead.all_states()
                  if partition_of(p.key, "", self.rc.partitions) == partition]
        existing = await self._previous_consumers()
        for sink in self.sinks:
            base = self.consumer_base(sink, partition)
            name = f"{base}-e{epoch}"
            floor = delivered = 0
            for old, info in existing.items():
                if old != base and not old.startswith(base + "-e"):
                    continue
                floor = max(floor, int(info.ack_floor.stream_seq or 0))
                delivered = max(delivered, int(info.delivered.stream_seq or 0))
                try:
                    await self.js.delete_consumer(self.rc.stream, old)
                except NotFoundError:
                    pass
            self.consumers[(sink, partition)] = name
            cfg = ConsumerConfig(
                durable_name=name,
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=partition_filter(self.rc.filter, partition),
                ack_wait=self.rc.ack_wait_s,
                max_ack_pending=max(self.rc.max_pending * 2, 1000),
                max_deliver=-1,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=floor + 1,
            )
            await self.js.add_consumer(self.rc.stream, cfg)
            sub = await self.js.pull_subscribe_bind(name, stream=self.rc.stream)
            self.queue.note_parked(sink, [p.key for p in parked if p.sink == sink])
            self.queue.attach(sink, partition, sub, recheck_until=delivered)
            log_event(log, logging.INFO, "partition consumer started", relay=self.relay_id,
                      sink=sink, partition=partition, from_seq=floor + 1)

    async def _drop(self, partition: int, graceful: bool) -> None:
        assert self.queue is not None
        drain = max(1.0, min(10.0, self.rc.lease_ttl_s / 4)) if graceful else 0.0
        for sink in self.sinks:
            await self.queue.detach(sink, partition, drain_s=drain)

    # ------------------------------------------------------------------ background

    async def _scan_parked(self) -> None:
        """Carry out operators' replay/discard decisions for keys of owned partitions."""
        assert self.queue is not None and self.dead is not None
        assert self.ownership is not None
        while True:
            await asyncio.sleep(SCAN_S)
            try:
                for park in await self.dead.all_states():
                    partition = partition_of(park.key, "", self.rc.partitions)
                    feed = self.queue.feeds.get(park.sink, {}).get(partition)
                    if feed is None or not self.ownership.holds(partition):
                        continue
                    if park.state == "parked":
                        self.queue.note_parked(park.sink, [park.key])
                    else:
                        await self.queue.operate(feed, park)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - NATS away: next scan
                log_event(log, logging.WARNING, "could not read parked keys",
                          error=repr(err))

    async def _log_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_LOG_S)
            log_event(log, logging.INFO, "relay status", **self.status_fields())

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` answers."""
        own, q = self.ownership, self.queue
        return {
            "relay": self.relay_id,
            "stream": self.rc.stream,
            "partitions": self.rc.partitions,
            "members": own.members if own else 0,
            "owned": sorted(own.owned) if own else [],
            "nats_connected": bool(self.nc is not None and self.nc.is_connected),
            "fetched": q.fetched if q else 0,  # messages taken from the consumers
            "acknowledged": q.acked if q else 0,  # delivered or stored as dead letters
            "sinks": {sid: {**fwd.status(), "held": q.held(sid) if q else 0}
                      for sid, fwd in self.forwarders.items()},
        }

    def status_fields(self) -> dict[str, Any]:
        q, own = self.queue, self.ownership
        return {
            "relay": self.relay_id,
            "partitions": ",".join(str(p) for p in sorted(own.owned)) if own else "",
            "members": own.members if own else 0,
            "held": sum(q.held(s) for s in self.sinks) if q else 0,
            "delivered": sum(f.delivered for f in self.forwarders.values()),
        }
