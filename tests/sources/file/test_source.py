"""The file source in a real gateway: files dropped in a folder → outbox → HTTP receiver.

Every test runs a gateway (``gateways``) with the stand-in ERP (``erp``) and drops files
the way a LIMS export or a supplier portal would. Rows carry a ``serial``; the receiver's
events carry it as ``data.serial``, so "every row once" is checked row by row.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge.sim.erp import ErpReceiver
from tests.support import eventually, http_sink_yaml, sample

Gateways = Callable[..., Any]

ENTRIES = """\
- pattern: "{supplier}_{lot}.csv"
  event: inspection.result
  fields: {lot_id: lot, serial: sn, result: result, measured: value}
- pattern: "*.json"
  event: inspection.result
  fields: {lot_id: lot, serial: sn, result: result}
- pattern: "*.jsonl"
  event: inspection.result
  fields: {lot_id: lot, serial: sn, result: result}
"""


def config(folder: Path, erp: ErpReceiver, *, extra: str = "", files: str = ENTRIES) -> str:
    return (textwrap.dedent(f"""\
        sources:
          - id: lims
            type: file
            path: {folder}
            settle_s: 0.2
            poll_interval_s: 0.1
        """) + textwrap.indent(textwrap.dedent(extra), " " * 4)
        + "    files:\n" + textwrap.indent(files, " " * 6)
        + "sinks:\n" + http_sink_yaml(erp.url))


def serials(erp: ErpReceiver) -> dict[str, set[str]]:
    """serial → the distinct event ids it arrived under."""
    out: dict[str, set[str]] = {}
    for ev in erp.events:
        sn = (ev.get("data") or {}).get("serial")
        if sn is not None:
            out.setdefault(sn, set()).add(ev["id"])
    return out


def drop(folder: Path, name: str, content: str | bytes) -> Path:
    """Write under a hidden name, then rename: how a well-behaved writer drops a file."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, folder / name)
    return folder / name


def csv_rows(prefix: str, n: int, lot: str = "L1") -> str:
    return "lot,sn,result,value\n" + "".join(
        f"{lot},{prefix}{i:04d},pass,{i / 100:.2f}\n" for i in range(n))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "drop"
    d.mkdir()
    return d


