"""Helpers shared by the benchmarks: workload events, outbox pre-fill, RSS sampling via /proc,
the stand-in ERP receiver in its own process, a minimal HTTP load generator, timers.

Every benchmark prints its figure next to a baseline measured in the same run, so the
ratios stay meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.components import Submission
from edge.config import OutboxConfig
from edge.events import Event, EventClass, make_event

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- workload

# (type, class, share): holds are rare and critical, inspections dominate, telemetry is low.
MIX: list[tuple[str, EventClass, float]] = [
    ("quality.hold", EventClass.critical, 0.01),
    ("inspection.result", EventClass.high, 0.49),
    ("production.count", EventClass.normal, 0.30),
    ("machine.reading", EventClass.low, 0.20),
]


def _pick_type(r: float) -> tuple[str, EventClass]:
    acc = 0.0
    for type_, cls, share in MIX:
        acc += share
        if r < acc:
            return type_, cls
    return MIX[-1][0], MIX[-1][1]


def workload_event(i: int, rng: random.Random, keys: int = 1000, site: str = "plant-01",
                   source: str = "line1") -> Event:
    """One realistic event: ~100 bytes of data; lot keys for all but telemetry (no key)."""
    type_, cls = _pick_type(rng.random())
    lot = f"L{rng.randrange(keys):06d}"
    if type_ == "machine.reading":
        data: dict[str, Any] = {"machine": f"M{i % 40:02d}", "signal": "spindle_temp",
                                "value": round(rng.uniform(20, 90), 3), "unit": "C"}
        key = None
    elif type_ == "production.count":
        data = {"lot_id": lot, "station": f"st{i % 12:02d}", "good": rng.randrange(100),
                "scrap": rng.randrange(3)}
        key = f"lot:{lot}"
    elif type_ == "quality.hold":
        data = {"lot_id": lot, "reason": "dimension out of spec", "station": f"st{i % 12:02d}"}
        key = f"lot:{lot}"
    else:
        data = {"lot_id": lot, "serial": f"SN{i:010d}", "station": f"st{i % 12:02d}",
                "result": "pass" if rng.random() < 0.97 else "fail",
                "measured": round(rng.uniform(9.9, 10.1), 4), "unit": "mm"}
        key = f"lot:{lot}"
    return make_event(type=type_, site=site, source=source, data=data, ordering_key=key,
                      event_class=cls)


def workload(n: int, seed: int = 1, keys: int = 1000) -> list[Event]:
    rng = random.Random(seed)
    return [workload_event(i, rng, keys) for i in range(n)]


def event_row(seq: int, ev: Event, now: float) -> tuple[Any, ...]:
    """The ``events`` row the outbox stores for ``ev`` (for the raw-SQLite baselines)."""
    return (seq, ev.id, ev.type, int(ev.event_class), ev.ordering_key, ev.source, now,
            ev.payload_sha256, ev.to_json())


# --------------------------------------------------------------------------- pre-fill


async def _prefill(state_dir: str, n: int, seed: int, keys: int, sink: str, batch: int,
                   producers: int) -> float:
    from edge.outbox import Outbox

    cfg = OutboxConfig(max_size_mb=1_000_000)
    rng = random.Random(seed)
    counter = iter(range(n))
    async with Outbox(state_dir, cfg, router=lambda ev: [sink]) as ob:
        started = time.perf_counter()

        async def producer() -> None:
            while True:
                items = []
                for _ in range(batch):
                    i = next(counter, None)
                    if i is None:
                        break
                    items.append(Submission(workload_event(i, rng, keys)))
                if not items:
                    return
                await ob.submit(items)

        async with asyncio.TaskGroup() as tg:
            for _ in range(producers):
                tg.create_task(producer())
        return time.perf_counter() - started


def prefill(state_dir: str | Path, n: int, *, seed: int = 1, keys: int = 1000,
            sink: str = "erp", batch: int = 100, producers: int = 4) -> float:
    """Fill ``state_dir/outbox.db`` with ``n`` events through ``Outbox.submit``; seconds."""
    from edge.cli.common import run_async

    return float(run_async(_prefill(str(state_dir), n, seed, keys, sink, batch, producers)))


def prefilled_copy(cache_dir: Path, n: int, target_dir: Path, *, keys: int = 1000,
                   sink: str = "erp", log: Any = print) -> None:
    """Copy a cached pre-filled outbox of ``n`` events into ``target_dir`` (fill it once).

    Filling 1M events through the outbox takes about a minute; a drain deletes rows, so
    every run starts from a fresh copy of the same file.
    """
    from edge.outbox.schema import SCHEMA_VERSION

    # per schema version: a cache of an older layout would measure its upgrade too
    cached = cache_dir / f"outbox-{n}-k{keys}-{sink}-v{SCHEMA_VERSION}.db"
    if not cached.exists():
        tmp = cache_dir / f"fill-{n}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        secs = prefill(tmp, n, keys=keys, sink=sink)
        log(f"  pre-filled {n:,} events through Outbox.submit in {secs:.1f} s "
            f"({n / secs:,.0f} events/s)")
        # a clean close checkpointed the WAL into the main file
        os.replace(tmp / "outbox.db", cached)
        shutil.rmtree(tmp, ignore_errors=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target_dir / f"outbox.db{suffix}")
    shutil.copyfile(cached, target_dir / "outbox.db")


def db_summary(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        events, avg_body = conn.execute("SELECT COUNT(*), AVG(LENGTH(body)) FROM events").fetchone()
        keys = conn.execute(
            "SELECT COUNT(DISTINCT ordering_key) FROM deliveries").fetchone()[0]
        classes = dict(conn.execute("SELECT class, COUNT(*) FROM deliveries GROUP BY class"))
    finally:
        conn.close()
    return {"events": events, "avg_body": avg_body or 0, "keys": keys,
            "classes": {EventClass(c).name: n for c, n in classes.items()},
            "file_mb": path.stat().st_size / 2**20}


# --------------------------------------------------------------------------- /proc


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB; VmHWM is the kernel's peak RSS of the process."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread; keeps peak and a timeline."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic, KiB)
        self.peak_kib = 0
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss, hwm = rss_kib(self.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            self.samples.append((time.monotonic(), rss))
            self.peak_kib = max(self.peak_kib, rss)
            self.hwm_kib = max(self.hwm_kib, hwm)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            rss, hwm = rss_kib(self.pid)
            self.peak_kib = max(self.peak_kib, rss)
            self.hwm_kib = max(self.hwm_kib, hwm)
        self._stop.set()
        self._thread.join(timeout=2)

    def at_fraction(self, start: float, end: float, fraction: float) -> int:
        """RSS (KiB) of the sample closest to ``start + fraction * (end - start)``."""
        t = start + fraction * (end - start)
        if not self.samples:
            return 0
        return min(self.samples, key=lambda s: abs(s[0] - t))[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / tick


# --------------------------------------------------------------------------- receiver process


RECEIVER_MAIN = "bench.common"


class ReceiverProcess:
    """The stand-in ERP (``edge.sim.erp.ErpReceiver``, ``record=False``) in its own process.

    It prints ``PORT n`` once and then ``COUNT accepted requests`` every 50 ms on stdout;
    ``accepted``/``requests`` here follow those lines.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.accepted = 0
        self.requests = 0
        self._first_event_at: float | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    command: tuple[str, ...] = (PY, "-m", RECEIVER_MAIN, "receiver")

    def start(self) -> ReceiverProcess:
        self.proc, self.port = start_child(list(self.command))
        self._reader = threading.Thread(target=self._read, daemon=True, name="receiver-out")
        self._reader.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("COUNT "):
                _, a, r = line.split()
                with self._cond:
                    self.accepted, self.requests = int(a), int(r)
                    if self.accepted and self._first_event_at is None:
                        self._first_event_at = time.monotonic()
                    self._cond.notify_all()

    def wait_accepted(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.accepted >= n, timeout)

    def wait_first(self, timeout: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: self._first_event_at is not None, timeout)
            return self._first_event_at

    def reset_first(self) -> None:
        with self._cond:
            self._first_event_at = None

    def stop(self) -> None:
        stop_child(self.proc)


