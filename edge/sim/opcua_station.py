"""An OPC UA inspection-station simulator (asyncua Server) for the demo, tests and benches.

Address space (namespace ``urn:edge-gateway:sim:<name>``, index 2), under
``/Objects/2:<name>``::

    Temperature   Double   ~20 °C, changes every reading period, HISTORIZED
    SpindleSpeed  Double   ~12000 rpm
    PartCounter   UInt32   parts made
    LotId         String   changes every lot period ("L<name>-0001" ...)
    Serial        String   serial of the last inspected part
    Result        String   "pass" | "fail" (every tenth part fails)
    Measured      Double   measured characteristic of the last part
    ResultReady   Boolean  true when a result is ready (writable: the ack of a handshake)
    Sensor0000…   Double   optional extra items for load tests (``items``)

Every result period the station writes LotId/Serial/Result/Measured, then sets
ResultReady to true; half a period later it resets it to false (or, with ``handshake``,
waits until a client writes false). NodeIds are ``ns=2;s=<name>.<Variable>``.

Programmatic API (demo, tests)::

    station = await start_station(port=0)      # loopback, free port
    station.endpoint                           # opc.tcp://127.0.0.1:PORT
    station.node_id("Temperature")             # "ns=2;s=Station7.Temperature"
    await station.write("Temperature", 21.5)   # drive values by hand (auto=False)
    await station.publish_result(serial="S1", result="fail", measured=9.1)
    station.fail_next(2)                       # the next 2 results fail (out of spec)
    station.fail_every = 0                     # no failures of its own (default: every 10th)
    await station.refuse_reads("Serial")       # faults: a Read including Serial fails …
    await station.accept_reads("Serial")       # … until accepted again
    await station.refuse_writes("ResultReady") # the ack write is refused (access denied)
    await station.accept_writes("ResultReady")
    await station.raise_alarm("Overheat", severity=800, message="too hot")  # → EventId hex
    await station.acknowledge_alarm("Overheat")   # an operator acknowledged it
    await station.clear_alarm("Overheat")         # back to normal (retained until acked)
    station.active_alarms()                       # names of the retained conditions
    await station.stop()

Alarms (OPC UA Alarms & Conditions): ``raise_alarm`` / ``acknowledge_alarm`` /
``clear_alarm`` fire a condition event (``AlarmConditionType`` by default; also
``OffNormalAlarmType``, ``LimitAlarmType`` …) from the Server object, with SourceName
``<name>.<source variable>``, ConditionName the alarm's name, ConditionId
``ns=2;s=<name>.Alarms.<alarm>``, and ActiveState / AckedState / Retain as the spec has
them. The server answers ConditionRefresh (``condition_refresh=False``: it does not, as
many small servers do not) by re-sending every retained condition with its last EventId,
between a RefreshStartEvent and a RefreshEndEvent. With ``auto`` the station raises an
Overheat alarm (severity 700) while Temperature is above ``alarm_above`` and clears it
below.

CLI: ``edge simulate opcua --port 4840 [--history-db FILE] [--items N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["Station", "add_arguments", "run", "start_station"]

log = logging.getLogger(__name__)

VARIABLES: dict[str, tuple[str, Any]] = {
    "Temperature": ("Double", 20.0),
    "SpindleSpeed": ("Double", 12000.0),
    "PartCounter": ("UInt32", 0),
    "LotId": ("String", ""),
    "Serial": ("String", ""),
    "Result": ("String", ""),
    "Measured": ("Double", 0.0),
    "ResultReady": ("Boolean", False),
}

POLICIES = {
    "Basic256Sha256": ("Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"),
    "Aes128_Sha256_RsaOaep": ("Aes128Sha256RsaOaep_Sign", "Aes128Sha256RsaOaep_SignAndEncrypt"),
    "Aes256_Sha256_RsaPss": ("Aes256Sha256RsaPss_Sign", "Aes256Sha256RsaPss_SignAndEncrypt"),
}


@dataclass
class _Alarm:
    """One simulated condition: its event generator (the event object is the condition's
    current state, which the server keeps for ConditionRefresh while it is retained)."""

    gen: Any
    event_type: str
    active: bool = False
    acked: bool = True


@dataclass
class Station:
    """A running simulated station. Use ``start_station`` to make one."""

    name: str
    server: Any
    endpoint: str
    namespace: str
    ns: int
    nodes: dict[str, Any] = field(default_factory=dict)
    parts: int = 0
    lot: int = 1
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ready_reset: asyncio.Event = field(default_factory=asyncio.Event)
    _kept: dict[str, Any] = field(default_factory=dict)  # values held while reads are refused
    # username → password the server accepts (with ``users``); change it to refuse a login
    users: dict[str, str] = field(default_factory=dict)
    # a result fails when its part number is a multiple of this (0: never), or while
    # ``fail_next`` has failures pending; a failing part measures out of spec
    fail_every: int = 10
    failing: int = 0
    _alarms: dict[str, _Alarm] = field(default_factory=dict)

    def fail_next(self, n: int = 1) -> None:
        """The next ``n`` results fail (result "fail", measured out of spec)."""
        self.failing += n

    def _fails(self) -> bool:
        if self.failing > 0:
            self.failing -= 1
            return True
        return bool(self.fail_every) and self.parts % self.fail_every == 0

    # ------------------------------------------------------------------ alarms

    async def raise_alarm(self, name: str, *, severity: int = 800, message: str | None = None,
                          source: str = "Temperature", event_type: str = "AlarmConditionType",
                          time: datetime | None = None) -> str:
        """Activate alarm ``name`` (created on first use, of ``event_type``) and fire its
        event; returns the EventId (hex). Raising an active alarm again fires a new event
        (e.g. a new severity)."""
        alarm = await self._alarm(name, source, event_type)
        alarm.gen.event.Severity = severity
        alarm.active, alarm.acked = True, False
        return await self._fire(alarm, message or f"{name}: active", time)

    async def acknowledge_alarm(self, name: str, *, message: str | None = None) -> str:
        """An operator acknowledged ``name``: AckedState true, fires its event."""
        alarm = self._alarms[name]
        alarm.acked = True
        return await self._fire(alarm, message or f"{name}: acknowledged", None)

    async def clear_alarm(self, name: str, *, message: str | None = None,
                          time: datetime | None = None) -> str:
        """``name`` returns to normal: ActiveState false, fires its event (the condition
        stays retained until it is acknowledged)."""
        alarm = self._alarms[name]
        alarm.active = False
        return await self._fire(alarm, message or f"{name}: back to normal", time)

    async def define_alarm(self, name: str, *, source: str = "Temperature",
                           event_type: str = "AlarmConditionType") -> None:
        """Create alarm ``name`` without firing it (so a burst of raises is fast)."""
        await self._alarm(name, source, event_type)

    def active_alarms(self) -> list[str]:
        """Names of the retained conditions (active, or not acknowledged yet)."""
        return [n for n, a in self._alarms.items() if a.active or not a.acked]

    async def _alarm(self, name: str, source: str, event_type: str) -> _Alarm:
        from asyncua import ua
        from asyncua.server.event_generator import EventGenerator

        alarm = self._alarms.get(name)
        if alarm is not None:
            return alarm
        etype = ua.NodeId(getattr(ua.ObjectIds, event_type))
        gen = EventGenerator(self.server.iserver.isession)
        # one GeneratesEvent reference per type is enough (a second one is refused)
        first = not any(a.event_type == event_type for a in self._alarms.values())
        await gen.init(etype, emitting_node=ua.ObjectIds.Server, add_generates_event=first)
        ev = gen.event
        ev.SourceNode = self.nodes[source].nodeid if source in self.nodes else ev.SourceNode
        ev.SourceName = f"{self.name}.{source}"
        ev.ConditionName = name
        ev.NodeId = _nid(f"{self.name}.Alarms.{name}", self.ns)  # the ConditionId
        ev.BranchId = ua.NodeId()
        alarm = self._alarms[name] = _Alarm(gen, event_type)
        return alarm

    async def _fire(self, alarm: _Alarm, message: str, time: datetime | None) -> str:
        from asyncua import ua

        ev = alarm.gen.event
        ev.add_property("ActiveState/Id", alarm.active, ua.VariantType.Boolean)
        ev.add_variable("ActiveState", ua.LocalizedText("Active" if alarm.active
                                                        else "Inactive"),
                        ua.VariantType.LocalizedText)
        ev.add_property("AckedState/Id", alarm.acked, ua.VariantType.Boolean)
        ev.add_variable("AckedState", ua.LocalizedText("Acknowledged" if alarm.acked
                                                       else "Unacknowledged"),
                        ua.VariantType.LocalizedText)
        ev.add_property("EnabledState/Id", True, ua.VariantType.Boolean)
        ev.Retain = alarm.active or not alarm.acked
        await alarm.gen.trigger(time_attr=time, message=message)
        event_id = ev.EventId.Value if isinstance(ev.EventId, ua.Variant) else ev.EventId
        return bytes(event_id).hex()

    def node_id(self, variable: str) -> str:
        """NodeId string of a variable, e.g. ``ns=2;s=Station7.Temperature``."""
        return f"ns={self.ns};s={self.name}.{variable}"

    def browse_path(self, variable: str) -> str:
        return f"/Objects/{self.ns}:{self.name}/{self.ns}:{variable}"

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    async def write(self, variable: str, value: Any, *, ts: datetime | None = None,
                    status: int | None = None) -> datetime:
        """Set a variable as the device would (SourceTimestamp = ``ts`` or now)."""
        from asyncua import ua

        node = self.nodes[variable]
        self._kept.pop(variable, None)  # a write ends refused reads (see refuse_reads)
        vtype = getattr(ua.VariantType, VARIABLES.get(variable, ("Double", 0))[0])
        ts = ts or datetime.now(UTC)
        variant = ua.Variant() if value is None else ua.Variant(value, vtype)
        stamp: Any = ts  # asyncua types it as its DateTime subclass; a datetime is what it uses
        dv = ua.DataValue(variant, StatusCode=ua.StatusCode(ua.UInt32(status or 0)),
                          SourceTimestamp=stamp, ServerTimestamp=stamp)
        await self.server.write_attribute_value(node.nodeid, dv)
        return ts

    async def read(self, variable: str) -> Any:
        return await self.nodes[variable].read_value()

    async def publish_result(
        self, *, serial: str | None = None, result: str | None = None,
        measured: float | None = None, lot_id: str | None = None, ready: bool = True,
    ) -> dict[str, Any]:
        """Write one inspection result, then ResultReady=true; returns what was written."""
        self.parts += 1
        if result is None:
            result = "fail" if self._fails() else "pass"
        if measured is None:
            measured = (round(10.0 + random.choice((-1, 1)) * random.uniform(0.12, 0.3), 4)
                        if result == "fail" else round(random.gauss(10.0, 0.015), 4))
        values = {
            "LotId": lot_id or self.lot_id,
            "Serial": serial or f"{self.name}-{self.parts:06d}",
            "Result": result,
            "Measured": float(measured),
        }
        for name, value in values.items():
            await self.write(name, value)
        await self.write("PartCounter", self.parts)
        if ready:
            await self.raise_ready()
        return values

    async def raise_ready(self) -> datetime:
        """ResultReady=true: the result written before is ready (waits for the ack again
        with ``handshake``); returns its SourceTimestamp."""
        self._ready_reset.clear()
        return await self.write("ResultReady", True)

    async def refuse_reads(self, variable: str, status: str = "BadResourceUnavailable") -> None:
        """Fail every Read that includes ``variable`` (the whole service call answers with a
        ServiceFault ``status``), as a station whose data source is briefly unavailable
        would; ``accept_reads`` ends it. The value is kept; writes in between end it too."""
        from asyncua import ua

        node = self.nodes[variable]
        kept = self.server.read_attribute_value(node.nodeid)
        self._kept[variable] = kept
        error = getattr(ua.uaerrors, status)

        def refuse(nodeid: Any, attr: Any) -> Any:
            raise error()

        self.server.set_attribute_value_callback(node.nodeid, refuse)

    async def accept_reads(self, variable: str) -> None:
        kept = self._kept.pop(variable, None)
        if kept is not None:
            await self.server.write_attribute_value(self.nodes[variable].nodeid, kept)

    async def refuse_writes(self, variable: str = "ResultReady") -> None:
        """Clients may no longer write ``variable`` (BadUserAccessDenied), e.g. the ack of a
        handshake; ``accept_writes`` allows it again."""
        await self.nodes[variable].set_writable(False)

    async def accept_writes(self, variable: str = "ResultReady") -> None:
        await self.nodes[variable].set_writable(True)

    async def wait_acknowledged(self) -> None:
        """With ``handshake``: return once a client wrote ResultReady=false (it stored the
        result), the station's signal to move on to the next part."""
        await self._ready_reset.wait()

    def next_lot(self) -> str:
        """Start the next lot and return its id (written to LotId by the next result)."""
        self.lot += 1
        return self.lot_id

    @property
    def lot_id(self) -> str:
        return f"L{self.name}-{self.lot:04d}"

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.server.stop()


