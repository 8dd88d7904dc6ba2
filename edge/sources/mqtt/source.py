"""The MQTT source at run time: reconnect supervisor, batching, ack after commit.

See ``edge.sources.mqtt`` for the contract. Data path inside one process::

    socket ─ loop_read ─ on_message ─▶ inbox (deque, bounded: reading pauses when full)
                                          │ processor: up to max_batch per loop turn
                                          ▼
                  prepare (match topic, parse, map) ─▶ store task (one submit for the
                                          │            events, plus quarantines; retried
                                          │            until committed, see ``_store``)
                                          ▼
                  acker: awaits store tasks in FIFO order, then PUBACKs in arrival order

Up to ``_STORE_BATCHES`` store tasks run concurrently (they share the outbox's group
commits), and reading pauses while the inbox is full: at most ``MqttSource.max_held``
messages are in memory whatever the broker sends (some brokers do not enforce the
client's Receive Maximum once acks flow).

Storage order is arrival order (DESIGN invariant 4), also when a write fails: every submit
names the source as its ``chain``, and the store tasks make their calls — first ones and
re-submissions — in arrival order (``_Turn``). A failed write of any kind (budget full,
storage fault, an earlier write of the chain failed) is never acked nor quarantined: the
batch is retried with backoff while the broker keeps the messages. Only an exception that
one record causes (a bug mapping or serialising it) turns that record into an
``internal_error`` quarantine record; if even that cannot be written, it is retried too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import paho.mqtt.client as mqtt

from edge.mqtt.connection import MAX_PACKETS_PER_WAKE, Connection
from edge.mqtt.supervisor import Backoff, Failure, Supervisor, broker_target
from edge.mqtt.topics import CompiledTopic, TopicTemplate
from edge.plugin import (
    ComponentContext,
    ConfigError,
    Ingest,
    InputError,
    Mapper,
    OutboxClosedError,
    OutboxError,
    OutboxFullError,
    OutboxOrderError,
    Submission,
    log_event,
)
from edge.sources.mqtt.config import MqttSourceConfig, SubscriptionConfig
from edge.timefmt import utc_iso

if TYPE_CHECKING:
    from edge.sources.mqtt.sparkplug import Decoded, SparkplugMapping, SparkplugState

__all__ = ["MqttSource"]

log = logging.getLogger("edge.sources.mqtt")

_STORE_BATCHES = 4  # store tasks (batches) in flight at most
_BURST_WINDOW_S = 60.0
_RETRY_MIN_S = 0.5  # backoff of a failed write: doubles per failure, capped
_RETRY_MAX_S = 30.0
_SPARKPLUG_SAVE_S = 2.0
_TOPIC_MATCHES_MAX = 4096  # topics whose subscription match is remembered


@dataclass(slots=True)
class _Inbound:
    conn: Connection
    msg: mqtt.MQTTMessage
    received_at: float


@dataclass(slots=True)
class _Prepared:
    inbound: _Inbound
    submission: Submission | None = None
    default_key: bool = True
    topic: str = ""
    subscription: str = ""
    reason: str = ""
    detail: str = ""
    raw: bytes = b""
    meta: dict[str, Any] | None = None
    # audit rows (state, reason, detail) of the message, written before it is acked
    audits: list[tuple[str, str, dict[str, Any]]] | None = None
    # a Sparkplug B message: the records it became (none for one that only changes state)
    records: list[_Prepared] | None = None


@dataclass(slots=True)
class _Sub:
    config: SubscriptionConfig
    topic: CompiledTopic
    mapper: Mapper
    sparkplug: SparkplugMapping | None = None


class _BurstLog:
    """Log the first of a burst of similar problems, then at most once per window."""

    def __init__(self, window_s: float = _BURST_WINDOW_S, max_keys: int = 1000) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def hit(self, key: tuple[str, str]) -> int | None:
        """None: stay quiet; else log now, reporting this many suppressed repeats."""
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            suppressed = int(entry[1]) if entry else 0
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return suppressed
        entry[1] += 1
        return None


class _Turn:
    """A store batch's place in the order of submit calls (arrival order).

    The outbox commits the calls of one chain in the order they were made, and fails
    every call made before a failure was reported (``OutboxOrderError``). So the source
    only has to make its calls in arrival order, re-submissions included. The rule, for
    every call of a batch: its predecessor (the batch that arrived just before) has made
    all its calls and at least one newer than the predecessor call that preceded this
    batch's previous call — or is committed (``done``).

    In the normal path a batch calls right after its predecessor called: batches are in
    flight together and share group commits. After a failure the failed batch and every
    batch behind it re-submit one after the other in arrival order: a batch waits until
    its predecessor's re-submission was made (or its predecessor committed), never on a
    timer of its own, so a later batch can neither commit first nor be left out.

    Why a first call cannot slip in between the outbox reporting a predecessor's failure
    and the predecessor seeing it: the report resolves the predecessor's future, which
    queues its wake-up on the event loop before anything that runs after the report, and
    a submit reaches the writer's queue without suspending (rules and the outbox's
    preparation are synchronous). Only a full writer queue (20,000 ops) would suspend a
    call before it is queued; the outbox would then have to fail calls by the failures
    their caller has seen rather than by enqueue time.
    """

    __slots__ = ("abandoned", "after", "changed", "done", "made", "pending", "prev")

    def __init__(self, prev: _Turn | None) -> None:
        self.prev = prev
        self.made = 0  # submit calls made
        self.pending = True  # a call is still to be made (new batch, or its last one failed)
        self.done = False  # every call committed (or there was nothing to submit)
        self.abandoned = False  # the task ended without committing (shutdown)
        self.after = 0  # the predecessor's ``made`` when this batch last called
        self.changed = asyncio.Event()  # one waiter: the successor

    def _ready(self) -> bool:
        p = self.prev
        if p is None or p.done:
            return True
        if p.abandoned:
            raise OutboxClosedError("an earlier batch of this source was not stored")
        return not p.pending and p.made > self.after

    async def wait(self) -> None:
        """Return once this batch may make its next submit call."""
        while not self._ready():
            p = self.prev
            assert p is not None
            p.changed.clear()
            await p.changed.wait()

    def calling(self, last: bool) -> None:
        """Right before a call; ``last`` is False while more calls of this batch follow."""
        self.after = self.prev.made if self.prev is not None else 0
        self.made += 1
        self.pending = not last
        self.changed.set()

    def failed(self) -> None:
        self.pending = True
        self.changed.set()

    def finish(self) -> None:
        self.done = True
        self.pending = False
        self.prev = None  # committed: what came before does not matter any more
        self.changed.set()

    def abandon(self) -> None:
        if not self.done:
            self.abandoned = True
            self.changed.set()


class MqttSource:
    """``type: mqtt`` at run time; built by ``edge.sources.mqtt._factory`` (no I/O)."""

    def __init__(self, cfg: MqttSourceConfig, ctx: ComponentContext) -> None:
        if ctx.ingest is None:
            raise ConfigError("an mqtt source needs the ingest pipeline", location=cfg.id)
        self.id = cfg.id
        self.cfg = cfg
        self.ctx = ctx
        self.ingest: Ingest = ctx.ingest
        self.client_id = cfg.client_id_for(ctx.site, cfg.id)
        for i, sub in enumerate(cfg.subscriptions):
            if "{site}" in TopicTemplate.parse(sub.topic).levels and (
                    not ctx.site or any(c in ctx.site for c in "/+#\x00")):
                raise ConfigError(
                    f"site {ctx.site!r} cannot fill {{site}}: a topic level must not be empty "
                    "or contain '/', '+' or '#'", location=f"{cfg.id}.subscriptions[{i}].topic")
        self.subs = [
            _Sub(s, CompiledTopic.build(TopicTemplate.parse(s.topic), ctx.site),
                 Mapper(s, site=ctx.site, source=cfg.id))
            for s in cfg.subscriptions
        ]
        # Sparkplug B state (alias tables, sequences) lives as long as this object, so a
        # reconnect keeps it; protobuf is loaded only when a subscription uses it.
        self._spb: SparkplugState | None = None
        self._spb_loaded = False
        self._conditions: set[str] = set()
        if any(s.format == "sparkplug_b" for s in cfg.subscriptions):
            from edge.sources.mqtt import sparkplug

            self._spb = sparkplug.SparkplugState()
            for entry in self.subs:
                if entry.config.format == "sparkplug_b":
                    entry.sparkplug = sparkplug.SparkplugMapping(
                        entry.config, site=ctx.site, source=cfg.id)
        m = ctx.metrics
        self._errors = m.source_errors
        self._bursts = _BurstLog()
        self._link: Supervisor | None = None  # made by run(), once the secrets are read
        self._expect_session = False
        self._lost_at: tuple[float, str] | None = None  # (when, why) the connection ended
        self._inbox: deque[_Inbound] = deque()
        self._inbox_max = max(4 * cfg.max_batch, 2 * cfg.max_inflight_messages)
        # Messages held in memory at most, whatever the broker sends: the inbox pauses
        # reading at _inbox_max (+ what one socket read delivers) and at most
        # _STORE_BATCHES batches are being stored.
        self.max_held = self._inbox_max + MAX_PACKETS_PER_WAKE + _STORE_BATCHES * cfg.max_batch
        # How far back a redelivered copy's content hash is looked for (DESIGN invariant
        # 3). Acks go out in arrival order, so when a message is unacked every message
        # stored after it is unacked and held too: at a crash or a lost connection its
        # first copy is among the newest max_held keys of this source. Twice that covers
        # what else can come between the two copies: PUBACKs handed to paho or the kernel
        # but lost with the socket (a killed process's unsent data is discarded), and the
        # messages the next connection stores before the broker's resends reach a batch.
        self.redelivery_horizon = 2 * self.max_held
        self._wake = asyncio.Event()
        self._in_store = 0  # messages in _pending
        self._room = asyncio.Event()  # set when a store task leaves _pending
        # store tasks in arrival order, awaited by the acker
        self._pending: deque[tuple[list[_Inbound], asyncio.Task[None]]] = deque()
        self._pending_added = asyncio.Event()
        self._last_turn: _Turn | None = None  # the newest store batch's turn
        self._granted: dict[str, int | None] = {}
        # topic bytes → (topic, subscription, captures): see _match_topic
        self._topic_matches: dict[bytes, tuple[str, _Sub | None, dict[str, Any] | None]] = {}
        self._stopping = False
        self.counts = {"received": 0, "stored": 0, "duplicates": 0, "quarantined": 0,
                       "acked": 0}
        self.last_message_at: float | None = None
        self.session_present = False

    @property
    def _conn(self) -> Connection | None:
        """The newest connection (also while it opens), None before ``run``."""
        return self._link.conn if self._link is not None else None

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """For ``/status``: connection, subscriptions, unacked messages (no secrets)."""
        conn, link = self._conn, self._link
        in_store = self._in_store
        last = self.last_message_at
        return {
            "connected": bool(conn and conn.connected),
            "broker": f"{self.cfg.scheme}://{self.cfg.host}:{self.cfg.port}",
            "client_id": self.client_id,
            "protocol": self.cfg.protocol,
            "session_present": self.session_present,
            "subscriptions": [
                {"filter": s.topic.filter, "qos": s.config.qos,
                 "granted_qos": self._granted.get(s.topic.filter)} for s in self.subs
            ],
            "unacked": len(self._inbox) + in_store,
            "last_message_at": utc_iso(last) if last is not None else None,
            "reconnects": link.reconnects if link is not None else 0,
            "last_error": link.last_error if link is not None else None,
            **self.counts,
            **({"sparkplug": self._spb.status()} if self._spb is not None else {}),
        }

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Connect, receive, store and ack until cancelled; reconnects by itself.

        Raises FatalStartupError only when a secret or certificate file cannot be used.
        """
        cfg = self.cfg
        target = await broker_target(
            cfg, who=f"source {self.id!r}", client_id=self.client_id,
            session_expiry_s=cfg.session_expiry_s, receive_maximum=cfg.max_inflight_messages)
        link = Supervisor(target, self._on_message,
                          [(s.topic.filter, s.config.qos) for s in self.subs])
        if self._link is not None:  # restarted after a bug: /status keeps counting
            link.reconnects = self._link.reconnects
        self._link = link
        self._inbox.clear()
        self._wake.clear()
        self._last_turn = None
        tasks = [
            asyncio.create_task(self._processor(), name=f"mqtt-{self.id}-processor"),
            asyncio.create_task(self._acker(), name=f"mqtt-{self.id}-acker"),
            asyncio.create_task(self._connection_loop(link), name=f"mqtt-{self.id}-conn"),
        ]
        if self._spb is not None:
            tasks.append(asyncio.create_task(self._sparkplug_saver(),
                                             name=f"mqtt-{self.id}-sparkplug"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a bug in one of them: let the supervisor restart us
        finally:
            self._ack_completed()  # acks for batches committed before the stop
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._drop_pending()
            link.close()
            self.ctx.set_connected(False)
            if self._spb is not None and self._spb_loaded:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._save_sparkplug, self._spb.snapshot())

    # ------------------------------------------------------------------ connection

    async def _connection_loop(self, link: Supervisor) -> None:
        if self._spb is not None and not self._spb_loaded:
            # before the first message: the session's queued data resolves with the
            # tables of the previous run (see SparkplugState.restore)
            nodes = await asyncio.to_thread(self._load_sparkplug, self._spb)
            self._spb_loaded = True
            if nodes:
                log_event(log, logging.INFO, "Sparkplug alias tables of the previous run "
                          "loaded", source=self.id, edge_nodes=nodes)
        self._expect_session = await asyncio.to_thread(self._session_marker_matches)
        backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        await link.run(backoff, self._connected, self._disconnected)

    def _disconnected(self, failure: Failure) -> None:
        if failure.lost:
            self.ctx.set_connected(False)
            self._lost_at = (time.time(), failure.message)
        self._failed(failure.code, failure.message, failure.retry_in_s, failure.attempt)

    def _failed(self, code: str, message: str, delay: float, attempt: int) -> None:
        self._errors.labels(self.id, code).inc()
        level = logging.ERROR if code in ("auth", "tls_verify", "tls") else logging.WARNING
        log_event(log, level, message, source=self.id, code=code, attempt=attempt,
                  retry_in_s=round(delay, 2))

    async def _connected(self, conn: Connection) -> None:
        assert self._link is not None
        target, granted = conn.target, self._link.granted
        session_present = self.session_present = conn.session_present
        expect_session, self._expect_session = self._expect_session, True
        self._granted = {s.topic.filter: g for s, g in zip(self.subs, granted, strict=True)}
        for s, g in zip(self.subs, granted, strict=True):
            if g is None:
                self._errors.labels(self.id, "subscribe_refused").inc()
                log_event(log, logging.ERROR, "MQTT broker refused a subscription (ACL?)",
                          source=self.id, filter=s.topic.filter)
            elif g < s.config.qos:
                log_event(log, logging.WARNING, "MQTT broker granted a lower QoS than asked: "
                          "messages may be lost", source=self.id, filter=s.topic.filter,
                          granted_qos=g)
        self.ctx.set_connected(True)
        log_event(log, logging.INFO, "MQTT connected", source=self.id, broker=target.address,
                  client_id=self.client_id, protocol=target.protocol,
                  session_present=session_present, subscriptions=len(self.subs))
        if self._lost_at is not None:  # the trail shows each outage window
            (lost_at, why), self._lost_at = self._lost_at, None
            with contextlib.suppress(OutboxError):
                await self.ingest.audit("reconnected", source=self.id, detail={
                    "broker": target.address, "session_present": session_present,
                    "lost_at": utc_iso(lost_at), "down_s": round(time.time() - lost_at, 1),
                    "error": why})
        if expect_session and not session_present:
            self.ctx.metrics.source_gaps.labels(self.id).inc()
            reason = ("the broker had no session for this client id: messages published "
                      "while the gateway was disconnected may be lost (broker restarted "
                      "without persistence, or session expired)")
            log_event(log, logging.WARNING, "MQTT session was not resumed", source=self.id,
                      client_id=self.client_id, detail=reason)
            with contextlib.suppress(OutboxError):
                await self.ingest.audit("gap", source=self.id, reason=reason,
                                        detail={"client_id": self.client_id})
        if self._spb is not None and not session_present:
            # Births published while no session kept messages for us may be gone: ask
            # every edge node seen so far for a new one.
            for group, node, why in self._spb.rebirth_all(time.monotonic(), "session_lost"):
                self._publish_rebirth(group, node, why)
        await asyncio.to_thread(self._write_session_marker)

    # A marker in state_dir says "this client id had a session on this broker", so a later
    # CONNACK without session_present is recognised as a gap, also after a restart.
    def _marker_path(self) -> Path:
        return Path(self.ctx.state_dir) / "mqtt" / f"{self.id}.session"

    def _marker_doc(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "broker": f"{self.cfg.host}:{self.cfg.port}"}

    def _session_marker_matches(self) -> bool:
        try:
            return bool(json.loads(self._marker_path().read_text()) == self._marker_doc())
        except (OSError, ValueError):
            return False

    def _write_session_marker(self) -> None:
        path = self._marker_path()
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self._marker_doc()))

    # Sparkplug B alias tables and sequences, kept for the next run: written at most every
    # _SPARKPLUG_SAVE_S while they change, and when the source stops.
    def _sparkplug_path(self) -> Path:
        return Path(self.ctx.state_dir) / "mqtt" / f"{self.id}.sparkplug.json"

    def _load_sparkplug(self, state: SparkplugState) -> int:
        try:
            return state.restore(json.loads(self._sparkplug_path().read_text()))
        except (OSError, ValueError):
            return 0

    def _save_sparkplug(self, doc: dict[str, Any]) -> None:
        path = self._sparkplug_path()
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc))
            tmp.replace(path)
        except OSError as err:
            self._note("sparkplug_save", "state", logging.WARNING,
                       f"cannot save the Sparkplug alias tables ({err}): after a restart "
                       "data before the next births is quarantined")

    async def _sparkplug_saver(self) -> None:
        assert self._spb is not None
        while True:
            await asyncio.sleep(_SPARKPLUG_SAVE_S)
            if self._spb.dirty and self._spb_loaded:
                await asyncio.to_thread(self._save_sparkplug, self._spb.snapshot())

    # ------------------------------------------------------------------ receive

    def _on_message(self, conn: Connection, msg: mqtt.MQTTMessage) -> None:
        # Called from paho's loop_read: enqueue only (an exception here would escape it).
        now = time.time()
        self._inbox.append(_Inbound(conn, msg, now))
        self.last_message_at = now
        self.counts["received"] += 1
        if len(self._inbox) >= self._inbox_max:
            conn.pause_reading()
        self._wake.set()

    async def _processor(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._inbox:
                # A few batches in flight share group commits; more would only split the
                # same messages into smaller transactions (measured: worse latency).
                while len(self._pending) >= _STORE_BATCHES:
                    self._room.clear()
                    await self._room.wait()
                n = min(len(self._inbox), self.cfg.max_batch)
                items = [self._inbox.popleft() for _ in range(n)]
                prepared = [r for m in items for r in self._records(self._prepare(m))]
                self._in_store += n
                turn = None  # a batch without events takes no part in the submit order
                if any(p.submission is not None for p in prepared):
                    turn = self._last_turn = _Turn(self._last_turn)
                task = asyncio.create_task(self._store(turn, prepared),
                                           name=f"mqtt-{self.id}-store")
                self._pending.append((items, task))
                self._pending_added.set()
                conn = self._conn
                if conn is not None and len(self._inbox) <= self._inbox_max // 2:
                    conn.resume_reading()

    def _match_topic(self, raw: bytes, topic: str
                     ) -> tuple[str, _Sub | None, dict[str, Any] | None]:
        """The first subscription whose template matches ``topic`` and its captures
        (shared by every message of the topic: read only), remembered for the next
        message of the same topic. The subscriptions do not change while the source
        lives; the memory is bounded (cleared when full)."""
        match: tuple[str, _Sub | None, dict[str, Any] | None] = (topic, None, None)
        for sub in self.subs:
            captures = sub.topic.match(topic)
            if captures is not None:
                match = (topic, sub, captures)
                break
        if len(self._topic_matches) >= _TOPIC_MATCHES_MAX:
            self._topic_matches.clear()
        self._topic_matches[bytes(raw)] = match
        return match

    @staticmethod
    def _records(p: _Prepared) -> list[_Prepared]:
        return [p] if p.records is None else p.records

    def _prepare(self, m: _Inbound) -> _Prepared:
        """Topic match → JSON → mapping; every failure becomes a quarantine record. A
        Sparkplug B message becomes a record per metric, in ``records``."""
        msg = m.msg
        payload = msg.payload
        out = _Prepared(m)
        match = self._topic_matches.get(msg._topic)  # paho keeps the topic's bytes
        if match is None:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                out.topic = bytes(msg._topic).decode("utf-8", "replace")
                return self._reject(out, "invalid_topic", "topic is not valid UTF-8", payload)
            match = self._match_topic(msg._topic, topic)
        topic, sub, captures = match
        out.topic = topic
        if len(payload) > self.cfg.max_payload_bytes:
            return self._reject(
                out, "too_large",
                f"{len(payload)} bytes > max_payload_bytes {self.cfg.max_payload_bytes} "
                "(first max_payload_bytes kept)", payload)
        if sub is None or captures is None:
            return self._reject(out, "unmatched_topic",
                                "no subscription template matches this topic", payload)
        out.subscription = sub.topic.filter
        if sub.sparkplug is not None:
            out.records = self._prepare_sparkplug(out, sub.sparkplug, captures)
            return out
        return self._prepare_json(out, sub, captures)

    def _prepare_json(self, out: _Prepared, sub: _Sub, captures: dict[str, Any]
                      ) -> _Prepared:
        msg = out.inbound.msg
        payload = msg.payload
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as err:
            return self._reject(out, "not_json", str(err) if payload else "empty payload",
                                payload)
        try:
            event, key = sub.mapper.map(doc, captures)
        except InputError as err:
            return self._reject(out, err.reason, err.detail, payload)
        except Exception as err:  # noqa: BLE001 - hostile input must never stop the source
            return self._reject(out, "invalid_data", f"cannot map: {err!r}", payload)
        if key is not None:  # a station-assigned identity: matched within the window
            out.default_key = False
            out.submission = Submission(event, key)
            return out
        # Content hash: matched only for a copy the broker flags as a resend (DUP), or a
        # retained message replayed by a (re)subscription, so a device that repeats a
        # payload on purpose gets an event each time (DESIGN invariant 3).
        out.submission = Submission(
            event, hashlib.sha256(msg._topic + b"\x00" + payload).hexdigest(),
            redelivery_only=True, redelivered=bool(msg.dup or msg.retain),
            redelivery_horizon=self.redelivery_horizon)
        return out

    def _prepare_sparkplug(self, out: _Prepared, mapping: SparkplugMapping,
                           captures: dict[str, Any]) -> list[_Prepared]:
        """One Sparkplug B message → its events, quarantine records and audit rows (see
        ``edge.sources.mqtt.sparkplug``); publishes a rebirth request when it needs one."""
        assert self._spb is not None
        m, msg = out.inbound, out.inbound.msg
        redelivered = bool(msg.dup or msg.retain)
        try:
            decoded = self._spb.handle(mapping, out.topic, bytes(msg.payload), captures,
                                       redelivered=redelivered, now=time.monotonic())
        except Exception as err:  # noqa: BLE001 - hostile input must never stop the source
            return [self._reject(out, "invalid_data", f"cannot decode: {err!r}", msg.payload)]
        records: list[_Prepared] = []
        for r in decoded.readings:
            records.append(_Prepared(
                m, Submission(r.event, r.dedupe_key, redelivery_only=r.redelivery_only,
                              redelivered=redelivered,
                              redelivery_horizon=self.redelivery_horizon),
                topic=out.topic, subscription=out.subscription))
        for rej in decoded.rejects:
            p = self._reject(_Prepared(m, topic=out.topic, subscription=out.subscription),
                             rej.reason, rej.detail, msg.payload)
            if p.meta is not None:
                p.meta.update(rej.meta)
            records.append(p)
        self._sparkplug_side_effects(decoded, out.topic)
        if decoded.audits:
            if not records:  # a message that only changes state still carries its audit
                records.append(_Prepared(m, topic=out.topic, subscription=out.subscription))
            records[0].audits = decoded.audits
        return records

    def _sparkplug_side_effects(self, decoded: Decoded, topic: str) -> None:
        for what, detail in decoded.notes:
            log_event(log, logging.INFO, f"Sparkplug: {what}", source=self.id, topic=topic,
                      **detail)
        for code, message in decoded.conditions:
            if (message is not None) != (code in self._conditions):
                self._conditions.symmetric_difference_update({code})
                self.ctx.set_condition(code, message, "warning")
        for state, reason, detail in decoded.audits:
            if state == "gap":
                self.ctx.metrics.source_gaps.labels(self.id).inc()
                log_event(log, logging.WARNING, "Sparkplug gap", source=self.id,
                          reason=reason, **detail)
        if decoded.rebirth is not None:
            group, node, why = decoded.rebirth
            if self._publish_rebirth(group, node, why):
                decoded.audits.append(("rebirth_requested", why,
                                       {"group": group, "edge_node": node}))

    def _publish_rebirth(self, group: str, node: str, why: str) -> bool:
        """Publish NCMD ``Node Control/Rebirth = true`` to one edge node (QoS 0, as the
        Sparkplug specification has commands); False when there is no connection."""
        from edge.sources.mqtt.sparkplug import NAMESPACE, rebirth_payload

        conn = self._conn
        topic = f"{NAMESPACE}/{group}/NCMD/{node}"
        if conn is None or not conn.connected:
            log_event(log, logging.WARNING, "Sparkplug rebirth not requested: not connected",
                      source=self.id, topic=topic, reason=why)
            return False
        fut = conn.publish(topic, rebirth_payload(int(time.time() * 1000)), qos=0)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        log_event(log, logging.INFO, "Sparkplug rebirth requested", source=self.id,
                  topic=topic, reason=why)
        return True

    def _reject(self, out: _Prepared, reason: str, detail: str, raw: bytes | bytearray
                ) -> _Prepared:
        """Turn ``out`` into a quarantine record (raw payload kept up to the size limit)."""
        msg = out.inbound.msg
        out.meta = {"topic": out.topic, "qos": msg.qos, "dup": bool(msg.dup),
                    "retain": bool(msg.retain), "bytes": len(raw)}
        if out.subscription:
            out.meta["subscription"] = out.subscription
        limit = self.cfg.max_payload_bytes
        if len(raw) > limit:  # the quarantine keeps evidence, not unbounded blobs
            out.meta["truncated_from"] = len(raw)
            raw = raw[:limit]
        out.reason, out.detail, out.raw = reason, detail, bytes(raw)
        return out

    # ------------------------------------------------------------------ store

    async def _store(self, turn: _Turn | None, prepared: list[_Prepared]) -> None:
        """Commit a batch: its events in one submit (in ``turn`` order), its quarantine
        records beside it; return once all are committed, retrying until then.

        Raises only OutboxClosedError (shutdown) and CancelledError: then nothing of the
        batch, nor of any later batch, may be acked.
        """
        events = [p for p in prepared if p.submission is not None]
        rejects = [p for p in prepared if p.submission is None and p.reason]
        try:
            for p in prepared:  # a Sparkplug B gap or death, recorded before the ack
                for state, reason, detail in p.audits or ():
                    await self._audit(state, reason, detail)
            if not rejects and turn is not None:
                await self._store_events(turn, events)
            else:
                async with asyncio.TaskGroup() as tg:
                    for p in rejects:
                        tg.create_task(self._quarantine(p))
                    if turn is not None:
                        await self._store_events(turn, events)
        except BaseExceptionGroup as group:  # the first error of the TaskGroup
            raise group.exceptions[0] from None
        finally:
            if turn is not None:
                turn.abandon()

    async def _store_events(self, turn: _Turn, events: list[_Prepared]) -> None:
        """Submit ``events`` (chain: this source) until committed; see the module doc.

        A non-outbox exception of a batch splits it into single records, submitted one
        after the other; the single record that still raises is quarantined instead
        (``internal_error``). Any OutboxError is retried with backoff, never acked.
        """
        calls = [events] if events else []
        delay = _RETRY_MIN_S
        while calls:
            job = calls[0]
            await turn.wait()
            turn.calling(last=len(calls) == 1)
            try:
                ids = await self.ingest.submit(
                    [p.submission for p in job if p.submission is not None], chain=self.id)
            except OutboxClosedError:
                raise
            except OutboxError as err:
                turn.failed()
                await self._write_failed(err, delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except Exception as err:  # noqa: BLE001 - a bug must not lose or block the rest
                turn.failed()
                if len(job) > 1:
                    calls[0:1] = [[p] for p in job]  # find the record that causes it
                    continue
                p = calls.pop(0)[0]
                p.submission = None
                self._reject(p, "internal_error", f"cannot store: {err!r}", p.inbound.msg.payload)
                await self._quarantine(p)
                continue
            calls.pop(0)
            delay = _RETRY_MIN_S
            self._count_stored(job, ids)
        turn.finish()

    async def _audit(self, state: str, reason: str, detail: dict[str, Any]) -> None:
        """Write an audit row; an outbox error is logged (the row is not worth holding
        the message for: its events and quarantine records are)."""
        try:
            await self.ingest.audit(state, source=self.id, reason=reason, detail=detail)
        except OutboxClosedError:
            raise
        except OutboxError as err:
            self._note("audit_write", "outbox", logging.ERROR,
                       f"cannot write an audit row ({state}, {reason}): {err}")

    async def _write_failed(self, err: OutboxError, delay: float) -> None:
        """After a failed write of events or a quarantine record: wait before retrying."""
        if isinstance(err, OutboxFullError):
            self._note("backpressure", "outbox", logging.WARNING,
                       "outbox refuses events (budget full): not acknowledging MQTT "
                       "messages; the broker keeps them")
            await self.ingest.wait_accepting()
        elif isinstance(err, OutboxOrderError):
            pass  # an earlier batch failed (counted there); the turn order paces the retry
        else:
            self._errors.labels(self.id, "outbox_write").inc()
            self._note("outbox_write", "outbox", logging.ERROR,
                       f"outbox write failed: not acknowledging MQTT messages (the broker "
                       f"keeps them), retrying in {delay:g} s: {err}")
            await asyncio.sleep(delay)

    async def _quarantine(self, p: _Prepared) -> None:
        """Commit ``p``'s quarantine record, retrying until it is committed: an unusable
        message is acked only once its evidence is stored."""
        delay = _RETRY_MIN_S
        while True:
            try:
                await self.ingest.quarantine(self.id, p.reason, p.raw, p.meta, p.detail)
            except OutboxClosedError:
                raise
            except OutboxError as err:
                await self._write_failed(err, delay)
            except Exception as err:  # noqa: BLE001 - keep the message with the broker
                self._errors.labels(self.id, "quarantine_write").inc()
                self._note("quarantine_write", p.topic, logging.ERROR,
                           f"cannot write a quarantine record ({p.reason}): not acknowledging "
                           f"the message (the broker keeps it), retrying in {delay:g} s: "
                           f"{err!r}")
                await asyncio.sleep(delay)
            else:
                break
            delay = min(delay * 2, _RETRY_MAX_S)
        self.counts["quarantined"] += 1
        suppressed = self._bursts.hit((p.reason, p.topic))
        if suppressed is not None:
            log_event(log, logging.WARNING, "MQTT message quarantined and acked",
                      source=self.id, reason=p.reason, topic=p.topic,
                      detail=p.detail[:200], suppressed_since_last=suppressed)

    def _count_stored(self, job: list[_Prepared], ids: list[str]) -> None:
        for p, eid in zip(job, ids, strict=True):
            if p.submission is not None and eid == p.submission.event.id:
                self.counts["stored"] += 1
                continue
            self.counts["duplicates"] += 1
            if not p.default_key and not p.inbound.msg.dup:
                self._note("repeated_key", p.topic, logging.INFO,
                           "a message not flagged as redelivered had the dedupe_key of an "
                           "event stored within outbox.dedupe_window_s and was not stored "
                           "again (dedupe_key must name what identifies one record)")

    def _note(self, code: str, topic: str, level: int, message: str) -> None:
        suppressed = self._bursts.hit((code, topic))
        if suppressed is not None:
            log_event(log, level, message, source=self.id, topic=topic,
                      suppressed_since_last=suppressed)

    # ------------------------------------------------------------------ ack

    async def _acker(self) -> None:
        while True:
            while not self._pending:
                self._pending_added.clear()
                await self._pending_added.wait()
            items, task = self._pending[0]
            await asyncio.wait([task])
            self._pending.popleft()
            self._in_store -= len(items)
            self._room.set()
            if task.cancelled() or task.exception() is not None:
                # OutboxClosedError: shutting down. Nothing after it may be acked either;
                # the broker redelivers and the outbox dedupe maps copies to their events.
                self._stopping = True
                err = None if task.cancelled() else task.exception()
                if err is not None and not isinstance(err, OutboxClosedError):
                    raise err  # a bug: let the supervisor restart the source
            elif not self._stopping:
                self._ack(items)

    def _ack(self, items: list[_Inbound]) -> None:
        conn = self._conn
        if conn is None or not conn.connected:
            return  # the broker redelivers them; the outbox dedupe maps them to their events
        mids = [m.msg.mid for m in items if m.msg.qos == 1 and m.conn is conn]
        if mids:
            conn.ack_many(mids)
            self.counts["acked"] += len(mids)
            conn.flush()

    def _ack_completed(self) -> None:
        """On stop: ack, in order, the batches whose commit already finished."""
        while self._pending and not self._stopping:
            items, task = self._pending[0]
            if not task.done() or task.cancelled() or task.exception() is not None:
                break
            self._pending.popleft()
            self._ack(items)

    def _drop_pending(self) -> None:
        while self._pending:
            _, task = self._pending.popleft()
            task.cancel()
        self._in_store = 0
        self._inbox.clear()
        self._stopping = False

