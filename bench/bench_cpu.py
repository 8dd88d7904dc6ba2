"""CPU cost of the gateway per 1,000 events at a steady 1,000 events/s.

Path: publisher (paho, QoS 1, own process) → private mosquitto → gateway (``python -m edge
run`` in its own process: mqtt source → outbox commit (synchronous=FULL) → forwarder →
HTTP sink, batches of up to 100) → stand-in ERP (``ErpReceiver(record=False)``, own
process). Figure: the daemon's CPU seconds (utime + stime of all its threads, from
/proc/PID/stat) from the first publish until the ERP accepted the last event, per 1,000
events.

Baselines in the same run, same broker, same messages, same rate:
- a bare paho subscriber in its own process (QoS 1, automatic PUBACK) that only counts:
  what receiving the messages costs at the least;
- the publisher's own CPU for the gateway run (its process, all threads).
The daemon idle (connected, nothing to do) is measured too, per second.

Run:  python -m bench.bench_cpu [--rate 1000] [--seconds 60]     (--quick: 10 s)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_mqtt_ingest import Mosquitto
from bench.common import PY, REPO, Daemon, ReceiverProcess, cpu_seconds, gateway_yaml, machine_line

TOPIC_GW = "gw/st{st:02d}/inspection"
TOPIC_BARE = "bare/st{st:02d}/inspection"

SOURCE_BLOCK = """\
sources:
  - id: line1
    type: mqtt
    url: mqtt://127.0.0.1:{port}
    protocol: "5"
    client_id: bench-cpu-gateway
    subscriptions:
      - topic: gw/{{station}}/inspection
        event: inspection.result
        ordering_key: "lot:{{lot_id}}"
        fields: {{lot_id: lot, serial: sn, result: result, measured: value, seq: seq,
                 sent: sent}}
"""


# --------------------------------------------------------------------------- child roles


def _publisher_main(port: int, rate: float, seconds: float, topic: str) -> None:
    """Publish at ``rate`` for ``seconds``; print ``CPU s n`` (own CPU from the first
    publish until the last PUBACK)."""
    from bench.bench_latency import publish_paced

    c0 = time.process_time()
    n = publish_paced(port, "5", rate, seconds, topic)
    print(f"CPU {time.process_time() - c0:.4f} {n}", flush=True)


def _subscriber_main(port: int, count: int) -> None:
    """Count ``count`` messages on ``bare/+/inspection``; print ``CPU s n`` (own CPU from
    SUBACK to the last message)."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-cpu-bare",
                    protocol=mqtt.MQTTv5)
    got = [0]
    done = threading.Event()
    start_cpu = [0.0]

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] >= count:
            done.set()
            c.disconnect()

    def on_subscribe(*_: object) -> None:
        start_cpu[0] = time.process_time()
        print("READY", flush=True)

    def on_connect(*_: object) -> None:
        c.subscribe("bare/+/inspection", qos=1)

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_forever()
    print(f"CPU {time.process_time() - start_cpu[0]:.4f} {got[0]}", flush=True)


def _cpu_line(proc: subprocess.Popen[str]) -> tuple[float, int]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("CPU "):
            _, cpu, n = line.split()
            return float(cpu), int(n)
    raise RuntimeError(f"child exited without its CPU line (exit {proc.wait()})")


def _publisher(port: int, rate: float, seconds: float, topic: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, "-m", "bench.bench_cpu", "_publish", "--port", str(port),
                             "--rate", str(rate), "--seconds", str(seconds), "--topic", topic],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- runs


