"""JetStream publishing: a pre-filled outbox drained by the daemon's ``nats`` sink into a
stream, against bare nats-py publishers of the same bodies in the same run.

Setup per run: a pre-filled outbox (``Outbox.submit``, 1,000 lot keys, classes mixed;
filled once per size and cached), the gateway as ``python -m edge run -c cfg.yaml`` in its
own process with one ``nats`` sink, and a fresh file-storage stream per measurement on
the NATS server under test (default: the machine's, 127.0.0.1:4222), deleted afterwards.

Figures:
  gateway events/s     messages in the stream ÷ time from the first to the last one
                       (polled with stream info every 20 ms)
Same-run baselines (this process, one nats-py connection, the same bodies and headers
incl. Nats-Msg-Id, so the server's dedupe work is the same):
  bare awaited         js.publish awaited one by one (one PubAck round trip each)
  bare pipelined       js.publish with as many in flight as the sink may have
                       (max_in_flight lanes × max_in_flight_requests), no key order

The gateway does more per event than the bare publisher: it leases rows from SQLite,
keeps per-key order (a lot's next event waits for the previous PubAck), and records every
outcome with a synchronous=FULL commit. The ratio to the pipelined publisher is the cost of
those guarantees.

Run:  python -m bench.bench_nats_sink [--events 20000] [--url nats://127.0.0.1:4222]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine_line, prefilled_copy, work_dir, workload_event

SINK = "js"


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10].upper()}"


async def _connect(url: str) -> Any:
    import nats

    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)


async def _add_stream(js: Any, subjects: list[str]) -> str:
    from nats.js.api import StorageType, StreamConfig

    name = _unique("BENCH_")
    await js.add_stream(StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE,
                                     duplicate_window=600))
    return name


async def bare(url: str, bodies: list[tuple[str, bytes, dict[str, str]]],
               concurrency: int) -> float:
    """events/s of a bare nats-py publisher into a fresh stream (concurrency 1: awaited
    one by one)."""
    nc = await _connect(url)
    js = nc.jetstream(timeout=10)
    prefix = _unique("bare")
    name = await _add_stream(js, [prefix + ".>"])
    try:
        items = [(f"{prefix}.{subject}", body, headers) for subject, body, headers in bodies]
        started = time.perf_counter()
        if concurrency == 1:
            for subject, body, headers in items:
                await js.publish(subject, body, stream=name, headers=headers)
        else:
            sem = asyncio.Semaphore(concurrency)

            async def one(subject: str, body: bytes, headers: dict[str, str]) -> None:
                async with sem:
                    await js.publish(subject, body, stream=name, headers=headers)

            async with asyncio.TaskGroup() as tg:
                for item in items:
                    tg.create_task(one(*item))
        took = time.perf_counter() - started
        info = await js.stream_info(name)
        assert info.state.messages == len(items), info.state
        return len(items) / took
    finally:
        await js.delete_stream(name)
        await nc.close()


def _sink_yaml(state: Path, url: str, stream: str, prefix: str, lanes: int,
               requests: int) -> str:
    return (f"site: bench\nstate_dir: {state}\napi: {{enabled: false}}\n"
            "logging: {level: info}\noutbox: {max_size_mb: 100000}\n"
            f"sinks:\n  - id: {SINK}\n    type: nats\n    servers: [\"{url}\"]\n"
            f"    stream: {stream}\n    subject: \"{prefix}.{{site}}.p{{partition}}.{{type}}\"\n"
            f"    max_in_flight: {lanes}\n    max_in_flight_requests: {requests}\n"
            "    lease_batch: 500\n"
            "    retry: {initial_backoff_s: 0.2, max_backoff_s: 2}\n")


async def _watch(url: str, stream: str, n: int, timeout_s: float) -> tuple[float, float, int]:
    """(first, last, count): monotonic times the stream got its first and its n-th message."""
    nc = await _connect(url)
    js = nc.jetstream()
    first = last = 0.0
    count = 0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            count = int((await js.stream_info(stream)).state.messages)
            now = time.monotonic()
            if count and not first:
                first = now
            if count >= n:
                last = now
                break
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    return first, last, count


def gateway(root: Path, cache: Path, url: str, n: int, lanes: int, requests: int,
            timeout_s: float) -> tuple[float, int]:
    """(events/s, messages in the stream) of the daemon's drain of ``n`` events."""
    run = root / f"run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    prefilled_copy(cache, n, run / "state", sink=SINK, log=lambda s: print(s, flush=True))

    async def setup() -> tuple[str, str]:
        nc = await _connect(url)
        try:
            prefix = _unique("gw")
            return prefix, await _add_stream(nc.jetstream(), [prefix + ".>"])
        finally:
            await nc.close()

    async def teardown(stream: str) -> None:
        nc = await _connect(url)
        try:
            await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()

    prefix, stream = asyncio.run(setup())
    cfg = run / "gateway.yaml"
    cfg.write_text(_sink_yaml(run / "state", url, stream, prefix, lanes, requests))
    daemon = Daemon(cfg).start()
    try:
        if daemon.wait_line(r"gateway started", 60) is None:
            raise RuntimeError(f"the daemon did not start:\n{daemon.tail()}")
        first, last, count = asyncio.run(_watch(url, stream, n, timeout_s))
    finally:
        daemon.stop()
        asyncio.run(teardown(stream))
        shutil.rmtree(run, ignore_errors=True)
    if not last:
        print(f"  !! timeout after {timeout_s:.0f} s: {count:,} of {n:,} in the stream\n"
              + daemon.tail())
        return 0.0, count
    return (n / (last - first) if last > first else 0.0), count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_nats_sink", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="backlog drained (and published "
                   "by each baseline)")
    p.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server with JetStream")
    p.add_argument("--lanes", type=int, default=4, help="sink max_in_flight")
    p.add_argument("--requests", type=int, default=32, help="sink max_in_flight_requests")
    p.add_argument("--dir", help="scratch folder on the disk under test (default: temp dir)")
    p.add_argument("--cache", help="folder for the pre-filled outbox files (reused if present)")
    p.add_argument("--timeout", type=float, default=600, help="max seconds for the drain")
    args = p.parse_args(argv)

    root = work_dir(args.dir, "nats-sink")
    cache = Path(args.cache) if args.cache else root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line()}")
    print(f"server: {args.url}  events: {args.events:,}  sink concurrency: {args.lanes} lanes "
          f"× {args.requests} requests")

    from edge.nats.subjects import partition_of

    rng = random.Random(1)
    bodies = []
    for i in range(args.events):
        ev = workload_event(i, rng)
        headers = {"Nats-Msg-Id": ev.id, "X-Correlation-ID": ev.correlation_id or ev.id,
                   "Edge-Event-Type": ev.type}
        if ev.ordering_key:
            headers["Edge-Ordering-Key"] = ev.ordering_key
        part = partition_of(ev.ordering_key, ev.id, 16)
        bodies.append((f"bench.p{part}.{ev.type}", ev.to_json(), headers))

    concurrency = args.lanes * args.requests
    awaited = asyncio.run(bare(args.url, bodies, 1))
    pipelined = asyncio.run(bare(args.url, bodies, concurrency))
    print(f"bare nats-py, js.publish awaited one by one:      {awaited:>9,.0f} events/s")
    print(f"bare nats-py, js.publish {concurrency:>3} in flight:          "
          f"{pipelined:>9,.0f} events/s")
    eps, count = gateway(root, cache, args.url, args.events, args.lanes, args.requests,
                         args.timeout)
    print(f"gateway (edge run, nats sink, outbox drain):      {eps:>9,.0f} events/s "
          f"({count:,} messages in the stream)")
    if awaited and pipelined:
        print(f"ratio gateway / bare awaited:   {eps / awaited:5.2f}")
        print(f"ratio gateway / bare pipelined: {eps / pipelined:5.2f}")

    from bench.results import record

    run = f"{args.events:,} events, {args.lanes} lanes × {args.requests} requests"
    record("nats_sink", figure="JetStream publishing through the nats sink (outbox drain)",
           value=round(eps), unit="ev/s", baseline="bare js.publish, awaited one by one",
           baseline_value=round(awaited), note=f"{run}; {count:,} messages in the stream")
    record("nats_sink", figure="same, against pipelined bare publishers",
           value=round(eps), unit="ev/s",
           baseline=f"bare js.publish, {concurrency} in flight, no order",
           baseline_value=round(pipelined), note=run)
    shutil.rmtree(root, ignore_errors=True) if not args.dir else None


if __name__ == "__main__":
    main()
