"""Per-event POSTs at the HTTP client's limit: bare clients against the gateway's drain.

One receiver in its own process (default: a minimal HTTP/1.1 responder, so that the
clients' limits show; ``--receiver erp``: the stand-in ERP) takes the same request from
every client: one event's envelope (~480 bytes of JSON) with the
headers the http sink sends (Content-Type, Idempotency-Key, X-Correlation-ID, traceparent,
User-Agent), over keep-alive connections.

Figures (all from the same run, against the same receiver):
  bare httpx HTTP/1.1    ``httpx.AsyncClient`` as the sink configured it before, c=4 and 16
  bare httpx HTTP/2      needs a receiver that speaks h2c; neither does: reported skipped
  bare aiohttp           ``aiohttp.ClientSession`` (C parser), c=4 and 16
  raw HTTP/1.1 client    a few lines of asyncio (no client library): the receiver's limit
  gateway per-event      the daemon draining a pre-filled outbox of N events through a
                         ``max_batch: 1`` route, at max_in_flight_requests (and
                         max_connections) 4 and 16 (events/s from the receiver's first
                         to last event; daemon CPU per event)
Ratio = gateway per-event events/s ÷ the fastest bare client's req/s (target >= 0.9).

Run:  python -m bench.bench_http_clients [--events 20000] [--seconds 5]
      python -m bench.bench_http_clients --quick        # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    Daemon,
    ReceiverProcess,
    cpu_seconds,
    gateway_yaml,
    machine_line,
    prefilled_copy,
    receiver_capacity,
    work_dir,
    workload_event,
)
from bench.results import record

NODE_RED_MSG_S = 1_295  # a Node-RED flow posting one message per request (issue figure)
CONCURRENCY = (4, 16)


def _requests(n: int = 2000) -> list[tuple[bytes, dict[str, str]]]:
    """(body, headers) of per-event requests as the sink builds them."""
    from edge.components import StoredEvent
    from edge.sinks.http.config import RouteConfig
    from edge.sinks.http.request import request_headers

    rng = random.Random(5)
    route = RouteConfig(events=["*"], path="/events")
    out = []
    for i in range(n):
        ev = workload_event(i, rng)
        stored = StoredEvent(i + 1, ev.id, ev.type, ev.event_class, ev.ordering_key, 0,
                             ev.to_json())
        headers = {"User-Agent": "edge-gateway/bench (bench)",
                   **request_headers(route, [stored])}
        out.append((stored.body, headers))
    return out


class _RawHttp(asyncio.Protocol):
    """HTTP/1.1 keep-alive: every request (Content-Length bodies) answered 200 ``{}``."""

    ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: 2\r\n\r\n{}")

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        answers = 0
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0
                              else None]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length:]
            answers += 1
        self.buf = buf
        if answers:
            self.counts[0] += answers
            assert self.transport is not None
            self.transport.write(self.ANSWER * answers)


async def _raw_receiver_main() -> None:
    """Prints ``PORT n``, then ``COUNT accepted requests`` every 50 ms (as bench.common's)."""
    import contextlib
    import signal

    counts = [0]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _RawHttp(counts), "127.0.0.1", 0, backlog=256)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    last = -1
    while not stop.is_set():
        if counts[0] != last:
            last = counts[0]
            print(f"COUNT {last} {last}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    server.close()


class RawReceiverProcess(ReceiverProcess):
    """``_RawHttp`` in its own process: a receiver far cheaper per request than the
    stand-in ERP, so the clients' own limits show."""

    command = (sys.executable, "-m", "bench.bench_http_clients", "--serve")


Poster = Callable[[bytes, dict[str, str]], Awaitable[int]]


async def _drive(post: Poster, reqs: Sequence[tuple[bytes, dict[str, str]]],
                 concurrency: int, seconds: float) -> float:
    """Requests/s of ``concurrency`` workers posting ``reqs`` in turn for ``seconds``."""
    counts = [0]
    deadline = time.monotonic() + seconds

    async def worker(start: int) -> None:
        i = start
        while time.monotonic() < deadline:
            body, headers = reqs[i % len(reqs)]
            i += concurrency
            status = await post(body, headers)
            if status != 200:
                raise RuntimeError(f"receiver answered {status}")
            counts[0] += 1

    await post(*reqs[0])  # connect outside the measurement
    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return counts[0] / (time.monotonic() - started)


async def _httpx(url: str, reqs: Sequence[tuple[bytes, dict[str, str]]], concurrency: int,
                 seconds: float, *, http2: bool = False) -> float:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False,
                                 follow_redirects=False, http1=not http2, http2=http2,
                                 timeout=httpx.Timeout(10.0, connect=5.0)) as client:
        async def post(body: bytes, headers: dict[str, str]) -> int:
            resp = await client.post("/events", content=body, headers=headers)
            return resp.status_code

        return await _drive(post, reqs, concurrency, seconds)


