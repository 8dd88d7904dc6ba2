"""The gateway's wall clock stepped +1 h and -1 h at run time (NTP correcting a PC clock).

Promise: retries, backoff, Retry-After waits, the circuit breaker and MQTT reconnects run
on the monotonic clock: after a step back there is no hour-long stall, after a step forward
no burst of early retries. Audit timestamps may jump; order may not break. Only the gateway
child's clock moves (libfaketime, ``tests.faults.clock``); the ERP judges Retry-After on
the test process's monotonic clock.

The first test guards the tool itself: Debian's libfaketime 0.9.10, as packaged, cuts
every timed wait on a ``CLOCK_MONOTONIC`` condition variable short (CPython's GIL hand-over
is one), which starves a threaded gateway whatever the offset; ``SteppedClock`` switches
that conversion off.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.clock import SteppedClock, faketime_missing
from tests.faults.harness import Campaign, fault_cycles

pytestmark = pytest.mark.skipif(faketime_missing() is not None,
                                reason=faketime_missing() or "")

HOUR = 3600

# What the child measures under the stepped clock: the wall clock's offset, and how long
# each timed wait the gateway's process relies on really lasted (real monotonic clock).
_WAITS_PROBE = textwrap.dedent("""\
    import asyncio, ctypes, json, threading, time
    libc = ctypes.CDLL(None)  # global scope: a preloaded wrapper is the one called

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def gil_like_wait(seconds):
        # CPython's GIL waits like this: a timed wait on a CLOCK_MONOTONIC condvar
        attr, cond, mutex = (ctypes.create_string_buffer(64) for _ in range(3))
        libc.pthread_condattr_init(attr)
        libc.pthread_condattr_setclock(attr, time.CLOCK_MONOTONIC)
        libc.pthread_cond_init(cond, attr)
        libc.pthread_mutex_init(mutex, None)
        deadline = time.clock_gettime(time.CLOCK_MONOTONIC) + seconds
        ts = Timespec(int(deadline), int(deadline % 1 * 1e9))
        libc.pthread_mutex_lock(mutex)
        libc.pthread_cond_timedwait(cond, mutex, ctypes.byref(ts))
        libc.pthread_mutex_unlock(mutex)

    def took(wait, seconds=0.2):
        t0 = time.monotonic()
        wait(seconds)
        return time.monotonic() - t0

    out = {"wall": time.time(), "monotonic": time.monotonic(), "waits": {
        "pthread_cond_timedwait(CLOCK_MONOTONIC)": took(gil_like_wait),
        "time.sleep": took(time.sleep),
        "threading.Event.wait": took(threading.Event().wait),
        "asyncio.sleep": took(lambda s: asyncio.run(asyncio.sleep(s))),
    }}
    print(json.dumps(out))
""")


def test_the_stepped_clock_moves_only_the_wall_clock_and_keeps_waits_whole(
        tmp_path: Path) -> None:
    """Under ``SteppedClock.env`` the child's wall clock is an hour ahead, and no timed wait
    ends early (a lower bound: a wait may be late on a busy machine, never short)."""
    clock = SteppedClock(tmp_path / "clock")
    clock.step(HOUR)
    probe = tmp_path / "probe.py"
    probe.write_text(_WAITS_PROBE)
    env = {**os.environ, **clock.env}
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    found = json.loads(out.stdout)
    print(found)
    assert abs(found["wall"] - time.time() - HOUR) < 60, found
    assert abs(found["monotonic"] - time.monotonic()) < 60, found  # only the wall clock
    short = {name: s for name, s in found["waits"].items() if s < 0.2 * 0.95}
    assert not short, f"timed waits that ended early under the stepped clock: {short}"


def _rounds() -> int:
    return max(1, fault_cycles(1) // 20)


async def _retrying_across_a_step(c: Campaign, clock: SteppedClock, step_s: int,
                                  fault: str, **params: object) -> None:
    """Events wait for a retry (``fault`` at the ERP) while the clock steps; the fault ends
    shortly after: the waiting events must go out within seconds, never early. The broker
    restarts after the step: the MQTT source must reconnect on its own backoff."""
    c.start_publishing()
    await c.erp.set_fault(fault, **params)
    erp = await _sink_once(c, lambda s: s["retrying"] > 0)  # rows carry retry times now
    print(f"before the {step_s:+d} s step under {fault}: ERP answered "
          f"{dict(Counter(r.status for r in c.erp.requests))}, retrying {erp['retrying']}, "
          f"paused for {erp['paused_for_s']} s, circuit {erp['circuit']}")
    clock.step(step_s)
    await asyncio.sleep(2.0)  # the step is seen (libfaketime re-reads its file each second)
    mark = len(c.gateway.lines)
    await c.restart_broker(down_s=0.5)
    await c.gateway.await_line("MQTT connected", 30, mark)
    await c.erp.clear()
    await asyncio.sleep(1.0)
    await c.stop_publishing()


async def _sink_once(c: Campaign, predicate: Callable[[dict[str, Any]], bool],
                     within_s: float = 30.0) -> dict[str, Any]:
    """The ERP sink's ``/status`` entry once ``predicate`` holds for it."""
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            resp = await client.get(f"http://127.0.0.1:{c.api_port}/status")
            sink = resp.json()["sinks"]["erp"]
            if predicate(sink):
                return sink
            assert time.monotonic() < deadline, f"never true within {within_s} s: {sink}"
            await asyncio.sleep(0.2)


@pytest.mark.mqtt
@pytest.mark.parametrize("step_s", [HOUR, -HOUR], ids=["forward_1h", "back_1h"])
async def test_a_clock_step_neither_stalls_nor_hurries_retries(step_s: int,
                                                               tmp_path: Path) -> None:
    clock = SteppedClock(tmp_path / "clock")
    async with Campaign(tmp_path, env=clock.env) as c:
        await c.start_gateway()
        await c.publish_for(0.5)
        for _ in range(_rounds()):
            # 503s (backoff, circuit breaker) and 429 + Retry-After (a sink-wide pause), in
            # seconds and as an HTTP-date (the ERP's clock is right, the gateway's stepped)
            await _retrying_across_a_step(c, clock, step_s, "5xx")
            await _retrying_across_a_step(c, clock, step_s, "429_seconds", retry_after_s=3)
            await _retrying_across_a_step(c, clock, step_s, "429_date", retry_after_s=3)
        # an hour-long stall would show as lost events: 30 s a round is far above any
        # backoff here, and the long form's backlog of 25 rounds drains well within an hour
        report = await c.finish(30 * _rounds())
    print(f"clock steps {clock.steps}: {report.summary()}")
    if not report.clean:
        print("\n".join(line[:300] for line in c.gateway.lines[-40:]))
    report.assert_clean()
    assert report.counts["statuses"].get(429) and report.counts["statuses"].get(503)
    assert report.counts["faults"].get("429_date")