async def start_station(
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "Station7",
    *,
    auto: bool = True,
    reading_period_s: float = 0.5,
    result_period_s: float = 1.0,
    lot_period_s: float = 10.0,
    handshake: bool = False,
    history_db: str | Path | None = None,
    history_count: int = 100_000,
    items: int = 0,
    items_period_s: float = 0.1,
    security: list[str] | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    users: dict[str, str] | None = None,
    seed: int | None = None,
    condition_refresh: bool = True,
    alarm_above: float | None = None,
) -> Station:
    """Start a station server; returns once it listens.

    ``auto``: produce readings and results by itself (else drive it with ``write`` /
    ``publish_result``). ``history_db``: keep the Temperature history in SQLite so it
    survives a restart (else in memory). ``security``: policy names (``Basic256Sha256``,
    ``Aes128_Sha256_RsaOaep``, ``Aes256_Sha256_RsaPss``) offered with Sign and
    SignAndEncrypt, plus None unless ``users`` demands encryption; needs ``cert_file`` and
    ``key_file``. ``users``: {username: password}; anonymous login is then refused.
    """
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.server.user_managers import UserManager

    if seed is not None:
        random.seed(seed)
    server = Server()
    known = dict(users or {})
    if users is not None:

        class _Users(UserManager):
            def get_user(self, iserver: Any, username: str | None = None,
                         password: str | None = None, certificate: Any = None) -> Any:
                if username is not None and known.get(username) == password:
                    return User(role=UserRole.User, name=username)
                return None

        server.iserver.user_manager = _Users()
    server.iserver.bind_condition_methods = condition_refresh  # before init()
    if history_db is not None:  # before init(), which opens the storage
        server.iserver.history_manager.set_storage(_history_sqlite(str(history_db)))
    await _init_server(server)
    server.set_server_name(f"edge-gateway simulated station {name}")
    await server.set_application_uri(f"urn:edge-gateway:sim:{name}:server")
    server.set_endpoint(f"opc.tcp://{_url_host(host)}:{port}")
    if security:
        if cert_file is None or key_file is None:
            raise ValueError("security needs cert_file and key_file")
        policies = [] if users is not None else [ua.SecurityPolicyType.NoSecurity]
        for p in security:
            for member in POLICIES[p]:
                policies.append(getattr(ua.SecurityPolicyType, member))
        server.set_security_policy(policies)
        await server.load_certificate(str(cert_file))
        await server.load_private_key(str(key_file))
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if users is not None:
        server.set_identity_tokens([ua.UserNameIdentityToken])
    namespace = f"urn:edge-gateway:sim:{name}"
    ns = await server.register_namespace(namespace)
    obj = await server.nodes.objects.add_object(_nid(name, ns), ua.QualifiedName(name, ns))
    nodes: dict[str, Any] = {}
    for var, (vtype, initial) in VARIABLES.items():
        nodes[var] = await obj.add_variable(
            _nid(f"{name}.{var}", ns), ua.QualifiedName(var, ns),
            ua.Variant(initial, getattr(ua.VariantType, vtype)))
    await nodes["ResultReady"].set_writable()
    for i in range(items):
        var = f"Sensor{i:04d}"
        nodes[var] = await obj.add_variable(
            _nid(f"{name}.{var}", ns), ua.QualifiedName(var, ns),
            ua.Variant(0.0, ua.VariantType.Double))
    await server.start()
    await server.historize_node_data_change(
        nodes["Temperature"], period=timedelta(days=3650 if history_db else 1),
        count=history_count)
    actual = server.bserver.port if server.bserver is not None else port
    station = Station(name=name, server=server, endpoint=f"opc.tcp://{_url_host(host)}:{actual}",
                      namespace=namespace, ns=ns, nodes=nodes, users=known)
    await station.write("LotId", station.lot_id)
    if handshake:
        station._tasks.append(asyncio.create_task(_watch_ack(station), name="station-ack"))
    if auto:
        station._tasks.append(asyncio.create_task(
            _readings(station, reading_period_s, alarm_above), name="station-readings"))
        station._tasks.append(asyncio.create_task(
            _results(station, result_period_s, lot_period_s, handshake), name="station-results"))
    if items:
        station._tasks.append(asyncio.create_task(
            _load(station, items, items_period_s), name="station-load"))
    log.info("station %s listening on %s", name, station.endpoint)
    return station


