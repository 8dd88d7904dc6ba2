"""``kill -9`` of the gateway half-way through a file: after the restart every row is
delivered exactly once (one event id per row) and the file ends in done/.

The gateway runs as a child process whose outbox stops committing after a few batches of
the file source (the hook below), so the kill lands after some rows were committed and
before the file's move — the window the row identity keys (file SHA-256 + row index) are
for. The second run is an ordinary gateway on the same state_dir.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path
from typing import Any

from edge.sim.erp import ErpReceiver
from tests.fixtures.gateway_process import GatewayProcess
from tests.support import eventually, http_sink_yaml

# The gateway's CLI with the file source's submits hanging after three of them committed.
HANG_AFTER_3 = textwrap.dedent("""\
    import asyncio, sys
    from edge import pipeline
    real = pipeline.Pipeline.submit
    calls = 0
    async def submit(self, items, *, chain=None):
        global calls
        if chain == "lims":
            calls += 1
            if calls > 3:
                print("TEST-HOOK: submit hangs", file=sys.stderr, flush=True)
                await asyncio.Event().wait()
        return await real(self, items, chain=chain)
    pipeline.Pipeline.submit = submit
    from edge.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """)

ROWS = 100


def body(folder: Path, erp: ErpReceiver) -> str:
    return textwrap.dedent(f"""\
        sources:
          - id: lims
            type: file
            path: {folder}
            settle_s: 0
            poll_interval_s: 0.1
            max_batch: 10
            files:
              - pattern: "*.csv"
                event: inspection.result
                fields: {{lot_id: lot, serial: sn, result: result}}
        """) + "sinks:\n" + http_sink_yaml(erp.url)


def serials(erp: ErpReceiver) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for ev in erp.events:
        out.setdefault(ev["data"]["serial"], set()).add(ev["id"])
    return out


async def test_kill_9_mid_file_then_restart_delivers_every_row_exactly_once(
        tmp_path: Path, erp: ErpReceiver, gateways: Any) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    state = tmp_path / "state"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {state}\napi: {{enabled: false}}\n"
                   + body(folder, erp))
    tmp = folder / ".lab.csv.part"
    tmp.write_text("lot,sn,result\n" + "".join(f"L{i % 3},s{i:03d},pass\n"
                                               for i in range(ROWS)))
    os.replace(tmp, folder / "lab.csv")
    gw = GatewayProcess(cfg, python_args=("-c", HANG_AFTER_3)).start()
    try:
        await gw.await_line("TEST-HOOK: submit hangs", 30)
        # the three committed batches reach the ERP: the outbox has them
        await erp.wait_for(lambda e: len(serials(e)) == 30, 20)
        await asyncio.to_thread(gw.kill9)
    finally:
        gw.stop()
    assert "Traceback" not in "\n".join(gw.lines)
    assert (folder / "lab.csv").exists(), "not moved: not every row was committed"
    first = serials(erp)

    gw2 = await gateways(body(folder, erp), state_dir=state)
    src = gw2.sources["lims"]
    await eventually(lambda: src.status()["files_done"] == 1, what="file done", timeout=30)
    await erp.wait_for(lambda e: len(serials(e)) == ROWS, 30)
    got = serials(erp)
    twice = {sn: ids for sn, ids in got.items() if len(ids) > 1}
    assert not twice, f"rows delivered under two event ids: {list(twice.items())[:3]}"
    assert all(got[sn] == ids for sn, ids in first.items())
    assert src.status()["duplicates"] == 30 and src.status()["stored"] == ROWS - 30
    assert (folder / "done" / "lab.csv").exists() and not (folder / "lab.csv").exists()
