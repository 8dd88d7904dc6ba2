"""The private nats-server fixture of ``tests.nats.support`` for the sink's tests."""

from tests.nats.support import nats_servers

__all__ = ["nats_servers"]