def _history_sqlite(path: str) -> Any:
    """asyncua's SQLite history, with table names its own SQL guard accepts.

    asyncua 2.1 names a node's table ``f"{ns}_{identifier!r}"``, so every string NodeId
    (``'Station7.Temperature'``, quotes included) is refused as an SQL injection.
    """
    import re

    from asyncua.server.history_sql import HistorySQLite

    class _History(HistorySQLite):
        def _get_table_name(self, node_id: Any) -> str:
            return f"{node_id.NamespaceIndex}_" + re.sub(r"\W", "_", str(node_id.Identifier))

    return _History(path)


def _aspace_shelf() -> Path | None:
    """Where the standard address space is cached (None: caching off).

    asyncua builds its standard address space from generated code at every start (seconds
    on a busy 2-core box); asyncua can instead load it lazily from a read-only shelf built
    once. The cache lives in ``$XDG_CACHE_HOME/edge-gateway`` (``EDGE_SIM_CACHE`` overrides,
    ``EDGE_SIM_CACHE=off`` disables it) and is keyed by the asyncua version.
    """
    from importlib.metadata import version

    setting = os.environ.get("EDGE_SIM_CACHE", "")
    if setting.lower() in ("off", "0", "no"):
        return None
    root = Path(setting) if setting else Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-gateway"
    return root / f"asyncua-{version('asyncua')}-aspace"


