"""One gateway per state folder (docs/container.md, "Keep on persistent storage"): a second
container started on the same volume refuses to start instead of sharing the outbox."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.support import sink_yaml, stop_async_process


async def test_a_second_gateway_on_the_same_state_folder_refuses_to_start(gateways, erp,
                                                                          tmp_path):
    state = tmp_path / "state"
    first = await gateways(sink_yaml(erp.url), state_dir=state)
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"site: test-site\nstate_dir: {state}\napi: {{enabled: false}}\n"
                   + sink_yaml(erp.url))
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", "run", "-c", str(cfg), cwd=tmp_path, env=dict(os.environ),
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):  # a second gateway that starts runs until stopped
            _, err = await second.communicate()
    finally:
        await stop_async_process(second)
    assert second.returncode == 1
    assert f"state_dir {state} is in use by another running gateway" in err.decode()
    assert first.ready.is_set() and first.outbox.writable()  # the first one is untouched