def start_child(argv: list[str]) -> tuple[subprocess.Popen[str], int]:
    """A helper process that prints ``PORT n`` first (a receiver); (process, port)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, bufsize=1)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"receiver did not start: {line!r}")
    return proc, int(line.split()[1])


def stop_child(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _receiver_main() -> None:
    from edge.sim.erp import ErpReceiver

    erp = ErpReceiver(record=False)
    await erp.start()
    print(f"PORT {erp.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    last = (-1, -1)
    while not stop.is_set():
        now = (erp.accepted_count, erp.request_count)
        if now != last:
            print(f"COUNT {now[0]} {now[1]}", flush=True)
            last = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    await erp.stop()


# --------------------------------------------------------------------------- load generator


async def _raw_client(port: int, path: str, bodies: Sequence[bytes], deadline: float,
                      counts: list[int], per_request: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\n").encode()
    i = 0
    try:
        while time.monotonic() < deadline:
            body = bodies[i % len(bodies)]
            i += 1
            writer.write(head + f"Idempotency-Key: k{i}\r\nContent-Length: {len(body)}\r\n\r\n"
                         .encode() + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if b" 200 " not in status_line:
                raise RuntimeError(f"receiver answered {status_line!r}")
            counts[0] += 1
            counts[1] += per_request
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def receiver_capacity(port: int, bodies: Sequence[bytes], per_request: int, *,
                      seconds: float = 5.0, connections: int = 8) -> tuple[float, float]:
    """Max (requests/s, events/s) the receiver sustains from a minimal raw HTTP/1.1 client.

    The client is a few lines of asyncio on keep-alive connections (no httpx), so the
    figure is the receiver's limit on this machine, not the gateway's.
    """

    async def main() -> tuple[float, float]:
        counts = [0, 0]
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(*(
            _raw_client(port, "/events", bodies, deadline, counts, per_request)
            for _ in range(connections)
        ))
        took = time.monotonic() - started
        return counts[0] / took, counts[1] / took

    return asyncio.run(main())


def httpx_capacity(url: str, bodies: Sequence[bytes], per_request: int, *,
                   seconds: float = 5.0, concurrency: int = 8) -> tuple[float, float]:
    """(requests/s, events/s) of a bare ``httpx.AsyncClient`` (as the sink configures it)
    posting to the receiver: the client-side floor of per-event POSTs, with no outbox."""
    import httpx

    async def main() -> tuple[float, float]:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False) as client:
            counts = [0]
            started = time.monotonic()
            deadline = started + seconds

            async def worker() -> None:
                i = 0
                while time.monotonic() < deadline:
                    i += 1
                    resp = await client.post("/events", content=bodies[i % len(bodies)],
                                             headers={"Content-Type": "application/json",
                                                      "Idempotency-Key": f"k{i}"})
                    resp.raise_for_status()
                    counts[0] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            took = time.monotonic() - started
            return counts[0] / took, counts[0] * per_request / took

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


# --------------------------------------------------------------------------- gateway daemon


def gateway_yaml(state_dir: Path, url: str, *, max_batch: int, lease_batch: int = 500,
                 max_in_flight: int = 4, api: str | None = None,
                 extra_sink: str = "") -> str:
    api_block = f"api: {{listen: '{api}'}}" if api else "api: {enabled: false}"
    return textwrap.dedent(f"""\
        site: bench
        state_dir: {state_dir}
        {api_block}
        logging: {{level: info}}
        outbox:
          max_size_mb: 100000   # a 1M-event backlog must not trigger the low-class expiry
        sinks:
          - id: erp
            type: http
            url: {url}
            max_in_flight: {max_in_flight}
            lease_batch: {lease_batch}
            retry: {{initial_backoff_s: 0.2, max_backoff_s: 2}}
            routes:
              - {{events: ["*"], method: POST, path: /events, max_batch: {max_batch}}}
        """) + extra_sink


@dataclass
class Daemon:
    """``python -m edge run -c FILE`` as a child process; stderr lines are timestamped."""

    config: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    verb: str = "run"  # ``relay`` for a relay of the JetStream tier
    lines: list[tuple[float, str]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> Daemon:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen([PY, "-m", "edge", self.verb, "-c", str(self.config)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     cwd=REPO)
        threading.Thread(target=self._read, daemon=True, name="daemon-err").start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> float | None:
        """Monotonic time at which a stderr line matching ``pattern`` was read, or None."""
        rx = re.compile(pattern)
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(rx.search(text) for _, text in self.lines)
                or (self.proc is not None and self.proc.poll() is not None), timeout)
            if not ok:
                return None
            return next((t for t, text in self.lines if rx.search(text)), None)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def tail(self, n: int = 15) -> str:
        return "\n".join(text for _, text in self.lines[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- misc


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box = [0.0]
    started = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - started


def work_dir(arg: str | None, name: str) -> Path:
    """A scratch folder on the disk under test (``--dir``), else a fresh temporary one."""
    if arg:
        p = Path(arg) / name
        p.mkdir(parents=True, exist_ok=True)
        return p
    return Path(tempfile.mkdtemp(prefix=f"edge-{name}-"))


def machine_line() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cpu ({cpu}), Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}")


def mib(kib: int) -> float:
    return kib / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.common")
    p.add_argument("what", choices=["receiver"])
    p.parse_args(argv)
    try:
        import uvloop

        uvloop.run(_receiver_main())
    except ImportError:
        asyncio.run(_receiver_main())


if __name__ == "__main__":
    main()
