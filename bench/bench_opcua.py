"""OPC UA ingest: data-change notifications/s the ``opcua`` source turns into committed
events, and the gateway's CPU%, beside a bare asyncua client on the same server.

For each item count (default 1,000 and 5,000 items changing every 100 ms, i.e. 10,000 and
50,000 changes/s offered) the same server process serves, one after the other:

  bare asyncua client   subscribes to every item (100 ms sampling and publishing) and only
                        counts notifications (iterator-mode queue, drained in batches)
  gateway               a real ``Gateway`` with the ``opcua`` source on the same items,
                        outbox ``synchronous=FULL``; figure = events committed/s
                        (``edge_events_received_total``); its sink points at a closed port
                        with the circuit breaker open, so sending costs (almost) nothing

Each client runs in its own process and measures its own CPU (all threads); the server
runs in a third process (asyncua station simulator, or ``--server node`` for the
node-opcua station of tests/opcua_node), so neither shares a GIL with the measured client.
CPU% is of one core (100% = one core busy); the machine has ``nproc`` cores in total.

Run:  python -m bench.bench_opcua [--items 1000 5000] [--seconds 10] [--server asyncua|node]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, free_port, machine_line

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "tests" / "opcua_node"


# --------------------------------------------------------------------------- server


class Server:
    def __init__(self, kind: str, items: int, period_ms: float) -> None:
        self.kind, self.items, self.period_ms = kind, items, period_ms
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="edge-bench-opcua-"))

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    @property
    def ns(self) -> int:
        return 1 if self.kind == "node" else 2

    def node(self, i: int) -> str:
        return f"ns={self.ns};s=Station7.Sensor{i:04d}"

    def start(self) -> None:
        if self.kind == "node":
            cmd = ["node", str(NODE_DIR / "server.js"), "--port", str(self.port), "--pki",
                   str(self.tmp / "pki"), "--items", str(self.items), "--period-ms",
                   str(self.period_ms), "--result-period-ms", "3600000"]
            marker = b"{"
        else:
            cmd = [sys.executable, "-m", "edge", "simulate", "opcua", "--port", str(self.port),
                   "--items", str(self.items), "--items-period-ms", str(self.period_ms),
                   "--reading-period-ms", "3600000", "--result-period-ms", "3600000"]
            marker = b"station "
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=REPO)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.kind} server exited")
            if line.startswith(marker):
                break
        # Keep draining its stdout so it never blocks on a full pipe.
        import threading

        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- clients


async def _bare(endpoint: str, nodes: list[str], warmup_s: float, seconds: float,
                period_ms: float) -> dict[str, Any]:
    from asyncua import Client, ua

    client = Client(endpoint, timeout=30)
    await client.connect()
    params = ua.CreateSubscriptionParameters()
    params.RequestedPublishingInterval = period_ms
    params.RequestedMaxKeepAliveCount = 100
    params.RequestedLifetimeCount = 1000
    params.MaxNotificationsPerPublish = 0
    params.PublishingEnabled = True
    sub = await client.create_subscription(params, None, queue_maxsize=10_000_000)
    for start in range(0, len(nodes), 500):
        await sub.subscribe_data_change([client.get_node(n) for n in nodes[start:start + 500]],
                                        queuesize=10, sampling_interval=period_ms)
    count = 0

    async def consume() -> None:
        nonlocal count
        while True:
            await sub.next_event()
            count += 1
            q = sub._event_queue  # drain the rest without a coroutine per item
            while q is not None and not q.empty():
                q.get_nowait()
                count += 1

    task = asyncio.create_task(consume())
    await asyncio.sleep(warmup_s)
    n0, c0, t0 = count, time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    n1, c1, t1 = count, time.process_time(), time.monotonic()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 10)
    return {"rate": (n1 - n0) / (t1 - t0), "cpu": (c1 - c0) / (t1 - t0)}


async def _gateway(endpoint: str, nodes: list[str], warmup_s: float, seconds: float,
                   period_ms: float, state: str) -> dict[str, Any]:
    from edge.app import Gateway
    from edge.config import load_config_text
    from edge.telemetry import setup_logging

    setup_logging("warning")
    items = "\n".join(
        f'      - {{node: "{n}", sampling_ms: {period_ms}, queue_size: 10}}' for n in nodes)
    dead = free_port()  # nothing listens: the sink fails fast, its breaker stays open
    text = f"""
