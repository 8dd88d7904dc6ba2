"""One paho-mqtt connection driven from the asyncio loop (no paho thread, no paho reconnect).

Contract:
- ``await conn.open()`` connects (TCP, TLS, CONNECT in an executor thread, because paho's
  ``connect`` blocks), then waits for CONNACK on the loop. It returns ``session_present``
  or raises ``ConnectError`` with a bounded ``code`` and an operator-readable message.
  A connection object is used once: the caller builds a new one to reconnect, so no paho
  state (or message id) of a dead connection leaks into the next one.
- After ``open`` every paho call happens on the loop thread: the socket is watched with
  ``add_reader``/``add_writer`` (paho's socket callbacks) and ``loop_misc`` runs every
  second for keep-alive. With TLS, reads continue while ``sock.pending() > 0``.
- ``on_message(conn, msg)`` is called synchronously from ``loop_read``; it must only
  enqueue. ``lost`` resolves (with a reason) when the connection ends for any reason.
- ``ack(mid)`` sends PUBACK for a QoS 1 message of THIS connection; ``flush()`` writes
  queued packets now instead of on the next writable event.
- ``publish(topic, payload, qos, retain)`` returns a future that resolves on PUBACK (QoS 1)
  or once written (QoS 0), and fails with ``ConnectError`` if the connection ends first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.mqtt import decoding

__all__ = ["BrokerTarget", "ConnectError", "Connection"]

decoding.install()  # MQTT 5 properties of received packets: shared tables, same values

# paho reads one packet per loop_read(); read on while a call yields a message, up to
# this many packets per readable event, so one loop iteration collects a batch.
MAX_PACKETS_PER_WAKE = 512
# paho asks the socket for a packet's first byte, its length bytes and its body one
# recv() at a time; ReadBuffer takes what the kernel has in reads of up to this size.
READ_SIZE = 65536

# PUBACK as paho writes it for a successful QoS 1 message (also for MQTT 5: without a
# reason code, which means success): command, remaining length 2, packet id.
_PUBACK_COMMAND = 0x40
_PUBACK = struct.Struct("!BBH")

# CONNACK / DISCONNECT reason codes (MQTT 5 numbering; paho maps 3.1.1 codes onto them).
_BAD_CREDENTIALS = 134
_NOT_AUTHORIZED = 135
_SESSION_TAKEN_OVER = 142


class ConnectError(Exception):
    """A connection attempt failed; ``code`` is a bounded metric label."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class BrokerTarget:
    host: str
    port: int
    protocol: str  # "3.1.1" | "5"
    client_id: str
    keepalive_s: int
    connect_timeout_s: float
    session_expiry_s: int
    receive_maximum: int
    ssl_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line or repr

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.ssl_context else 'mqtt'}://{self.host}:{self.port}"


def connack_error(reason: Any, has_username: bool) -> ConnectError:
    """CONNACK refusal → ConnectError with a message that says what to check."""
    value = getattr(reason, "value", reason)
    prefix = "MQTT broker refused the connection: "
    if value == _BAD_CREDENTIALS:
        return ConnectError("auth", prefix + "bad user name or password")
    if value == _NOT_AUTHORIZED:
        hint = ("bad user name or password, or this user may not connect" if has_username
                else "the broker requires a user name and password (set username and "
                "password_file)")
        return ConnectError("auth", prefix + f"not authorized ({hint})")
    return ConnectError("refused", prefix + str(reason))


def _classify(err: BaseException, target: BrokerTarget) -> ConnectError:
    where = f"{target.host}:{target.port}"
    if isinstance(err, ssl.SSLCertVerificationError):
        detail = err.verify_message or err.reason or str(err)
        return ConnectError(
            "tls_verify",
            f"TLS verification of the MQTT broker's certificate at {where} failed: {detail} "
            "(check tls.ca_file and that the certificate names this host)",
        )
    if isinstance(err, ssl.SSLError):
        return ConnectError("tls", f"TLS handshake with the MQTT broker at {where} failed: "
                                   f"{err.reason or err}")
    if isinstance(err, ConnectionRefusedError):
        return ConnectError("refused", f"cannot reach the MQTT broker at {where}: connection "
                                       "refused (is it running and listening there?)")
    if isinstance(err, socket.gaierror):
        return ConnectError("dns", f"cannot resolve the MQTT broker host {target.host!r}: "
                                   f"{err.strerror}")
    if isinstance(err, TimeoutError):
        return ConnectError("timeout", f"no answer from the MQTT broker at {where} within "
                                       f"{target.connect_timeout_s:g} s")
    if isinstance(err, OSError):
        return ConnectError("network", f"cannot connect to the MQTT broker at {where}: "
                                       f"{err.strerror or err}")
    return ConnectError("network", f"cannot connect to the MQTT broker at {where}: {err!r}")


