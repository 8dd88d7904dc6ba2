"""Connection supervision shared by the ``mqtt`` source and the ``mqtt`` sink.

One broker, one ``Connection`` at a time. What the two components share lives here; what
they do with a failure differs and stays with them (see "Two ways to use it").

Contract:

- ``await broker_target(cfg, ...)`` reads ``password_file`` and builds the TLS context off
  the event loop. A file that cannot be used raises ``FatalStartupError`` (the component
  stops, the gateway runs on); call it when the component starts, never at load.
- ``Supervisor(target, on_message, filters)`` owns the connections. ``conn`` is the newest
  one from the moment it is made, also while it opens: messages the broker resends right
  after CONNACK arrive before the SUBACK and belong to it (they are acked through it).
- ``await connect()`` is one attempt: a fresh ``Connection`` (no paho state or message id
  of a dead one leaks into it), opened, then subscribed to ``filters`` when there are any.
  It returns the connection, or raises ``ConnectError`` with a bounded ``code``
  (``auth``, ``tls_verify``, ``tls``, ``refused``, ``dns``, ``timeout``, ``network``,
  ``closed``, ``subscribe_refused`` when the broker refused every filter) and an
  operator-readable ``message``, kept in ``last_error``; the attempt's socket is closed
  without DISCONNECT, so the broker keeps the session. ``granted`` holds the granted QoS
  per filter of the last successful attempt (None where refused).
- ``await ensure(on_up)`` returns the current connection while it is up, else makes one
  attempt; concurrent callers wait for the same attempt. ``on_up(conn)`` runs once per new
  connection.
- ``await run(backoff, on_up, on_down)`` keeps a connection up until cancelled: after
  each successful attempt ``await on_up(conn)``; after a failed attempt or a lost
  connection ``on_down(failure)`` (a ``Failure``: code, message, the delay before the next
  attempt, the attempt number; ``lost`` for a connection that was up, code
  ``connection_lost``), then it sleeps that delay. It never returns; a ConnectError never
  escapes it; an exception of ``on_up``/``on_down`` does.
- ``Backoff``: capped exponential with jitter (between half and the full delay: never a
  thundering herd of gateways, never a retry faster than half the nominal delay); the
  delay starts over once a connection lived ``stable_s``.
- ``close()`` sends DISCONNECT if it can and closes the current connection.

Two ways to use it: the source calls ``run`` — it must stay connected and subscribed,
reconnecting by itself, because while it is away only the broker's session keeps the
plant's messages. The sink calls ``ensure`` from ``send``: a failure becomes the outcome
of the events (retry, or a sink fault for refused credentials), and the forwarder's retry
backoff and circuit breaker pace the next attempt, so the sink neither sleeps nor keeps a
connection open with nothing to send.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import paho.mqtt.client as mqtt

from edge.mqtt.config import MqttConnectionConfig, ssl_context
from edge.mqtt.connection import BrokerTarget, ConnectError, Connection
from edge.plugin import ConfigError, FatalStartupError, read_secret

__all__ = ["CONNECTION_LOST", "Backoff", "Failure", "Supervisor", "broker_target"]

CONNECTION_LOST = "connection_lost"
STABLE_S = 10.0  # a connection that lived this long resets the reconnect backoff

OnMessage = Callable[[Connection, mqtt.MQTTMessage], None]


async def broker_target(cfg: MqttConnectionConfig, *, who: str, client_id: str,
                        session_expiry_s: int, receive_maximum: int) -> BrokerTarget:
    """Where and as whom to connect; secrets and certificates read now (``who`` names
    the component in the error). FatalStartupError when a file cannot be used."""
    try:
        password = await asyncio.to_thread(read_secret, cfg.password_file)
        context = await asyncio.to_thread(ssl_context, cfg, who)
    except ConfigError as err:
        raise FatalStartupError(str(err)) from err
    return BrokerTarget(
        host=cfg.host, port=cfg.port, protocol=cfg.protocol, client_id=client_id,
        keepalive_s=cfg.keepalive_s, connect_timeout_s=cfg.connect_timeout_s,
        session_expiry_s=session_expiry_s, receive_maximum=receive_maximum,
        ssl_context=context, username=cfg.username, password=password,
    )


class Backoff:
    """Reconnect delays: ``initial_s`` doubling per failed attempt up to ``max_s``, each
    drawn between half and the full value; back to ``initial_s`` after a connection that
    lived ``stable_s`` (a broker that accepts and then drops at once keeps backing off)."""

    def __init__(self, initial_s: float, max_s: float, *, stable_s: float = STABLE_S,
                 rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.stable_s = stable_s
        self.attempt = 0  # failed attempts (and lost connections) since the last reset
        self._rng = rng
        self._clock = clock
        self._up_since: float | None = None

    def next_delay(self) -> float:
        """The delay before the next attempt; counts this failure."""
        cap = min(self.max_s, self.initial_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return cap / 2 + self._rng() * cap / 2

    def up(self) -> None:
        """A connection is up now."""
        self._up_since = self._clock()

    def down(self) -> None:
        """The connection that was up is lost: start over if it lived long enough."""
        if self._up_since is not None and self._clock() - self._up_since >= self.stable_s:
            self.attempt = 0
        self._up_since = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why there is no connection, and when the next attempt comes."""

    code: str
    message: str
    retry_in_s: float
    attempt: int

    @property
    def lost(self) -> bool:
        """A connection that was up ended (rather than an attempt failing)."""
        return self.code == CONNECTION_LOST


