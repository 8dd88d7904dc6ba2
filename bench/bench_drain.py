"""Backlog drain: a pre-filled outbox forwarded by the daemon to a loopback receiver.

Setup per run: a pre-filled outbox (``Outbox.submit``, 1,000 lot keys, classes mixed; filled
once per size and copied for each run), the stand-in ERP (``ErpReceiver(record=False)``)
in its own process, and the gateway as ``python -m edge run -c cfg.yaml`` in its own
process, so the RSS sampled from /proc is the daemon's alone.

Figures:
  drain events/s  events accepted by the receiver ÷ time from its first to its last event
  peak RSS        max of VmRSS sampled every 100 ms and the kernel's VmHWM of the daemon
Same-run baselines: the receiver's own capacity, measured with a minimal raw HTTP/1.1
client (no httpx) posting the same request shape (a batch of N events, or one event per
request) over 8 keep-alive connections. "Per-event POSTs are limited only by the
receiver": that capacity is the per-event baseline.

Run:  python -m bench.bench_drain [--events 100000] [--batch-max 100,500]
      python -m bench.bench_drain --events 100000,300000,1000000   # RSS flatness, full
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Daemon,
    ReceiverProcess,
    RssSampler,
    cpu_seconds,
    db_summary,
    gateway_yaml,
    httpx_capacity,
    machine_line,
    mib,
    prefilled_copy,
    receiver_capacity,
    work_dir,
    workload_event,
)
from edge.outbox.schema import SCHEMA_VERSION


@dataclass
class DrainResult:
    events: int
    max_batch: int
    accepted: int
    seconds: float
    peak_rss_kib: int
    hwm_kib: int
    rss_marks: tuple[int, int, int]  # KiB at 10 %, 50 %, 90 % of the drain
    cpu_s: float
    problems: int
    ready_s: float

    @property
    def eps(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def drain_once(root: Path, cache: Path, receiver: ReceiverProcess, n: int, max_batch: int,
               *, lease_batch: int, timeout_s: float) -> DrainResult:
    run = root / f"run-{n}-{max_batch}"
    shutil.rmtree(run, ignore_errors=True)
    prefilled_copy(cache, n, run / "state", log=lambda s: print(s, flush=True))
    cfg = run / "gateway.yaml"
    cfg.write_text(gateway_yaml(run / "state", receiver.url, max_batch=max_batch,
                                lease_batch=lease_batch))
    time.sleep(0.2)  # let the receiver's counters settle
    base = receiver.accepted
    receiver.reset_first()
    daemon = Daemon(cfg).start()
    sampler = RssSampler(daemon.pid).start()
    try:
        ready = daemon.wait_line(r"gateway started", 60)
        if ready is None:
            raise RuntimeError(f"the daemon did not start:\n{daemon.tail()}")
        first = receiver.wait_first(60)
        if first is None:
            raise RuntimeError(f"nothing arrived at the receiver:\n{daemon.tail()}")
        done = receiver.wait_accepted(base + n, timeout_s)
        end = time.monotonic()
        cpu = cpu_seconds(daemon.pid)
        time.sleep(0.3)  # late duplicates would show here
    finally:
        sampler.stop()
        daemon.stop()
    accepted = receiver.accepted - base
    problems = sum(1 for _, line in daemon.lines if re.search(r" (WARNING|ERROR) ", line))
    if not done:
        print(f"  !! timeout after {timeout_s:.0f} s: {accepted:,} of {n:,} arrived")
    marks = tuple(sampler.at_fraction(first, end, f) for f in (0.1, 0.5, 0.9))
    shutil.rmtree(run, ignore_errors=True)
    return DrainResult(n, max_batch, accepted, end - first, sampler.peak_kib, sampler.hwm_kib,
                       marks, cpu, problems, ready - daemon.started_at)  # type: ignore[arg-type]


def storage_only_drain(root: Path, cache: Path, n: int, *, lease: int, max_rows: int,
                       max_s: float = 60.0) -> float:
    """events/s of the outbox's own drain SQL alone on a copy of the same backlog.

    ``scan_lease`` + ``apply_resolutions`` (every row delivered) + COMMIT with
    synchronous=FULL, and the deferred delete (``sweep_delivered``) every ``SWEEP_ROWS``
    deliveries, in one thread: no HTTP, no asyncio, no forwarder. The ceiling the
    outbox's storage work sets on this disk, for up to ``max_rows`` rows or ``max_s``.
    """
    from edge.outbox import queries
    from edge.outbox.dbthread import connect
    from edge.outbox.lease import scan_lease
    from edge.outbox.store import Resolution

    run = root / f"storage-{n}"
    shutil.rmtree(run, ignore_errors=True)
    prefilled_copy(cache, n, run, log=lambda s: print(s, flush=True))
    conn = connect(str(run / "outbox.db"), synchronous="FULL")
    queries.set_wal_limits(conn, 64 << 20)  # as the daemon sets it for budgets >= 640 MB
    done = unswept = 0
    started = time.perf_counter()
    try:
        while done < max_rows and time.perf_counter() - started < max_s:
            rows = scan_lease(conn, "erp", lease, live_limit=int(lease * 0.2), now=time.time())
            if not rows:
                break
            conn.execute("BEGIN IMMEDIATE")
            queries.apply_resolutions(
                conn, "erp", [Resolution(r.seq, r.event_id, "delivered", 200) for r in rows])
            conn.execute("COMMIT")
            done += len(rows)
            unswept += len(rows)
            if unswept >= queries.SWEEP_ROWS:  # the deferred delete, as the daemon runs it
                conn.execute("BEGIN IMMEDIATE")
                queries.sweep_delivered(conn)
                conn.execute("COMMIT")
                unswept = 0
        took = time.perf_counter() - started
    finally:
        conn.close()
        shutil.rmtree(run, ignore_errors=True)
    return done / took


def idle_rss(root: Path, receiver: ReceiverProcess, seconds: float = 3.0) -> int:
    """RSS (KiB) of the same daemon with an empty outbox: the RSS baseline of this run."""
    run = root / "idle"
    shutil.rmtree(run, ignore_errors=True)
    cfg = run / "gateway.yaml"
    run.mkdir(parents=True)
    cfg.write_text(gateway_yaml(run / "state", receiver.url, max_batch=100))
    daemon = Daemon(cfg).start()
    sampler = RssSampler(daemon.pid).start()
    try:
        if daemon.wait_line(r"gateway started", 60) is None:
            raise RuntimeError(f"the daemon did not start:\n{daemon.tail()}")
        time.sleep(seconds)
    finally:
        sampler.stop()
        daemon.stop()
    shutil.rmtree(run, ignore_errors=True)
    return sampler.peak_kib


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_drain", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", default="100000",
                   help="backlog sizes, comma separated (e.g. 100000,300000,1000000)")
    p.add_argument("--batch-max", default="100,500", help="batched route sizes to run")
    p.add_argument("--per-event-events", type=int, default=0,
                   help="backlog for a per-event (max_batch=1) run; 0 skips it (the per-event "
                   "figure and its bare-client baselines: bench.bench_http_clients)")
    p.add_argument("--lease-batch", type=int, default=500, help="sink lease_batch")
    p.add_argument("--dir", help="scratch folder on the disk under test (default: temp dir)")
    p.add_argument("--cache", help="folder for the pre-filled outbox files (reused if present)")
    p.add_argument("--timeout", type=float, default=1800, help="max seconds per drain")
    args = p.parse_args(argv)

    sizes = [int(x) for x in args.events.split(",") if x]
    batches = [int(x) for x in args.batch_max.split(",") if x]
    root = work_dir(args.dir, "drain")
    cache = Path(args.cache) if args.cache else root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line()}")
    print(f"scratch: {root}  (pre-filled outbox cache: {cache})")

    receiver = ReceiverProcess().start()
    results: list[DrainResult] = []
    try:
        rng = random.Random(5)
        bodies = [workload_event(i, rng).to_json() for i in range(2000)]
        capacity: dict[int, float] = {}
        capacity_req: dict[int, float] = {}
        for bm in sorted({*batches, 1} if args.per_event_events else set(batches)):
            reqs = [b"[" + b",".join(bodies[i : i + bm]) + b"]" if bm > 1 else bodies[i]
                    for i in range(0, len(bodies) - bm + 1, max(1, bm // 2))]
            capacity_req[bm], capacity[bm] = receiver_capacity(receiver.port, reqs, bm)
        print("receiver capacity (raw HTTP/1.1 client, 8 connections, same run):")
        for bm in sorted(capacity):
            print(f"  batch {bm:>4}: {capacity_req[bm]:>8,.0f} req/s  {capacity[bm]:>9,.0f} events/s")
        if args.per_event_events:
            hx_req, _ = httpx_capacity(receiver.url, bodies, 1)
            print(f"bare httpx.AsyncClient, 8 concurrent per-event POSTs (client floor): "
                  f"{hx_req:,.0f} req/s")

        storage: dict[int, float] = {}
        for n in sizes:
            storage[n] = storage_only_drain(root, cache, n, lease=args.lease_batch,
                                            max_rows=min(n, 100_000))
            print(f"storage-only drain SQL, backlog {n:,} (first {min(n, 100_000):,} rows): "
                  f"{storage[n]:,.0f} events/s", flush=True)
        idle_kib = idle_rss(root, receiver)
        print(f"idle daemon, empty outbox (RSS baseline): {mib(idle_kib):.1f} MiB")
        for n in sizes:
            for bm in batches:
                print(f"drain {n:,} events, max_batch {bm} ...", flush=True)
                r = drain_once(root, cache, receiver, n, bm, lease_batch=args.lease_batch,
                               timeout_s=args.timeout)
                results.append(r)
                print(f"  {r.eps:,.0f} events/s, peak RSS {mib(r.peak_rss_kib):.1f} MiB", flush=True)
        if args.per_event_events:
            n = args.per_event_events
            print(f"drain {n:,} events, per-event POSTs ...", flush=True)
            r = drain_once(root, cache, receiver, n, 1, lease_batch=args.lease_batch,
                           timeout_s=args.timeout)
            results.append(r)
            print(f"  {r.eps:,.0f} events/s, peak RSS {mib(r.peak_rss_kib):.1f} MiB", flush=True)
    finally:
        receiver.stop()

    for n in sorted({r.events for r in results}):
        s = db_summary(next(cache.glob(f"outbox-{n}-*-v{SCHEMA_VERSION}.db")))
        print(f"backlog {n:,}: file {s['file_mb']:.0f} MiB, mean body {s['avg_body']:.0f} B, "
              f"{s['keys']} keys, classes {s['classes']}")
    print()
    print(f"{'backlog':>9} {'route':>10} {'events/s':>9} {'receiver cap.':>14} {'ratio':>6} "
          f"{'storage only':>12} "
          f"{'target':>8} {'peak RSS':>9} {'VmHWM':>7} {'RSS 10/50/90 %':>15} {'CPU s':>6} "
          f"{'ready s':>7} {'dup':>4} {'warn':>4}")
    for r in results:
        cap = capacity[r.max_batch]
        route = "per-event" if r.max_batch == 1 else f"batch {r.max_batch}"
        target = ">=0.8 cap" if r.max_batch == 1 else ">=20,000"
        marks = "/".join(f"{mib(k):.0f}" for k in r.rss_marks)
        sto = f"{storage[r.events]:,.0f}" if r.events in storage else "-"
        print(f"{r.events:>9,} {route:>10} {r.eps:>9,.0f} {cap:>14,.0f} {r.eps / cap:>6.2f} "
              f"{sto:>12} "
              f"{target:>8} {mib(r.peak_rss_kib):>8.1f}M {mib(r.hwm_kib):>6.1f}M {marks:>15} "
              f"{r.cpu_s:>6.1f} {r.ready_s:>7.2f} {r.accepted - r.events:>4} {r.problems:>4}")
    print(f"RSS baseline: the same daemon idle with an empty outbox: {mib(idle_kib):.1f} MiB")
    if args.per_event_events:
        print(f"per-event: the bare httpx client alone reached {hx_req:,.0f} req/s in this run "
              f"(gateway per-event drain = {results[-1].eps / hx_req:.2f} x that)")
    _record(results, storage, capacity, idle_kib, cache)
    print("storage only = the outbox's lease + delivered-bookkeeping SQL alone on the same "
          "backlog (no HTTP): the ceiling its storage work sets on this disk")
    print("\nratio = drain events/s ÷ the receiver's own capacity for that request shape; "
          "dup = events the receiver got more than once; warn = WARNING/ERROR log lines")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


def _record(results: list[DrainResult], storage: dict[int, float], capacity: dict[int, float],
            idle_kib: int, cache: Path) -> None:
    """The figures of this run for BENCHMARKS.md (``bench.results``)."""
    from bench.results import record

    for n, eps in storage.items():
        record("drain", figure=f"storage-only drain SQL (lease + delivered + sweep), {n:,} backlog",
               value=round(eps), unit="ev/s", target=None, met=None,
               note="no HTTP, no asyncio: the ceiling the outbox's own SQL sets on this disk")
    for r in results:
        route = "per-event" if r.max_batch == 1 else f"batch_max {r.max_batch}"
        if r.max_batch == 1:
            record("drain", figure=f"backlog drain, {route}, {r.events:,} backlog",
                   value=round(r.eps), unit="ev/s",
                   baseline="receiver capacity, raw HTTP/1.1 client",
                   baseline_value=round(capacity[1]), target=None, met=None,
                   note="the per-event target is measured in bench_http_clients")
            continue
        record("drain", figure=f"backlog drain, batched ({route}), {r.events:,} backlog",
               value=round(r.eps), unit="ev/s",
               baseline="storage-only drain SQL, same backlog",
               baseline_value=round(storage.get(r.events, 0)) or None,
               target=">= 20,000 ev/s", met=r.eps >= 20_000,
               note=f"receiver capacity {capacity[r.max_batch]:,.0f} ev/s; daemon CPU "
                    f"{r.cpu_s:.1f} s; duplicates {r.accepted - r.events}; warnings {r.problems}")
        record("drain", figure=f"peak RSS (VmHWM) draining {r.events:,} ({route})",
               value=round(mib(r.hwm_kib), 1), unit="MiB",
               baseline="the same daemon idle, empty outbox", baseline_value=round(mib(idle_kib), 1),
               target="< 100 MiB", met=mib(r.hwm_kib) < 100)
    for n in sorted({r.events for r in results}):
        path = next(cache.glob(f"outbox-{n}-*-v{SCHEMA_VERSION}.db"))
        s = db_summary(path)
        per_event = path.stat().st_size / n
        record("drain", figure=f"outbox bytes per queued event ({n:,} queued)",
               value=round(per_event), unit="B", baseline="the stored envelope (mean body)",
               baseline_value=round(s["avg_body"]), target="<= 2 x the envelope",
               met=per_event <= 2 * s["avg_body"])


if __name__ == "__main__":
    main()