async def _aiohttp(url: str, reqs: Sequence[tuple[bytes, dict[str, str]]], concurrency: int,
                   seconds: float) -> float:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        target = f"{url}/events"

        async def post(body: bytes, headers: dict[str, str]) -> int:
            async with session.post(target, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                await resp.read()
                return resp.status

        return await _drive(post, reqs, concurrency, seconds)


def _run(coro: Awaitable[float]) -> float:
    """On uvloop where available, as the daemon runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


@dataclass
class Drain:
    events: int
    in_flight: int
    seconds: float
    cpu_s: float
    accepted: int

    @property
    def eps(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def gateway_drain(root: Path, cache: Path, receiver: ReceiverProcess, n: int, in_flight: int,
                  *, timeout_s: float, profile: str | None = None) -> Drain:
    """The daemon draining ``n`` pre-filled events one per request. ``profile``: a py-spy
    SVG of the daemon during the drain."""
    run = root / f"run-{n}-{in_flight}"
    shutil.rmtree(run, ignore_errors=True)
    prefilled_copy(cache, n, run / "state", log=lambda s: print(s, flush=True))
    cfg = run / "gateway.yaml"
    cfg.write_text(gateway_yaml(run / "state", receiver.url, max_batch=1,
                                extra_sink=f"    max_in_flight_requests: {in_flight}\n"
                                           f"    max_connections: {in_flight}\n"))
    time.sleep(0.2)
    base = receiver.accepted
    receiver.reset_first()
    daemon = Daemon(cfg).start()
    spy = None
    try:
        if daemon.wait_line(r"gateway started", 60) is None:
            raise RuntimeError(f"the daemon did not start:\n{daemon.tail()}")
        first = receiver.wait_first(60)
        if first is None:
            raise RuntimeError(f"nothing arrived at the receiver:\n{daemon.tail()}")
        cpu0 = cpu_seconds(daemon.pid)
        if profile:
            import subprocess
            import sys

            fmt = "flamegraph" if profile.endswith(".svg") else "raw"  # raw: folded stacks
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                                    "-o", profile, "--format", fmt, "--pid", str(daemon.pid),
                                    "-d", "8"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = receiver.wait_accepted(base + n, timeout_s)
        end = time.monotonic()
        cpu = cpu_seconds(daemon.pid) - cpu0
    finally:
        if spy is not None:
            spy.wait(30)
        daemon.stop()
    accepted = receiver.accepted - base
    if not done:
        print(f"  !! timeout after {timeout_s:.0f} s: {accepted:,} of {n:,} arrived")
    shutil.rmtree(run, ignore_errors=True)
    # events after the first one arrived: the CPU figure covers the same span
    return Drain(n, in_flight, end - first, cpu, accepted)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_http_clients", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="backlog drained per event")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per bare client")
    p.add_argument("--quick", action="store_true", help="2,000 events, 1.5 s per client")
    p.add_argument("--dir", help="scratch folder (default: temp dir)")
    p.add_argument("--cache", help="folder for the pre-filled outbox files (reused if present)")
    p.add_argument("--profile", help="py-spy profile of the daemon's drain at the largest "
                                     "max_in_flight_requests (.svg: flame graph, else folded "
                                     "stacks)")
    p.add_argument("--timeout", type=float, default=600, help="max seconds per drain")
    p.add_argument("--receiver", choices=["raw", "erp"], default="raw",
                   help="raw: a minimal HTTP/1.1 responder (default); erp: the stand-in ERP "
                        "(starlette + uvicorn), whose own limit is then what shows")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _run(_raw_receiver_main())  # type: ignore[arg-type]
        return
    if args.quick:
        args.events, args.seconds = 2_000, 1.5
    root = work_dir(args.dir, "http-clients")
    cache = Path(args.cache) if args.cache else root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line()}")
    reqs = _requests()
    print(f"request: POST /events, {sum(len(b) for b, _ in reqs) / len(reqs):.0f}-byte body, "
          f"headers {', '.join(reqs[0][1])}")

    receiver = (RawReceiverProcess() if args.receiver == "raw" else ReceiverProcess()).start()
    print(f"receiver: {args.receiver}")
    bare: dict[str, float] = {}
    drains: list[Drain] = []
    try:
        raw, _ = receiver_capacity(receiver.port, [b for b, _ in reqs], 1,
                                   seconds=args.seconds, connections=16)
        print(f"raw HTTP/1.1 client (receiver's limit), 16 connections: {raw:>8,.0f} req/s")
        for c in CONCURRENCY:
            bare[f"httpx HTTP/1.1 c={c}"] = _run(_httpx(receiver.url, reqs, c, args.seconds))
            bare[f"aiohttp c={c}"] = _run(_aiohttp(receiver.url, reqs, c, args.seconds))
        for name, value in bare.items():
            print(f"bare {name:<22} {value:>8,.0f} req/s")
        print("bare httpx HTTP/2: skipped; neither receiver speaks h2c (HTTP/2 without TLS, "
              "which httpx speaks only with prior knowledge)")
        for c in CONCURRENCY:
            print(f"gateway drain of {args.events:,} events, per-event, max_in_flight_requests {c} ...",
                  flush=True)
            drains.append(gateway_drain(root, cache, receiver, args.events, c,
                                        timeout_s=args.timeout,
                                        profile=args.profile if c == CONCURRENCY[-1] else None))
            d = drains[-1]
            print(f"  {d.eps:,.0f} events/s, {d.cpu_s / d.events * 1e6:,.0f} µs daemon CPU "
                  f"per event", flush=True)
    finally:
        receiver.stop()

    best_name = max(bare, key=lambda k: bare[k])
    best = bare[best_name]
    gw = max(drains, key=lambda d: d.eps)
    ratio = gw.eps / best
    print()
    print(f"fastest bare client: {best_name}, {best:,.0f} req/s")
    print(f"gateway per-event: {gw.eps:,.0f} ev/s (max_in_flight_requests {gw.in_flight}) = "
          f"{ratio:.2f} x the fastest bare client (target >= 0.9), "
          f"{gw.eps / NODE_RED_MSG_S:.1f} x Node-RED's {NODE_RED_MSG_S:,} msg/s (target >= 5)")
    for name, value in bare.items():
        record("http_clients", figure=f"bare {name}, per-event POSTs", value=round(value),
               unit="req/s", baseline="raw HTTP/1.1 client (receiver's limit)",
               baseline_value=round(raw), met=None)
    for d in drains:
        record("http_clients", figure=f"gateway per-event drain, max_in_flight_requests {d.in_flight}",
               value=round(d.eps), unit="ev/s", baseline=f"fastest bare client ({best_name})",
               baseline_value=round(best), target=">= 0.9 x fastest bare client",
               met=d.eps >= 0.9 * best,
               cpu_us_per_event=round(d.cpu_s / d.events * 1e6), events=d.events)
    record("http_clients", figure="gateway per-event drain vs Node-RED", value=round(gw.eps),
           unit="ev/s", baseline="Node-RED, one message per request (issue figure)",
           baseline_value=NODE_RED_MSG_S, target=">= 5 x", met=gw.eps >= 5 * NODE_RED_MSG_S)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
