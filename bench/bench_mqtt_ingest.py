"""MQTT QoS 1 ingest into the committed outbox vs a bare paho subscriber that stores nothing.

Setup: one private mosquitto (loopback, free port, window 1000, queues unbounded). For each
measurement a persistent session is created for a fresh client id, N inspection messages
(~150 bytes of JSON) are published into it while the consumer is offline, then the consumer
starts in its own process and drains the queue:

  baseline  bare paho subscriber (MQTT 5, Receive Maximum 1000, paho's automatic PUBACK),
            counts messages, stores nothing
  gateway   the gateway's mqtt source in a Gateway (uvloop): map → validate → outbox
            (synchronous=FULL, group commit) → PUBACK after COMMIT, in arrival order;
            its HTTP sink points at a closed port (the ERP is "down"), so the figure is
            ingest only

Figure: messages/s from CONNACK to the N-th message counted (baseline) or acked after its
commit (gateway). Rounds alternate the order; the medians and their ratio are printed and
recorded (target: gateway >= 0.5 x baseline, DESIGN "Performance targets"), with the CPU
seconds each consumer process used per 1,000 messages (startup included), a figure that
moves less than the rates on a busy machine.

Run:  python -m bench.bench_mqtt_ingest [--messages 50000] [--rounds 3] [--protocol 5]
      python -m bench.bench_mqtt_ingest --quick      # smoke run: 5,000 messages, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import orjson

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
SUBSCRIPTION = """\
    subscriptions:
      - topic: bench/{line}/{station}/inspection
        event: inspection.result
        ordering_key: "lot:{lot_id}"
        fields: {lot_id: lot, serial: sn, result: result, measured: value}
"""
WINDOW = 1000
TARGET_RATIO = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_line() -> str:
    try:
        from bench.common import machine_line as ml

        return ml()
    except ImportError:
        return f"{os.cpu_count()} cpu, Python {sys.version.split()[0]}"


class Mosquitto:
    def __init__(self, workdir: Path) -> None:
        from edge.demo.broker import find_mosquitto

        exe = find_mosquitto()
        if exe is None:
            raise SystemExit("mosquitto is not installed")
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "persistence false", f"max_inflight_messages {WINDOW}",
                 "max_queued_messages 0", "max_queued_bytes 0",
                 f"log_dest file {workdir / 'mosquitto.log'}"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("mosquitto did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _client(client_id: str, protocol: str, *, manual_ack: bool = False) -> object:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    v5 = protocol == "5"
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                       protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                       clean_session=None if v5 else False, manual_ack=manual_ack)


def _connect(c: object, port: int, protocol: str) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = WINDOW
        c.connect("127.0.0.1", port, 60, clean_start=False, properties=props)  # type: ignore[attr-defined]
    else:
        c.connect("127.0.0.1", port, 60)  # type: ignore[attr-defined]


def prepare_queue(port: int, client_id: str, protocol: str, n: int) -> float:
    """Create the consumer's persistent session, then publish ``n`` messages into it."""
    done = threading.Event()
    c = _client(client_id, protocol)
    c.on_subscribe = lambda *a: done.set()  # type: ignore[attr-defined]
    _connect(c, port, protocol)
    c.subscribe("bench/+/+/inspection", qos=1)  # type: ignore[attr-defined]
    c.loop_start()  # type: ignore[attr-defined]
    if not done.wait(10):
        raise SystemExit("no SUBACK")
    c.disconnect()  # type: ignore[attr-defined]
    c.loop_stop()  # type: ignore[attr-defined]

    pub = _client(f"{client_id}-pub", "5")
    acked = [0]
    lock = threading.Lock()

    def on_publish(*_: object) -> None:
        with lock:
            acked[0] += 1

    pub.on_publish = on_publish  # type: ignore[attr-defined]
    pub.max_inflight_messages_set(WINDOW)  # type: ignore[attr-defined]
    pub.connect("127.0.0.1", port)  # type: ignore[attr-defined]
    pub.loop_start()  # type: ignore[attr-defined]
    started = time.perf_counter()
    for i in range(n):
        doc = {"lot": f"L{i % 97:04d}", "sn": f"SN{i:09d}", "result": "OK" if i % 10 else "NOK",
               "value": 10.0 + (i % 100) / 1000, "ts": "2026-01-01T00:00:00.000Z", "seq": i}
        pub.publish(f"bench/1/st{i % 12:02d}/inspection", orjson.dumps(doc), qos=1)  # type: ignore[attr-defined]
    while acked[0] < n:
        time.sleep(0.01)
    took = time.perf_counter() - started
    pub.disconnect()  # type: ignore[attr-defined]
    pub.loop_stop()  # type: ignore[attr-defined]
    return n / took


