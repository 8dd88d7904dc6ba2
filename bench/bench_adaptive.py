"""Adaptive request concurrency: a per-event route drained against an ERP answering in 50 ms.

Setup per run: a pre-filled outbox (``Outbox.submit``, 1,000 lot keys, classes mixed), the
stand-in ERP (``ErpReceiver(record=False)``, ``latency_s=0.05``) in its own process, and
the gateway as ``python -m edge run -c cfg.yaml`` in its own process with one event per
request (``max_batch: 1``) and otherwise the default sink config.

Runs:
  adaptive       the defaults: adaptive concurrency, ceiling ``max_in_flight_requests`` 64
  fixed 8        baseline, same run: ``adaptive_concurrency: false``,
                 ``max_in_flight_requests: 8`` (the old fixed limit)
  rate-limited   adaptive again, the ERP taking ``--rate`` requests a second and answering
                 429 with ``Retry-After: 1`` above that: the limit backs off (its timeline
                 from ``/metrics`` ``edge_sink_concurrency``), and no event is sent again
                 before the Retry-After its 429 gave (``early`` must be 0)

Figures: drain events/s (events accepted ÷ time from the first to the last), the most
requests the ERP had in hand at once, and for the rate-limited run the 429s, the early
retries and the limit before/after the first 429. Target: >= 1,000 events/s adaptive.

Run:  python -m bench.bench_adaptive [--events 10000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    Daemon,
    free_port,
    gateway_yaml,
    machine_line,
    prefilled_copy,
    start_child,
    stop_child,
    work_dir,
)
from bench.results import record

LATENCY_S = 0.05
TARGET_EPS = 1_000.0
MAIN = "bench.bench_adaptive"

# --------------------------------------------------------------------------- the ERP process


async def _receiver_main(latency_s: float, rate: float) -> None:
    """The stand-in ERP with a 50 ms answer, counting requests in hand at once, and (with
    ``rate``) a 1-second window rate limit answering 429 + ``Retry-After: 1`` above it."""
    import contextvars

    from starlette.requests import Request
    from starlette.responses import Response

    from edge.sim.erp import Answer, ErpReceiver

    arrived: contextvars.ContextVar[float] = contextvars.ContextVar("arrived")
    stats = {"in_hand": 0, "peak": 0, "refused": 0, "early": 0}
    not_before: dict[str, float] = {}  # Idempotency-Key -> end of the Retry-After it got

    class BenchErp(ErpReceiver):
        async def _handle(self, request: Request) -> Response:
            arrived.set(time.monotonic())
            stats["in_hand"] += 1
            stats["peak"] = max(stats["peak"], stats["in_hand"])
            try:
                return await super()._handle(request)
            finally:
                stats["in_hand"] -= 1

    erp = BenchErp(record=False, latency_s=latency_s)
    window = [0.0, 0]

    async def limit(events: list[dict[str, Any]], headers: dict[str, str]) -> Answer | None:
        """Called after the 50 ms: counts early retries, then applies the rate limit."""
        now = time.monotonic()
        key = headers.get("idempotency-key", "")
        due = not_before.pop(key, None)
        if due is not None and arrived.get(now) < due:
            stats["early"] += 1  # sent again before the Retry-After its 429 gave
        if not rate:
            return None
        if now - window[0] >= 1.0:
            window[0], window[1] = now, 0
        window[1] += 1
        if window[1] <= rate:
            return None
        stats["refused"] += 1
        not_before[key] = now + 1.0
        return Answer(429, {"Retry-After": "1"}, '{"error": "rate limited"}')

    erp.intercept = limit
    await erp.start()
    print(f"PORT {erp.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    last: tuple[int, ...] = ()
    while not stop.is_set():
        now = (erp.accepted_count, erp.request_count, stats["peak"], stats["refused"],
               stats["early"])
        if now != last:
            print("COUNT " + " ".join(map(str, now)), flush=True)
            last = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    await erp.stop()


@dataclass
class Receiver:
    """The ERP process; its counters follow the ``COUNT`` lines it prints."""

    latency_s: float
    rate: float = 0.0
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    first_at: float | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> Receiver:
        self.proc, self.port = start_child([PY, "-m", MAIN, "receiver", "--latency",
                                            str(self.latency_s), "--rate", str(self.rate)])
        threading.Thread(target=self._read, daemon=True, name="erp-out").start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def accepted(self) -> int:
        return self.counts[0]

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("COUNT "):
                with self._cond:
                    self.counts = [int(x) for x in line.split()[1:]]
                    if self.counts[0] and self.first_at is None:
                        self.first_at = time.monotonic()
                    self._cond.notify_all()

    def wait_accepted(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.counts[0] >= n, timeout)

    def stop(self) -> None:
        stop_child(self.proc)


# --------------------------------------------------------------------------- one drain


@dataclass
class Run:
    name: str
    events: int
    accepted: int
    seconds: float
    peak_in_hand: int
    refused: int
    early: int
    limits: list[tuple[float, float]]  # (seconds since the first event, limit)
    warnings: int

    @property
    def eps(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


class LimitWatcher:
    """Reads ``edge_sink_concurrency{sink="erp"}`` from the daemon's ``/metrics``."""

    def __init__(self, port: int, interval_s: float = 0.1) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="limit-watch")

    def start(self) -> LimitWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        rx = re.compile(r'^edge_sink_concurrency\{sink="erp"\} (\S+)$', re.M)
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url, timeout=2) as resp:  # noqa: S310
                    m = rx.search(resp.read().decode())
                if m:
                    self.samples.append((time.monotonic(), float(m.group(1))))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def drain(name: str, root: Path, cache: Path, n: int, *, rate: float, extra: str,
          timeout_s: float) -> Run:
    run_dir = root / f"run-{name.replace(' ', '-')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    prefilled_copy(cache, n, run_dir / "state", log=lambda s: print(s, flush=True))
    receiver = Receiver(LATENCY_S, rate).start()
    api_port = free_port()
    cfg = run_dir / "gateway.yaml"
    cfg.write_text(gateway_yaml(run_dir / "state", receiver.url, max_batch=1,
                                api=f"127.0.0.1:{api_port}", extra_sink=extra))
    daemon = Daemon(cfg).start()
    watcher: LimitWatcher | None = None
    try:
        if daemon.wait_line(r"gateway started", 60) is None:
            raise RuntimeError(f"the daemon did not start:\n{daemon.tail()}")
        watcher = LimitWatcher(api_port).start()
        done = receiver.wait_accepted(n, timeout_s)
        end = time.monotonic()
        if not done:
            print(f"  !! timeout after {timeout_s:.0f} s: {receiver.accepted:,} of {n:,}")
        time.sleep(0.3)  # late duplicates would show here
    finally:
        if watcher is not None:
            watcher.stop()
        daemon.stop()
        receiver.stop()
    first = receiver.first_at or end
    warnings = sum(1 for _, line in daemon.lines if re.search(r" (WARNING|ERROR) ", line))
    accepted, _requests, peak, refused, early = receiver.counts
    limits = [(t - first, v) for t, v in (watcher.samples if watcher else [])]
    shutil.rmtree(run_dir, ignore_errors=True)
    return Run(name, n, accepted, end - first, peak, refused, early, limits, warnings)


