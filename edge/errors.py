"""Typed, classified errors of the gateway — every exception the code raises on purpose.

The tree::

    EdgeError                         base; never raised itself
    ├── ConfigError                   bad configuration; fatal at start (exit 2), carries
    │                                 one ``ConfigIssue`` per problem with its location
    ├── StartupError                  a component could not start
    │   ├── RetryableStartupError     try again with backoff (broker down, DNS, refused)
    │   └── FatalStartupError         retrying cannot help (bad credentials are retried too,
    │       │                         but certificate or node errors are fatal)
    │       └── OutboxOpenError       the outbox file cannot be opened or checked (locked,
    │                                 busy, no permission) — not corrupt, never moved
    │                                 aside; ``edge run`` exits 2
    ├── InputError                    one inbound record is unusable (not JSON, too large,
    │                                 fails validation): quarantined, counted, acked
    ├── OutboxError                   the local store
    │   ├── OutboxFullError           budget exhausted by protected rows: backpressure,
    │   │                             do NOT ack upstream, wait for ``Outbox.accepting``
    │   ├── OutboxClosedError         the writer stopped (shutdown): do not ack
    │   ├── OutboxStorageError        a storage fault at run time (corrupt page, I/O
    │   │                             error): do not ack, health failing, retry later
    │   └── OutboxOrderError          an earlier submit of the same chain failed: re-submit
    │                                 in the original order, do not ack
    └── SalvageError                  ``edge outbox salvage``: the file cannot be read at
                                      all (defined in ``edge.outbox.salvage``)

Sources classify broker/server failures as Retryable/Fatal startup errors; the supervisor in
``edge.app`` retries the former with capped backoff and stops the component on the latter
(health shows it), never the whole daemon.

Sinks raise nothing per event: a failed delivery is an ``Outcome`` (``edge.components``),
and an exception escaping ``Sink.send`` is a retryable failure of the whole batch. A file
that fails the integrity check at open raises nothing either: it is moved aside, a fresh outbox
starts, and an alarm says so.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "EdgeError",
    "FatalStartupError",
    "InputError",
    "OutboxClosedError",
    "OutboxError",
    "OutboxFullError",
    "OutboxOpenError",
    "OutboxOrderError",
    "OutboxStorageError",
    "RetryableStartupError",
    "StartupError",
]


class EdgeError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One located configuration problem: ``sinks[0].routes[1].method: must be ...``."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(EdgeError):
    """The configuration is invalid; ``issues`` lists every problem with its location."""

    def __init__(self, issues: list[ConfigIssue] | str, *, location: str = "") -> None:
        if isinstance(issues, str):
            issues = [ConfigIssue(location, issues)]
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class StartupError(EdgeError):
    """A component could not connect or initialise."""


class RetryableStartupError(StartupError):
    """Transient: the supervisor retries with capped exponential backoff."""


class FatalStartupError(StartupError):
    """Retrying cannot help (bad node id, refused certificate): the component stops."""


class OutboxOpenError(FatalStartupError):
    """The outbox file exists but cannot be opened or checked (a lock held elsewhere, a
    busy timeout, a permission problem): it is not corrupt and is left where it is."""


class InputError(EdgeError):
    """One inbound record is unusable. ``reason`` is a short bounded code for metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class OutboxError(EdgeError):
    """The local outbox failed."""


class OutboxFullError(OutboxError):
    """The size budget is exhausted by rows that may not be expired: apply backpressure."""


class OutboxClosedError(OutboxError):
    """The outbox is closing or closed; nothing submitted now was committed."""


class OutboxStorageError(OutboxError):
    """A storage fault at run time (corrupt page, I/O error): nothing was committed; do not
    acknowledge upstream, retry later. The outbox raises a health alarm."""


class OutboxOrderError(OutboxError):
    """An earlier submit of the same chain failed, so this one was not stored either (it
    would have committed ahead of it): re-submit in the original order."""
