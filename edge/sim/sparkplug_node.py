"""A simulated Sparkplug B edge node (``edge simulate sparkplug``; used by the tests).

One edge node with devices, publishing under ``spBv1.0/<group>/...`` as the Sparkplug B
specification has it:

- connects with an ``NDEATH`` will (QoS 1) that carries this session's ``bdSeq``;
  ``bdSeq`` counts up with every new MQTT connection;
- ``NBIRTH`` (``seq`` 0, metrics ``bdSeq``, ``Node Control/Rebirth``, ``Cabinet/
  Temperature``, each with an alias) and a ``DBIRTH`` per device (``Spindle/Speed``
  Int32, ``Spindle/Temperature`` Float with an ``engUnit`` property, ``Running``
  Boolean, ``Parts`` UInt64), then ``NDATA``/``DDATA`` by alias only, ``seq`` 0–255
  wrapping, one counter for the node and its devices;
- answers ``NCMD`` ``Node Control/Rebirth = true`` with a new NBIRTH and DBIRTHs;
- ``stop()`` publishes NDEATH and disconnects; ``crash()`` drops the connection without
  DISCONNECT, so the broker publishes the will.

Test hooks: ``skip_seq(n)`` loses ``n`` sequence numbers (a gap the host must notice),
``births=False`` on ``start`` connects without publishing births (data the host cannot
resolve until it asks for a rebirth).

The payloads are encoded here with a small protobuf writer of its own (no generated
code), which keeps the gateway's decoder honest: it reads what an independent encoder
wrote. Programmatic use::

    node = SparkplugNode(url, group="plant1", node="press7", devices=["dev1"])
    await node.start()
    await node.run(duration=5)          # DDATA at ``rate`` messages/s
    node.published                      # {(message type, seq): payload metrics}
    await node.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Metric", "SparkplugNode", "add_arguments", "decode_payload", "encode_payload",
           "run"]

NAMESPACE = "spBv1.0"
# datatype numbers of the Sparkplug B specification
INT32, INT64, UINT64, FLOAT, DOUBLE, BOOLEAN, STRING = 3, 4, 8, 9, 10, 11, 12
_VARINT_32 = {1, 2, 3, 5, 6, 7}
_VARINT_64 = {4, 8, 13}


# --------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int, body: bytes) -> bytes:
    head = _varint(number << 3 | wire)
    if wire == 2:
        return head + _varint(len(body)) + body
    return head + body


@dataclass
class Metric:
    """One metric as the node sends it; ``name=None`` sends the alias only."""

    name: str | None
    alias: int | None
    datatype: int
    value: Any = None
    timestamp: int | None = None
    unit: str | None = None
    quality: int | None = None

    def encode(self) -> bytes:
        out = b""
        if self.name is not None:
            out += _field(1, 2, self.name.encode())
        if self.alias is not None:
            out += _field(2, 0, _varint(self.alias))
        if self.timestamp is not None:
            out += _field(3, 0, _varint(self.timestamp))
        out += _field(4, 0, _varint(self.datatype))
        if self.value is None:
            out += _field(7, 0, _varint(1))  # is_null
        props = self._properties()
        if props:
            out += _field(9, 2, props)
        if self.value is not None:
            out += self._value()
        return out

    def _properties(self) -> bytes:
        keys, values = b"", b""
        if self.unit is not None:
            keys += _field(1, 2, b"engUnit")
            values += _field(2, 2, _field(1, 0, _varint(STRING))
                             + _field(8, 2, self.unit.encode()))
        if self.quality is not None:
            keys += _field(1, 2, b"Quality")
            values += _field(2, 2, _field(1, 0, _varint(INT32))
                             + _field(3, 0, _varint(self.quality & 0xFFFFFFFF)))
        return keys + values

    def _value(self) -> bytes:
        dt, v = self.datatype, self.value
        if dt in _VARINT_32:
            return _field(10, 0, _varint(int(v) & 0xFFFFFFFF))
        if dt in _VARINT_64:
            return _field(11, 0, _varint(int(v)))
        if dt == FLOAT:
            return _field(12, 5, struct.pack("<f", v))
        if dt == DOUBLE:
            return _field(13, 1, struct.pack("<d", v))
        if dt == BOOLEAN:
            return _field(14, 0, _varint(int(bool(v))))
        return _field(15, 2, str(v).encode())


def encode_payload(metrics: list[Metric], *, timestamp: int | None = None,
                   seq: int | None = None) -> bytes:
    """A Sparkplug B ``Payload`` (timestamp, metrics, seq) in protobuf wire format."""
    out = b"" if timestamp is None else _field(1, 0, _varint(timestamp))
    for m in metrics:
        out += _field(2, 2, m.encode())
    if seq is not None:
        out += _field(3, 0, _varint(seq))
    return out


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; ValueError if malformed."""
    out: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(data):
        value: int | bytes
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _read_varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("truncated")
        out.append((number, wire, value))
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def decode_payload(data: bytes) -> dict[str, Any]:
    """The parts of a payload a node needs to read a command: ``timestamp``, ``seq`` and
    ``metrics`` (each ``name``, ``alias``, ``datatype``, ``value`` for the scalar kinds)."""
    doc: dict[str, Any] = {"metrics": []}
    for number, _, value in _fields(data):
        if number == 1:
            doc["timestamp"] = value
        elif number == 3:
            doc["seq"] = value
        elif number == 2:
            m: dict[str, Any] = {}
            for n, _, v in _fields(value):
                if n == 1:
                    m["name"] = v.decode()
                elif n == 2:
                    m["alias"] = v
                elif n == 4:
                    m["datatype"] = v
                elif n in (10, 11):
                    m["value"] = v
                elif n == 12:
                    m["value"] = struct.unpack("<f", v)[0]
                elif n == 13:
                    m["value"] = struct.unpack("<d", v)[0]
                elif n == 14:
                    m["value"] = bool(v)
                elif n == 15:
                    m["value"] = v.decode()
            doc["metrics"].append(m)
    return doc


