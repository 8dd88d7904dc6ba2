"""OPC UA stations for the fault campaign: servers that can be killed and started again on
the same port while results flow, and that write down what the gateway owes them.

What a handshake station sees acknowledged is the OPC UA analogue of a PUBACK: the
gateway writes ``ResultReady=false`` only after the result is committed. Each station
here keeps a **journal** (JSON lines, appended and flushed line by line, so a ``kill -9``
of the station keeps every line written before it):

    {"k": "part", "part": 7, "serial": "...", "lot": "...", "result": "...", "measured": ...}
    {"k": "acked", "part": 7}                     the gateway wrote ResultReady=false
    {"k": "sample", "ts": "<ISO>", "value": 42.0} Temperature written (historized node)
    {"k": "start", "at": "<ISO>", "history": "memory|sqlite"}

and resumes from it after a restart, as a station keeping its state in the PLC would:
part numbers go on, and a part raised but not acknowledged when the server went away is
raised again with the same values (the gateway's ``dedupe_key: "{serial}"`` makes that
one part). Temperature values are a counter that goes on too, so every value names one
sample.

What the gateway owes (``owed_results``, ``check_samples``):

- every part the journal shows ``acked`` reaches the ERP once, per lot in part order;
- every Temperature sample the server still holds in its history (read at the end) and
  written while the gateway watched reaches the ERP once, in source-time order;
- every other sample the ERP never got lies inside a gap the gateway reported (audit
  ``backfilled`` / ``backfill_failed`` / ``backfill_truncated`` windows): a restarted
  server with in-memory history (node-opcua, asyncua without ``--history-db``) cannot
  give those back, and the gateway must say so rather than invent data;
- nothing reaches the ERP that the station never wrote.

Wrappers: ``AsyncuaStation`` (this module run as ``python -m tests.faults.opcua``: the
asyncua simulator ``edge.sim.opcua_station`` driven by the loop below) and
``NodeOpcuaStation`` (tests/opcua_node/server.js ``--journal``). Both: ``start``,
``kill9``, ``stop``, ``restart(how)``, ``endpoint``, ``source_yaml(id)``, ``journal()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support import free_port, stop_async_process

__all__ = [
    "AsyncuaStation",
    "Journal",
    "NodeOpcuaStation",
    "SampleFigures",
    "check_samples",
    "gap_windows",
    "owed_results",
    "read_history",
]

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "tests" / "opcua_node"
READY_NODE = "ResultReady"


def parse_ts(text: str) -> datetime:
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- journal


@dataclass
class Part:
    part: int
    serial: str
    lot: str
    result: str
    measured: float


@dataclass
class Journal:
    """What a station wrote down (across all of its restarts)."""

    parts: dict[int, Part] = field(default_factory=dict)
    acked: list[int] = field(default_factory=list)  # in ack order; a part may appear again
    samples: dict[datetime, float] = field(default_factory=dict)  # Temperature ts → value
    starts: int = 0

    @classmethod
    def read(cls, path: Path) -> Journal:
        j = cls()
        if not path.exists():
            return j
        for raw in path.read_text().splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # the last line, cut by a kill -9 mid-write
            kind = rec.get("k")
            if kind == "part":
                j.parts[int(rec["part"])] = Part(int(rec["part"]), rec["serial"], rec["lot"],
                                                 rec["result"], float(rec["measured"]))
            elif kind == "acked":
                j.acked.append(int(rec["part"]))
            elif kind == "sample":
                j.samples[parse_ts(rec["ts"])] = float(rec["value"])
            elif kind == "start":
                j.starts += 1
        return j

    @property
    def acked_parts(self) -> list[Part]:
        return [self.parts[n] for n in sorted(set(self.acked)) if n in self.parts]

    @property
    def last_part(self) -> Part | None:
        return self.parts[max(self.parts)] if self.parts else None

    @property
    def next_value(self) -> float:
        return max(self.samples.values(), default=0.0) + 1.0


def owed_results(journal: Journal) -> list[tuple[str, int, str]]:
    """(ordering key, per-key sequence, serial) of every acknowledged part: what the ERP
    must get, once each, per lot in part order."""
    return [(f"lot:{p.lot}", p.part, p.serial) for p in journal.acked_parts]


class _Writer:
    """Appends journal lines; each line reaches the kernel before the call returns."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - held for the process

    def write(self, **rec: Any) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()