async def _init_server(server: Any) -> None:
    shelf = _aspace_shelf()
    if shelf is None:
        await server.init()
        return
    try:
        shelf.parent.mkdir(parents=True, exist_ok=True)
        lock = await asyncio.to_thread(_lock, shelf.with_name(shelf.name + ".lock"))
    except OSError as err:
        log.warning("address-space cache unavailable (%s); starting without it", err)
        await server.init()
        return
    try:
        # asyncua loads the shelf when ``shelf`` is a file and builds it otherwise. With the
        # dbm.dumb backend the shelf is shelf.dat/.dir, so an empty marker file at ``shelf``
        # says "built and complete"; it is written last, under the lock.
        complete = shelf.is_file()  # noqa: ASYNC240 - one stat
        await server.init(shelf)
        if not complete and not shelf.exists():  # noqa: ASYNC240
            shelf.touch()  # noqa: ASYNC240
    finally:
        lock.close()


def _lock(path: Path) -> Any:
    import fcntl

    f = open(path, "a")  # noqa: SIM115 - held until released by the caller
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _nid(identifier: str, ns: int) -> Any:
    from asyncua import ua

    return ua.NodeId(ua.String(identifier), ua.Int16(ns))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _readings(station: Station, period_s: float, alarm_above: float | None) -> None:
    t0 = asyncio.get_running_loop().time()
    hot = False
    while True:
        t = asyncio.get_running_loop().time() - t0
        temperature = round(20.0 + 2.0 * math.sin(t / 30.0) + random.gauss(0, 0.05), 3)
        await station.write("Temperature", temperature)
        if alarm_above is not None and (temperature > alarm_above) != hot:
            hot = not hot
            if hot:
                await station.raise_alarm("Overheat", severity=700,
                                          message=f"Temperature {temperature} above "
                                                  f"{alarm_above}")
            else:
                await station.clear_alarm("Overheat")
        await station.write("SpindleSpeed", round(12000 + random.gauss(0, 15), 1))
        await asyncio.sleep(period_s)