class ReadBuffer:
    """The socket paho reads from after CONNECT: ``recv(n)`` answers from one larger read
    of the real socket, so a small packet costs a fraction of a system call instead of
    three or four. Everything else (send, close, fileno, TLS ``pending``) is the
    socket's own. ``buffered`` bytes are invisible to the event loop's readiness
    watch: whoever reads must drain them (``Connection._on_readable``).
    """

    __slots__ = ("_buf", "_pos", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; raises what the socket's recv raises when nothing is
        buffered (BlockingIOError, ssl.SSLWantReadError, OSError); b"" at EOF."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self.sock.recv(max(n, READ_SIZE))
            if not buf:
                return buf
            pos = 0
        end = pos + n
        self._buf, self._pos = buf, min(end, len(buf))
        return buf[pos:end] if pos or end < len(buf) else buf

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class Connection:
    def __init__(self, target: BrokerTarget,
                 on_message: Callable[[Connection, mqtt.MQTTMessage], None]) -> None:
        self.target = target
        self._on_message_cb = on_message
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[str] = self._loop.create_future()
        self.connected = False
        self.session_present = False
        self.received = 0
        self._connack: asyncio.Future[bool] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[list[Any]]] = {}
        self._pubacks: dict[int, asyncio.Future[None]] = {}
        self._sock: Any = None
        self._reader: ReadBuffer | None = None
        self._fd = -1
        self._reading = False
        self._paused = False
        self._misc: asyncio.Task[None] | None = None
        self.client = self._make_client()
        # paho's packet queue, for acks written together (``ack_many``); without it (a
        # paho laid out differently) each ack goes through ``Client.ack``
        queue = getattr(self.client, "_packet_queue", None)
        self._queue_packet: Callable[..., Any] | None = queue if callable(queue) else None

    # ------------------------------------------------------------------ setup

    def _make_client(self) -> mqtt.Client:
        t = self.target
        v5 = t.protocol == "5"
        client = decoding.FastDispatchClient(
            CallbackAPIVersion.VERSION2,
            client_id=t.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        client.connect_timeout = t.connect_timeout_s
        client.max_inflight_messages_set(t.receive_maximum)
        if t.ssl_context is not None:
            client.tls_set_context(t.ssl_context)
        if t.username is not None:
            client.username_pw_set(t.username, t.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    async def open(self) -> bool:
        """Connect and wait for CONNACK; return ``session_present`` (see module contract)."""
        t = self.target
        kwargs: dict[str, Any] = {}
        if t.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = t.session_expiry_s
            props.ReceiveMaximum = t.receive_maximum
            kwargs = {"clean_start": False, "properties": props}
        connect = functools.partial(self.client.connect, t.host, t.port, t.keepalive_s, **kwargs)
        fut = self._loop.run_in_executor(None, connect)
        try:
            async with asyncio.timeout(t.connect_timeout_s * 2 + 5):  # DNS is not bounded
                await asyncio.shield(fut)
        except TimeoutError as err:
            fut.add_done_callback(lambda _: self._abandon())
            raise _classify(err, t) from err
        except asyncio.CancelledError:
            fut.add_done_callback(lambda _: self._abandon())
            raise
        except (OSError, ValueError) as err:  # ssl errors are OSErrors
            raise _classify(err, t) from err
        self._attach()
        try:
            async with asyncio.timeout(t.connect_timeout_s):
                self.session_present = await self._connack
        except TimeoutError as err:
            self.abort()
            raise ConnectError("timeout", f"no CONNACK from the MQTT broker at "
                                          f"{t.host}:{t.port} within "
                                          f"{t.connect_timeout_s:g} s") from err
        except BaseException:
            self.abort()
            raise
        self.connected = True
        return self.session_present

    def _attach(self) -> None:
        """Hand the socket paho opened (in the executor) to the event loop."""
        client = self.client
        sock = client.socket()
        if sock is None:  # closed already (refused CONNECT written and dropped)
            self._set_lost("socket closed during connect")
            return
        self._sock = sock
        self._fd = sock.fileno()
        if getattr(client, "_sock", None) is sock:  # paho's attribute (2.x): read buffered
            self._reader = ReadBuffer(sock)
            client._sock = self._reader
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._start_reading()
        if client.want_write():
            self._loop.add_writer(self._fd, self._on_writable)
        self._misc = self._loop.create_task(self._misc_loop(), name="mqtt-keepalive")

    def _abandon(self) -> None:
        """The executor finished a connect we gave up on: close what it opened."""
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # ------------------------------------------------------------------ socket callbacks

    def _start_reading(self) -> None:
        if not self._reading and self._fd >= 0 and not self._paused:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def pause_reading(self) -> None:
        """Stop reading the socket (TCP backpressure) until ``resume_reading``."""
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        was_paused, self._paused = self._paused, False
        if not self.lost.done():
            self._start_reading()
            if was_paused and self._unseen():  # no readiness event will announce them
                self._loop.call_soon(self._on_readable)

    def _unseen(self) -> bool:
        """Bytes read from the kernel (ReadBuffer, TLS) that epoll does not report."""
        reader = self._reader
        if reader is not None and reader.buffered:
            return True
        return self.target.ssl_context is not None and bool(
            getattr(self.client.socket(), "pending", int)())

    def _on_readable(self) -> None:
        client = self.client
        if not self._reading or self._paused:  # a call_soon that came after a pause
            return
        for _ in range(MAX_PACKETS_PER_WAKE):
            before = self.received
            rc = client.loop_read()
            sock = client.socket()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None or self._paused:
                return
            if self.received == before and not self._unseen():
                return
        if self._unseen():  # the rest on the next loop turn, after other work
            self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        self.client.loop_write()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._fd >= 0 and not self.lost.done():
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._detach()
        self._set_lost("socket closed")

    def _detach(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._reading = False
        self._fd = -1
        if self._misc is not None:
            self._misc.cancel()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(connack_error(reason, self.target.username is not None))
        else:
            self._connack.set_result(bool(flags.session_present))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        value = getattr(reason, "value", None)
        if value == _SESSION_TAKEN_OVER:
            text = ("session taken over: another client connected with the same client_id "
                    f"{self.target.client_id!r} (two gateways sharing one id?)")
        else:
            text = str(reason)
        if not self._connack.done():
            self._connack.set_exception(ConnectError(
                "closed", f"the MQTT broker closed the connection before CONNACK: {text}"))
        self._set_lost(text)

    def _set_lost(self, reason: str) -> None:
        self.connected = False
        if not self.lost.done():
            self.lost.set_result(reason)
        for futs in (self._subacks, self._pubacks):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(ConnectError("closed", f"connection lost: {reason}"))
        if not self._connack.done():
            self._connack.set_exception(ConnectError("closed", f"connection lost: {reason}"))
            self._connack.exception()  # retrieved: nobody may be waiting any more

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self._on_message_cb(self, msg)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any],
                      properties: Any) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reasons)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        fut = self._pubacks.pop(mid, None)
        if fut is None or fut.done():
            return
        if getattr(reason, "is_failure", False):
            fut.set_exception(ConnectError("refused", f"the broker refused the message: {reason}"))
        else:
            fut.set_result(None)

    # ------------------------------------------------------------------ operations

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
                ) -> asyncio.Future[None]:
        """Queue a PUBLISH; the future resolves on PUBACK (QoS 1) / when sent (QoS 0)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_exception(ConnectError("closed", f"cannot publish: {mqtt.error_string(info.rc)}"))
            return fut
        if info.is_published():  # QoS 0 written already
            fut.set_result(None)
        else:
            self._pubacks[info.mid] = fut
        return fut

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int | None]:
        """Subscribe and wait for SUBACK; granted QoS per filter, None where refused.

        MQTT 5 subscriptions ask for retained messages only when the subscription is new,
        so a reconnect does not replay them.
        """
        if self.target.protocol == "5":
            topics: list[Any] = [
                (f, SubscribeOptions(qos=q, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
                for f, q in filters
            ]
        else:
            topics = list(filters)
        rc, mid = self.client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectError("closed", f"cannot subscribe: {mqtt.error_string(rc)}")
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        self._subacks[mid] = fut
        try:
            async with asyncio.timeout(self.target.connect_timeout_s):
                reasons = await fut
        except TimeoutError as err:
            raise ConnectError("timeout", "no SUBACK from the MQTT broker within "
                                          f"{self.target.connect_timeout_s:g} s") from err
        return [None if r.is_failure else int(r.value) for r in reasons]

    def ack(self, mid: int) -> None:
        self.client.ack(mid, 1)

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK each of ``mids`` (QoS 1 messages of this connection), in this order.

        The same bytes as ``ack`` once per message, queued as one write: paho sends each
        queued packet with its own ``send()``, a system call per message otherwise.
        """
        if len(mids) == 1 or self._queue_packet is None:
            for mid in mids:
                self.client.ack(mid, 1)
            return
        if mids:
            pack = _PUBACK.pack
            self._queue_packet(_PUBACK_COMMAND, b"".join([pack(_PUBACK_COMMAND, 2, m)
                                                          for m in mids]), 0, 0)

    def flush(self) -> None:
        if self.client.want_write() and self.client.socket() is not None:
            self.client.loop_write()

    def abort(self) -> None:
        """Close the socket now (no DISCONNECT): the broker keeps the session."""
        sock = self.client.socket()
        self._detach()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._set_lost("closed by the gateway")

    def close(self) -> None:
        """Send pending acks and DISCONNECT if the socket takes them now, then close.

        The session stays on the broker (persistent session; MQTT 5 expiry applies).
        """
        if self.connected and self.client.socket() is not None:
            with contextlib.suppress(OSError, ValueError):
                self.client.disconnect()
                self.client.loop_write()
        self.abort()
