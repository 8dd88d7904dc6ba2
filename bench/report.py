"""Render the generated tables of BENCHMARKS.md from ``bench/results/*.json``.

BENCHMARKS.md holds hand-written prose and, between markers, generated blocks::

    <!-- generated: summary -->      every figure that has a target, from all results files
    <!-- /generated -->
    <!-- generated: drain -->        one table of ``bench/results/drain.json``
    <!-- /generated -->
    <!-- generated: others -->       one table per results file no other block names
    <!-- /generated -->

``python -m bench.report`` rewrites what lies between each pair of markers and nothing
else; run twice on the same results it leaves the file unchanged. A block whose results
file is missing says so (and how to produce it) instead of showing numbers.

Run:  python -m bench.report [--results DIR] [--output BENCHMARKS.md] [--check]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

from bench.results import RESULTS_DIR, load_all

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "BENCHMARKS.md"

BLOCK = re.compile(r"(<!-- generated: *(?P<name>[\w.-]+) *-->\n)(?P<body>.*?)(<!-- /generated -->)",
                   re.DOTALL)
SUMMARY, OTHERS = "summary", "others"


# --------------------------------------------------------------------------- formatting


def fmt_number(value: Any) -> str:
    """A figure as a person reads it: thousands separators, few decimals, ``—`` for none."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _cell(str(value))
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    magnitude = abs(value)
    if isinstance(value, int) or magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:,.1f}"
    if magnitude >= 1 or magnitude == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _with_unit(value: Any, unit: str | None) -> str:
    shown = fmt_number(value)
    return shown if shown == "—" or not unit else f"{shown} {_cell(unit)}"


def verdict(met: bool | None) -> str:
    return "informative" if met is None else "**met**" if met else "**missed**"


def _ratio(row: dict[str, Any]) -> str:
    r = row.get("ratio")
    if r is None or not isinstance(r, int | float) or not math.isfinite(r):
        return "—"
    return f"{r:.2f}×"


def _baseline(row: dict[str, Any]) -> str:
    name, value = row.get("baseline"), row.get("baseline_value")
    if not name and value is None:
        return "—"
    shown = _with_unit(value, row.get("baseline_unit") or row.get("unit"))
    if not name:
        return shown
    return _cell(name) if shown == "—" else f"{_cell(name)}: {shown}"


def _stamp(doc: dict[str, Any]) -> str:
    return f"commit {doc.get('commit', '?')}, {doc.get('at', '?')}"


# --------------------------------------------------------------------------- blocks


def missing(name: str) -> str:
    return (f"_No results yet: `bench/results/{name}.json` is missing. Run the benchmark "
            f"(`make bench`, or `python -m bench.bench_{name}`), then `python -m bench.report`._\n")


def bench_table(doc: dict[str, Any]) -> str:
    """One benchmark's figures: figure, result, same-run baseline, ratio, target, verdict."""
    lines = [f"Measured at {_stamp(doc)}.", "",
             "| figure | result | same-run baseline | ratio | target | verdict | note |",
             "|---|---:|---|---:|---|---|---|"]
    for row in doc.get("figures", []):
        lines.append("| " + " | ".join([
            _cell(str(row.get("figure", ""))), _with_unit(row.get("value"), row.get("unit")),
            _baseline(row), _ratio(row), _cell(row.get("target") or "—"),
            verdict(row.get("met")), _cell(row.get("note") or ""),
        ]) + " |")
    if not doc.get("figures"):
        lines.append("| _(no figures recorded)_ | | | | | | |")
    return "\n".join(lines) + "\n"


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """Every figure that has a target, across all results files."""
    rows = [(name, doc, row) for name, doc in sorted(results.items())
            for row in doc.get("figures", []) if row.get("target")]
    if not rows:
        return "_No results with a target yet: run `make bench`, then `python -m bench.report`._\n"
    lines = ["| benchmark | figure | result | same-run baseline | target | verdict | measured |",
             "|---|---|---:|---|---|---|---|"]
    for name, doc, row in rows:
        lines.append("| " + " | ".join([
            _cell(name), _cell(str(row.get("figure", ""))),
            _with_unit(row.get("value"), row.get("unit")), _baseline(row),
            _cell(row["target"]), verdict(row.get("met")), _cell(_stamp(doc)),
        ]) + " |")
    return "\n".join(lines) + "\n"


def others_block(results: dict[str, dict[str, Any]], named: set[str]) -> str:
    rest = [name for name in sorted(results) if name not in named]
    if not rest:
        return "_Every results file has its own section._\n"
    return "\n".join(f"**{_cell(name)}**\n\n{bench_table(results[name])}" for name in rest)


def render(text: str, results: dict[str, dict[str, Any]]) -> str:
    """``text`` with every generated block re-rendered from ``results``; the rest verbatim."""
    named = {m["name"] for m in BLOCK.finditer(text)} - {SUMMARY, OTHERS}

    def body(name: str) -> str:
        if name == SUMMARY:
            return summary_table(results)
        if name == OTHERS:
            return others_block(results, named)
        doc = results.get(name)
        return bench_table(doc) if doc is not None else missing(name)

    return BLOCK.sub(lambda m: m.group(1) + body(m["name"]) + m.group(4), text)


def update(output: Path, results_dir: Path) -> bool:
    """Rewrite the generated blocks of ``output``; True when the file changed."""
    text = output.read_text()
    new = render(text, load_all(results_dir) if results_dir.is_dir() else {})
    if new == text:
        return False
    output.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of results files")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to update")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when the file is not up to date")
    args = p.parse_args(argv)
    text = args.output.read_text()
    blocks = [m["name"] for m in BLOCK.finditer(text)]
    if not blocks:
        print(f"{args.output}: no '<!-- generated: NAME -->' blocks", file=sys.stderr)
        return 1
    if args.check:
        results = load_all(args.results) if args.results.is_dir() else {}
        stale = render(text, results) != text
        print(f"{args.output}: {'out of date' if stale else 'up to date'}")
        return 1 if stale else 0
    changed = update(args.output, args.results)
    print(f"{args.output}: {len(blocks)} generated blocks, "
          f"{'rewritten' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
