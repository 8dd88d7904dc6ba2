"""Sparkplug B on ``format: sparkplug_b`` subscriptions: decode, alias tables, sequences.

Topic namespace ``spBv1.0/{group}/{type}/{edge_node}[/{device}]``. Contract:

- ``SparkplugState`` belongs to one source and is shared by its ``sparkplug_b``
  subscriptions. It keeps, per edge node, the birth's ``bdSeq``, the next expected ``seq``
  (0–255, wrapping, one counter for the node and its devices) and the alias tables of the
  node and of each device. It lives as long as the source object: a reconnect or a restart
  of ``run()`` keeps it. ``snapshot()``/``restore()`` carry it over a gateway restart (the
  source saves it in ``state_dir``); a restored node is trusted only once its ``seq``
  continues where the snapshot left it.
- ``state.handle(mapping, topic, payload, captures, redelivered=..., now=...)`` is called
  in arrival order on the event loop and never raises for input. It returns a ``Decoded``:
  one event per metric it can resolve (births included: their values are current), the
  quarantine records of what it cannot, audit rows, condition changes and at most one
  rebirth request. The caller commits events, quarantine records and audit rows before it
  acks the message, and publishes the rebirth request.
- NBIRTH builds the node's alias table (alias → name, datatype) and drops its devices'
  tables (they are born again after it); DBIRTH builds the device's. NDATA/DDATA metrics
  are resolved by alias (device table, then node table) or by name.
- A metric that cannot be resolved (an alias no birth defined: data before a birth, a
  rebirth lost) is quarantined with reason ``unknown_alias`` (one record per message, the
  raw payload kept, the aliases listed) and the node is asked for a rebirth
  (``NCMD`` ``Node Control/Rebirth = true``), at most once per ``rebirth_interval_s``.
- A ``seq`` that is not the expected one is a ``gap`` audit row (reason
  ``sparkplug_seq_gap``) and asks for a rebirth too. NDEATH (with the birth's ``bdSeq``;
  an older session's late will is ignored) and DDEATH are ``gap`` rows
  (``sparkplug_node_death``, ``sparkplug_device_death``) and set a condition that the next
  birth clears. A copy the broker flags as redelivered never counts as a gap.
- Dedupe: each event's key is ``spb:<SHA-256 of topic and payload>:<metric index>``. With
  a payload timestamp it is an identity (the node's own timestamp and seq make the bytes
  unique, so any copy of the message, flagged or not, maps to the stored events); without
  one it is matched only for redeliveries, like a JSON message. A ``dedupe_key`` template
  replaces it (an identity).

Values by datatype: signed integers from their two's complement, Float as the shortest
decimal that round-trips in 32 bits, DateTime as ISO-8601 UTC, Bytes/File as base64;
``is_null`` (or no value) → ``value: null`` with status ``BadNoData``. A ``Quality``
property (192 Good, 0–63 Bad, 64–191 Uncertain, 500 stale) sets ``status``; an
``engUnit``/``unit`` property sets ``unit``. DataSet and Template values are quarantined
(``unsupported_datatype``); template definitions in births, ``bdSeq`` and the ``Node
Control/*``/``Device Control/*`` metrics are state, not readings, and make no event.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import string
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError

from edge.plugin import Event, EventClass, InputError, make_event, validate_data
from edge.sources.mqtt.config import SubscriptionConfig
from edge.sources.mqtt.sparkplug_b_pb2 import Payload
from edge.timefmt import iso_z

__all__ = ["NAMESPACE", "Decoded", "SparkplugMapping", "SparkplugState", "rebirth_payload"]

NAMESPACE = "spBv1.0"
NODE_TYPES = {"NBIRTH", "NDEATH", "NDATA", "NCMD"}
DEVICE_TYPES = {"DBIRTH", "DDEATH", "DDATA", "DCMD"}
REBIRTH_METRIC = "Node Control/Rebirth"

DATATYPES = {
    0: "Unknown", 1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16",
    7: "UInt32", 8: "UInt64", 9: "Float", 10: "Double", 11: "Boolean", 12: "String",
    13: "DateTime", 14: "Text", 15: "UUID", 16: "DataSet", 17: "Bytes", 18: "File",
    19: "Template", 20: "PropertySet", 21: "PropertySetList",
}
_SIGNED32 = {1, 2, 3}
_BOOLEAN = 11
_DATETIME = 13
_INT64 = 4
_UNIT_KEYS = {"engunit", "engunits", "unit", "units"}


def rebirth_payload(now_ms: int) -> bytes:
    """The NCMD payload that asks an edge node for a new birth."""
    p = Payload(timestamp=now_ms)
    m = p.metrics.add(name=REBIRTH_METRIC, timestamp=now_ms, datatype=_BOOLEAN)
    m.boolean_value = True
    return bytes(p.SerializeToString())


# --------------------------------------------------------------------------- mapping


class _Template:
    """A ``{name}`` template parsed once. ``render``: a missing or empty value leaves
    nothing, and the ``/`` it leaves doubled or at an end goes with it
    (``{edge_node}/{device}/{metric}`` of a node metric is ``node/metric``)."""

    __slots__ = ("parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts = [(literal, name) for literal, name, _, _ in string.Formatter().parse(text)]

    def render(self, values: dict[str, Any]) -> str:
        out = []
        for literal, name in self.parts:
            out.append(literal)
            if name:
                value = values.get(name)
                out.append("" if value is None else str(value))
        text = "".join(out)
        if "//" in text:
            text = re.sub(r"/{2,}", "/", text)
        return text.strip("/")


class SparkplugMapping:
    """A ``sparkplug_b`` subscription's mapping, compiled once."""

    def __init__(self, cfg: SubscriptionConfig, *, site: str, source: str) -> None:
        assert cfg.sparkplug is not None  # set by the config model for sparkplug_b
        self.cfg = cfg
        self.site = site
        self.source = source
        self.event = cfg.event
        self.event_class = EventClass.parse(cfg.event_class) if cfg.event_class else None
        self.signal = _Template(cfg.sparkplug.signal)
        self.ordering_key = _Template(cfg.ordering_key or "spb:{group}/{edge_node}/{device}")
        self.dedupe_key = _Template(cfg.dedupe_key) if cfg.dedupe_key else None
        self.static = dict(cfg.static)
        self.rebirth = cfg.sparkplug.rebirth
        self.rebirth_interval_s = cfg.sparkplug.rebirth_interval_s


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Def:
    name: str
    datatype: int
    unit: str | None = None  # the birth's engineering unit: data messages do not repeat it


