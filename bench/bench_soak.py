"""Mixed soak: MQTT and OPC UA intake at a steady rate while the ERP flaps, for minutes.

A real gateway (``python -m edge run`` in its own process) with two sources:
- ``mqtt``: a private mosquitto on a free port and a paced paho publisher (QoS 1, a thread
  of this process), ``--mqtt-rate`` inspection results/s, every one with its own serial;
- ``opcua``: the asyncua station simulator (``edge simulate opcua``, own process) with
  ``--opcua-items`` sensor items changing every ``--opcua-period-ms``, each change an event.
One ``http`` sink to the stand-in ERP (``ErpReceiver``, in this process, recording ids),
which is stopped (connections refused) for ``--down-s`` and started again after
``--up-s``, over and over.

Every second: intake (``edge_events_received_total``) and delivered
(``edge_events_delivered_total``) from ``/metrics``, backlog (``edge_outbox_depth``), the
daemon's RSS (VmRSS) and open files (entries of /proc/PID/fd). At the end intake stops, the
ERP stays up until the backlog is empty, and the ERP's distinct event ids are compared with
the intake count: events lost must be 0; duplicates (the same id accepted twice: a batch
in flight when the ERP went down) are allowed by at-least-once delivery and counted.

Output: ``bench/results/soak.png`` (intake and delivery rate, backlog, RSS, open files,
ERP down periods shaded) and the figures: RSS at 90 % of the run vs once warm (after the
first two ERP outages drained: the first drains grow SQLite's page caches and the
allocator's high-water mark once), peak RSS, max open files vs at the start, events lost,
duplicates.

Run:  python -m bench.bench_soak [--minutes 10]          (--minutes 1: smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.bench_mqtt_ingest import Mosquitto
from bench.bench_opcua import Server as OpcuaServer
from bench.common import Daemon, free_port, gateway_yaml, machine_line, rss_kib
from bench.results import RESULTS_DIR

SOURCES = """\
sources:
  - id: line1
    type: mqtt
    url: mqtt://127.0.0.1:{mqtt_port}
    protocol: "5"
    client_id: bench-soak-gateway
    subscriptions:
      - topic: soak/{{station}}/inspection
        event: inspection.result
        ordering_key: "lot:{{lot_id}}"
        fields: {{lot_id: lot, serial: sn, result: result, measured: value, seq: seq}}
  - id: station7
    type: opcua
    endpoint: {endpoint}
    publishing_ms: {period_ms}
    timeout_s: 30
    backfill: {{enabled: false}}
    monitored:
{items}
"""


@dataclass
class Sample:
    t: float  # seconds since the start of the run
    intake: float
    delivered: float
    backlog: float
    rss_kib: int
    open_files: int
    erp_up: bool


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    down: list[tuple[float, float]] = field(default_factory=list)  # ERP down (start, end)
    published: int = 0


# --------------------------------------------------------------------------- probes


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every series of the three metrics read (labels ignored)."""
    wanted = {"edge_events_received_total": "intake", "edge_events_delivered_total": "delivered",
              "edge_outbox_depth": "backlog"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def publish_steady(port: int, rate: float, stop: threading.Event, run: Run) -> None:
    """Publish ``rate`` inspection results/s (QoS 1) until ``stop``; counts into ``run``."""
    from edge.sim.mqtt_station import Publisher

    pub = Publisher(f"mqtt://127.0.0.1:{port}", client_id="bench-soak-station",
                    max_inflight=1000).start()
    started = time.perf_counter()
    i = 0
    while not stop.is_set():
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        doc = {"lot": f"L{i % 50:03d}", "sn": f"SN{i:08d}", "result": "OK", "value": 10.0,
               "seq": i}
        pub.publish(f"soak/st{i % 12:02d}/inspection", orjson.dumps(doc), str(i))
        i += 1
        run.published = i
    pub.wait_acked(60)
    pub.stop()


# --------------------------------------------------------------------------- the run


async def soak(args: argparse.Namespace, work: Path) -> tuple[Run, dict[str, float]]:
    import httpx

    from edge.sim.erp import ErpReceiver

    broker = Mosquitto(work)
    station = OpcuaServer("asyncua", args.opcua_items, args.opcua_period_ms)
    erp = await ErpReceiver().start()
    daemon: Daemon | None = None
    stop_pub = threading.Event()
    pub_thread: threading.Thread | None = None
    run = Run()
    try:
        await asyncio.to_thread(station.start)
        api_port = free_port()
        items = "\n".join(
            f'      - {{node: "{station.node(i)}", sampling_ms: {args.opcua_period_ms}, '
            f'queue_size: 10}}' for i in range(args.opcua_items))
        cfg = work / "cfg.yaml"
        cfg.write_text(gateway_yaml(work / "state", erp.url, max_batch=100,
                                    api=f"127.0.0.1:{api_port}")
                       + SOURCES.format(mqtt_port=broker.port, endpoint=station.endpoint,
                                        period_ms=args.opcua_period_ms, items=items))
        daemon = Daemon(cfg).start()
        if await asyncio.to_thread(daemon.wait_line, "MQTT connected", 60) is None:
            raise SystemExit("gateway did not connect:\n" + daemon.tail())
        pub_thread = threading.Thread(target=publish_steady, daemon=True, name="soak-pub",
                                      args=(broker.port, args.mqtt_rate, stop_pub, run))
        pub_thread.start()
        duration = args.minutes * 60
        t0 = time.monotonic()
        erp_up = True
        next_flip = t0 + args.up_s
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                     trust_env=False, timeout=5) as api:
            tick = 0
            while True:
                tick += 1
                now = time.monotonic()
                if now - t0 >= duration:
                    break
                if now >= next_flip:
                    if erp_up:
                        await erp.stop()
                        run.down.append((now - t0, now - t0))
                        next_flip = now + args.down_s
                    else:
                        await erp.start()
                        run.down[-1] = (run.down[-1][0], now - t0)
                        next_flip = now + args.up_s
                    erp_up = not erp_up
                m = parse_metrics((await api.get("/metrics")).text)
                rss, _ = rss_kib(daemon.pid)
                run.samples.append(Sample(now - t0, m["intake"], m["delivered"], m["backlog"],
                                          rss, open_files(daemon.pid), erp_up))
                await asyncio.sleep(max(0.0, t0 + tick - time.monotonic()))
            # intake stops; the ERP comes back (if down) and the backlog drains
            stop_pub.set()
            await asyncio.to_thread(pub_thread.join, 90)
            await asyncio.to_thread(station.stop)
            if not erp_up:
                await erp.start()
                run.down[-1] = (run.down[-1][0], time.monotonic() - t0)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                m = parse_metrics((await api.get("/metrics")).text)
                if m["backlog"] == 0 and m["delivered"] >= m["intake"]:
                    break
                await asyncio.sleep(1)
            final = parse_metrics((await api.get("/metrics")).text)
            mqtt_in = await api.get("/metrics")
        mqtt_received = sum(
            float(line.rsplit(" ", 1)[1]) for line in mqtt_in.text.splitlines()
            if line.startswith('edge_events_received_total{source="line1"'))
        ids = erp.accepted_ids
        final.update(distinct=len(ids), duplicates=sum(n - 1 for n in ids.values() if n > 1),
                     mqtt_received=mqtt_received, erp_requests=erp.request_count,
                     errors=sum(1 for _, text in daemon.lines if "ERROR" in text))
        return run, final
    finally:
        stop_pub.set()
        if daemon is not None:
            daemon.stop()
            (work / "daemon.log").write_text("\n".join(text for _, text in daemon.lines) + "\n")
        with contextlib.suppress(Exception):
            await erp.stop()
        station.stop()
        broker.stop()