def timeline(limits: list[tuple[float, float]], every_s: float = 1.0) -> str:
    """The limit at each ``every_s`` mark: ``0s:8 1s:20 ...``."""
    out, mark = [], 0.0
    for t, v in limits:
        if t >= mark:
            out.append(f"{mark:.0f}s:{v:.0f}")
            mark += every_s
    return " ".join(out)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MAIN}", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="?", choices=["bench", "receiver"], default="bench")
    p.add_argument("--events", type=int, default=10_000, help="queued events (1,000 lots)")
    p.add_argument("--quick", action="store_true", help="2,000 events: a smoke run")
    p.add_argument("--rate", type=float, default=400.0,
                   help="requests/s the rate-limited ERP takes before answering 429")
    p.add_argument("--latency", type=float, default=LATENCY_S, help=argparse.SUPPRESS)
    p.add_argument("--dir", help="scratch folder (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="max seconds per drain")
    args = p.parse_args(argv)
    if args.what == "receiver":
        try:
            import uvloop

            uvloop.run(_receiver_main(args.latency, args.rate))
        except ImportError:
            asyncio.run(_receiver_main(args.latency, args.rate))
        return

    n = 2_000 if args.quick else args.events
    root = work_dir(args.dir, "adaptive")
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line()}")
    print(f"{n:,} events over 1,000 lots, one event per request, ERP answering in "
          f"{LATENCY_S * 1000:.0f} ms (own process)")
    fixed = ("    adaptive_concurrency: false\n"
             "    max_in_flight_requests: 8\n")
    runs = []
    for name, rate, extra in [("adaptive", 0.0, ""), ("fixed 8", 0.0, fixed),
                              ("rate-limited", args.rate, "")]:
        print(f"drain: {name} ...", flush=True)
        r = drain(name, root, cache, n, rate=rate, extra=extra, timeout_s=args.timeout)
        runs.append(r)
        print(f"  {r.eps:,.0f} events/s, ERP peak {r.peak_in_hand} requests at once, "
              f"429s {r.refused}, early retries {r.early}", flush=True)
        print(f"  limit: {timeline(r.limits)}", flush=True)
    adaptive, baseline, limited = runs

    print()
    print(f"{'run':>13} {'events/s':>9} {'ERP peak':>9} {'429s':>6} {'early':>6} "
          f"{'limit max':>9} {'limit end':>9} {'warn':>5}")
    for r in runs:
        top = max((v for _, v in r.limits), default=0)
        end = r.limits[-1][1] if r.limits else 0
        print(f"{r.name:>13} {r.eps:>9,.0f} {r.peak_in_hand:>9} {r.refused:>6} {r.early:>6} "
              f"{top:>9.0f} {end:>9.0f} {r.warnings:>5}")
    ratio = adaptive.eps / baseline.eps if baseline.eps else 0.0
    print(f"adaptive ÷ fixed 8 (same run): {ratio:.1f} x; target >= {TARGET_EPS:,.0f} ev/s: "
          f"{'met' if adaptive.eps >= TARGET_EPS else 'NOT met'}")
    record("adaptive", figure=f"per-event drain, ERP 50 ms, {n:,} events / 1,000 lots, "
           "adaptive concurrency (defaults)", value=round(adaptive.eps), unit="ev/s",
           baseline="same drain, fixed max_in_flight_requests 8 (adaptive off)",
           baseline_value=round(baseline.eps), target=f">= {TARGET_EPS:,.0f} ev/s",
           met=adaptive.eps >= TARGET_EPS,
           note=f"ERP peak {adaptive.peak_in_hand} requests at once vs "
                f"{baseline.peak_in_hand} fixed")
    # the limit before the first 429 and its lowest after it
    first_429 = next((t for t, v in zip(limited.limits, limited.limits[1:], strict=False)
                      if v[1] < t[1]), None)
    before = first_429[1] if first_429 else None
    low = min((v for t, v in limited.limits if first_429 and t >= first_429[0]),
              default=None)
    print(f"rate-limited at {args.rate:.0f} req/s: limit {before} before the first cut, "
          f"{low} lowest after it; {limited.refused} answers 429, {limited.early} early "
          f"retries (must be 0); {limited.eps:,.0f} events/s")
    record("adaptive", figure=f"early retries under 429 + Retry-After (ERP at "
           f"{args.rate:.0f} req/s)", value=limited.early, unit="requests",
           target="0", met=limited.early == 0 and limited.refused > 0,
           note=f"{limited.refused} answers 429; limit {before} before the first cut, "
                f"{low} lowest after; {limited.eps:,.0f} ev/s")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
