"""Time and duration formatting, one style everywhere (API, page, CLI, logs, envelopes).

- ``utc_iso(ts)``        epoch seconds (default: now) → ``2026-11-29T22:56:57.123456Z``
- ``iso_z(dt)``          a datetime → ISO-8601 in UTC with ``Z`` (naive = UTC); the form of
                         the event envelope and of OPC UA dedupe keys, so it must not change
- ``parse_iso(text)``    ISO-8601 (``Z`` or an offset) → epoch seconds, None if unreadable
- ``duration(s)``        ``42 s``, ``12 min``, ``3.4 h``, ``2.1 d``; ``-`` when unknown
- ``ago(iso)``           ``12 min ago``; ``never`` when there is no time
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["ago", "duration", "iso_z", "parse_iso", "utc_iso"]


def utc_iso(ts: float | None = None) -> str:
    """Epoch seconds (default: now) as UTC ISO-8601 with microseconds and ``Z``."""
    dt = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return dt.isoformat(timespec="microseconds").replace("+00:00", "Z")


def iso_z(dt: datetime) -> str:
    """A datetime as ISO-8601 in UTC with ``Z``; a naive datetime is taken as UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_iso(text: str | None) -> float | None:
    """ISO-8601 text (``Z`` or an offset; naive = UTC) → epoch seconds; None if unreadable."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def duration(seconds: float | None) -> str:
    """``42 s``, ``12 min``, ``3.4 h``, ``2.1 d``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def ago(iso: str | None, now: float | None = None) -> str:
    """``12 min ago`` for a UTC ISO time; ``never`` when there is none."""
    ts = parse_iso(iso)
    if ts is None:
        return "never"
    return f"{duration(max(0.0, (now if now is not None else time.time()) - ts))} ago"
