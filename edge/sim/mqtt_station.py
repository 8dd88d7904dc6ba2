"""Simulated MQTT inspection stations (``edge simulate mqtt``; used by ``edge demo``).

Each station of a line publishes, at QoS 1, on the topics of ``config/demo.yaml``:

- ``plant/<site>/line/<line>/station/<station>/inspection`` — an inspection result::

      {"msg_id": "st01-000042", "lot": "L0003", "sn": "SN01-000042", "result": "OK",
       "value": 10.012, "ts": "2026-01-01T12:00:00.000Z"}

  The lot changes every ``lot_every_s`` seconds; about 10 % of parts fail (``NOK``, with a
  measured value outside 10.00 ± 0.05).
- ``plant/<site>/line/<line>/station/<station>/reading`` — a machine reading (spindle
  temperature, ``value`` in °C).

- ``plant/<site>/warehouse/<location>/receipt`` — a goods receipt of a lot (the warehouse
  scanner; ``receipt()`` builds one, the lot's supplier goes with it)::

      {"msg_id": "rcpt-L0003", "lot": "L0003", "material": "BRG-6204",
       "supplier": "acme", "supplier_lot": "AB-L0003", "qty": 500, "unit": "pcs",
       "po": "PO-0003", "ts": "..."}

- ``plant/<site>/mes/lot/<lot>/status`` — a disposition decided by the MES or the QMS
  (``lot_status()``: released, hold, quarantine, rejected; who decided and why).

``msg_id`` is unique per simulator run; ``Publisher.acked`` holds the ids the broker
confirmed with PUBACK, so a test or the demo can check that every confirmed message
reached the receiver exactly once.

Programmatic use::

    sim = StationSimulator(url, site="demo-plant", stations=3, rate=30)
    await sim.run(duration=10)            # or run() until cancelled / sim.stop()
    sim.publisher.acked                   # {msg_id, ...}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

__all__ = ["Publisher", "StationSimulator", "add_arguments", "lot_status", "receipt", "run"]

NOMINAL_MM = 10.0
TOLERANCE_MM = 0.05


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def receipt(site: str, lot: str, *, supplier: str, material: str = "BRG-6204",
            quantity: float = 500, unit: str = "pcs", location: str = "WH1",
            supplier_lot: str | None = None, purchase_order: str | None = None,
            msg_id: str | None = None) -> tuple[str, bytes, str]:
    """(topic, payload, msg_id) of a goods receipt of ``lot`` from ``supplier``, as the
    warehouse scanner publishes it (fields of ``config/plant.example.yaml``)."""
    msg_id = msg_id or f"rcpt-{lot}-{uuid.uuid4().hex[:6]}"
    doc = {"msg_id": msg_id, "lot": lot, "material": material, "supplier": supplier,
           "supplier_lot": supplier_lot or f"{supplier.upper()[:3]}-{lot}", "qty": quantity,
           "unit": unit, "po": purchase_order or f"PO-{lot}", "ts": _now_iso()}
    return f"plant/{site}/warehouse/{location}/receipt", orjson.dumps(doc), msg_id


def lot_status(site: str, lot: str, status: str, *, decided_by: str, reason: str = "",
               msg_id: str | None = None) -> tuple[str, bytes, str]:
    """(topic, payload, msg_id) of a disposition of ``lot`` (``released``, ``hold``,
    ``quarantine``, ``rejected``) published by the MES on behalf of whoever decided."""
    msg_id = msg_id or f"status-{lot}-{uuid.uuid4().hex[:6]}"
    doc = {"msg_id": msg_id, "lot": lot, "status": status, "decided_by": decided_by,
           "reason": reason, "ts": _now_iso()}
    return f"plant/{site}/mes/lot/{lot}/status", orjson.dumps(doc), msg_id


class Publisher:
    """A paho QoS 1 publisher on paho's own network thread that records PUBACKs.

    ``publish(topic, payload, key)`` queues a message (paho keeps and resends it across
    reconnects); ``acked`` is the set of keys the broker confirmed. Thread-safe counters.
    paho holds at most 65,535 unconfirmed QoS 1 messages (one per packet id): beyond that,
    e.g. after an hour of broker outage at 20 msg/s, ``publish`` is refused and counted in
    ``refused`` (the station would have to buffer or drop; it is never tracked as sent).

    ``ordered=True`` keeps each topic's publish order across reconnects: at most one QoS 1
    message per topic is unconfirmed, the next waits here and goes out on the PUBACK of
    the one before. Without it paho (2.2) can reorder a topic: it resends unconfirmed
    messages only after the CONNACK, and a message published between its CONNECT and that
    CONNACK goes out at once, ahead of them (MQTT asks a client to resend in the original
    order, but not to hold new messages behind the resends).
    """

    def __init__(self, url: str, *, client_id: str | None = None, protocol: str = "5",
                 username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, max_inflight: int = 100,
                 ordered: bool = False) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

        # refused: every packet id is in use (MQTT_ERR_NO_CONN, by contrast, still queues)
        self._queue_full = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"url must be mqtt://host:port or mqtts://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.protocol = str(protocol)
        v5 = self.protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edge-sim-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        if parts.scheme == "mqtts":
            ctx = ssl.create_default_context(cafile=ca_file)
            self.client.tls_set_context(ctx)
        if username:
            self.client.username_pw_set(username, password)
        self._lock = threading.Lock()
        self._keys: dict[int, str] = {}
        self._early: dict[int, bool] = {}
        self.acked: set[str] = set()
        self.published = 0
        self.refused = 0
        # ordered mode: topic → messages waiting behind the topic's unconfirmed one (the
        # topic is present while it has one), the packet id of each unconfirmed one, and
        # the messages released by a PUBACK for the sender thread (paho's callbacks must
        # not call paho)
        self.ordered = ordered
        self._waiting: dict[str, deque[tuple[bytes, str, int]]] = {}
        self._topic_of: dict[int, str] = {}
        self._held = 0  # accepted, not yet handed to paho
        self._ready: deque[tuple[str, bytes, str, int]] = deque()
        self._ready_cv = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        self._stopping = False
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not reason.is_failure:
            self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        # Runs on paho's thread while paho holds its message lock: never call paho here.
        ok = not getattr(reason, "is_failure", False)
        with self._lock:
            key = self._keys.pop(mid, None)
            if key is None:
                self._early[mid] = ok  # PUBACK before publish() returned its mid
                return
            if ok:
                self.acked.add(key)
            topic = self._topic_of.pop(mid, None)
            if topic is not None:
                self._release(topic)

    def _release(self, topic: str) -> None:
        """The topic's unconfirmed message is settled: hand its next one to the sender.
        Called with ``self._lock`` held."""
        waiting = self._waiting.get(topic)
        if waiting:
            payload, key, qos = waiting.popleft()
            self._ready.append((topic, payload, key, qos))
            self._ready_cv.notify()
        else:
            self._waiting.pop(topic, None)

    def _send_released(self) -> None:
        """Sender thread of ordered mode: publish what a PUBACK released."""
        while True:
            with self._ready_cv:
                while not self._ready and not self._stopping:
                    self._ready_cv.wait()
                if self._stopping:
                    return
                topic, payload, key, qos = self._ready.popleft()
            self._send(topic, payload, key, qos, held=True)

    def start(self, timeout: float = 10.0) -> Publisher:
        """Connect (blocking, up to ``timeout``) and start paho's network thread."""
        if self.ordered and self._sender is None:
            self._sender = threading.Thread(target=self._send_released, daemon=True,
                                            name="publisher-ordered")
            self._sender.start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise ConnectionError(f"cannot connect to the MQTT broker at "
                                  f"{self.host}:{self.port} within {timeout:g} s")
        return self

    def publish(self, topic: str, payload: bytes, key: str, qos: int = 1) -> None:
        if self.ordered and qos > 0:
            with self._lock:
                waiting = self._waiting.get(topic)
                if waiting is not None:  # the topic has an unconfirmed message: wait
                    waiting.append((payload, key, qos))
                    self._held += 1
                    return
                self._waiting[topic] = deque()
        self._send(topic, payload, key, qos)

    def _send(self, topic: str, payload: bytes, key: str, qos: int, *,
              held: bool = False) -> None:
        # paho's lock is taken inside publish(); ours only afterwards (no lock inversion).
        info = self.client.publish(topic, payload, qos=qos)
        ordered = self.ordered and qos > 0
        with self._lock:
            if held:
                self._held -= 1
            if info.rc == self._queue_full:  # every packet id is held by an unacked message
                self.refused += 1
                if ordered:
                    self._release(topic)
                return
            self.published += 1
            early = self._early.pop(info.mid, None)
            if qos == 0 or early:
                self.acked.add(key)
            elif early is None:
                self._keys[info.mid] = key
                if ordered:
                    self._topic_of[info.mid] = topic
                    return
            if ordered:  # settled before publish() returned
                self._release(topic)

    @property
    def unacked(self) -> int:
        """Messages published and not confirmed yet (in ordered mode, also those waiting
        behind an unconfirmed one of their topic)."""
        with self._lock:
            return len(self._keys) + self._held

    def wait_acked(self, timeout: float) -> bool:
        """Wait until every published message was confirmed (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.unacked == 0:
                return True
            time.sleep(0.02)
        return self.unacked == 0

    def stop(self) -> None:
        with self._ready_cv:
            self._stopping = True
            self._ready_cv.notify_all()
        if self._sender is not None:
            self._sender.join(5)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class StationSimulator:
    """N inspection stations of one line publishing at ``rate`` messages/s in total."""

    def __init__(self, url: str, *, site: str = "demo-plant", line: str = "1",
                 stations: int = 3, rate: float = 20.0, reading_share: float = 0.2,
                 fail_share: float = 0.1, lot_every_s: float = 5.0, protocol: str = "5",
                 seed: int | None = None, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> None:
        if stations < 1 or rate <= 0:
            raise ValueError("stations must be >= 1 and rate > 0")
        if not 0.0 <= fail_share <= 1.0:
            raise ValueError("the fail share must be between 0 and 1")
        self.site, self.line, self.stations, self.rate = site, line, stations, rate
        self.reading_share, self.fail_share, self.lot_every_s = (
            reading_share, fail_share, lot_every_s)
        self.rng = random.Random(seed)
        self.run_id = uuid.uuid4().hex[:6]
        self.publisher = Publisher(url, client_id=client_id, protocol=protocol,
                                   username=username, password=password, ca_file=ca_file)
        self.counts = {"inspection": 0, "reading": 0, "fail": 0}
        self._seq = 0
        self._stop = asyncio.Event()
        self._started = 0.0

    def topic(self, station: int, kind: str) -> str:
        return f"plant/{self.site}/line/{self.line}/station/st{station:02d}/{kind}"

    def next_message(self) -> tuple[str, bytes, str]:
        """(topic, payload, msg_id) of the next simulated message."""
        self._seq += 1
        station = self._seq % self.stations + 1
        msg_id = f"{self.run_id}-st{station:02d}-{self._seq:07d}"
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.rng.random() < self.reading_share:
            self.counts["reading"] += 1
            doc: dict[str, Any] = {"msg_id": msg_id, "signal": "spindle_temp",
                                   "value": round(self.rng.gauss(42.0, 1.5), 2), "unit": "C",
                                   "ts": ts}
            return self.topic(station, "reading"), orjson.dumps(doc), msg_id
        elapsed = time.monotonic() - self._started if self._started else 0.0
        lot = f"L{self.line}-{station:02d}-{int(elapsed // self.lot_every_s) + 1:04d}"
        fail = self.rng.random() < self.fail_share
        if fail:
            self.counts["fail"] += 1
            value = NOMINAL_MM + self.rng.choice((-1, 1)) * self.rng.uniform(0.06, 0.2)
        else:
            value = self.rng.uniform(NOMINAL_MM - TOLERANCE_MM, NOMINAL_MM + TOLERANCE_MM)
        self.counts["inspection"] += 1
        doc = {"msg_id": msg_id, "lot": lot, "sn": f"SN{station:02d}-{self._seq:07d}",
               "result": "NOK" if fail else "OK", "value": round(value, 4), "ts": ts}
        return self.topic(station, "inspection"), orjson.dumps(doc), msg_id

    def stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        await asyncio.to_thread(self.publisher.start)

    async def run(self, duration: float | None = None,
                  on_tick: Callable[[StationSimulator], None] | None = None) -> None:
        """Publish until ``duration`` seconds passed, ``stop()`` or cancellation.

        Connects first if ``start()`` was not awaited. Pacing is by wall clock, so the
        rate holds even when one iteration is late.
        """
        if not self.publisher.connected.is_set():
            await self.start()
        self._started = time.monotonic()
        sent = 0
        interval = 1.0 / self.rate
        while not self._stop.is_set():
            now = time.monotonic()
            if duration is not None and now - self._started >= duration:
                break
            due = int((now - self._started) / interval) + 1
            for _ in range(min(due - sent, 1000)):
                topic, payload, msg_id = self.next_message()
                self.publisher.publish(topic, payload, msg_id)
                sent += 1
            if on_tick is not None:
                on_tick(self)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(interval, 0.01))

    async def close(self, ack_timeout: float = 10.0) -> bool:
        """Wait for outstanding PUBACKs (up to ``ack_timeout``), then disconnect."""
        ok = await asyncio.to_thread(self.publisher.wait_acked, ack_timeout)
        await asyncio.to_thread(self.publisher.stop)
        return ok


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="mqtt://127.0.0.1:1883",
                        help="broker, mqtt://host:port or mqtts://host:port")
    parser.add_argument("--site", default="demo-plant", help="the {site} topic level")
    parser.add_argument("--line", default="1", help="the {line} topic level")
    parser.add_argument("--stations", type=int, default=3, help="number of stations")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="messages per second, all stations together")
    parser.add_argument("--fail-share", type=float, default=0.1, metavar="F",
                        help="share of inspections that fail, out of spec (default 0.1)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds to run; 0 = until Ctrl-C")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    parser.add_argument("--username")
    parser.add_argument("--password-file", help="file holding the password")
    parser.add_argument("--ca-file", help="CA bundle for mqtts://")
    parser.add_argument("--client-id")
    parser.add_argument("--seed", type=int)


async def run(args: argparse.Namespace) -> int:
    """``edge simulate mqtt``: publish until --duration or Ctrl-C; print what was confirmed."""
    password = None
    if args.password_file:
        from edge.config import read_secret

        password = await asyncio.to_thread(read_secret, args.password_file)
    try:
        sim = StationSimulator(args.url, site=args.site, line=args.line,
                               stations=args.stations, rate=args.rate,
                               fail_share=args.fail_share, protocol=args.protocol,
                               seed=args.seed, client_id=args.client_id,
                               username=args.username, password=password,
                               ca_file=args.ca_file)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    try:
        await sim.start()
    except ConnectionError as err:
        print(f"error: {err}")
        return 1
    topics = f"plant/{args.site}/line/{args.line}/station/st01..st{args.stations:02d}/" \
             "{inspection,reading}"
    print(f"publishing {args.rate:g} msg/s at QoS 1 to {args.url} on {topics}; Ctrl-C stops",
          flush=True)
    try:
        await sim.run(args.duration or None)
    except asyncio.CancelledError:
        pass
    finally:
        ok = await sim.close()
        p = sim.publisher
        print(f"published {p.published}, confirmed by the broker {len(p.acked)}"
              f"{'' if ok else f', {p.unacked} unconfirmed'}"
              f"{f', {p.refused} refused by the client (packet ids exhausted)' if p.refused else ''}; "
              f"{sim.counts['inspection']} inspections ({sim.counts['fail']} failed), "
              f"{sim.counts['reading']} readings", flush=True)
    return 0
