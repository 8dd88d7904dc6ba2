"""A stop requested during the start-up integrity check (docs/container.md, "Stop"): it
takes effect when the check ends; the check is not interrupted, and the gateway then
stops cleanly instead of running on."""

from __future__ import annotations

import asyncio

from edge.app import Gateway
from edge.config import load_config_text
from edge.outbox import Outbox
from tests.support import sink_yaml


async def test_sigterm_during_the_integrity_check_stops_the_gateway_after_it(
        erp, tmp_path, monkeypatch):
    check_done = asyncio.Event()
    opening = asyncio.Event()
    real_open = Outbox.open

    async def slow_open(self, *args, **kwargs):
        opening.set()
        await check_done.wait()
        return await real_open(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, "open", slow_open)
    cfg = load_config_text(f"site: s\nstate_dir: {tmp_path / 'state'}\n"
                           "api: {enabled: false}\n" + sink_yaml(erp.url), base_dir=tmp_path)
    gw = Gateway(cfg)
    running = asyncio.create_task(gw.run())
    try:
        async with asyncio.timeout(30):
            await opening.wait()
        gw.request_stop()  # what the SIGTERM handler calls
        await asyncio.sleep(0.3)
        assert not running.done()  # the check goes on
        check_done.set()
        async with asyncio.timeout(30):
            await running  # then the gateway stops by itself
        assert all(st.state == "stopped" for st in gw.status.values())
    finally:
        check_done.set()
        if not running.done():
            running.cancel()
        await gw.stop()
