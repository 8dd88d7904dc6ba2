"""The gateway child's wall clock, stepped at run time (libfaketime).

``SteppedClock(folder)`` gives the environment that loads Debian's libfaketime into the
gateway process only: ``CLOCK_REALTIME`` (``time.time()``) follows an offset kept in a file
that ``step()`` rewrites while the gateway runs; the monotonic clocks are left alone
(``FAKETIME_DONT_FAKE_MONOTONIC=1``), as on a PC whose NTP daemon steps the clock. Nothing
else on the machine sees the step.

libfaketime 0.9.10 (Debian 12) breaks two kinds of monotonic waits when monotonic time is
not faked, and the environment works around both:

- ``pthread_cond_timedwait`` on a condition variable set to ``CLOCK_MONOTONIC`` returns
  ETIMEDOUT at once, whatever the offset (0 included): the package is built with its
  "forced monotonic fix", which converts the deadline against the faked clock (upstream
  pull request #503 describes the same conversion). CPython's GIL waits exactly like
  that, so every thread waiting for the GIL forced a hand-over at once: the gateway (event
  loop, SQLite writer and reader threads) used about three times the CPU and delivered
  nothing for seconds at a time, which is how a +1 h step looked like a hang (the retry
  drain after the step never finished in time). ``FAKETIME_FORCE_MONOTONIC_FIX=0``
  switches that conversion off; the wall clock is still faked and stepped. Guarded by
  ``test_the_stepped_clock_moves_only_the_wall_clock_and_keeps_waits_whole``.
- ``time.sleep`` (``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`` gets a realtime
  deadline and fails with EINVAL; upstream issue #426): a ``sitecustomize`` module on the
  child's path replaces ``time.sleep`` with a wait on an event that is never set (a
  semaphore wait with a monotonic deadline, unaffected).

Timed waits of the event loop (epoll, uvloop), ``threading`` and ``queue`` are not touched
by the offset: checked before and after steps of +/-1 h.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["LIBFAKETIME", "SteppedClock", "faketime_missing"]

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)
LIBFAKETIME = next((p for p in _CANDIDATES if os.path.exists(p)), None)

_SLEEP_SHIM = '''\
"""Test shim: time.sleep as a monotonic timed wait (libfaketime 0.9.10 breaks it)."""
import threading
import time

_never = threading.Event()


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    _never.wait(seconds)


time.sleep = _sleep
'''


def faketime_missing() -> str | None:
    """Why the clock faults cannot run here (for ``pytest.skip``), or None."""
    if LIBFAKETIME is None:
        return ("libfaketime is not installed (Debian: apt-get install faketime; "
                "`make test` installs it when run as root)")
    return None


class SteppedClock:
    """The wall clock of one gateway child; ``env`` goes into the child's environment."""

    def __init__(self, folder: Path) -> None:
        if LIBFAKETIME is None:
            raise RuntimeError(faketime_missing())
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "faketime.rc"
        self.shim = folder / "shim"
        self.shim.mkdir(exist_ok=True)
        (self.shim / "sitecustomize.py").write_text(_SLEEP_SHIM)
        self.offset_s = 0
        self.steps: list[int] = []  # every step, in order (seconds)
        self._write()

    @property
    def env(self) -> dict[str, str]:
        assert LIBFAKETIME is not None
        path = [str(self.shim)] + ([os.environ["PYTHONPATH"]]
                                   if os.environ.get("PYTHONPATH") else [])
        return {
            "LD_PRELOAD": LIBFAKETIME,
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_CACHE_DURATION": "1",  # re-read the file each second: a step applies within 1 s
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            # 0.9.10's forced fix cuts CLOCK_MONOTONIC condvar waits (the GIL's) short
            "FAKETIME_FORCE_MONOTONIC_FIX": "0",
            "NO_FAKE_STAT": "1",  # file times stay real (SQLite stats its files constantly)
            "PYTHONPATH": os.pathsep.join(path),
        }

    def step(self, seconds: int) -> None:
        """Move the child's wall clock by ``seconds`` (negative: back) from where it is."""
        self.offset_s += seconds
        self.steps.append(seconds)
        self._write()

    def _write(self) -> None:
        # rename over the old file: the child never reads a half-written offset
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{self.offset_s:+d}\n")
        os.replace(tmp, self.file)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
