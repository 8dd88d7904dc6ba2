"""The durable SQLite outbox (see ``edge.outbox.store.Outbox``)."""

from edge.outbox.store import Outbox, Resolution

__all__ = ["Outbox", "Resolution"]
