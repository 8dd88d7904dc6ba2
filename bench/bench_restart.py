"""Start-to-ready after ``kill -9`` with a large backlog queued (target: < 2 s at 1M).

Steps: a pre-filled outbox (copied from a cache, see bench.common.prefilled_copy); the
daemon starts with its sink pointing at a closed loopback port (nothing drains, the
forwarder leases, fails and records retries), is SIGKILLed after ``--settle`` seconds,
then restarted and timed from exec to ready — ``--rounds`` times, each after a kill -9.

Ready = ``GET /readyz`` answers 200 when the local API exists (edge/api/server.py), else
the "gateway started" log line on stderr (both are recorded when both exist).

Same-run baselines / breakdown:
  quick_check alone       ``PRAGMA quick_check`` on the same file, state as left by kill -9
  process floor           ``python -m edge check-config`` exec→exit: interpreter, imports and
                          config validation, which every start pays before opening the outbox
Each is measured with the file in the page cache (warm: a crash-restart under systemd) and
after evicting the database files from it with posix_fadvise (cold: close to a reboot).

Run:  python -m bench.bench_restart [--events 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import socket
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
from edge.outbox.integrity import quick_check


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


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} (max {max(values):.2f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_restart", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="queued events")
    p.add_argument("--rounds", type=int, default=3, help="kill -9 / restart rounds per cache state")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds the daemon runs (leasing, failing, recording retries) before kill")
    p.add_argument("--dir", help="scratch folder on the disk under test (default: temp dir)")
    p.add_argument("--cache", help="folder for the pre-filled outbox files (reused if present)")
    args = p.parse_args(argv)

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
    time.sleep(args.settle)
    daemon.kill9()
    print(f"first start (clean file): {first_line:.2f} s; killed with SIGKILL after "
          f"{args.settle:.0f} s")

    results: dict[str, dict[str, list[float]]] = {}
    for cache_state in ("warm", "cold"):
        r = results[cache_state] = {"line": [], "readyz": [], "quick_check": [], "floor": []}
        for _ in range(args.rounds):
            wal = (state / "outbox.db-wal")
            wal_mb = wal.stat().st_size / 2**20 if wal.exists() else 0.0
            if cache_state == "cold":
                evict(state)
            daemon, line_s, readyz_s = start_until_ready(cfg, api_port)
            r["line"].append(line_s)
            if readyz_s is not None:
                r["readyz"].append(readyz_s)
            time.sleep(args.settle)
            daemon.kill9()
            if cache_state == "cold":
                evict(state)
            r["quick_check"].append(timed_quick_check(db))
            r["floor"].append(process_floor(cfg))
            print(f"  {cache_state}: ready {line_s:.2f} s"
                  + (f", /readyz {readyz_s:.2f} s" if readyz_s is not None else "")
                  + f" (WAL at kill {wal_mb:.1f} MiB); quick_check alone "
                  f"{r['quick_check'][-1]:.2f} s; process floor {r['floor'][-1]:.2f} s",
                  flush=True)

    print()
    print(f"{'page cache':<11}{'exec->ready s':>22}{'exec->/readyz s':>22}"
          f"{'quick_check alone s':>22}{'process floor s':>22}{'target':>8}")
    for cache_state, r in results.items():
        print(f"{cache_state:<11}{fmt(r['line']):>22}{fmt(r['readyz']):>22}"
              f"{fmt(r['quick_check']):>22}{fmt(r['floor']):>22}{'< 2 s':>8}")
    print(f"\n{args.events:,} events queued, {args.rounds} rounds each; medians (max)")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
