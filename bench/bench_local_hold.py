"""Local hold latency with the cloud down: failing result published → hold on the broker.

Path measured: a station publishes a failing inspection result (paho, QoS 1) → mosquitto →
gateway (``python -m edge run`` in its own process: mqtt source → spec_limits rule → outbox
commit (synchronous=FULL) with the hold episode's events → forwarder → the ``line-holds``
MQTT sink, retained, QoS 1) → mosquitto → a subscriber on the hold topics (the line
controller), in this process. Every cloud sink is down the whole time: the ERP answers 503
to every request (a stand-in in outage) and the QMS does not listen at all (connection
refused), so their backlog grows while the holds go out.

Each failure is on a lot of its own (a lot's first failure opens a hold episode; later
ones add nonconformances only), published one at a time, the next once its hold arrived
(plus ``--gap-ms``): the figure is the latency of one hold, not a throughput. The first
``--warmup`` failures are not counted (the sink's first connect, caches).

Baseline in the same run: the same publisher, broker and subscriber with a plain QoS 1
publish and receive of the same payload, one at a time: the broker round trip, the floor.

Target (issue 10, item 4): the hold reaches the plant broker within 100 ms of the failing
result with every cloud sink down.

Run:  python -m bench.bench_local_hold [--failures 300] [--gap-ms 20] [--protocol 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import orjson

from bench.bench_latency import percentile
from bench.bench_mqtt_ingest import Mosquitto, machine_line
from bench.common import Daemon, free_port

SITE = "bench"
TARGET_MS = 100.0


class Line:
    """A publisher (the station) and a subscriber (the line controller) on one broker;
    ``round_trip(topic, payload, wait_topic)`` → seconds from publish to the message on
    ``wait_topic`` (monotonic clock, one process)."""

    def __init__(self, port: int, protocol: str, subscribe: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = protocol == "5"
        self._arrived: dict[str, float] = {}
        self._cond = threading.Condition()
        self.retained_flags: list[bool] = []
        self.qos: list[int] = []
        self.sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-hold-line",
                               protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        ready = threading.Event()
        self.sub.on_connect = lambda c, *a: c.subscribe(subscribe, qos=1)
        self.sub.on_subscribe = lambda *a: ready.set()
        self.sub.on_message = self._on_message
        self.sub.connect("127.0.0.1", port)
        self.sub.loop_start()
        if not ready.wait(10):
            raise SystemExit("the subscriber did not subscribe")
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-hold-station",
                               protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        now = time.monotonic()
        with self._cond:
            self._arrived.setdefault(msg.topic, now)  # type: ignore[attr-defined]
            self.qos.append(msg.qos)  # type: ignore[attr-defined]
            self._cond.notify_all()

    def round_trip(self, topic: str, payload: bytes, wait_topic: str,
                   timeout: float = 30.0) -> float:
        sent = time.monotonic()
        self.pub.publish(topic, payload, qos=1)
        with self._cond:
            if not self._cond.wait_for(lambda: wait_topic in self._arrived, timeout):
                raise SystemExit(f"nothing arrived on {wait_topic} within {timeout:g} s")
            return self._arrived[wait_topic] - sent

    def stop(self) -> None:
        for c in (self.pub, self.sub):
            c.disconnect()
            c.loop_stop()


def failing_result(i: int) -> tuple[str, bytes]:
    doc = {"lot": f"LH{i:05d}", "sn": f"SN{i:08d}", "result": "NOK", "value": 10.23,
           "char": "bore_diameter"}
    return f"plant/{SITE}/line/1/station/st01/inspection", orjson.dumps(doc)


def run_baseline(port: int, protocol: str, n: int, gap_s: float) -> list[float]:
    line = Line(port, protocol, "base/+/echo")
    try:
        out = []
        for i in range(n):
            _, payload = failing_result(i)
            out.append(line.round_trip(f"base/{i}/echo", payload, f"base/{i}/echo"))
            time.sleep(gap_s)
        return out
    finally:
        line.stop()


def gateway_config(work: Path, port: int, protocol: str, erp_url: str) -> Path:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    cfg = work / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        site: {SITE}
        state_dir: {work / 'state'}
        api: {{enabled: false}}
        logging: {{level: info}}
        sources:
          - id: line1
            type: mqtt
            url: mqtt://127.0.0.1:{port}
            protocol: "{protocol}"
            client_id: bench-hold-gateway
            subscriptions:
              - topic: plant/{{site}}/line/{{line}}/station/{{station}}/inspection
                event: inspection.result
                ordering_key: "lot:{{lot_id}}"
                fields: {{lot_id: lot, serial: sn, result: result, measured: value,
                         characteristic: char}}
        rules:
          - {{type: spec_limits, characteristic: bore_diameter, lower: 9.95, upper: 10.05}}
        sinks:
          - id: erp
            type: http
            url: {erp_url}
            routes:
              - {{events: [lot.status], method: PUT, path: "/lots/{{data.lot_id}}/status"}}
              - {{events: [notification], method: POST, path: /notifications}}
          - id: qms
            type: http
            url: {down}
            routes:
              - {{events: [inspection.result, nonconformance, supplier.case,
                          quality.hold, quality.release], method: POST, path: /events}}
          - id: line-holds
            type: mqtt
            url: mqtt://127.0.0.1:{port}
            protocol: "{protocol}"
            client_id: bench-hold-sink
            routes:
              - {{events: [quality.hold, quality.release],
                 topic: "plant/{{site}}/lot/{{data.lot_id}}/hold", qos: 1, retain: true}}
        """))
    return cfg


