"""Wake-ups for the drop folder: Linux inotify (through libc with ctypes, no dependency) or
plain polling.

A watcher only says "something may have changed": the source rescans the folder after
every wake-up, so a lost or coalesced notification costs at most one rescan interval.
inotify does not see changes made on another host of a network file system (NFS, SMB):
use ``watch: poll`` for such shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import struct
import sys

__all__ = ["InotifyWatcher", "PollWatcher", "Watcher", "inotify_available"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_ATTRIB = 0x00000004
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_MASK = (_IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
         | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


class Watcher:
    """Poll: ``wait(timeout)`` just sleeps. ``broken`` asks the source for a new watcher."""

    kind = "poll"
    broken = False

    async def wait(self, max_wait_s: float) -> None:
        await asyncio.sleep(max(0.0, max_wait_s))

    def close(self) -> None:
        pass


PollWatcher = Watcher


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - probe the symbol
        libc.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def inotify_available() -> bool:
    return _libc() is not None


class InotifyWatcher(Watcher):
    """inotify on one folder. Raises OSError when the watch cannot be set (folder missing,
    too many watches: ``fs.inotify.max_user_watches``) or inotify is not available."""

    kind = "inotify"

    def __init__(self, path: str) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this system")
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = libc.inotify_add_watch(fd, os.fsencode(path), _MASK)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        self.fd: int | None = fd
        self.broken = False
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        if self.fd is None:
            return
        try:
            while True:
                data = os.read(self.fd, 64 * 1024)
                if not data:
                    break
                self._parse(data)
        except BlockingIOError:
            pass
        except OSError:
            self.broken = True
        self._changed.set()

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + _HEADER.size <= len(data):
            _, mask, _, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size + length
            if mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                self.broken = True  # the folder went away or was replaced: watch again

    async def wait(self, max_wait_s: float) -> None:
        if self._changed.is_set() or self.broken:
            self._changed.clear()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, max_wait_s)):
                await self._changed.wait()
        self._changed.clear()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(fd)
            os.close(fd)