@pytest.mark.parametrize("watch", ["inotify", "poll"])
async def test_csv_json_and_json_lines_rows_are_delivered_and_files_moved_to_done(
        watch: str, folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(folder, erp, extra=f"watch: {watch}\n"))
    src = gw.sources["lims"]
    drop(folder, "acme_L7.csv", "\ufeff" + csv_rows("c", 120, lot="L7"))  # BOM tolerated
    drop(folder, "cert.json", orjson.dumps(
        [{"lot": "L8", "sn": f"j{i}", "result": "ok"} for i in range(5)]))
    drop(folder, "one.json", orjson.dumps({"lot": "L8", "sn": "o1", "result": "fail"}))
    drop(folder, "cmm.jsonl", "".join(
        orjson.dumps({"lot": "L9", "sn": f"l{i}", "result": "pass"}).decode() + "\n"
        for i in range(7)))
    want = ({f"c{i:04d}" for i in range(120)} | {f"j{i}" for i in range(5)} | {"o1"}
            | {f"l{i}" for i in range(7)})
    await erp.wait_for(lambda e: want <= set(serials(e)), 20)
    assert all(len(ids) == 1 for ids in serials(erp).values())
    await eventually(lambda: src.status()["files_done"] == 4, what="four files done")
    assert sorted(p.name for p in (folder / "done").iterdir()) == [
        "acme_L7.csv", "cert.json", "cmm.jsonl", "one.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["done", "rejected"]
    assert src.status()["watch"] == watch
    # the file name captures become data; the BOM did not end up in a column name
    ev = next(e for e in erp.events if e["data"]["serial"] == "c0000")
    assert ev["data"]["supplier"] == "acme" and ev["data"]["lot_id"] == "L7"
    assert ev["data"]["measured"] == 0.0 and ev["ordering_key"] == "lot:L7"
    assert sample(gw, "edge_events_received_total", source="lims") >= len(want)


async def test_an_unusable_file_is_rejected_with_a_reason_naming_the_line(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(folder, erp, extra="max_rows: 50\n"))
    src = gw.sources["lims"]
    drop(folder, "bad.json", '{"lot": "L1",\n "sn": "x1",\n "result": pass}\n')
    drop(folder, "acme_big.csv", csv_rows("b", 51))
    drop(folder, "acme_latin.csv", "lot,sn,result\nL1,caf\xe9,pass\n".encode("latin-1"))
    drop(folder, "acme_none.csv", "lot,sn,result\nL1,n1,maybe\nL1,n2,perhaps\n")
    await eventually(lambda: src.status()["files_rejected"] == 4, what="four rejected")
    rejected = folder / "rejected"
    reasons = {p.name.removesuffix(".reason"): p.read_text()
               for p in rejected.glob("*.reason")}
    assert set(reasons) == {"bad.json", "acme_big.csv", "acme_latin.csv", "acme_none.csv"}
    assert all((rejected / name).exists() for name in reasons)
    assert "reason: not_json" in reasons["bad.json"] and "line: 3" in reasons["bad.json"]
    assert "reason: too_many_rows" in reasons["acme_big.csv"]
    assert "row: 51" in reasons["acme_big.csv"]
    assert "reason: bad_encoding" in reasons["acme_latin.csv"]
    assert "line: 2" in reasons["acme_latin.csv"]
    assert "reason: all_rows_invalid" in reasons["acme_none.csv"]
    assert "row 1 (line 2): invalid_data" in reasons["acme_none.csv"]
    assert not erp.events, "nothing of a rejected file is stored"
    assert (await gw.outbox.stats())["quarantine"] == {}
    assert sample(gw, "edge_source_errors_total", source="lims", code="file_rejected") == 4


async def test_invalid_rows_of_a_good_file_are_quarantined_and_the_rest_stored(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(folder, erp))
    src = gw.sources["lims"]
    drop(folder, "acme_L2.csv", "lot,sn,result,value\n"
         "L2,g1,pass,1.0\n"
         "L2,g2,maybe,1.0\n"        # row 2: not a result
         "L2,g3,pass\n"             # row 3: a cell missing
         "\n"
         "L2,g4,pass,2.5\n")
    await erp.wait_for(lambda e: set(serials(e)) == {"g1", "g4"}, 20)
    await eventually(lambda: src.status()["files_done"] == 1, what="file done")
    assert (await gw.outbox.stats())["quarantine"] == {"invalid_data": 1, "bad_row": 1}
    assert src.status()["quarantined"] == 2
    assert (folder / "done" / "acme_L2.csv").exists()


async def test_marker_mode_takes_a_file_only_with_its_marker_and_removes_both(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(folder, erp, extra="complete: marker\nsettle_s: 0\n"))
    src = gw.sources["lims"]
    (folder / "acme_L3.csv").write_text(csv_rows("m", 3, lot="L3"))  # written in place
    await eventually(lambda: src.status()["waiting"] == [] and src.current is None)
    await eventually(lambda: gw.status["lims"].connected, what="source connected")
    # without its marker the file stays, however long it sits there
    for _ in range(5):
        await src_scanned(src)
    assert not erp.events and (folder / "acme_L3.csv").exists()
    (folder / "acme_L3.csv.done").write_text("")
    await erp.wait_for(lambda e: set(serials(e)) == {"m0000", "m0001", "m0002"}, 20)
    await eventually(lambda: src.status()["files_done"] == 1, what="file done")
    assert sorted(p.name for p in folder.iterdir()) == ["done", "rejected"]


async def src_scanned(src: Any) -> None:
    """Let the source scan the folder at least once more (it polls every 0.1 s here): a
    sleep, because these tests prove that something does not happen."""
    await asyncio.sleep(0.15)


async def test_the_same_name_dropped_twice_never_overwrites_in_done(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(folder, erp))
    src = gw.sources["lims"]
    drop(folder, "acme_L4.csv", csv_rows("a", 2, lot="L4"))
    await eventually(lambda: src.status()["files_done"] == 1, what="first done")
    drop(folder, "acme_L4.csv", csv_rows("b", 2, lot="L4"))
    await eventually(lambda: src.status()["files_done"] == 2, what="second done")
    drop(folder, "acme_L4.csv", csv_rows("c", 2, lot="L4"))
    await eventually(lambda: src.status()["files_done"] == 3, what="third done")
    done = folder / "done"
    assert sorted(p.name for p in done.iterdir()) == [
        "acme_L4-1.csv", "acme_L4-2.csv", "acme_L4.csv"]
    assert "a0000" in (done / "acme_L4.csv").read_text()
    assert "b0000" in (done / "acme_L4-1.csv").read_text()
    await erp.wait_for(lambda e: len(serials(e)) == 6, 20)


async def test_a_missing_drop_folder_is_a_condition_not_a_crash(
        tmp_path: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    folder = tmp_path / "later"
    gw = await gateways(config(folder, erp))
    status = gw.status["lims"]
    await eventually(lambda: "drop_folder" in status.conditions, what="condition set")
    assert status.state == "running" and not status.connected
    assert "does not exist" in status.conditions["drop_folder"][1]
    folder.mkdir()
    await eventually(lambda: status.connected and not status.conditions,
                     what="condition cleared")
    drop(folder, "acme_L5.csv", csv_rows("d", 1, lot="L5"))
    await erp.wait_for(lambda e: set(serials(e)) == {"d0000"}, 20)
    assert (folder / "done" / "acme_L5.csv").exists()


async def test_a_file_still_growing_is_not_taken_before_it_settles(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    gw = await gateways(config(folder, erp).replace("settle_s: 0.2", "settle_s: 2.0"))
    src = gw.sources["lims"]
    path = folder / "acme_L6.csv"
    with open(path, "w") as f:
        f.write("lot,sn,result,value\nL6,s0,pass,1\n")
        f.flush()
        for i in range(1, 6):
            await src_scanned(src)
            f.write(f"L6,s{i},pass,1\n")
            f.flush()
    await erp.wait_for(lambda e: len(serials(e)) == 6, 20)
    await eventually(lambda: src.status()["files_done"] == 1, what="file done")
    assert set(serials(erp)) == {f"s{i}" for i in range(6)}


async def test_a_done_folder_that_cannot_be_made_is_a_condition_and_the_file_waits(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    (folder / "done").write_text("a file where the folder should be")
    drop(folder, "acme_L8.csv", csv_rows("e", 2, lot="L8"))
    gw = await gateways(config(folder, erp))
    status = gw.status["lims"]
    await eventually(lambda: "folder_unwritable" in status.conditions, what="condition")
    assert not status.connected and status.state == "running"
    await src_scanned(gw.sources["lims"])
    assert (folder / "acme_L8.csv").exists() and not erp.events
    (folder / "done").unlink()
    await erp.wait_for(lambda e: set(serials(e)) == {"e0000", "e0001"}, 20)
    await eventually(lambda: (folder / "done" / "acme_L8.csv").exists(), what="moved")
    assert not status.conditions


async def test_entry_options_tab_delimiter_encoding_provenance_and_own_dedupe_key(
        folder: Path, erp: ErpReceiver, gateways: Gateways) -> None:
    files = textwrap.dedent("""\
        - pattern: "{supplier}-*.txt"
          format: csv
          delimiter: "\\\\t"
          encoding: cp1252
          provenance: true
          event: inspection.result
          dedupe_key: "{sample}"
          fields: {lot_id: lot, serial: sn, sample: sample, result: result}
        """)
    gw = await gateways(config(folder, erp, files=files))
    src = gw.sources["lims"]
    drop(folder, "ACME-0001.txt",
         "lot\tsn\tsample\tresult\nL1\tp\xe91\tS-1\tpass\nL1\tp2\tS-2\tfail\n"
         .encode("cp1252"))
    await erp.wait_for(lambda e: set(serials(e)) == {"p\xe91", "p2"}, 20)
    ev = next(e for e in erp.events if e["data"]["serial"] == "p2")
    assert ev["data"]["source_file"] == "ACME-0001.txt" and ev["data"]["source_row"] == 2
    assert ev["data"]["supplier"] == "ACME"
    # another file with a sample already stored: its own id maps it to the first event
    await eventually(lambda: src.status()["files_done"] == 1, what="first file done")
    drop(folder, "ACME-0002.txt", "lot\tsn\tsample\tresult\nL1\tp2\tS-2\tfail\n")
    await eventually(lambda: src.status()["files_done"] == 2, what="second file done")
    assert src.status()["duplicates"] == 1 and src.status()["stored"] == 2
