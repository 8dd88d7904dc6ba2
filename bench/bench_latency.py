"""Online end-to-end latency at a steady publish rate (default 1,000 msg/s).

Path measured: publisher (paho, QoS 1) → mosquitto → gateway (``python -m edge run`` in its
own process: mqtt source → outbox commit (synchronous=FULL) → forwarder → HTTP sink) →
stand-in ERP (starlette/uvicorn, in this process). Each payload carries its publish time;
latency = time the ERP handled the request − publish time (same clock, same machine).
The first second is warm-up and is not counted.

Baseline in the same run: the same publisher, broker and rate to a bare paho subscriber
in its own process that only timestamps arrival (no storage, no HTTP): the floor set by
the broker and paho.

Target: gateway p99 < 50 ms at 1,000 msg/s.

Run:  python -m bench.bench_latency [--rate 1000] [--seconds 10] [--protocol 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import orjson

from bench.bench_mqtt_ingest import Mosquitto, machine_line

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
WARMUP_S = 1.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def publish_paced(port: int, protocol: str, rate: float, seconds: float, topic: str) -> int:
    """Publish ``rate`` msg/s for ``seconds`` from a thread; payload carries ``sent``."""
    from edge.sim.mqtt_station import Publisher

    pub = Publisher(f"mqtt://127.0.0.1:{port}", protocol=protocol, max_inflight=1000).start()
    n = int(rate * seconds)
    started = time.perf_counter()
    for i in range(n):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        doc = {"lot": f"L{i % 50:03d}", "sn": f"SN{i:08d}", "result": "OK",
               "value": 10.0, "seq": i, "sent": time.time()}
        pub.publish(topic.format(st=i % 12), orjson.dumps(doc), str(i))
    pub.wait_acked(30)
    pub.stop()
    return n


# --------------------------------------------------------------------------- baseline


def subscriber_main(port: int, protocol: str, n: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    lat: list[tuple[float, float]] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-latency-bare",
                    protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        doc = orjson.loads(msg.payload)
        lat.append((doc["sent"], now - doc["sent"]))
        if len(lat) >= n:
            c.disconnect()

    c.on_connect = lambda *a: (c.subscribe("lat/+/inspection", qos=1), print("READY", flush=True))
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_forever()
    print("LAT " + json.dumps(lat), flush=True)


def run_baseline(port: int, protocol: str, rate: float, seconds: float) -> list[float]:
    n = int(rate * seconds)
    proc = subprocess.Popen([PY, "-m", "bench.bench_latency", "--subscriber", "--port", str(port),
                             "--protocol", protocol, "--count", str(n)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise SystemExit("baseline subscriber did not start")
    time.sleep(0.3)  # SUBACK
    publish_paced(port, protocol, rate, seconds, "lat/st{st:02d}/inspection")
    out, _ = proc.communicate(timeout=60)
    pairs = json.loads(out.split("LAT ", 1)[1])
    t0 = min(s for s, _ in pairs)
    return [lat for sent, lat in pairs if sent - t0 >= WARMUP_S]


# --------------------------------------------------------------------------- gateway


async def run_gateway(port: int, protocol: str, rate: float, seconds: float
                      ) -> tuple[list[float], str]:
    from bench.common import Daemon
    from edge.sim.erp import ErpReceiver

    erp = await ErpReceiver().start()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-latency-"))
    cfg = work / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        site: bench
        state_dir: {work / 'state'}
        api: {{enabled: false}}
        logging: {{level: info}}
        sinks:
          - id: erp
            type: http
            url: {erp.url}
            routes: [{{events: ["*"], method: POST, path: /events, max_batch: 100}}]
        sources:
          - id: line1
            type: mqtt
            url: mqtt://127.0.0.1:{port}
            protocol: "{protocol}"
            client_id: bench-latency-gateway
        """) + textwrap.indent(textwrap.dedent("""\
        subscriptions:
          - topic: gw/{station}/inspection
            event: inspection.result
            ordering_key: "lot:{lot_id}"
            fields: {lot_id: lot, serial: sn, result: result, measured: value, seq: seq,
                     sent: sent}
        """), "    "))
    daemon = Daemon(cfg).start()
    try:
        if daemon.wait_line("MQTT connected", 30) is None:
            raise SystemExit("gateway did not connect:\n" + daemon.tail())
        n = int(rate * seconds)
        await asyncio.to_thread(publish_paced, port, protocol, rate, seconds,
                                "gw/st{st:02d}/inspection")
        await erp.wait_for(lambda e: len(e.events) >= n, 60)
        rows = [(ev["data"]["sent"], _epoch(ev["received_ts"]), req.at)
                for req in erp.requests if req.status == 200 for ev in req.events]
        requests = sum(1 for r in erp.requests if r.status == 200)
    finally:
        daemon.stop()
        await erp.stop()
    t0 = min(r[0] for r in rows)
    rows = [r for r in rows if r[0] - t0 >= WARMUP_S]
    ingest = [(rec - sent) * 1000 for sent, rec, _ in rows]
    forward = [(at - rec) * 1000 for _, rec, at in rows]
    legs = (f"{len(rows):,} events in {requests} requests; legs p50/p99: publish→mapped "
            f"{percentile(ingest, 50):.1f}/{percentile(ingest, 99):.1f} ms, mapped→ERP "
            f"{percentile(forward, 50):.1f}/{percentile(forward, 99):.1f} ms")
    return [at - sent for sent, _, at in rows], legs


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def line(name: str, lat: list[float]) -> str:
    ms = [x * 1000 for x in lat]
    return (f"{name:<46} p50 {percentile(ms, 50):6.1f} ms  p99 {percentile(ms, 99):6.1f} ms  "
            f"max {max(ms):6.1f} ms  (n={len(ms):,})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_latency", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    p.add_argument("--subscriber", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.subscriber:
        subscriber_main(args.port, args.protocol, args.count)
        return

    print(f"machine: {machine_line()}")
    print(f"MQTT {args.protocol}, QoS 1, {args.rate:,.0f} msg/s for {args.seconds:g} s "
          f"(first {WARMUP_S:g} s not counted)")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-mosquitto-"))
    broker = Mosquitto(work)
    try:
        base = run_baseline(broker.port, args.protocol, args.rate, args.seconds)
        print(line("baseline  publish → broker → bare subscriber", base), flush=True)
        from edge.cli.common import run_async

        gw, info = run_async(run_gateway(broker.port, args.protocol, args.rate, args.seconds))
        print(line("gateway   publish → outbox (FULL) → HTTP ERP", gw))
        print(f"          {info}")
    finally:
        broker.stop()
    p99 = percentile([x * 1000 for x in gw], 99)
    print(f"gateway p99 {p99:.1f} ms (target < 50 ms); baseline p99 "
          f"{percentile([x * 1000 for x in base], 99):.1f} ms")

    from bench.results import record

    gw_ms, base_ms = [x * 1000 for x in gw], [x * 1000 for x in base]
    run = f"MQTT {args.protocol} QoS 1, {args.rate:,.0f} msg/s for {args.seconds:g} s"
    record("latency", figure=f"end-to-end latency p99 at {args.rate:,.0f} msg/s, publish → ERP",
           value=round(p99, 2), unit="ms", baseline="publish → broker → bare subscriber, p99",
           baseline_value=round(percentile(base_ms, 99), 2), target="< 50 ms", met=p99 < 50,
           note=f"{run}; {info}")
    record("latency", figure="end-to-end latency p50, publish → ERP",
           value=round(percentile(gw_ms, 50), 2), unit="ms",
           baseline="publish → broker → bare subscriber, p50",
           baseline_value=round(percentile(base_ms, 50), 2), note=run)


if __name__ == "__main__":
    main()
