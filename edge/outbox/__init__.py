"""The durable SQLite outbox (see ``edge.outbox.store.Outbox``)."""

from edge.outbox.queries import Resolution
from edge.outbox.store import Outbox

__all__ = ["Outbox", "Resolution"]
