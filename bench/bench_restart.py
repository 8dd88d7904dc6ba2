"""Start-to-ready after ``kill -9`` with a large backlog queued (target: < 2 s at 1M).

Steps: a pre-filled outbox (copied from a cache, see bench.common.prefilled_copy); the
daemon starts with its sink pointing at a closed loopback port (nothing drains, the
forwarder leases, fails and records retries), is SIGKILLed after the background integrity
check is done and ``--settle`` seconds more, then restarted and timed — ``--rounds``
times per page-cache state, each after a kill -9.

Figures per start:
  exec -> /readyz 200     ready: the cheap start-up check passed, the outbox is open
  exec -> check done      the background ``PRAGMA quick_check`` passed (the gateway took
                          events meanwhile)
Same-run baselines:
  quick_check alone       ``PRAGMA quick_check`` on the same file, state as left by kill -9
                          (what the start waited for before the check moved to the
                          background)
  process floor           ``python -m edge check-config`` exec→exit: interpreter, imports and
                          config validation, which every start pays before opening the outbox
Page cache: warm (a crash-restart under systemd) and cold (close to a reboot): as root,
``echo 3 > /proc/sys/vm/drop_caches`` before each timed step (the interpreter's own files
are evicted too); otherwise posix_fadvise(DONTNEED) on the outbox files only.

WAL growth during the check: the check reads one snapshot, so checkpoints cannot fold the
WAL past it until it ends. Measured here as WAL bytes per event committed (10 events per
transaction, what the 10 ms group-commit window gathers at 1,000 events/s) while a reader
holds a snapshot; the WAL a check lets grow is that × intake rate × the check's duration,
against the 64 MiB at which the WAL is folded back when no reader holds it.

Intake beside the check: ``Outbox.submit`` on the backlog's file while checks run back to
back, against the same intake without one (the check must not starve intake).

Run:  python -m bench.bench_restart [--events 1000000] [--rounds 3]   (--quick: 20k, 1 round)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench.common import (
    PY,
    REPO,
    Daemon,
    db_summary,
    free_port,
    gateway_yaml,
    machine_line,
    prefilled_copy,
    work_dir,
)
from bench.results import record
from edge.outbox.integrity import quick_check

TARGET_S = 2.0
WAL_LIMIT_MB = 64  # edge.outbox.store: the WAL is checkpointed and truncated at 64 MiB


def drop_caches(state: Path) -> str:
    """Empty the page cache: all of it as root, else the outbox files (clean pages only).
    Returns which was done."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    evict(state)
    return "fadvise"


def evict(state: Path) -> None:
    """Drop the outbox files from the page cache (no root needed: clean pages only)."""
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        path = state / name
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def readyz_poller(port: int, started: float, box: list[float], stop: threading.Event) -> None:
    """Poll GET /readyz every 5 ms; put the monotonic time of the first 200 in ``box``."""
    req = f"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(req)
                head = s.recv(64)
                if head.startswith(b"HTTP/1.1 200"):
                    box.append(time.monotonic())
                    return
        except OSError:
            pass
        stop.wait(0.005)


def start_until_ready(cfg: Path, api_port: int | None, timeout: float = 60
                      ) -> tuple[Daemon, float, float | None]:
    """(daemon, seconds to the 'gateway started' line, seconds to /readyz 200 or None)."""
    box: list[float] = []
    stop = threading.Event()
    daemon = Daemon(cfg).start()
    poller = None
    if api_port:
        poller = threading.Thread(target=readyz_poller,
                                  args=(api_port, daemon.started_at, box, stop), daemon=True)
        poller.start()
    line_at = daemon.wait_line(r"gateway started", timeout)
    if line_at is None:
        stop.set()
        daemon.kill9()
        raise RuntimeError(f"the daemon did not start:\n{daemon.tail()}")
    if poller is not None:
        poller.join(timeout)
        stop.set()
    readyz = box[0] - daemon.started_at if box else None
    return daemon, line_at - daemon.started_at, readyz


def check_done(daemon: Daemon, timeout: float = 900) -> float | None:
    """Seconds from exec to the background integrity check's verdict line."""
    at = daemon.wait_line(r"outbox integrity check (passed|could not run)|found by the "
                          r"background integrity check", timeout)
    return at - daemon.started_at if at is not None else None


