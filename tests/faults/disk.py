"""A small disk for the gateway's ``state_dir`` that a test fills and frees at run time.

``SmallDisk(path, size_mb)``:

- ``tmpfs`` mode (the test may mount, e.g. as root): a tmpfs of ``size_mb`` is mounted on
  ``path``; ``fill()`` writes a ballast file until the file system says ENOSPC, so the
  gateway's next write that needs a new block fails the way a full disk fails (SQLite
  reports SQLITE_FULL, or an I/O error for a ``-shm``/``-wal`` extension); ``free()``
  deletes the ballast. ``close()`` unmounts.
- ``page_limit`` mode (mounting is not allowed): ``path`` is a plain folder and the gateway
  child runs with a ``sitecustomize`` (see ``env``) that, before each outbox transaction,
  applies ``PRAGMA max_page_count`` from a control file: ``fill()`` caps the file at its
  current size (free pages inside it can still be reused, as on a real full disk),
  ``free()`` lifts the cap. Only SQLITE_FULL of the main file is modelled here.

Either way ``env`` is the environment the gateway child needs (empty for tmpfs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["SmallDisk"]

REPO = Path(__file__).resolve().parents[2]

_PAGE_LIMIT_SHIM = '''\
"""Test shim: the outbox writer obeys a page limit taken from a control file."""
import os
import sys

sys.path.insert(0, {repo!r})
from edge.outbox import writer as _writer  # noqa: E402

_CONTROL = {control!r}
_run = _writer._run_transaction
_seen = {{"stamp": None}}


def _run_transaction(conn, ops):
    try:
        stamp = os.stat(_CONTROL).st_mtime_ns
    except FileNotFoundError:
        stamp = None
    if stamp != _seen["stamp"]:
        _seen["stamp"] = stamp
        with open(_CONTROL) as f:
            full = f.read().strip() == "full"
        # below the current size SQLite keeps the current size: no new page can be added
        conn.execute(f"PRAGMA max_page_count={{1 if full else 1073741823}}")
    return _run(conn, ops)


_writer._run_transaction = _run_transaction
'''


def _try_mount(path: Path, size_mb: int) -> str | None:
    """Mount a tmpfs on ``path``; None on success, else why not."""
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return (proc.stderr or proc.stdout).strip() or f"mount exited {proc.returncode}"
    return None


class SmallDisk:
    """See the module docstring. ``mode`` forces ``"tmpfs"`` or ``"page_limit"``."""

    def __init__(self, path: Path, size_mb: int = 16, *, mode: str | None = None,
                 work_dir: Path | None = None) -> None:
        self.path = path
        self.size_mb = size_mb
        self.work_dir = work_dir or path.parent / (path.name + ".disk")
        self.filled = False
        self.fills = 0
        path.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.why_not_tmpfs: str | None = None
        if mode in (None, "tmpfs"):
            self.why_not_tmpfs = _try_mount(path, size_mb)
            if self.why_not_tmpfs is not None and mode == "tmpfs":
                raise RuntimeError(f"cannot mount a tmpfs on {path}: {self.why_not_tmpfs}")
        else:
            self.why_not_tmpfs = "page_limit mode asked for"
        self.mode = "tmpfs" if self.why_not_tmpfs is None else "page_limit"
        self._ballast = path / ".ballast"
        self._control = self.work_dir / "page_limit"
        if self.mode == "page_limit":
            self._control.write_text("free\n")
            shim = self.work_dir / "shim"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(
                _PAGE_LIMIT_SHIM.format(repo=str(REPO), control=str(self._control)))

    @property
    def env(self) -> dict[str, str]:
        if self.mode == "tmpfs":
            return {}
        path = [str(self.work_dir / "shim")] + ([os.environ["PYTHONPATH"]]
                                                if os.environ.get("PYTHONPATH") else [])
        return {"PYTHONPATH": os.pathsep.join(path)}

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int = 0) -> int:
        """Make the disk full (leaving about ``leave_bytes``); returns the ballast size."""
        self.filled = True
        self.fills += 1
        if self.mode == "page_limit":
            self._control.write_text("full\n")
            return 0
        written = self._ballast.stat().st_size if self._ballast.exists() else 0
        chunk = b"\0" * (1 << 20)
        with open(self._ballast, "ab") as f:
            while True:
                room = self.free_bytes() - leave_bytes
                if room <= 0:
                    break
                try:
                    f.write(chunk[:min(len(chunk), room)])
                    f.flush()
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
                written = f.tell()
        return written

    def free(self) -> None:
        """Give the space back."""
        self.filled = False
        if self.mode == "page_limit":
            self._control.write_text("free\n")
            return
        with contextlib.suppress(FileNotFoundError):
            self._ballast.unlink()

    def close(self) -> None:
        """Unmount (tmpfs) and forget the helper files; safe to call twice."""
        if self.mode == "tmpfs" and os.path.ismount(self.path):
            proc = subprocess.run(["umount", str(self.path)], capture_output=True, text=True,
                                  timeout=30, check=False)
            if proc.returncode != 0:  # a process still holds a file there: detach it
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True,
                               timeout=30, check=False)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> SmallDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