@dataclass
class _Tables:
    aliases: dict[int, _Def] = field(default_factory=dict)
    names: dict[str, _Def] = field(default_factory=dict)
    online: bool = False

    def clear(self) -> None:
        self.aliases.clear()
        self.names.clear()


@dataclass
class _Node(_Tables):
    bd_seq: int | None = None
    next_seq: int | None = None
    devices: dict[str, _Tables] = field(default_factory=dict)
    last_rebirth: float = -math.inf
    # loaded from the snapshot of an earlier run, not confirmed yet by a continuing seq
    restored: bool = False


@dataclass(slots=True)
class Reading:
    event: Event
    dedupe_key: str
    redelivery_only: bool


@dataclass(slots=True)
class Reject:
    reason: str
    detail: str
    meta: dict[str, Any]


@dataclass
class Decoded:
    """What one message means; see the module contract."""

    readings: list[Reading] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    audits: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    conditions: list[tuple[str, str | None]] = field(default_factory=list)
    rebirth: tuple[str, str, str] | None = None  # (group, edge node, why)
    ignored: str | None = None  # STATE, NCMD, DCMD: nothing to store
    notes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # logged


class SparkplugState:
    """Per edge node: bdSeq, next seq, alias tables; see the module contract."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], _Node] = {}
        self.counts = {"births": 0, "deaths": 0, "seq_gaps": 0, "unknown_alias": 0,
                       "rebirths_requested": 0, "ignored": 0}
        self.dirty = False  # changed since the last snapshot

    # ------------------------------------------------------------------ snapshot

    def snapshot(self) -> dict[str, Any]:
        """The tables and sequences as JSON, for the next run (``restore``)."""
        self.dirty = False
        return {"version": 1, "nodes": [
            {"group": g, "edge_node": n, "bdSeq": st.bd_seq, "next_seq": st.next_seq,
             "online": st.online, "metrics": _dump(st),
             "devices": {d: {"online": t.online, "metrics": _dump(t)}
                         for d, t in st.devices.items()}}
            for (g, n), st in self.nodes.items()]}

    def restore(self, doc: Any) -> int:
        """Load a ``snapshot``; returns the number of edge nodes (0 for anything that is
        not a snapshot of this version: the state then starts empty).

        A restored node's tables are used once its ``seq`` continues where the snapshot
        left it (or for copies the broker redelivers); a first message with another
        ``seq`` means messages, maybe a birth, were missed: the tables are dropped, the
        gap recorded and a rebirth requested.
        """
        try:
            if doc.get("version") != 1:
                return 0
            nodes: dict[tuple[str, str], _Node] = {}
            for item in doc["nodes"]:
                st = _Node(bd_seq=_opt_int(item["bdSeq"]), next_seq=_opt_int(item["next_seq"]),
                           online=bool(item["online"]), restored=True)
                _load(st, item["metrics"])
                for dev, t in item["devices"].items():
                    tables = st.devices[str(dev)] = _Tables(online=bool(t["online"]))
                    _load(tables, t["metrics"])
                nodes[(str(item["group"]), str(item["edge_node"]))] = st
        except (AttributeError, KeyError, TypeError, ValueError):
            return 0
        self.nodes = nodes
        return len(nodes)

    def status(self) -> dict[str, Any]:
        online = sum(1 for n in self.nodes.values() if n.online)
        return {"edge_nodes": len(self.nodes), "edge_nodes_online": online, **self.counts}

    def rebirth_all(self, now: float, why: str) -> list[tuple[str, str, str]]:
        """Rebirth requests for every known node (after a session the broker lost)."""
        out = []
        for (group, node), st in self.nodes.items():
            st.last_rebirth = now
            out.append((group, node, why))
        self.counts["rebirths_requested"] += len(out)
        return out

    # ------------------------------------------------------------------ one message

    def handle(self, mapping: SparkplugMapping, topic: str, raw: bytes,
               captures: dict[str, Any], *, redelivered: bool, now: float) -> Decoded:
        out = Decoded()
        parts = topic.split("/")
        if len(parts) >= 2 and parts[0] == NAMESPACE and parts[1] == "STATE":
            return self._ignore(out, "STATE")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
            return self._reject(out, "not_sparkplug", f"topic is not {NAMESPACE}/group/"
                                "TYPE/edge_node[/device]")
        group, mtype, node = parts[1], parts[2], parts[3]
        device = parts[4] if len(parts) == 5 else None
        if mtype not in NODE_TYPES | DEVICE_TYPES:
            return self._reject(out, "not_sparkplug", f"unknown message type {mtype!r}")
        if (mtype in DEVICE_TYPES) != (device is not None):
            return self._reject(out, "not_sparkplug", f"{mtype} topics "
                                f"{'need' if mtype in DEVICE_TYPES else 'take no'} device level")
        if mtype in ("NCMD", "DCMD"):
            return self._ignore(out, mtype)
        try:
            payload = Payload.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as err:
            return self._reject(out, "not_protobuf", f"not a Sparkplug B payload: {err}")
        ctx = _Message(mapping, topic, raw, captures, group, mtype, node, device, payload)
        st = self.nodes.get((group, node))
        if st is None:
            st = self.nodes[(group, node)] = _Node()
        where = f"{group}/{node}" + (f"/{device}" if device else "")
        self.dirty = True
        if st.restored and mtype not in ("NBIRTH", "NDEATH") and not redelivered:
            self._confirm_restored(st, ctx, out)
        if mtype == "NBIRTH":
            self._nbirth(st, ctx, out)
        elif mtype == "NDEATH":
            self._ndeath(st, ctx, out, redelivered)
            return out
        else:
            self._check_seq(st, ctx, out, redelivered)
            if mtype == "DBIRTH":
                dev = st.devices.setdefault(device or "", _Tables())
                dev.clear()
                if not dev.online:
                    out.conditions.append((f"sparkplug_offline:{where}", None))
                dev.online = True
                self.counts["births"] += 1
            elif mtype == "DDEATH":
                dev = st.devices.setdefault(device or "", _Tables())
                dev.online = False
                if not redelivered:
                    self.counts["deaths"] += 1
                    out.audits.append(("gap", "sparkplug_device_death",
                                       {"group": group, "edge_node": node, "device": device}))
                    out.conditions.append((f"sparkplug_offline:{where}",
                                           f"Sparkplug device {where} is offline (DDEATH)"))
                return out
        self._metrics(st, ctx, out, birth=mtype in ("NBIRTH", "DBIRTH"))
        if out.rebirth is not None:
            self._rate_limit(st, mapping, out, now)
        return out

    def _ignore(self, out: Decoded, what: str) -> Decoded:
        self.counts["ignored"] += 1
        out.ignored = what
        return out

    @staticmethod
    def _reject(out: Decoded, reason: str, detail: str) -> Decoded:
        out.rejects.append(Reject(reason, detail, {}))
        return out

    def _rate_limit(self, st: _Node, mapping: SparkplugMapping, out: Decoded, now: float
                    ) -> None:
        if not mapping.rebirth or now - st.last_rebirth < mapping.rebirth_interval_s:
            out.rebirth = None
            return
        st.last_rebirth = now
        self.counts["rebirths_requested"] += 1

    @staticmethod
    def _confirm_restored(st: _Node, ctx: _Message, out: Decoded) -> None:
        st.restored = False
        p = ctx.payload
        if p.HasField("seq") and st.next_seq is not None and p.seq != st.next_seq:
            st.clear()
            st.devices.clear()
            out.notes.append(("alias tables of the previous run dropped: seq does not "
                              "continue (messages were missed)", {
                                  "group": ctx.group, "edge_node": ctx.node,
                                  "expected_seq": st.next_seq, "seq": p.seq}))

    def _nbirth(self, st: _Node, ctx: _Message, out: Decoded) -> None:
        p = ctx.payload
        st.restored = False
        was_dead = not st.online and st.bd_seq is not None
        st.clear()
        st.devices.clear()
        st.bd_seq = _bd_seq(p)
        st.next_seq = (p.seq + 1) % 256 if p.HasField("seq") else None
        st.online = True
        self.counts["births"] += 1
        out.conditions.append((f"sparkplug_offline:{ctx.group}/{ctx.node}", None))
        if was_dead:
            out.audits.append(("reconnected", "sparkplug_node_birth",
                               {"group": ctx.group, "edge_node": ctx.node, "bdSeq": st.bd_seq}))

    def _ndeath(self, st: _Node, ctx: _Message, out: Decoded, redelivered: bool) -> None:
        bd = _bd_seq(ctx.payload)
        detail = {"group": ctx.group, "edge_node": ctx.node, "bdSeq": bd}
        if st.bd_seq is not None and bd is not None and bd != st.bd_seq:
            # the will of an older session, delivered after the node was born again
            out.notes.append(("stale NDEATH ignored (bdSeq of an earlier birth)",
                              {**detail, "birth_bdSeq": st.bd_seq}))
            return
        if redelivered and not st.online:
            return
        st.online = False
        for dev in st.devices.values():
            dev.online = False
        self.counts["deaths"] += 1
        out.audits.append(("gap", "sparkplug_node_death", detail))
        out.conditions.append((f"sparkplug_offline:{ctx.group}/{ctx.node}",
                               f"Sparkplug edge node {ctx.group}/{ctx.node} is offline "
                               "(NDEATH): its data stops until the next NBIRTH"))

    def _check_seq(self, st: _Node, ctx: _Message, out: Decoded, redelivered: bool) -> None:
        p = ctx.payload
        if not p.HasField("seq"):
            return
        expected, st.next_seq = st.next_seq, (p.seq + 1) % 256
        if expected is None or redelivered or p.seq == expected:
            return
        self.counts["seq_gaps"] += 1
        out.audits.append(("gap", "sparkplug_seq_gap", {
            "group": ctx.group, "edge_node": ctx.node, "device": ctx.device,
            "message_type": ctx.mtype, "expected_seq": expected, "seq": p.seq}))
        out.rebirth = (ctx.group, ctx.node, "sequence_gap")

    def _metrics(self, st: _Node, ctx: _Message, out: Decoded, *, birth: bool) -> None:
        tables: list[_Tables] = [st]
        if ctx.device is not None:
            tables.insert(0, st.devices.setdefault(ctx.device, _Tables()))
        unresolved: dict[str, list[dict[str, Any]]] = {}
        for i, m in enumerate(ctx.payload.metrics):
            d = _resolve(m, tables, birth)
            if d is None:
                what = ({"alias": m.alias} if m.HasField("alias")
                        else {"index": i, "problem": "neither name nor alias"})
                unresolved.setdefault("unknown_alias" if m.HasField("alias")
                                      else "invalid_data", []).append(what)
                continue
            if _is_state(d.name) or (m.HasField("template_value")
                                     and m.template_value.is_definition):
                continue
            try:
                out.readings.append(ctx.reading(i, m, d))
            except InputError as err:
                unresolved.setdefault(err.reason, []).append(
                    {"metric": d.name, "index": i, "detail": err.detail[:200]})
        for reason, metrics in unresolved.items():
            if reason == "unknown_alias":
                self.counts["unknown_alias"] += len(metrics)
                out.rebirth = (ctx.group, ctx.node, "unknown_alias")
                detail = (f"{len(metrics)} metric(s) with an alias no birth of "
                          f"{ctx.group}/{ctx.node} defined (rebirth requested)")
            else:
                detail = f"{len(metrics)} metric(s) could not become events"
            out.rejects.append(Reject(reason, detail, {
                "sparkplug": {"message_type": ctx.mtype, "seq": ctx.payload.seq
                              if ctx.payload.HasField("seq") else None,
                              "metrics": metrics[:50]}}))


def _dump(t: _Tables) -> list[list[Any]]:
    alias_of = {id(d): a for a, d in t.aliases.items()}
    return [[d.name, d.datatype, d.unit, alias_of.get(id(d))] for d in t.names.values()]


def _load(t: _Tables, metrics: list[list[Any]]) -> None:
    for name, datatype, unit, alias in metrics:
        d = _Def(str(name), int(datatype), None if unit is None else str(unit))
        t.names[d.name] = d
        if alias is not None:
            t.aliases[int(alias)] = d


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _is_state(name: str) -> bool:
    return name == "bdSeq" or name.startswith(("Node Control/", "Device Control/"))


def _bd_seq(p: Any) -> int | None:
    for m in p.metrics:
        if m.name == "bdSeq":
            which = m.WhichOneof("value")
            if which in ("long_value", "int_value"):
                return int(getattr(m, which))
    return None


def _resolve(m: Any, tables: Iterable[_Tables], birth: bool) -> _Def | None:
    """The metric's name and datatype: from its alias or name, registered by a birth."""
    tables = list(tables)
    datatype = m.datatype if m.HasField("datatype") else None
    if birth:
        if not m.name:
            return None
        d = _Def(m.name, datatype or 0, _properties(m)[1])
        table = tables[0]
        table.names[m.name] = d
        if m.HasField("alias"):
            table.aliases[m.alias] = d
        return d
    if m.HasField("alias") and not m.name:
        for t in tables:
            found = t.aliases.get(m.alias)
            if found is not None:
                return found if datatype is None else _Def(found.name, datatype, found.unit)
        return None
    if not m.name:
        return None
    for t in tables:
        found = t.names.get(m.name)
        if found is not None:
            return found if datatype is None else _Def(found.name, datatype, found.unit)
    return _Def(m.name, datatype or 0)