# --------------------------------------------------------------------------- asyncua driver


async def _drive(args: argparse.Namespace) -> int:
    """The asyncua station with a journal (``python -m tests.faults.opcua``)."""
    from edge.sim.opcua_station import start_station

    path = Path(args.journal)
    past = Journal.read(path)
    journal = _Writer(path)
    station = await start_station(
        port=args.port, name=args.name, auto=False, history_db=args.history_db)
    journal.write(k="start", at=datetime.now(UTC).isoformat(),
                  history="sqlite" if args.history_db else "memory")
    # The server listened with the variable's initial value already: a sample too.
    first = station.server.read_attribute_value(station.nodes["Temperature"].nodeid)
    journal.write(k="sample", ts=(first.SourceTimestamp or first.ServerTimestamp).isoformat(),
                  value=first.Value.Value)
    print(f"station {station.name} listening on {station.endpoint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def readings() -> None:
        value = past.next_value
        while True:
            ts = await station.write("Temperature", value)
            journal.write(k="sample", ts=ts.isoformat(), value=value)
            value += 1.0
            await asyncio.sleep(args.reading_period_ms / 1000)

    async def results() -> None:
        last = past.last_part
        again = last is not None and last.part not in past.acked
        n = last.part if last is not None else 0
        while True:
            if again and last is not None:
                part, again = last, False  # shown again after the restart: same values
            else:
                n += 1
                lot = f"L{args.name}-{(n - 1) // args.parts_per_lot + 1:04d}"
                fails = n % 10 == 0  # out of spec: the rules derive a nonconformance
                part = Part(n, f"{args.name}-{n:06d}", lot, "fail" if fails else "pass",
                            10.15 if fails else 10.0 + (n % 5) / 100)
                journal.write(k="part", part=part.part, serial=part.serial, lot=part.lot,
                              result=part.result, measured=part.measured)
            station.parts = part.part - 1
            await station.publish_result(serial=part.serial, lot_id=part.lot,
                                         result=part.result, measured=part.measured)
            # Only the gateway writes false: the ack of this part, after its commit.
            while await station.read(READY_NODE):
                await asyncio.sleep(0.02)
            journal.write(k="acked", part=part.part)
            await asyncio.sleep(args.result_period_ms / 1000)

    tasks = [asyncio.create_task(readings()), asyncio.create_task(results())]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await station.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.opcua")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--name", default="Station7")
    p.add_argument("--history-db", help="SQLite history (kept across restarts); else memory")
    p.add_argument("--reading-period-ms", type=float, default=100)
    p.add_argument("--result-period-ms", type=float, default=100)
    p.add_argument("--parts-per-lot", type=int, default=5)
    args = p.parse_args(argv)
    from edge.telemetry import setup_logging  # the simulator's asyncua chatter stays off

    with contextlib.suppress(Exception):
        setup_logging("warning")
    return asyncio.run(_drive(args))


# --------------------------------------------------------------------------- wrappers


