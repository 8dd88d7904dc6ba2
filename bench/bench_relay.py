"""Relay throughput: a stream of events delivered by ``edge relay`` processes to a loopback
receiver, against same-run baselines.

Setup: the stand-in ERP (``ErpReceiver(record=False)``) in its own process; a fresh
stream on the NATS server under test (default the machine's, 127.0.0.1:4222) filled with
the workload's envelopes (1,000 lot keys, classes mixed) exactly as gateways' nats sinks
publish them (partition subjects, ``Nats-Msg-Id``); relays as ``python -m edge relay -c``
processes with one ``http`` sink (POST /events, ``max_batch`` events per request).

Figures:
  relay events/s      events accepted by the receiver ÷ time from the first to the last
                      (one relay process; then two, sharing the partitions)
Same-run baselines:
  gateway drain       the same events from a pre-filled SQLite outbox by ``edge run`` with
                      the same sink and route: the forwarder on the outbox instead of on
                      JetStream partitions
  bare consumer       a nats-py pull consumer fetching and acknowledging the stream with
                      no delivery: what JetStream itself allows one client

Run:  python -m bench.bench_relay [--events 20000] [--batch-max 100] [--partitions 8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import time
import uuid
from pathlib import Path

from bench.common import (
    Daemon,
    ReceiverProcess,
    cpu_seconds,
    gateway_yaml,
    machine_line,
    prefilled_copy,
    work_dir,
    workload_event,
)
from edge.nats.subjects import partition_of, render_subject

SUBJECT = "{prefix}.{site}.p{partition}.{type}"


async def fill_stream(url: str, stream: str, prefix: str, n: int, partitions: int) -> float:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
    rng = random.Random(1)
    started = time.perf_counter()
    pending = []
    for i in range(n):
        ev = workload_event(i, rng)
        p = partition_of(ev.ordering_key, ev.id, partitions)
        subject = render_subject(SUBJECT.replace("{prefix}", prefix),
                                 {"site": "bench", "partition": p, "type": ev.type})
        pending.append(js.publish(subject, ev.to_json(), headers={"Nats-Msg-Id": ev.id}))
        if len(pending) >= 256:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    took = time.perf_counter() - started
    await nc.close()
    return took


async def drop_stream(url: str, *names: str) -> None:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    for name in names:
        try:
            await js.delete_stream(name)
        except Exception:  # noqa: BLE001 - not there
            pass
    await nc.close()


async def bare_consumer(url: str, stream: str, prefix: str, n: int) -> float:
    """events/s of a pull consumer that fetches 200 at a time and acks each, no delivery."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"{prefix}.>", durable=f"bare-{uuid.uuid4().hex[:6]}",
                                  stream=stream)
    got = 0
    started = time.perf_counter()
    while got < n:
        msgs = await sub.fetch(200, timeout=5)
        await asyncio.gather(*(m.ack() for m in msgs))
        got += len(msgs)
    await nc.flush()
    took = time.perf_counter() - started
    await nc.close()
    return got / took


def relay_yaml(url: str, erp: str, stream: str, prefix: str, tag: str, partitions: int,
               relay_id: str, max_batch: int) -> str:
    return (f"site: bench-relay\nstate_dir: state-{relay_id}\nlogging: {{level: info}}\n"
            "relay:\n"
            f"  servers: [\"{url}\"]\n  stream: {stream}\n  partitions: {partitions}\n"
            f"  filter: \"{prefix}.*.p{{partition}}.>\"\n"
            f"  owners_bucket: OWN_{tag}\n  parked_bucket: PARK_{tag}\n"
            f"  dlq_stream: DLQ_{tag}\n  dlq_subject: dlq.{tag}\n"
            f"  relay_id: {relay_id}\n  listen: null\n  lease_ttl_s: 6\n"
            "sinks:\n  - id: erp\n    type: http\n"
            f"    url: {erp}\n    max_in_flight: 4\n    lease_batch: 500\n"
            "    retry: {initial_backoff_s: 0.2, max_backoff_s: 2}\n"
            f"    routes:\n      - {{events: [\"*\"], method: POST, path: /events, "
            f"max_batch: {max_batch}}}\n")