def process_floor(cfg: Path) -> float:
    started = time.monotonic()
    subprocess.run([PY, "-m", "edge", "check-config", str(cfg)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def timed_quick_check(db: Path) -> float:
    started = time.monotonic()
    problem = quick_check(str(db))
    took = time.monotonic() - started
    if problem is not None:
        raise RuntimeError(f"quick_check failed: {problem}")
    return took


def wal_bytes_per_event(root: Path, events: int = 3_000, per_commit: int = 10) -> float:
    """WAL bytes per committed event while a reader holds a snapshot (what the running
    check does). ``per_commit`` events per transaction: about what the 10 ms group-commit
    window gathers at 1,000 events/s."""
    from bench.common import workload
    from edge.components import Submission
    from edge.config import OutboxConfig
    from edge.outbox import Outbox

    evs = workload(events)
    state = root / "wal-held"

    async def fill() -> float:
        shutil.rmtree(state, ignore_errors=True)
        async with Outbox(state, OutboxConfig(max_size_mb=100_000),
                          router=lambda ev: ["erp"]) as ob:
            await ob.submit([Submission(e) for e in evs[:per_commit]])
            wal = state / "outbox.db-wal"
            reader = sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True,
                                     isolation_level=None)
            try:
                reader.execute("BEGIN")  # one read transaction, as PRAGMA quick_check holds
                reader.execute("SELECT count(*) FROM meta").fetchone()
                before = wal.stat().st_size
                for i in range(per_commit, events, per_commit):
                    await ob.submit([Submission(e) for e in evs[i:i + per_commit]])
                grown = wal.stat().st_size - before
            finally:
                reader.close()
        shutil.rmtree(state, ignore_errors=True)
        return max(0, grown) / (events - per_commit)

    return asyncio.run(fill())


def intake_beside_check(state: Path, seconds: float = 3.0) -> tuple[float, float, int]:
    """(events/s committed while background checks run back to back, events/s without,
    checks completed): ``Outbox.submit`` of 10-event batches from 4 producers for
    ``seconds`` each, on the backlog's own file (warm cache)."""
    import random

    from bench.common import workload_event
    from edge.components import Submission
    from edge.config import OutboxConfig
    from edge.outbox import Outbox
    from edge.outbox.integrity import BackgroundCheck

    rng = random.Random(7)

    async def rate(with_check: bool) -> tuple[float, int]:
        done = 0
        checks = 0
        stop = threading.Event()

        def checker() -> None:
            nonlocal checks
            while not stop.is_set():
                check = BackgroundCheck(str(state / "outbox.db"))
                check.start()
                while not check.join(0.1):
                    if stop.is_set():
                        check.stop()
                check.join()
                checks += check.state == "passed"

        async with Outbox(state, OutboxConfig(max_size_mb=100_000),
                          router=lambda ev: ["erp"]) as ob:
            thread = threading.Thread(target=checker, daemon=True) if with_check else None
            if thread is not None:
                thread.start()
            deadline = time.monotonic() + seconds

            async def producer(k: int) -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    batch = [Submission(workload_event(done + j, rng)) for j in range(10)]
                    await ob.submit(batch)
                    done += len(batch)

            started = time.monotonic()
            await asyncio.gather(*(producer(k) for k in range(4)))
            took = time.monotonic() - started
            stop.set()
            if thread is not None:
                await asyncio.to_thread(thread.join)
        return done / took, checks

    beside, checks = asyncio.run(rate(True))
    alone, _ = asyncio.run(rate(False))
    return beside, alone, checks


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} (max {max(values):.2f})"


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_restart", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="queued events")
    p.add_argument("--rounds", type=int, default=3, help="kill -9 / restart rounds per cache state")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds the daemon runs after its check (leasing, failing, "
                   "recording retries) before kill")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k events, 1 round, "
                   "1 s settle")
    p.add_argument("--intake", type=float, default=1000.0,
                   help="intake rate (events/s) the WAL growth figure is given for")
    p.add_argument("--dir", help="scratch folder on the disk under test (default: temp dir)")
    p.add_argument("--cache", help="folder for the pre-filled outbox files (reused if present)")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.settle = min(args.events, 20_000), 1, 1.0

    root = work_dir(args.dir, "restart")
    cache = Path(args.cache) if args.cache else root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    shutil.rmtree(state, ignore_errors=True)
    print(f"machine: {machine_line()}")
    print(f"scratch: {root}  (pre-filled outbox cache: {cache})")
    prefilled_copy(cache, args.events, state, log=lambda s: print(s, flush=True))
    db = state / "outbox.db"
    s = db_summary(db)
    print(f"backlog: {s['events']:,} events, file {s['file_mb']:.0f} MiB")

    api_port = free_port() if importlib.util.find_spec("edge.api.server") else None
    closed_port = free_port()  # nothing listens there: the sink fails, nothing drains
    cfg = root / "gateway.yaml"
    cfg.write_text(gateway_yaml(state, f"http://127.0.0.1:{closed_port}", max_batch=100,
                                api=f"127.0.0.1:{api_port}" if api_port else None))
    print(f"readiness: {'GET /readyz and ' if api_port else ''}the 'gateway started' log line")

    # first start on the cleanly closed file, then let it lease and fail, then kill -9
    daemon, first_line, _ = start_until_ready(cfg, api_port)
    check_done(daemon)
    time.sleep(args.settle)
    daemon.kill9()
    print(f"first start (clean file): {first_line:.2f} s; killed with SIGKILL after its "
          f"check and {args.settle:.0f} s")

    cold_how = ""
    results: dict[str, dict[str, list[float]]] = {}
    for cache_state in ("warm", "cold"):
        r = results[cache_state] = {"line": [], "readyz": [], "check": [], "quick_check": [],
                                    "floor": []}
        for _ in range(args.rounds):
            wal = (state / "outbox.db-wal")
            wal_mb = wal.stat().st_size / 2**20 if wal.exists() else 0.0
            if cache_state == "cold":
                cold_how = drop_caches(state)
            daemon, line_s, readyz_s = start_until_ready(cfg, api_port)
            r["line"].append(line_s)
            if readyz_s is not None:
                r["readyz"].append(readyz_s)
            check_s = check_done(daemon)
            if check_s is not None:
                r["check"].append(check_s)
            time.sleep(args.settle)
            daemon.kill9()
            if cache_state == "cold":
                drop_caches(state)
            r["quick_check"].append(timed_quick_check(db))
            if cache_state == "cold":
                drop_caches(state)
            r["floor"].append(process_floor(cfg))
            print(f"  {cache_state}: ready {line_s:.2f} s"
                  + (f", /readyz {readyz_s:.2f} s" if readyz_s is not None else "")
                  + (f", check done {check_s:.2f} s" if check_s is not None else "")
                  + f" (WAL at kill {wal_mb:.1f} MiB); quick_check alone "
                  f"{r['quick_check'][-1]:.2f} s; process floor {r['floor'][-1]:.2f} s",
                  flush=True)

    print()
    print(f"{'page cache':<11}{'exec->ready s':>20}{'exec->/readyz s':>20}"
          f"{'exec->check done s':>21}{'quick_check alone s':>21}{'process floor s':>20}"
          f"{'target':>8}")
    for cache_state, r in results.items():
        print(f"{cache_state:<11}{fmt(r['line']):>20}{fmt(r['readyz']):>20}"
              f"{fmt(r['check']):>21}{fmt(r['quick_check']):>21}{fmt(r['floor']):>20}"
              f"{'< 2 s':>8}")
    print(f"\n{args.events:,} events queued, {args.rounds} rounds each; medians (max); cold "
          f"cache by {cold_how}")

    held = wal_bytes_per_event(root)
    check_cold = median(results["cold"]["check"]) or median(results["cold"]["quick_check"])
    growth_mb = held * args.intake * (check_cold or 0) / 2**20
    print(f"WAL growth while a check holds its snapshot: {held:,.0f} bytes/event committed; "
          f"at {args.intake:,.0f} events/s until the cold check is done ({check_cold or 0:.1f} s "
          f"after exec): {growth_mb:.1f} MiB (without a reader the WAL is folded back at its "
          f"limit, {WAL_LIMIT_MB} MiB by default)")

    beside, alone, checks = intake_beside_check(state)
    print(f"intake while the check runs: {beside:,.0f} events/s committed ({checks} full "
          f"checks done meanwhile); without it: {alone:,.0f} events/s")

    label = f"{args.events:,} queued"
    record("restart", figure=f"intake committed while background checks of {label} run",
           value=round(beside), unit="ev/s", baseline="same intake without a check",
           baseline_value=round(alone), met=None,
           note=f"Outbox.submit, 10 events per call from 4 producers; {checks} checks done")
    for cache_state, r in results.items():
        ready = r["readyz"] or r["line"]
        value = median(ready)
        how = f", {cold_how}" if cache_state == "cold" else ""
        record("restart", figure=f"kill -9 → /readyz 200, {label}, {cache_state} cache{how}",
               value=value, unit="s", baseline="process floor (check-config exec→exit)",
               baseline_value=median(r["floor"]), target="< 2 s",
               met=value is not None and value < TARGET_S, rounds=args.rounds,
               max=round(max(ready), 3) if ready else None)
        record("restart", figure=f"kill -9 → background check done, {label}, "
               f"{cache_state} cache{how}", value=median(r["check"]), unit="s",
               baseline="process floor + quick_check alone (what the start waited for "
               "before the check moved to the background)",
               baseline_value=round((median(r["floor"]) or 0) + (median(r["quick_check"]) or 0),
                                    3),
               met=None, note="the gateway is ready and takes events meanwhile; "
               f"quick_check alone {median(r['quick_check'])} s")
    record("restart", figure=f"WAL grown while the cold check of {label} holds its snapshot, "
           f"at {args.intake:,.0f} ev/s", value=round(growth_mb, 1), unit="MiB",
           baseline="the WAL's checkpoint limit (without a reader)",
           baseline_value=WAL_LIMIT_MB, met=None,
           note=f"{held:,.0f} bytes per event committed (10 per transaction) × intake rate × "
           "check duration; folded back by the first checkpoint after the check")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