class _StationProcess:
    """A station server as a child process on a fixed port: start, kill -9, stop, restart."""

    name = "Station7"
    kind = ""

    def __init__(self, workdir: Path, *, port: int | None = None,
                 result_period_ms: float = 100, reading_period_ms: float = 100) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.journal_file = self.workdir / f"{self.kind}-{self.port}.journal"
        self.log_file = self.workdir / f"{self.kind}-{self.port}.log"
        self.result_period_ms = result_period_ms
        self.reading_period_ms = reading_period_ms
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = {"kill9": 0, "stop": 0}
        self._pump: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def node_id(self, variable: str) -> str:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self, line: bytes) -> bool:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    async def start(self, timeout_s: float = 120) -> None:
        """Start the server and return once it listens (a port still held by the killed
        server's sockets in TIME_WAIT is retried)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            with open(self.log_file, "ab") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    *self._argv(), stdout=subprocess.PIPE, stderr=log, cwd=self._cwd(),
                    env=self._env(), start_new_session=True)
            assert self.proc.stdout is not None
            try:
                async with asyncio.timeout(max(1.0, deadline - loop.time())):
                    while True:
                        raw = await self.proc.stdout.readline()
                        if not raw:
                            break
                        if self._ready(raw):
                            self._pump = asyncio.create_task(_discard(self.proc))
                            return
            except TimeoutError:
                await self.kill9()
                raise RuntimeError(f"{self.kind} station did not start: {self.tail()}") \
                    from None
            await self.proc.wait()
            if loop.time() > deadline or "in use" not in self.tail():
                raise RuntimeError(f"{self.kind} station ended at start: {self.tail()}")
            await asyncio.sleep(0.5)  # the port is still taken: try again

    def _cwd(self) -> Path:
        return REPO

    def tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-n:]
        return ""

    async def kill9(self) -> None:
        """SIGKILL: no goodbye to the clients, like a power cut."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._end_pump()

    async def stop(self) -> None:
        """SIGTERM: the server closes its sessions (a clean restart, an update)."""
        if self.proc is not None:
            await stop_async_process(self.proc, 15)
        await self._end_pump()

    async def _end_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None

    async def restart(self, how: str = "kill9", down_s: float = 0.5) -> None:
        """Take the server down (``kill9`` or ``stop``), wait ``down_s``, start it again on
        the same port with the same journal (and history file, where it has one)."""
        await (self.kill9() if how == "kill9" else self.stop())
        self.restarts[how] += 1
        await asyncio.sleep(down_s)
        await self.start()

    def journal(self) -> Journal:
        return Journal.read(self.journal_file)

    def source_yaml(self, source_id: str = "station7", *, extra: str = "") -> str:
        """The gateway's source block for this station (a list item under ``sources:``):
        the handshake trigger (ack after commit, the part's serial as its identity) and
        the historized Temperature with backfill."""
        n = self.node_id
        return textwrap.dedent(f"""\
            - id: {source_id}
              type: opcua
              endpoint: {self.endpoint}
              publishing_ms: 100
              timeout_s: 3
              watchdog_s: 0.5
              reconnect_max_s: 1
              backfill: {{first_sample_wait_s: 5}}
            {{extra}}
              monitored:
                - {{node: "{n('Temperature')}", sampling_ms: 0, queue_size: 100,
                   static: {{station: {source_id}, characteristic: temperature}},
                   ordering_key: "{source_id}:temperature"}}
              triggers:
                - node: "{n(READY_NODE)}"
                  when: true
                  event: inspection.result
                  ordering_key: "lot:{{lot_id}}"
                  dedupe_key: "{{serial}}"
                  sampling_ms: 0
                  static: {{station: {source_id}}}
                  read: {{lot_id: "{n('LotId')}", serial: "{n('Serial')}",
                          result: "{n('Result')}", measured: "{n('Measured')}"}}
                  fields: {{lot_id: lot_id, serial: serial, result: result,
                            measured: measured, message_id: serial}}
                  ack: {{node: "{n(READY_NODE)}", value: false}}
            """).replace("{extra}\n", textwrap.indent(textwrap.dedent(extra), "  "))


class AsyncuaStation(_StationProcess):
    """The asyncua simulator as its own process, driven with a journal. ``history``:
    ``sqlite`` keeps the Temperature history in a file across restarts, ``memory`` loses
    it at every restart."""

    kind = "asyncua"

    def __init__(self, workdir: Path, *, history: str = "sqlite", **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.history = history
        self.history_db = self.workdir / f"asyncua-{self.port}.history.db"

    def node_id(self, variable: str) -> str:
        return f"ns=2;s={self.name}.{variable}"

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "tests.faults.opcua", "--port", str(self.port),
                "--journal", str(self.journal_file), "--name", self.name,
                "--reading-period-ms", str(self.reading_period_ms),
                "--result-period-ms", str(self.result_period_ms)]
        if self.history == "sqlite":
            argv += ["--history-db", str(self.history_db)]
        return argv

    def _ready(self, line: bytes) -> bool:
        return line.startswith(b"station ") and b"listening on" in line