site: bench
state_dir: {state}
api: {{enabled: false}}
outbox: {{synchronous: full}}
sources:
  - id: bench
    type: opcua
    endpoint: {endpoint}
    publishing_ms: {period_ms}
    timeout_s: 30
    queue_max: 200000
    max_batch: 5000
    backfill: {{enabled: false}}
    monitored:
{items}
sinks:
  - id: erp
    type: http
    url: http://127.0.0.1:{dead}
    circuit_breaker: {{failure_threshold: 1, open_s: 60, max_open_s: 60}}
    routes:
      - {{events: ["*"], method: POST, path: /events, max_batch: 500}}
"""
    gw = Gateway(load_config_text(text))
    await gw.start()
    received = gw.metrics.events_received.labels("bench")
    dropped = gw.metrics.source_dropped.labels("bench", "queue_full")
    server_dropped = gw.metrics.source_dropped.labels("bench", "server_queue_overflow")
    deadline = time.monotonic() + 120
    while received._value.get() == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(warmup_s)
    n0, d0, c0, t0 = received._value.get(), dropped._value.get(), time.process_time(), \
        time.monotonic()
    await asyncio.sleep(seconds)
    n1, d1, c1, t1 = received._value.get(), dropped._value.get(), time.process_time(), \
        time.monotonic()
    state, error = gw.status["bench"].state, gw.status["bench"].error
    await gw.stop()
    return {"rate": (n1 - n0) / (t1 - t0), "cpu": (c1 - c0) / (t1 - t0),
            "dropped": d1 - d0, "server_overflow": server_dropped._value.get(),
            "state": state, "error": error}


def _client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["_bare", "_gateway"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--nodes", required=True, help="file with one node id per line")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--period-ms", type=float, default=100)
    p.add_argument("--state")
    a = p.parse_args(argv)
    nodes = Path(a.nodes).read_text().split()
    from edge.cli.common import run_async  # uvloop where available, as `edge run` does

    if a.role == "_bare":
        out = run_async(_bare(a.endpoint, nodes, a.warmup, a.seconds, a.period_ms))
    else:
        out = run_async(_gateway(a.endpoint, nodes, a.warmup, a.seconds, a.period_ms,
                                 a.state))
    print("RESULT " + json.dumps(out), flush=True)


def _run_client(role: str, server: Server, nodes_file: Path, args: argparse.Namespace,
                state: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_opcua", role, "--endpoint", server.endpoint,
           "--nodes", str(nodes_file), "--warmup", str(args.warmup), "--seconds",
           str(args.seconds), "--period-ms", str(args.period_ms), "--state", str(state)]
    s0, t0 = server.cpu(), time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=600)
    server_cpu = (server.cpu() - s0) / (time.monotonic() - t0)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[7:])
            out["server_cpu"] = server_cpu
            return out
    raise RuntimeError(f"{role} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")


def _per_k(r: dict[str, Any]) -> float:
    """CPU% per 1,000 events/s: the cost of one event, comparable across rates."""
    return r["cpu"] * 100 / (r["rate"] / 1000) if r["rate"] else float("nan")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        _client_main(argv)
        return
    p = argparse.ArgumentParser(prog="python -m bench.bench_opcua")
    p.add_argument("--items", type=int, nargs="+", default=[200, 1000, 5000])
    p.add_argument("--seconds", type=float, default=10, help="measured window per client")
    p.add_argument("--warmup", type=float, default=5, help="seconds after the first event")
    p.add_argument("--period-ms", type=float, default=100, help="item change + sampling period")
    p.add_argument("--server", choices=["asyncua", "node"],
                   default="node" if shutil.which("node") and (NODE_DIR / "node_modules").is_dir()
                   else "asyncua",
                   help="node-opcua (default when installed: it offers 50k changes/s; the "
                        "asyncua simulator saturates its core below 10k/s)")
    args = p.parse_args(argv)
    print(f"machine: {machine_line()}")
    print(f"server: {args.server} station in its own process; every item changes every "
          f"{args.period_ms:g} ms; clients sample at {args.period_ms:g} ms")
    print("CPU% = CPU seconds per wall second of that process x 100 (100% = one core)\n")
    header = (f"{'items':>6} {'offered/s':>10} | {'client':<24} {'events/s':>9} {'CPU%':>6} "
              f"{'CPU%/1k/s':>9} {'server CPU%':>11} | {'vs bare':>7}")
    print(header)
    print("-" * len(header))
    for n in args.items:
        server = Server(args.server, n, args.period_ms)
        tmp = Path(tempfile.mkdtemp(prefix="edge-bench-opcua-run-"))
        try:
            server.start()
            nodes_file = tmp / "nodes.txt"
            nodes_file.write_text("\n".join(server.node(i) for i in range(n)))
            offered = n * 1000 / args.period_ms
            bare = _run_client("_bare", server, nodes_file, args, tmp / "bare")
            gw = _run_client("_gateway", server, nodes_file, args, tmp / "gw")
            print(f"{n:>6} {offered:>10,.0f} | {'bare asyncua (notif/s)':<24} "
                  f"{bare['rate']:>9,.0f} {bare['cpu'] * 100:>6.0f} {_per_k(bare):>9.1f} "
                  f"{bare['server_cpu'] * 100:>11.0f} | {'1.00':>7}")
            ratio = gw["rate"] / bare["rate"] if bare["rate"] else float("nan")
            print(f"{'':>6} {'':>10} | {'gateway (committed/s)':<24} {gw['rate']:>9,.0f} "
                  f"{gw['cpu'] * 100:>6.0f} {_per_k(gw):>9.1f} "
                  f"{gw['server_cpu'] * 100:>11.0f} | {ratio:>7.2f}")
            notes = []
            if gw["dropped"]:
                notes.append(f"gateway queue dropped {gw['dropped']:,.0f} (counted)")
            if gw["server_overflow"]:
                notes.append(f"server queue overflow flagged {gw['server_overflow']:,.0f}")
            if gw["state"] != "running":
                notes.append(f"source {gw['state']}: {gw['error']}")
            if notes:
                print(f"{'':>18} note: " + "; ".join(notes))
            from bench.results import record

            record("opcua", figure=f"OPC UA, {n:,} items at {args.period_ms:g} ms → committed "
                   "events", value=round(gw["rate"]), unit="ev/s",
                   baseline="bare asyncua client counting notifications",
                   baseline_value=round(bare["rate"]),
                   note=f"{args.server} server, {offered:,.0f} changes/s offered; CPU "
                        f"{gw['cpu'] * 100:.0f} % ({_per_k(gw):.1f} %/1k ev/s) vs bare "
                        f"{bare['cpu'] * 100:.0f} % ({_per_k(bare):.1f} %/1k ev/s)"
                        + ("; " + "; ".join(notes) if notes else ""))
        finally:
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nnproc={os.cpu_count()}: the server, the client under test and the OS share them;"
          " 'vs bare' = gateway committed/s ÷ bare notifications/s, same server, same run.\n"
          "Below the offered rate, the server's per-item queues overflow (flagged by the "
          "server, counted in edge_source_dropped_total{reason=server_queue_overflow}).")


if __name__ == "__main__":
    main()
