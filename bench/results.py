"""Machine-readable benchmark results: what ``make bench`` turns into BENCHMARKS.md.

Each benchmark, after printing its human-readable lines, calls ``record`` once per figure;
the figures of one benchmark run are written to ``bench/results/<bench>.json`` (replacing
that benchmark's previous file), together with the commit and the time. ``bench.report``
renders the tables of BENCHMARKS.md from these files, so a figure, its same-run baseline
and its target always come from the same sitting.

A figure::

    record("drain", figure="backlog drain, batched, 1M backlog (batch_max 100)",
           value=21_300, unit="ev/s",
           baseline="storage-only drain SQL", baseline_value=24_100,
           target=">= 20,000 ev/s", met=True, note="...")

``ratio`` is ``value / baseline_value`` when both are given (override with ``ratio=``).
``met``: True / False against the target, None when the figure is informative.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any

import orjson

RESULTS_DIR = Path(os.environ.get("EDGE_BENCH_RESULTS", Path(__file__).with_name("results")))

_pending: dict[str, list[dict[str, Any]]] = {}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent,
                               timeout=10, check=False)
    except OSError:
        return "unknown"
    sha = out.stdout.strip() or "unknown"
    return sha + ("+dirty" if dirty.stdout.strip() else "")


def record(bench: str, *, figure: str, value: float | None, unit: str,
           baseline: str | None = None, baseline_value: float | None = None,
           baseline_unit: str | None = None, ratio: float | None = None,
           target: str | None = None, met: bool | None = None, note: str = "",
           no_ratio: bool = False, **extra: Any) -> dict[str, Any]:
    """Add one figure of benchmark ``bench`` and rewrite its results file at once (a
    benchmark interrupted later keeps what it measured). ``no_ratio``: the baseline is a
    reference, not a rate to divide by (e.g. events lost of events taken in)."""
    if ratio is None and not no_ratio and value is not None and baseline_value:
        ratio = value / baseline_value
    row = {"figure": figure, "value": value, "unit": unit, "baseline": baseline,
           "baseline_value": baseline_value, "baseline_unit": baseline_unit or unit,
           "ratio": ratio, "target": target, "met": met, "note": note, **extra}
    rows = _pending.setdefault(bench, [])
    rows[:] = [r for r in rows if r["figure"] != figure] + [row]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {"bench": bench, "commit": _commit(),
           "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "figures": rows}
    path = RESULTS_DIR / f"{bench}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    return row


def load_all(directory: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Every results file in ``directory`` by benchmark name."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        doc = orjson.loads(path.read_bytes())
        out[doc["bench"]] = doc
    return out