class NodeOpcuaStation(_StationProcess):
    """tests/opcua_node/server.js (node-opcua) with ``--handshake --journal``; its
    Temperature history lives in memory and is lost at every restart."""

    kind = "node"
    history = "memory"

    def __init__(self, workdir: Path, **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.pki = self.workdir / f"node-pki-{self.port}"
        self.namespace: str | None = None

    @staticmethod
    def available() -> str | None:
        """None when node-opcua can run here, else why not."""
        if shutil.which("node") is None or shutil.which("npm") is None:
            return "Node.js/npm not installed"
        if not (NODE_DIR / "node_modules" / "node-opcua").is_dir():
            res = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR, capture_output=True, text=True, timeout=900, check=False)
            if res.returncode != 0:
                return f"npm install node-opcua failed: {res.stderr[-500:]}"
        return None

    def node_id(self, variable: str) -> str:
        ns = self.namespace or "urn:NodeOPCUA-Server-default"
        return f"nsu={ns};s={self.name}.{variable}"

    def _cwd(self) -> Path:
        return NODE_DIR

    def _env(self) -> dict[str, str]:
        return {**os.environ, "NODE_NO_WARNINGS": "1"}

    def _argv(self) -> list[str]:
        return ["node", str(NODE_DIR / "server.js"), "--port", str(self.port), "--pki",
                str(self.pki), "--handshake", "--journal", str(self.journal_file),
                "--period-ms", str(self.reading_period_ms),
                "--result-period-ms", str(self.result_period_ms)]

    def _ready(self, line: bytes) -> bool:
        if not line.startswith(b"{"):
            return False  # node-opcua also logs on stdout
        self.namespace = json.loads(line)["namespace"]
        return True


async def _discard(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    with contextlib.suppress(Exception):
        while await proc.stdout.readline():
            pass


# --------------------------------------------------------------------------- the checks


async def read_history(endpoint: str, node: str) -> list[datetime]:
    """Every sample the server holds in its history for ``node`` now (SourceTimestamps)."""
    from asyncua import Client

    # asyncua warns at every session that the server shortened its timeout
    logging.getLogger("asyncua.client.client").setLevel(logging.ERROR)
    async with Client(endpoint, timeout=10) as client:
        if node.startswith("nsu="):  # the client wants the namespace's index
            uri, rest = node[4:].split(";", 1)
            node = f"ns={await client.get_namespace_index(uri)};{rest}"
        values = await client.get_node(node).read_raw_history(
            datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC), numvalues=0)
    return sorted(dv.SourceTimestamp.astimezone(UTC) if dv.SourceTimestamp.tzinfo
                  else dv.SourceTimestamp.replace(tzinfo=UTC) for dv in values)


def gap_windows(outbox_db: Path, node: str) -> list[tuple[datetime, datetime, str, int]]:
    """The gaps the gateway reported for ``node``: (from, to, audit state, values read)
    of its ``backfilled``, ``backfill_failed`` and ``backfill_truncated`` rows."""
    con = sqlite3.connect(f"file:{outbox_db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT state, detail FROM audit WHERE event_id IS NULL AND state "
                           "IN ('backfilled', 'backfill_failed', 'backfill_truncated') "
                           "ORDER BY seq").fetchall()
    finally:
        con.close()
    out = []
    for state, raw in rows:
        d = json.loads(raw) if raw else {}
        if d.get("node") != node:
            continue
        start = d.get("from") or d.get("gap_start")
        end = d.get("to") or d.get("read_from")
        if start and end:
            out.append((parse_ts(start), parse_ts(end), state, int(d.get("read", 0))))
    return out