async def run_gateway(port: int, protocol: str, n: int, gap_s: float
                      ) -> tuple[list[float], str]:
    from edge.sim.erp import ErpReceiver

    erp = await ErpReceiver().start()
    erp.outage(True)  # every request: 503
    work = Path(tempfile.mkdtemp(prefix="edge-bench-hold-"))
    daemon = Daemon(gateway_config(work, port, protocol, erp.url)).start()
    line: Line | None = None
    try:
        if daemon.wait_line("MQTT connected", 30) is None:
            raise SystemExit("gateway did not connect:\n" + daemon.tail())
        line = await asyncio.to_thread(Line, port, protocol, f"plant/{SITE}/lot/+/hold")

        def go() -> list[float]:
            assert line is not None
            out = []
            for i in range(n):
                topic, payload = failing_result(i)
                out.append(line.round_trip(topic, payload, f"plant/{SITE}/lot/LH{i:05d}/hold"))
                time.sleep(gap_s)
            return out

        lat = await asyncio.to_thread(go)
        qos = set(line.qos)
        refused = sum(1 for r in erp.requests if r.status == 503)
        accepted = len(erp.events)
    finally:
        if line is not None:
            await asyncio.to_thread(line.stop)
        await asyncio.to_thread(daemon.stop)
        await erp.stop()
    info = (f"holds received at QoS {sorted(qos)}; the ERP refused {refused} requests "
            f"(503) and accepted {accepted}; the QMS never listened")
    return lat, info


def row(name: str, lat: list[float]) -> str:
    ms = [x * 1000 for x in lat]
    return (f"{name:<52} p50 {percentile(ms, 50):6.1f} ms  p95 {percentile(ms, 95):6.1f} ms  "
            f"max {max(ms):6.1f} ms  (n={len(ms):,})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_local_hold", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--failures", type=int, default=300, help="failing results (one lot each)")
    p.add_argument("--warmup", type=int, default=10, help="first failures not counted")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause after each hold")
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    args = p.parse_args(argv)
    n, gap = args.failures + args.warmup, args.gap_ms / 1000

    print(f"machine: {machine_line()}")
    print(f"MQTT {args.protocol}, QoS 1; {args.failures} failures, one lot each, one at a "
          f"time (+{args.gap_ms:g} ms); first {args.warmup} not counted; cloud sinks down")
    work = Path(tempfile.mkdtemp(prefix="edge-bench-mosquitto-"))
    broker = Mosquitto(work)
    try:
        base = run_baseline(broker.port, args.protocol, n, gap)[args.warmup:]
        print(row("baseline  publish → broker → subscriber", base), flush=True)
        from edge.cli.common import run_async

        gw, info = run_async(run_gateway(broker.port, args.protocol, n, gap))
        gw = gw[args.warmup:]
        print(row("gateway   failing result → hold on the broker", gw))
        print(f"          {info}")
    finally:
        broker.stop()
    worst = max(gw) * 1000
    within = sum(1 for x in gw if x * 1000 <= TARGET_MS)
    print(f"hold p95 {percentile([x * 1000 for x in gw], 95):.1f} ms, max {worst:.1f} ms; "
          f"{within}/{len(gw)} within {TARGET_MS:g} ms (target: all); baseline p95 "
          f"{percentile([x * 1000 for x in base], 95):.1f} ms")

    from bench.results import record

    record("local_hold", figure="failing result → hold on the broker, every cloud sink down (max)",
           value=round(worst, 1), unit="ms", baseline="plain QoS 1 publish → broker → "
           "subscriber, max", baseline_value=round(max(base) * 1000, 1),
           target=f"all within {TARGET_MS:g} ms", met=within == len(gw),
           note=f"{within}/{len(gw)} within {TARGET_MS:g} ms; p50 "
                f"{percentile([x * 1000 for x in gw], 50):.1f} ms, p95 "
                f"{percentile([x * 1000 for x in gw], 95):.1f} ms; {info}")


if __name__ == "__main__":
    main()