# --------------------------------------------------------------------------- consumers


def consume_paho(port: int, client_id: str, protocol: str, n: int) -> float:
    count = [0]
    t: dict[str, float] = {}
    c = _client(client_id, protocol)

    def on_connect(*_: object) -> None:
        t["start"] = time.perf_counter()

    def on_message(*_: object) -> None:
        count[0] += 1
        if count[0] == n:
            t["end"] = time.perf_counter()
            c.disconnect()  # type: ignore[attr-defined]

    c.on_connect = on_connect  # type: ignore[attr-defined]
    c.on_message = on_message  # type: ignore[attr-defined]
    _connect(c, port, protocol)
    c.loop_forever()  # type: ignore[attr-defined]
    return t["end"] - t["start"]


async def _consume_gateway(port: int, client_id: str, protocol: str, n: int) -> tuple[float, str]:
    from edge.app import Gateway
    from edge.config import load_config_text

    state = tempfile.mkdtemp(prefix="edge-bench-mqtt-")
    dead = free_port()  # nothing listens: the ERP is down, the outbox only fills
    text = textwrap.dedent(f"""\
        site: bench
        state_dir: {state}
        api: {{enabled: false}}
        sinks:
          - id: erp
            type: http
            url: http://127.0.0.1:{dead}
            circuit_breaker: {{failure_threshold: 1, open_s: 60, max_open_s: 60}}
            routes: [{{events: ["*"], method: POST, path: /events, max_batch: 100}}]
        sources:
          - id: line1
            type: mqtt
            url: mqtt://127.0.0.1:{port}
            protocol: "{protocol}"
            client_id: {client_id}
            max_inflight_messages: {WINDOW}
        """) + SUBSCRIPTION
    gw = Gateway(load_config_text(text))
    await gw.start()
    src = gw.sources["line1"]
    try:
        while not gw.status["line1"].connected:
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        while src.counts["acked"] < n:  # type: ignore[attr-defined]
            await asyncio.sleep(0.002)
        took = time.perf_counter() - started
        reg = gw.metrics.registry
        commits = reg.get_sample_value("edge_outbox_commits_total") or 0
        stored = reg.get_sample_value("edge_events_received_total", {"source": "line1"}) or 0
        info = f"{int(stored)} stored in {int(commits)} commits"
    finally:
        await gw.stop()
    return took, info


def consume_gateway(port: int, client_id: str, protocol: str, n: int) -> tuple[float, str]:
    from edge.cli.common import run_async

    return run_async(_consume_gateway(port, client_id, protocol, n))