async def _results(station: Station, period_s: float, lot_period_s: float,
                   handshake: bool) -> None:
    loop = asyncio.get_running_loop()
    lot_started = loop.time()
    while True:
        if loop.time() - lot_started >= lot_period_s:
            station.lot += 1
            lot_started = loop.time()
            await station.write("LotId", station.lot_id)
        await station.publish_result()
        if handshake:
            await station._ready_reset.wait()  # the client acknowledged (wrote false)
            await asyncio.sleep(period_s)
        else:
            await asyncio.sleep(period_s / 2)
            await station.write("ResultReady", False)
            await asyncio.sleep(period_s / 2)


async def _watch_ack(station: Station) -> None:
    """With a handshake, notice when a client writes ResultReady=false."""
    while True:
        await asyncio.sleep(0.05)
        if not await station.read("ResultReady"):
            station._ready_reset.set()


async def _load(station: Station, items: int, period_s: float) -> None:
    from asyncua import ua

    write = station.server.write_attribute_value
    ids = [station.nodes[f"Sensor{i:04d}"].nodeid for i in range(items)]
    n = 0
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        n += 1
        ts: Any = datetime.now(UTC)
        for nid in ids:
            await write(nid, ua.DataValue(ua.Variant(float(n), ua.VariantType.Double),
                                          SourceTimestamp=ts, ServerTimestamp=ts))
        next_at += period_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=4840, help="0 picks a free port")
    parser.add_argument("--name", default="Station7", help="station name (NodeId prefix)")
    parser.add_argument("--reading-period-ms", type=float, default=500)
    parser.add_argument("--result-period-ms", type=float, default=1000)
    parser.add_argument("--lot-period-s", type=float, default=10)
    parser.add_argument("--fail-every", type=int, default=10, metavar="N",
                        help="every N-th part fails, out of spec (0: none; default 10)")
    parser.add_argument("--handshake", action="store_true",
                        help="wait for a client to write ResultReady=false before the next part")
    parser.add_argument("--history-db", help="SQLite file for the Temperature history "
                        "(kept across restarts)")
    parser.add_argument("--items", type=int, default=0, help="extra Sensor variables (load)")
    parser.add_argument("--items-period-ms", type=float, default=100)
    parser.add_argument("--security", action="append", choices=sorted(POLICIES),
                        help="offer this policy (Sign + SignAndEncrypt); repeatable")
    parser.add_argument("--cert", help="server certificate (DER) for --security")
    parser.add_argument("--key", help="server private key (PEM) for --security")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--alarm-above", type=float, metavar="CELSIUS",
                        help="raise an Overheat alarm while Temperature is above this")
    parser.add_argument("--no-condition-refresh", action="store_true",
                        help="do not answer ConditionRefresh (like many small servers)")


async def run(args: argparse.Namespace) -> int:
    """``edge simulate opcua``: serve until SIGINT/SIGTERM; print the endpoint first."""
    try:
        station = await start_station(
            args.host, args.port, args.name,
            reading_period_s=args.reading_period_ms / 1000,
            result_period_s=args.result_period_ms / 1000, lot_period_s=args.lot_period_s,
            handshake=args.handshake, history_db=args.history_db, items=args.items,
            items_period_s=args.items_period_ms / 1000, security=args.security,
            cert_file=args.cert, key_file=args.key, seed=args.seed,
            condition_refresh=not args.no_condition_refresh, alarm_above=args.alarm_above,
        )
    except (OSError, ValueError) as err:
        print(f"cannot start the station: {err}", flush=True)
        return 1
    station.fail_every = max(0, args.fail_every)
    print(f"station {station.name} listening on {station.endpoint} "
          f"(namespace {station.namespace}, ns={station.ns})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await station.stop()
    return 0
