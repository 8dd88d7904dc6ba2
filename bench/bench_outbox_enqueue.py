"""Enqueue throughput: ``Outbox.submit`` with group commit vs raw SQLite on the same disk.

Figures (events/s, all with ``synchronous=FULL``, WAL, same disk, same run):
  outbox, P producers × batches of B   ``Outbox.submit`` (defaults: commit_max_rows=500,
                                       commit_interval_ms=10); each producer awaits its
                                       commit before submitting again, like an MQTT
                                       source acking after COMMIT
  raw one table, 500 rows/commit       the physical limit: ``executemany`` of the same
                                       rows into a table shaped like ``events``
  raw outbox schema, 500 rows/commit   the same rows into the real schema (events,
                                       deliveries, audit and their indexes): what the
                                       schema costs before any Python/asyncio work
  raw one table, 1 row/commit          the lower reference (no group commit)

Run:  python -m bench.bench_outbox_enqueue [--events 100000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import event_row, machine_line, work_dir, workload
from edge.cli.common import run_async
from edge.components import Submission
from edge.config import OutboxConfig
from edge.events import Event, EventClass
from edge.outbox import Outbox, audit
from edge.outbox.dbthread import connect
from edge.outbox.queries import ensure_schema

EVENTS_DDL = """
CREATE TABLE events(
  seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
  class INTEGER NOT NULL, ordering_key TEXT, source TEXT NOT NULL,
  received_at REAL NOT NULL, sha256 TEXT NOT NULL, body BLOB NOT NULL)
"""
INSERT_EVENT = "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)"


def fresh(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


# --------------------------------------------------------------------------- raw baselines


def raw_one_table(root: Path, events: list[Event], rows_per_commit: int) -> float:
    """events/s of executemany into one events-shaped table, one transaction per chunk."""
    now = time.time()
    rows = [event_row(i + 1, ev, now) for i, ev in enumerate(events)]
    conn = connect(str(fresh(root, f"raw1-{rows_per_commit}") / "raw.db"), synchronous="FULL")
    conn.execute(EVENTS_DDL)
    started = time.perf_counter()
    for i in range(0, len(rows), rows_per_commit):
        conn.execute("BEGIN IMMEDIATE")
        if rows_per_commit == 1:
            conn.execute(INSERT_EVENT, rows[i])
        else:
            conn.executemany(INSERT_EVENT, rows[i : i + rows_per_commit])
        conn.execute("COMMIT")
    took = time.perf_counter() - started
    conn.close()
    return len(rows) / took


def raw_outbox_schema(root: Path, events: list[Event], rows_per_commit: int) -> float:
    """events/s of executemany of the outbox's three row kinds into its real schema."""
    now = time.time()
    ts = audit.utc_iso(now)
    ev_rows = [event_row(i + 1, ev, now) for i, ev in enumerate(events)]
    dl_rows = [(i + 1, "erp", int(ev.event_class), ev.ordering_key) for i, ev in enumerate(events)]
    au_rows = [
        audit.audit_row("stored", event_id=ev.id, ordering_key=ev.ordering_key, ts=ts,
                        detail={"type": ev.type, "class": EventClass(ev.event_class).name,
                                "source": ev.source, "sha256": ev.payload_sha256,
                                "sinks": ["erp"]})
        for ev in events
    ]
    conn = connect(str(fresh(root, "raw-schema") / "outbox.db"), synchronous="FULL")
    ensure_schema(conn)
    started = time.perf_counter()
    for i in range(0, len(ev_rows), rows_per_commit):
        j = i + rows_per_commit
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_EVENT, ev_rows[i:j])
        conn.executemany(
            "INSERT INTO deliveries(seq, sink, class, ordering_key) VALUES (?,?,?,?)",
            dl_rows[i:j])
        audit.insert_audit(conn, au_rows[i:j])
        conn.execute("COMMIT")
    took = time.perf_counter() - started
    conn.close()
    return len(ev_rows) / took