def run_baseline(port: int, rate: float, seconds: float) -> dict[str, float]:
    n = int(rate * seconds)
    sub = subprocess.Popen([PY, "-m", "bench.bench_cpu", "_subscribe", "--port", str(port),
                            "--count", str(n)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "READY":
        raise SystemExit("baseline subscriber did not start")
    pub_cpu, _ = _cpu_line(_publisher(port, rate, seconds, TOPIC_BARE))
    sub_cpu, got = _cpu_line(sub)
    sub.wait(30)
    return {"events": got, "subscriber_cpu": sub_cpu, "publisher_cpu": pub_cpu}


def run_gateway(port: int, rate: float, seconds: float, idle_s: float) -> dict[str, float]:
    n = int(rate * seconds)
    work = Path(tempfile.mkdtemp(prefix="edge-bench-cpu-"))
    receiver = ReceiverProcess().start()
    cfg = work / "cfg.yaml"
    cfg.write_text(gateway_yaml(work / "state", receiver.url, max_batch=100)
                   + SOURCE_BLOCK.format(port=port))
    daemon = Daemon(cfg).start()
    try:
        if daemon.wait_line("MQTT connected", 60) is None:
            raise SystemExit("gateway did not connect:\n" + daemon.tail())
        time.sleep(1.0)  # let start-up work (integrity check, GC freeze) settle
        i0, it0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(idle_s)
        idle = (cpu_seconds(daemon.pid) - i0) / (time.monotonic() - it0)
        c0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        pub_cpu, _ = _cpu_line(_publisher(port, rate, seconds, TOPIC_GW))
        if not receiver.wait_accepted(n, 120):
            raise SystemExit(f"ERP accepted {receiver.accepted:,} of {n:,}:\n" + daemon.tail())
        daemon_cpu, took = cpu_seconds(daemon.pid) - c0, time.monotonic() - t0
        return {"events": receiver.accepted, "daemon_cpu": daemon_cpu, "wall": took,
                "idle_cpu_per_s": idle, "publisher_cpu": pub_cpu,
                "requests": receiver.requests}
    finally:
        daemon.stop()
        receiver.stop()


def per_k(cpu: float, events: float) -> float:
    return cpu / events * 1000 if events else float("nan")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        p = argparse.ArgumentParser()
        p.add_argument("role", choices=["_publish", "_subscribe"])
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--rate", type=float, default=1000)
        p.add_argument("--seconds", type=float, default=60)
        p.add_argument("--topic", default=TOPIC_GW)
        p.add_argument("--count", type=int, default=0)
        a = p.parse_args(argv)
        if a.role == "_publish":
            _publisher_main(a.port, a.rate, a.seconds, a.topic)
        else:
            _subscriber_main(a.port, a.count)
        return
    p = argparse.ArgumentParser(prog="python -m bench.bench_cpu", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    p.add_argument("--seconds", type=float, default=60.0, help="publishing time per run")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle daemon measured")
    p.add_argument("--quick", action="store_true", help="10 s per run (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.idle = 10.0, 2.0

    print(f"machine: {machine_line()}")
    print(f"MQTT 5, QoS 1, {args.rate:,.0f} msg/s for {args.seconds:g} s per run; CPU = "
          "utime + stime of the process (all threads)")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-mosquitto-"))
    broker = Mosquitto(work)
    try:
        base = run_baseline(broker.port, args.rate, args.seconds)
        gw = run_gateway(broker.port, args.rate, args.seconds, args.idle)
    finally:
        broker.stop()

    gw_k = per_k(gw["daemon_cpu"], gw["events"])
    sub_k = per_k(base["subscriber_cpu"], base["events"])
    pub_k = per_k(gw["publisher_cpu"], gw["events"])
    print(f"{'gateway daemon (publish → ERP, FULL)':<44} {gw_k:6.3f} CPU-s / 1k events  "
          f"({gw['daemon_cpu']:.1f} s for {gw['events']:,.0f} events in {gw['wall']:.1f} s, "
          f"{gw['requests']:,.0f} requests)")
    print(f"{'baseline: bare paho subscriber, counts only':<44} {sub_k:6.3f} CPU-s / 1k events  "
          f"({base['subscriber_cpu']:.1f} s for {base['events']:,.0f})")
    print(f"{'baseline: the publisher (gateway run)':<44} {pub_k:6.3f} CPU-s / 1k events  "
          f"({gw['publisher_cpu']:.1f} s)")
    print(f"{'gateway daemon idle':<44} {gw['idle_cpu_per_s'] * 100:6.1f} % of a core")
    print(f"at {args.rate:,.0f} ev/s the daemon uses {gw_k * args.rate / 10:.0f} % of one core "
          f"({gw_k / sub_k:.1f}× the bare subscriber)")

    from bench.results import record

    note = (f"MQTT 5 QoS 1 at {args.rate:,.0f} msg/s for {args.seconds:g} s, "
            f"{gw['events']:,.0f} events in {gw['requests']:,.0f} requests")
    record("cpu", figure=f"daemon CPU per 1,000 events at {args.rate:,.0f} ev/s, MQTT → ERP",
           value=round(gw_k, 4), unit="CPU-s/1k ev",
           baseline="bare paho subscriber that only counts", baseline_value=round(sub_k, 4),
           target=None, met=None, note=note)
    record("cpu", figure="publisher's own CPU per 1,000 events (same gateway run)",
           value=round(pub_k, 4), unit="CPU-s/1k ev", note="paho publisher, QoS 1")
    record("cpu", figure="daemon CPU while idle (connected, nothing to do)",
           value=round(gw["idle_cpu_per_s"] * 100, 2), unit="% of a core")


if __name__ == "__main__":
    main()