def run_relays(root: Path, receiver: ReceiverProcess, url: str, n: int, relays: int,
               partitions: int, max_batch: int) -> tuple[float, float]:
    """events/s at the receiver and CPU seconds of the relays, for ``relays`` processes."""
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"BENCH_{tag}", f"b{tag}"
    fill_s = asyncio.run(fill_stream(url, stream, prefix, n, partitions))
    print(f"  filled {stream} with {n:,} events in {fill_s:.1f} s", flush=True)
    daemons = []
    base = receiver.accepted
    receiver.reset_first()
    try:
        for r in range(relays):
            cfg = root / f"relay-{tag}-{r}.yaml"
            cfg.write_text(relay_yaml(url, receiver.url, stream, prefix, tag, partitions,
                                      f"r{r}", max_batch))
            daemons.append(Daemon(cfg, verb="relay").start())
        first = receiver.wait_first(60)
        if first is None:
            raise RuntimeError("nothing arrived:\n" + daemons[0].tail())
        ok = receiver.wait_accepted(base + n, 300)
        end = time.monotonic()
        cpu = sum(cpu_seconds(d.pid) for d in daemons)
        if not ok:
            print(f"  !! timeout: {receiver.accepted - base:,} of {n:,}")
    finally:
        for d in daemons:
            d.stop()
        asyncio.run(drop_stream(url, stream, f"DLQ_{tag}", f"KV_OWN_{tag}",
                                f"KV_PARK_{tag}"))
    return min(n, receiver.accepted - base) / (end - first), cpu


def gateway_drain(root: Path, cache: Path, receiver: ReceiverProcess, n: int,
                  max_batch: int) -> float:
    run = root / f"gw-{n}"
    shutil.rmtree(run, ignore_errors=True)
    prefilled_copy(cache, n, run / "state", log=lambda s: print(s, flush=True))
    cfg = run / "gateway.yaml"
    cfg.write_text(gateway_yaml(run / "state", receiver.url, max_batch=max_batch))
    base = receiver.accepted
    receiver.reset_first()
    d = Daemon(cfg).start()
    try:
        first = receiver.wait_first(60)
        if first is None:
            raise RuntimeError("nothing arrived:\n" + d.tail())
        receiver.wait_accepted(base + n, 300)
        end = time.monotonic()
    finally:
        d.stop()
        shutil.rmtree(run, ignore_errors=True)
    return (receiver.accepted - base) / (end - first)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_relay")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--batch-max", type=int, default=100)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--url", default="nats://127.0.0.1:4222")
    p.add_argument("--dir")
    a = p.parse_args()
    root = work_dir(a.dir, "relay")
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    n = a.events
    receiver = ReceiverProcess().start()
    try:
        tag = uuid.uuid4().hex[:8]
        asyncio.run(fill_stream(a.url, f"BARE_{tag}", f"x{tag}", n, a.partitions))
        bare = asyncio.run(bare_consumer(a.url, f"BARE_{tag}", f"x{tag}", n))
        asyncio.run(drop_stream(a.url, f"BARE_{tag}"))
        gw = gateway_drain(root, cache, receiver, n, a.batch_max)
        one, cpu1 = run_relays(root, receiver, a.url, n, 1, a.partitions, a.batch_max)
        two, cpu2 = run_relays(root, receiver, a.url, n, 2, a.partitions, a.batch_max)
    finally:
        receiver.stop()
    print(f"\nrelay throughput, {n:,} events, {a.partitions} partitions, "
          f"max_batch {a.batch_max}")
    print(f"  bare consumer (fetch + ack, no delivery)  {bare:>9,.0f} ev/s")
    print(f"  gateway drain from its outbox (baseline)  {gw:>9,.0f} ev/s")
    print(f"  1 relay process                           {one:>9,.0f} ev/s  "
          f"({one / gw:.2f} x gateway; {cpu1 / n * 1000:.2f} CPU-s per 1,000 events)")
    print(f"  2 relay processes                         {two:>9,.0f} ev/s  "
          f"({two / 2:,.0f} per process; {cpu2 / n * 1000:.2f} CPU-s per 1,000 events)")

    from bench.results import record

    run = f"{n:,} events, {a.partitions} partitions, max_batch {a.batch_max}"
    record("relay", figure="relay delivery, one edge relay process", value=round(one),
           unit="ev/s", baseline="the gateway's own drain of the same events",
           baseline_value=round(gw), note=f"{run}; {cpu1 / n * 1000:.2f} CPU-s per 1,000 "
           f"events; bare consumer (fetch + ack, no delivery) {bare:,.0f} ev/s")
    record("relay", figure="relay delivery, two edge relay processes", value=round(two),
           unit="ev/s", baseline="the gateway's own drain of the same events",
           baseline_value=round(gw), note=f"{run}; {cpu2 / n * 1000:.2f} CPU-s per 1,000 events")


if __name__ == "__main__":
    main()