# --------------------------------------------------------------------------- figures


def window_median(samples: list[Sample], duration: float, at: float, attr: str) -> float:
    """Median of ``attr`` over the samples within ±5 % of the run around ``at`` (0–1)."""
    lo, hi = (at - 0.05) * duration, (at + 0.05) * duration
    vals = [getattr(s, attr) for s in samples if lo <= s.t <= hi]
    return statistics.median(vals) if vals else float("nan")


def slope_per_min(samples: list[Sample], attr: str, since: float) -> float:
    """Least-squares slope of ``attr`` per minute over the samples after ``since`` s."""
    pts = [(s.t, float(getattr(s, attr))) for s in samples if s.t >= since]
    if len(pts) < 3:
        return float("nan")
    mx = statistics.fmean(t for t, _ in pts)
    my = statistics.fmean(v for _, v in pts)
    den = sum((t - mx) ** 2 for t, _ in pts)
    return sum((t - mx) * (v - my) for t, v in pts) / den * 60 if den else float("nan")


def plot(run: Run, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = run.samples
    t = [x.t / 60 for x in s]
    rate_t = t[1:]
    intake = [b.intake - a.intake for a, b in zip(s, s[1:], strict=False)]
    delivered = [b.delivered - a.delivered for a, b in zip(s, s[1:], strict=False)]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    axes[0].plot(rate_t, intake, label="intake (committed)", lw=0.8)
    axes[0].plot(rate_t, delivered, label="delivered to the ERP", lw=0.8)
    axes[0].set_ylabel("events/s")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(t, [x.backlog for x in s], color="tab:red", lw=0.8)
    axes[1].set_ylabel("backlog (rows)")
    axes[2].plot(t, [x.rss_kib / 1024 for x in s], color="tab:purple", lw=0.8)
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].set_ylim(bottom=0)
    axes[3].plot(t, [x.open_files for x in s], color="tab:green", lw=0.8)
    axes[3].set_ylabel("open files")
    axes[3].set_ylim(bottom=0)
    axes[3].set_xlabel("minutes")
    for ax in axes:
        for a, b in run.down:
            ax.axvspan(a / 60, b / 60, color="grey", alpha=0.2, lw=0)
        ax.grid(alpha=0.3)
    axes[0].set_title(title + " — grey: ERP down", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_soak", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    p.add_argument("--mqtt-rate", type=float, default=200.0, help="MQTT messages/s")
    p.add_argument("--opcua-items", type=int, default=50)
    p.add_argument("--opcua-period-ms", type=float, default=500.0)
    p.add_argument("--up-s", type=float, help="ERP up per cycle (default 60, 20 below 3 min)")
    p.add_argument("--down-s", type=float, help="ERP down per cycle (default 30, 10 below 3 min)")
    p.add_argument("--plot", type=Path, default=RESULTS_DIR / "soak.png")
    args = p.parse_args(argv)
    short = args.minutes < 3
    args.up_s = args.up_s or (20.0 if short else 60.0)
    args.down_s = args.down_s or (10.0 if short else 30.0)

    offered = args.mqtt_rate + args.opcua_items * 1000 / args.opcua_period_ms
    print(f"machine: {machine_line()}")
    print(f"{args.minutes:g} min: MQTT {args.mqtt_rate:g} msg/s + OPC UA {args.opcua_items} "
          f"items every {args.opcua_period_ms:g} ms (≈ {offered:,.0f} ev/s); ERP up "
          f"{args.up_s:g} s / down {args.down_s:g} s", flush=True)
    from edge.cli.common import run_async

    work = Path(tempfile.mkdtemp(prefix="edge-bench-soak-"))
    run, final = run_async(soak(args, work))
    duration = args.minutes * 60
    s = run.samples
    # warm: after the first two ERP outages have drained. The first drains grow SQLite's
    # page caches to their size and leave freed memory with the allocator (a one-off step,
    # not a trend; counted per outage it stops); flat is measured from there.
    warm_at = min(0.5, max(0.1, 2 * (args.up_s + args.down_s) / duration))
    rss10 = window_median(s, duration, warm_at, "rss_kib") / 1024
    rss90 = window_median(s, duration, 0.90, "rss_kib") / 1024
    rss_peak = max(x.rss_kib for x in s) / 1024
    rss_slope = slope_per_min(s, "rss_kib", warm_at * duration) / 1024
    fd_start = s[min(len(s) - 1, 5)].open_files  # after the sources connected
    fd_max = max(x.open_files for x in s)
    fd_end = s[-1].open_files
    lost = int(final["intake"] - final["distinct"])
    dups = int(final["duplicates"])
    mqtt_lost = int(run.published - final["mqtt_received"])
    backlog_max = max(x.backlog for x in s)
    plot(run, args.plot, f"{args.minutes:g} min soak, MQTT {args.mqtt_rate:g}/s + OPC UA "
         f"{offered - args.mqtt_rate:g}/s")

    print(f"intake {final['intake']:,.0f} events (MQTT published {run.published:,}, committed "
          f"{final['mqtt_received']:,.0f}); ERP: {final['distinct']:,.0f} distinct ids, "
          f"{final['erp_requests']:,.0f} requests; {len(run.down)} ERP outages; "
          f"max backlog {backlog_max:,.0f}")
    print(f"events lost {lost} (target 0); MQTT messages not committed {mqtt_lost}; "
          f"duplicates {dups} (at-least-once)")
    print(f"RSS at {warm_at:.0%} (warm) {rss10:.1f} MiB, at 90 % {rss90:.1f} MiB (drift "
          f"{rss90 - rss10:+.1f} MiB; slope after {warm_at:.0%} {rss_slope:+.2f} MiB/min); "
          f"peak {rss_peak:.1f} MiB")
    print(f"daemon log lines with ERROR: {final['errors']:.0f}")
    print(f"open files: {fd_start} at the start, max {fd_max}, {fd_end} at the end")
    print(f"plot: {args.plot}; the daemon's log: {work / 'daemon.log'}")

    from bench.results import record

    run_note = (f"{args.minutes:g} min, ≈ {offered:,.0f} ev/s (MQTT + OPC UA), ERP up "
                f"{args.up_s:g} s / down {args.down_s:g} s, {len(run.down)} outages, max "
                f"backlog {backlog_max:,.0f}")
    drift = rss90 - rss10
    record("soak", figure="RSS at 90 % of the run (vs warm: after two ERP outages)",
           value=round(rss90, 1), unit="MiB",
           baseline=f"RSS at {warm_at:.0%} of the run", baseline_value=round(rss10, 1),
           target="flat: drift ≤ 5 MiB", met=abs(drift) <= 5,
           note=f"slope after {warm_at:.0%}: {rss_slope:+.2f} MiB/min; {run_note}")
    record("soak", figure="peak RSS of the soak", value=round(rss_peak, 1), unit="MiB",
           target="< 100 MiB", met=rss_peak < 100,
           note="SQLite's two 8 MB page caches and the allocator's high-water mark after "
                "the largest drain make most of the step above the idle daemon")
    record("soak", figure="max open files (vs at the start)", value=fd_max, unit="fds",
           baseline="open files at the start", baseline_value=fd_start,
           target="flat: max ≤ start + 8", met=fd_max <= fd_start + 8,
           note=f"{fd_end} at the end")
    record("soak", figure="events lost (intake − distinct ids at the ERP)", value=lost,
           unit="events", target="0", met=lost == 0,
           note=f"of {final['intake']:,.0f} committed ({final['distinct']:,.0f} distinct ids "
                f"at the ERP); MQTT published {run.published:,}, not committed {mqtt_lost}")
    record("soak", figure="duplicates at the ERP (same id accepted twice)", value=dups,
           unit="events", note="at-least-once: a batch in flight when the ERP went down")


if __name__ == "__main__":
    main()
