"""bench.report: BENCHMARKS.md's generated blocks come from the results files, the prose
around them stays as written, a second run changes nothing, a missing file is marked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import report, results

REPO = Path(__file__).resolve().parents[2]

DOC = """\
# Benchmarks

Hand-written introduction | with a pipe, kept as is.

## Summary

<!-- generated: summary -->
stale summary that must go
<!-- /generated -->

## Drain

Prose about the drain.

<!-- generated: drain -->
<!-- /generated -->

## Restart

<!-- generated: restart -->
old numbers
<!-- /generated -->

Closing remarks.

<!-- generated: others -->
<!-- /generated -->
"""


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "results"
    monkeypatch.setattr(results, "RESULTS_DIR", out)
    monkeypatch.setattr(results, "_pending", {})
    results.record("drain", figure="backlog drain, 100k backlog", value=11438.4, unit="ev/s",
                   baseline="storage-only drain SQL", baseline_value=22192,
                   target=">= 20,000 ev/s", met=False, note="batch_max 100")
    results.record("drain", figure="peak RSS while draining", value=90.4, unit="MiB",
                   baseline="idle daemon", baseline_value=52.8, target="< 100 MB", met=True)
    results.record("cpu", figure="daemon CPU per 1,000 events", value=0.403,
                   unit="CPU-s/1k ev", baseline="bare paho subscriber", baseline_value=0.061)
    return out


def _prose(text: str) -> str:
    """The text with every generated block's content removed."""
    return report.BLOCK.sub(lambda m: m.group(1) + m.group(4), text)


def test_blocks_are_rendered_from_the_results_and_the_prose_is_kept(
        tmp_path: Path, results_dir: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(DOC)
    assert report.update(md, results_dir)
    text = md.read_text()

    assert _prose(text) == _prose(DOC)
    assert "stale summary" not in text and "old numbers" not in text
    drain = text.split("<!-- generated: drain -->")[1].split("<!-- /generated -->")[0]
    assert "| backlog drain, 100k backlog | 11,438 ev/s | storage-only drain SQL: 22,192 ev/s " \
           "| 0.52× | >= 20,000 ev/s | **missed** | batch_max 100 |" in drain
    assert "| peak RSS while draining | 90.4 MiB |" in drain and "**met**" in drain
    summary = text.split("<!-- generated: summary -->")[1].split("<!-- /generated -->")[0]
    # only figures with a target are summarised
    assert "backlog drain, 100k backlog" in summary and "peak RSS" in summary
    assert "daemon CPU" not in summary
    others = text.split("<!-- generated: others -->")[1].split("<!-- /generated -->")[0]
    assert "**cpu**" in others and "daemon CPU per 1,000 events | 0.403 CPU-s/1k ev" in others
    assert "drain" not in others


def test_a_missing_results_file_is_marked_not_invented(tmp_path: Path,
                                                       results_dir: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(DOC)
    report.update(md, results_dir)
    restart = md.read_text().split("<!-- generated: restart -->")[1].split("<!-- /generated")[0]
    assert "No results yet" in restart and "bench/results/restart.json" in restart
    assert not re.search(r"\d", restart.replace("restart.json", ""))


def test_second_run_changes_nothing(tmp_path: Path, results_dir: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(DOC)
    assert report.update(md, results_dir)
    first = md.read_bytes()
    assert not report.update(md, results_dir)
    assert md.read_bytes() == first
    assert report.main(["--results", str(results_dir), "--output", str(md), "--check"]) == 0


def test_benchmarks_md_renders_without_touching_its_prose(tmp_path: Path) -> None:
    text = (REPO / "BENCHMARKS.md").read_text()
    names = {m["name"] for m in report.BLOCK.finditer(text)}
    assert {"summary", "others", "cpu", "soak", "latency", "drain"} <= names
    rendered = report.render(text, {})
    assert _prose(rendered) == _prose(text)
    assert rendered.count("No results yet") == len(names - {"summary", "others"})