# --------------------------------------------------------------------------- values


def _value(m: Any, datatype: int) -> Any:
    """The metric's value as JSON; ``None`` for null; InputError for what has no scalar
    form (DataSet, Template)."""
    if m.is_null:
        return None
    which = m.WhichOneof("value")
    if which is None:
        return None
    v = getattr(m, which)
    if which == "int_value":
        return v - (1 << 32) if datatype in _SIGNED32 and v >= 1 << 31 else int(v)
    if which == "long_value":
        if datatype == _DATETIME:
            try:
                return iso_z(datetime.fromtimestamp(v / 1000, UTC))
            except (OverflowError, OSError, ValueError) as err:
                raise InputError("invalid_data", f"DateTime {v}: {err}") from err
        if datatype in _SIGNED32 or datatype == _INT64:
            return v - (1 << 64) if v >= 1 << 63 else int(v)
        return int(v)
    if which == "float_value":
        return _float32(v)
    if which in ("double_value", "boolean_value", "string_value"):
        return v
    if which == "bytes_value":
        return base64.b64encode(v).decode("ascii")
    raise InputError("unsupported_datatype",
                     f"{which.removesuffix('_value')} values have no single reading")


def _float32(v: float) -> float | None:
    if not math.isfinite(v):
        return v
    packed = struct.pack("<f", v)
    for digits in range(6, 10):
        short = float(f"{v:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return v


def _quality(code: int) -> str:
    if code == 500:
        return "UncertainLastUsableValue"  # stale
    if 192 <= code < 256:
        return "Good"
    if 64 <= code < 192:
        return "Uncertain"
    return "Bad"


def _properties(m: Any) -> tuple[int | None, str | None]:
    """The metric's ``Quality`` code and engineering unit, where it has them."""
    if not m.HasField("properties"):
        return None, None
    quality, unit = None, None
    for key, pv in zip(m.properties.keys, m.properties.values, strict=False):
        k = key.lower()
        which = pv.WhichOneof("value")
        if k == "quality" and which in ("int_value", "long_value") and not pv.is_null:
            quality = int(getattr(pv, which))
        elif k in _UNIT_KEYS and which == "string_value" and pv.string_value:
            unit = pv.string_value
    return quality, unit


@dataclass(slots=True)
class _Message:
    mapping: SparkplugMapping
    topic: str
    raw: bytes
    captures: dict[str, Any]
    group: str
    mtype: str
    node: str
    device: str | None
    payload: Any
    _digest: str = ""

    @property
    def digest(self) -> str:
        if not self._digest:
            self._digest = hashlib.sha256(self.topic.encode() + b"\x00" + self.raw).hexdigest()
        return self._digest

    def reading(self, index: int, m: Any, d: _Def) -> Reading:
        """One metric → one event (InputError: quarantine it)."""
        mp, p = self.mapping, self.payload
        value = _value(m, d.datatype)
        quality, unit = _properties(m)
        unit = unit or d.unit
        status = None
        if value is None:
            status = "BadNoData"
        elif isinstance(value, float) and not math.isfinite(value):
            value, status = None, "BadOutOfRange"
        if quality is not None and (status is None or _quality(quality) != "Good"):
            status = _quality(quality)
        values: dict[str, Any] = {
            **self.captures, **mp.static, "site": mp.site, "source": mp.source,
            "group": self.group, "edge_node": self.node, "device": self.device,
            "metric": d.name, "message_type": self.mtype, "index": index,
            "seq": p.seq if p.HasField("seq") else None,
            "timestamp": p.timestamp if p.HasField("timestamp") else None,
            "station": self.device or self.node, "datatype": DATATYPES.get(d.datatype),
        }
        values["signal"] = mp.signal.render(values)
        data: dict[str, Any] = {"signal": values["signal"], "value": value,
                                "station": values["station"], "group": self.group,
                                "edge_node": self.node, "metric": d.name,
                                "datatype": DATATYPES.get(d.datatype, str(d.datatype))}
        if self.device is not None:
            data["device"] = self.device
        if status is not None:
            data["status"] = status
        if quality is not None:
            data["quality"] = quality
        if unit is not None:
            data["unit"] = unit
        if m.is_historical:
            data["historical"] = True
        for k, v in (*self.captures.items(), *mp.static.items()):
            data.setdefault(k, v)
        data = validate_data(mp.event, data)
        ts_ms = m.timestamp if m.HasField("timestamp") else (
            p.timestamp if p.HasField("timestamp") else None)
        source_ts = None
        if ts_ms is not None:
            try:
                source_ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
            except (OverflowError, OSError, ValueError) as err:
                raise InputError("invalid_timestamp", f"timestamp {ts_ms}: {err}") from err
        key = mp.ordering_key.render(values) or None
        event = make_event(type=mp.event, site=mp.site, source=mp.source, data=data,
                           ordering_key=key, event_class=mp.event_class, source_ts=source_ts)
        if mp.dedupe_key is not None:
            dedupe = mp.dedupe_key.render(values)
            if not dedupe:
                raise InputError("missing_field", f"dedupe_key {mp.dedupe_key.text!r} is empty")
            return Reading(event, dedupe, False)
        return Reading(event, f"spb:{self.digest}:{index}",
                       redelivery_only=not p.HasField("timestamp"))