def audit_states(outbox_db: Path) -> dict[str, int]:
    """Component audit rows of the gateway by state (gap, reconnected, ...)."""
    con = sqlite3.connect(f"file:{outbox_db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT state, count(*) FROM audit WHERE event_id IS NULL "
                           "GROUP BY state").fetchall()
    finally:
        con.close()
    return dict(rows)


@dataclass
class SampleFigures:
    """The Temperature promise, counted. The promise holds when ``problems`` is empty."""

    written: int = 0  # samples the station wrote while the gateway watched
    delivered: int = 0  # distinct samples the ERP got
    backfilled: int = 0  # of those, marked backfilled
    gaps_reported: int = 0  # gap windows audited for the node
    lost_in_reported_gaps: int = 0  # not delivered, inside a reported gap (history gone)
    lost_historized: list[datetime] = field(default_factory=list)  # in history, not delivered
    lost_unreported: list[datetime] = field(default_factory=list)  # outside every reported gap
    invented: list[tuple[str, Any]] = field(default_factory=list)  # never written (or other value)
    duplicates: list[datetime] = field(default_factory=list)  # one sample, several event ids
    order_violations: list[tuple[datetime, datetime]] = field(default_factory=list)

    @property
    def problems(self) -> dict[str, Any]:
        found = {"lost_historized": self.lost_historized[:5],
                 "lost_unreported": self.lost_unreported[:5], "invented": self.invented[:5],
                 "duplicates": self.duplicates[:5],
                 "order_violations": self.order_violations[:5]}
        return {k: v for k, v in found.items() if v}

    def summary(self) -> str:
        return (f"samples written={self.written} delivered={self.delivered} "
                f"(backfilled {self.backfilled}) gaps_reported={self.gaps_reported} "
                f"lost_in_reported_gaps={self.lost_in_reported_gaps} "
                f"lost_historized={len(self.lost_historized)} "
                f"lost_unreported={len(self.lost_unreported)} invented={len(self.invented)} "
                f"duplicates={len(self.duplicates)} "
                f"order_violations={len(self.order_violations)}")


def check_samples(journal: Journal, readings: Iterable[dict[str, Any]],
                  history: Iterable[datetime],
                  gaps: list[tuple[datetime, datetime, str, int]]) -> SampleFigures:
    """Compare the Temperature events the ERP accepted (in arrival order, one ordering
    key) with what the station wrote and what its server still holds in history.

    The window is from the first to the last sample the ERP got: before the gateway's
    first connect nothing is owed. Inside it every sample still in the server's history
    must arrive; every other missing sample must lie inside a reported gap."""
    figures = SampleFigures(gaps_reported=len(gaps))
    ids: dict[datetime, set[str]] = {}
    order: list[datetime] = []
    for e in readings:
        ts = parse_ts(e["source_ts"])
        value = e.get("data", {}).get("value")
        if journal.samples.get(ts) != value:
            figures.invented.append((e["source_ts"], value))
            continue
        if ts not in ids:
            order.append(ts)
        ids.setdefault(ts, set()).add(e["id"])
        if e.get("backfilled") and len(ids[ts]) == 1:
            figures.backfilled += 1
    figures.duplicates = sorted(ts for ts, s in ids.items() if len(s) > 1)
    # Delivery order of the first copy of each sample: source-time order per key.
    figures.order_violations = [(a, b) for a, b in zip(order, order[1:], strict=False) if b < a]
    figures.delivered = len(ids)
    if not ids:
        return figures
    lo, hi = min(ids), max(ids)
    window = [ts for ts in sorted(journal.samples) if lo <= ts <= hi]
    figures.written = len(window)
    held = set(history)
    for ts in window:
        if ts in ids:
            continue
        if ts in held:
            figures.lost_historized.append(ts)
        elif any(a <= ts <= b for a, b, _, _ in gaps):
            figures.lost_in_reported_gaps += 1
        else:
            figures.lost_unreported.append(ts)
    return figures


if __name__ == "__main__":
    sys.exit(main())