# --------------------------------------------------------------------------- the outbox


async def outbox_submit(root: Path, name: str, events: list[Event], producers: int,
                        batch: int) -> tuple[float, float]:
    """(events/s, mean rows per commit) of ``producers`` tasks submitting ``batch`` events."""
    outbox = Outbox(fresh(root, name), OutboxConfig(max_size_mb=100_000),
                    router=lambda ev: ["erp"])
    await outbox.open()
    chunks = [events[i : i + batch] for i in range(0, len(events), batch)]
    it = iter(chunks)
    try:
        started = time.perf_counter()

        async def producer() -> None:
            for chunk in it:
                await outbox.submit([Submission(ev) for ev in chunk])

        async with asyncio.TaskGroup() as tg:
            for _ in range(producers):
                tg.create_task(producer())
        took = time.perf_counter() - started
        commits = outbox.metrics.outbox_commits._value.get()
    finally:
        await outbox.close()
    return len(events) / took, len(events) / max(1.0, commits)


def run_loop(coro: Any) -> Any:
    """The daemon's own runner (uvloop, 1 ms GIL switch interval), as ``edge run`` uses."""
    return run_async(coro)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_outbox_enqueue",
                                description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="events per scenario")
    p.add_argument("--single-commit-events", type=int, default=2_000,
                   help="rows for the 1-row-per-commit reference (slow by design)")
    p.add_argument("--dir", help="scratch folder on the disk under test (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch databases")
    args = p.parse_args(argv)

    root = work_dir(args.dir, "enqueue")
    print(f"machine: {machine_line()}")
    print(f"scratch: {root}")
    events = workload(args.events, seed=7)
    body = sum(len(ev.to_json()) for ev in events[:2000]) / min(2000, len(events))
    print(f"workload: {len(events):,} events, mean stored body {body:.0f} bytes, "
          "1,000 lot keys, classes critical/high/normal/low = 1/49/30/20 %\n")

    raw500 = raw_one_table(root, events, 500)
    raw_schema = raw_outbox_schema(root, events, 500)
    raw1 = raw_one_table(root, events[: args.single_commit_events], 1)

    scenarios = [
        ("outbox, 8 producers x batches of 10", 8, 10),
        ("outbox, 4 producers x batches of 100", 4, 100),
        ("outbox, 200 producers x single events", 200, 1),
        ("outbox, 1000 producers x single events", 1000, 1),
    ]
    results = []
    for i, (label, producers, batch) in enumerate(scenarios):
        eps, per_commit = run_loop(outbox_submit(root, f"outbox-{i}", events, producers, batch))
        results.append((label, eps, per_commit))
    raw500_after = raw_one_table(root, events, 500)  # the disk drifts: measure again

    base = (raw500 + raw500_after) / 2
    print(f"{'figure':<44}{'events/s':>12}{'x raw 500/commit':>18}{'rows/commit':>13}")
    for label, eps, per_commit in results:
        print(f"{label:<44}{eps:>12,.0f}{eps / base:>18.2f}{per_commit:>13.0f}")
    print(f"{'raw outbox schema, 500 rows/commit':<44}{raw_schema:>12,.0f}"
          f"{raw_schema / base:>18.2f}{500:>13}")
    print(f"{'raw one table, 500 rows/commit (baseline)':<44}{base:>12,.0f}{1.0:>18.2f}{500:>13}"
          f"   (before {raw500:,.0f}, after {raw500_after:,.0f})")
    print(f"{'raw one table, 1 row/commit (lower ref.)':<44}{raw1:>12,.0f}{raw1 / base:>18.2f}"
          f"{1:>13}")
    from bench.results import record

    for label, eps, per_commit in results:
        record("outbox_enqueue", figure=label, value=round(eps), unit="ev/s",
               baseline="raw executemany, 500 rows/commit into the real schema",
               baseline_value=round(raw_schema), target=None, met=None,
               note=f"{per_commit:.0f} rows per commit; raw one table {base:,.0f} ev/s")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