def _ignore(conn: Connection, msg: mqtt.MQTTMessage) -> None:
    pass


class Supervisor:
    """The connections to one broker, one at a time; see the module contract."""

    def __init__(self, target: BrokerTarget, on_message: OnMessage = _ignore,
                 filters: Sequence[tuple[str, int]] = ()) -> None:
        self.target = target
        self.filters = list(filters)
        self.conn: Connection | None = None
        self.granted: list[int | None] = []
        self.last_error: str | None = None
        self.reconnects = 0  # connections lost after they were up
        self._on_message = on_message
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.connected

    async def connect(self) -> Connection:
        """One attempt: open and subscribe; ConnectError with the reason when it fails."""
        conn = self.conn = Connection(self.target, self._on_message)
        try:
            await conn.open()
            if self.filters:
                granted = await conn.subscribe(self.filters)
                if all(g is None for g in granted):
                    raise ConnectError("subscribe_refused", "the MQTT broker refused every "
                                       "subscription (check the broker's ACL for this user)")
                self.granted = granted
        except ConnectError as err:
            conn.abort()
            self.last_error = err.message
            raise
        except BaseException:
            conn.abort()
            raise
        self.last_error = None
        return conn

    async def ensure(self, on_up: Callable[[Connection], None] | None = None) -> Connection:
        """The connection while it is up, else one attempt (shared by concurrent callers)."""
        async with self._lock:
            conn = self.conn
            if conn is not None and conn.connected:
                return conn
            conn = await self.connect()
            if on_up is not None:
                on_up(conn)
            return conn

    async def run(self, backoff: Backoff, on_up: Callable[[Connection], Awaitable[None]],
                  on_down: Callable[[Failure], None]) -> NoReturn:
        """Stay connected until cancelled, reconnecting with ``backoff``."""
        while True:
            try:
                conn = await self.connect()
            except ConnectError as err:
                delay = backoff.next_delay()
                on_down(Failure(err.code, err.message, delay, backoff.attempt))
                await asyncio.sleep(delay)
                continue
            backoff.up()
            await on_up(conn)
            reason = await conn.lost
            self.reconnects += 1
            backoff.down()
            delay = backoff.next_delay()
            self.last_error = f"MQTT connection lost: {reason}"
            on_down(Failure(CONNECTION_LOST, self.last_error, delay, backoff.attempt))
            await asyncio.sleep(delay)

    def close(self) -> None:
        """DISCONNECT if the socket takes it now, then close (the session stays)."""
        if self.conn is not None:
            self.conn.close()