# --------------------------------------------------------------------------- the node


class SparkplugNode:
    """One edge node and its devices on paho's own network thread; see the module doc."""

    def __init__(self, url: str, *, group: str = "plant1", node: str = "node1",
                 devices: list[str] | None = None, rate: float = 5.0, qos: int = 0,
                 protocol: str = "5", client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, seed: int | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        for level in (group, node, *(devices or [])):
            if not level or any(c in level for c in "/+#\x00"):
                raise ValueError(f"a Sparkplug id must be one topic level, got {level!r}")
        if rate <= 0 or qos not in (0, 1):
            raise ValueError("rate must be > 0 and qos 0 or 1")
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"url must be mqtt://host:port or mqtts://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.group, self.node = group, node
        self.devices = list(devices if devices is not None else ["dev1"])
        self.rate, self.qos = rate, qos
        self.rng = random.Random(seed)
        v5 = str(protocol) == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"spb-sim-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 2)
        if parts.scheme == "mqtts":
            self.client.tls_set_context(ssl.create_default_context(cafile=ca_file))
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.bd_seq = -1  # the first connection uses 0
        self.seq = 0
        self.births = 0  # NBIRTHs published
        self.rebirth_requests = 0  # NCMD Rebirth received
        self.published: list[tuple[str, int | None]] = []  # (message type, seq) in order
        self._unconfirmed: list[Any] = []
        self._lock = threading.Lock()
        self._rebirth = threading.Event()
        self._stop = asyncio.Event()
        self._send_births = True
        self._parts = 0
        self._next_device = 0
        # node metric aliases from 1, device metrics from 100 (unique across the node)
        self.node_metrics = [Metric("Cabinet/Temperature", 1, DOUBLE, 31.5, unit="C")]
        self.device_metrics: dict[str, list[Metric]] = {
            dev: [Metric("Spindle/Speed", 100 + 10 * i, INT32, 1200),
                  Metric("Spindle/Temperature", 101 + 10 * i, FLOAT, 42.5, unit="C"),
                  Metric("Running", 102 + 10 * i, BOOLEAN, True),
                  Metric("Parts", 103 + 10 * i, UINT64, 0)]
            for i, dev in enumerate(self.devices)}

    def topic(self, mtype: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{mtype}/{self.node}"
        return f"{base}/{device}" if device else base

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe([(self.topic("NCMD"), 1), (self.topic("DCMD") + "/+", 1)])
        self.connected.set()
        if self._send_births:
            self._rebirth.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # paho's thread: flag the request; the run loop publishes the births.
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            doc = decode_payload(msg.payload)
            if any(m.get("name") == "Node Control/Rebirth" and m.get("value") is True
                   for m in doc["metrics"]):
                self.rebirth_requests += 1
                self._rebirth.set()

    # ------------------------------------------------------------------ publishing

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _publish(self, mtype: str, payload: bytes, device: str | None = None,
                 seq: int | None = None) -> None:
        info = self.client.publish(self.topic(mtype, device), payload, qos=self.qos)
        with self._lock:
            self.published.append((mtype + (f"/{device}" if device else ""), seq))
            if self.qos:
                self._unconfirmed.append(info)

    @property
    def unconfirmed(self) -> int:
        """QoS 1 messages the broker has not confirmed yet."""
        with self._lock:
            self._unconfirmed = [i for i in self._unconfirmed if not i.is_published()]
            return len(self._unconfirmed)

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) % 256
        return seq

    def _death_payload(self) -> bytes:
        return encode_payload([Metric("bdSeq", None, INT64, self.bd_seq)],
                              timestamp=self._now_ms())

    def publish_births(self) -> None:
        """NBIRTH (seq 0) and a DBIRTH per device: every metric with name and alias."""
        now = self._now_ms()
        self.seq = 0
        node = [Metric("bdSeq", None, INT64, self.bd_seq, now),
                Metric("Node Control/Rebirth", None, BOOLEAN, False, now),
                *(Metric(m.name, m.alias, m.datatype, m.value, now, m.unit)
                  for m in self.node_metrics)]
        seq = self._next_seq()
        self._publish("NBIRTH", encode_payload(node, timestamp=now, seq=seq), seq=seq)
        self.births += 1
        for dev, metrics in self.device_metrics.items():
            seq = self._next_seq()
            self._publish("DBIRTH", encode_payload(
                [Metric(m.name, m.alias, m.datatype, m.value, now, m.unit) for m in metrics],
                timestamp=now, seq=seq), dev, seq)

    def publish_data(self) -> None:
        """One DDATA (a device in turn, two changed metrics by alias) or, every fifth
        message, an NDATA."""
        now = self._now_ms()
        seq = self._next_seq()
        turn = self._next_device
        self._next_device += 1
        if not self.devices or turn % 5 == 4:
            m = self.node_metrics[0]
            m.value = round(m.value + self.rng.uniform(-0.2, 0.2), 2)
            self._publish("NDATA", encode_payload(
                [Metric(None, m.alias, m.datatype, m.value, now)], timestamp=now, seq=seq),
                seq=seq)
            return
        dev = self.devices[turn % len(self.devices)]
        speed, temp, _, parts = self.device_metrics[dev]
        temp.value = round(42.0 + self.rng.gauss(0, 1.0), 1)
        parts.value += 1
        self._publish("DDATA", encode_payload(
            [Metric(None, temp.alias, temp.datatype, temp.value, now),
             Metric(None, parts.alias, parts.datatype, parts.value, now)],
            timestamp=now, seq=seq), dev, seq)

    def skip_seq(self, n: int = 1) -> None:
        """Lose ``n`` sequence numbers: the next message has a gap before it."""
        self.seq = (self.seq + n) % 256

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, births: bool = True, connect_s: float = 10.0) -> SparkplugNode:
        """Connect with the NDEATH will (a new bdSeq) and, with ``births``, publish them."""
        self._send_births = births
        self.bd_seq = (self.bd_seq + 1) % 256
        self.client.will_set(self.topic("NDEATH"), self._death_payload(), qos=1)
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not await asyncio.to_thread(self.connected.wait, connect_s):
            self.client.loop_stop()
            raise ConnectionError(f"cannot connect to the MQTT broker at "
                                  f"{self.host}:{self.port} within {connect_s:g} s")
        self.tick()
        return self

    def tick(self) -> None:
        """Publish the births a connection or a rebirth request asked for."""
        if self._rebirth.is_set():
            self._rebirth.clear()
            self.publish_births()

    async def run(self, duration: float | None = None) -> None:
        """Publish data at ``rate`` messages/s (and births when asked) until ``duration``
        passed, ``stop()`` or cancellation."""
        started = time.monotonic()
        sent = 0
        interval = 1.0 / self.rate
        while not self._stop.is_set():
            now = time.monotonic()
            if duration is not None and now - started >= duration:
                break
            self.tick()
            due = int((now - started) / interval) + 1
            for _ in range(min(due - sent, 1000)):
                if self.connected.is_set():
                    self.publish_data()
                sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(interval, 0.05))

    async def wait_confirmed(self, within_s: float = 10.0) -> bool:
        """QoS 1: wait until the broker confirmed everything published."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.unconfirmed == 0:
                return True
            await asyncio.sleep(0.02)
        return self.unconfirmed == 0

    async def stop(self) -> None:
        """Publish NDEATH (a clean shutdown), then disconnect."""
        self._stop.set()
        if self.connected.is_set():
            info = self.client.publish(self.topic("NDEATH"), self._death_payload(), qos=1)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(info.wait_for_publish, 5)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def crash(self) -> None:
        """Drop the connection without DISCONNECT: the broker publishes the will."""
        self._stop.set()
        await asyncio.to_thread(self.client.loop_stop)
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self.connected.clear()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", "--url", dest="url", default="mqtt://127.0.0.1:1883",
                        help="broker, mqtt://host:port or mqtts://host:port")
    parser.add_argument("--group", default="plant1", help="Sparkplug group id")
    parser.add_argument("--node", default="node1", help="edge node id")
    parser.add_argument("--devices", default="dev1",
                        help="comma-separated device ids ('' for none)")
    parser.add_argument("--rate", type=float, default=5.0, help="data messages per second")
    parser.add_argument("--qos", type=int, choices=[0, 1], default=0,
                        help="QoS of births and data (the specification uses 0)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds to run; 0 = until Ctrl-C")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="5")
    parser.add_argument("--username")
    parser.add_argument("--password-file", help="file holding the password")
    parser.add_argument("--ca-file", help="CA bundle for mqtts://")
    parser.add_argument("--client-id")
    parser.add_argument("--seed", type=int)


async def run(args: argparse.Namespace) -> int:
    """``edge simulate sparkplug``: births, then data until --duration or Ctrl-C; NDEATH
    at the end."""
    password = None
    if args.password_file:
        from edge.config import read_secret

        password = await asyncio.to_thread(read_secret, args.password_file)
    devices = [d for d in args.devices.split(",") if d]
    try:
        node = SparkplugNode(args.url, group=args.group, node=args.node, devices=devices,
                             rate=args.rate, qos=args.qos, protocol=args.protocol,
                             client_id=args.client_id, username=args.username,
                             password=password, ca_file=args.ca_file, seed=args.seed)
        await node.start()
    except (ValueError, ConnectionError) as err:
        print(f"error: {err}")
        return 2 if isinstance(err, ValueError) else 1
    print(f"Sparkplug B edge node {args.group}/{args.node} with devices "
          f"{', '.join(devices) or '(none)'} on {args.url}: {args.rate:g} data messages/s "
          f"at QoS {args.qos}; answers NCMD Rebirth; Ctrl-C stops (NDEATH)", flush=True)
    try:
        await node.run(args.duration or None)
    except asyncio.CancelledError:
        pass
    finally:
        await node.stop()
        print(f"published {len(node.published)} messages ({node.births} NBIRTH, "
              f"{node.rebirth_requests} rebirth requests answered), bdSeq {node.bd_seq}",
              flush=True)
    return 0