# --------------------------------------------------------------------------- orchestration


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_variant(variant: str, port: int, client_id: str, protocol: str, n: int
                ) -> tuple[float, str, float]:
    """(seconds, info, CPU seconds of the consumer process) of one consumer run."""
    cpu = _children_cpu()
    out = subprocess.run(
        [PY, "-m", "bench.bench_mqtt_ingest", "--variant", variant, "--port", str(port),
         "--client-id", client_id, "--protocol", protocol, "--messages", str(n)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    cpu = _children_cpu() - cpu
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            _, secs, *info = line.split(" ", 2)
            return float(secs), (info[0] if info else ""), cpu
    raise SystemExit(f"{variant} failed:\n{out.stdout}\n{out.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_mqtt_ingest", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    p.add_argument("--quick", action="store_true", help="5,000 messages, 1 round (smoke run)")
    p.add_argument("--variant", choices=["paho", "gateway"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--client-id", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.variant == "paho":
        print(f"RESULT {consume_paho(args.port, args.client_id, args.protocol, args.messages)}")
        return
    if args.variant == "gateway":
        secs, info = consume_gateway(args.port, args.client_id, args.protocol, args.messages)
        print(f"RESULT {secs} {info}")
        return

    if args.quick:
        args.messages, args.rounds = 5_000, 1
    n = args.messages
    print(f"machine: {machine_line()}")
    print(f"MQTT {args.protocol}, QoS 1, {n:,} queued messages per run, window {WINDOW}, "
          f"{args.rounds} rounds")
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-mosquitto-"))
    broker = Mosquitto(workdir)
    rates: dict[str, list[float]] = {"paho": [], "gateway": []}
    cpus: dict[str, list[float]] = {"paho": [], "gateway": []}
    infos: list[str] = []
    try:
        for r in range(args.rounds):
            order = ["paho", "gateway"] if r % 2 == 0 else ["gateway", "paho"]
            for variant in order:
                cid = f"bench-{variant}-{r}-{os.getpid()}"
                pub_rate = prepare_queue(broker.port, cid, args.protocol, n)
                secs, info, cpu = run_variant(variant, broker.port, cid, args.protocol, n)
                rates[variant].append(n / secs)
                cpus[variant].append(cpu)
                if info:
                    infos.append(info)
                print(f"  round {r + 1} {variant:<8} {n / secs:>9,.0f} msg/s  ({secs:.2f} s"
                      f"{', ' + info if info else ''}; {cpu:.2f} CPU s; queue filled at "
                      f"{pub_rate:,.0f} msg/s)", flush=True)
    finally:
        broker.stop()
    base = statistics.median(rates["paho"])
    gw = statistics.median(rates["gateway"])
    base_cpu = statistics.median(cpus["paho"]) * 1000 / n
    gw_cpu = statistics.median(cpus["gateway"]) * 1000 / n
    print(f"baseline  bare paho subscriber, stores nothing : {base:>9,.0f} msg/s (median), "
          f"{base_cpu:.3f} CPU s per 1,000 messages")
    print(f"gateway   QoS 1 → outbox (FULL) → PUBACK        : {gw:>9,.0f} msg/s (median), "
          f"{gw_cpu:.3f} CPU s per 1,000 messages")
    print(f"ratio gateway / baseline: {gw / base:.2f}  (target >= {TARGET_RATIO:.2f})")

    from bench.results import record

    run = (f"MQTT {args.protocol}, QoS 1, {n:,} queued messages per run, window {WINDOW}, "
           f"{args.rounds} rounds, medians")
    record("mqtt_ingest", figure=f"MQTT {args.protocol} QoS 1 ingest → outbox (FULL) → PUBACK",
           value=round(gw), unit="msg/s",
           baseline="bare paho subscriber (automatic PUBACK), stores nothing",
           baseline_value=round(base), target=f">= {TARGET_RATIO} x baseline",
           met=gw / base >= TARGET_RATIO,
           note=f"{run}; rounds gateway {[round(x) for x in rates['gateway']]}, baseline "
                f"{[round(x) for x in rates['paho']]}; {infos[-1] if infos else ''}")
    record("mqtt_ingest", figure=f"MQTT {args.protocol} ingest CPU per 1,000 messages",
           value=round(gw_cpu, 3), unit="CPU s", baseline="bare paho subscriber",
           baseline_value=round(base_cpu, 3),
           note=f"{run}; the consumer process's user + system time, startup included")


if __name__ == "__main__":
    main()
