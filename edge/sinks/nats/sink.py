"""The ``nats`` sink at run time; see ``README.md`` beside this file for the contract."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.errors as nats_errors
from nats.js import errors as js_errors
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from edge.nats.connection import NatsConnectError, connect, connect_options
from edge.nats.subjects import partition_of, render_subject
from edge.plugin import (
    AdaptiveConcurrency,
    ComponentContext,
    ConfigError,
    FatalStartupError,
    Outcome,
    StoredEvent,
    log_event,
    send_in_key_order,
)
from edge.sinks.nats.config import NatsSinkConfig, default_stream_subjects

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

__all__ = ["NatsSink"]

log = logging.getLogger("edge.sinks.nats")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# JetStream API error codes (nats-server's errors.json) the sink treats specially
ERR_MESSAGE_TOO_LARGE = 10054  # the stream's max_msg_size
ERR_WRONG_STREAM = 10060  # "expected stream does not match"
ERR_STREAM_NOT_FOUND = 10059


class NatsSink:
    def __init__(self, config: NatsSinkConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.id = config.id
        self.ctx = ctx
        self.client_name = config.client_name(ctx.site, config.id)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._stream_checked = config.create_stream is None
        self._stopping = False
        # publishes awaiting their PubAck, sink-wide: adapted up to max_in_flight_requests
        self.concurrency = AdaptiveConcurrency(config.max_in_flight_requests,
                                               adaptive=config.adaptive_concurrency)

    def accepts(self, event_type: str) -> bool:
        return self.config.matches(event_type)

    async def start(self) -> None:
        """Read secrets and certificates now: a bad file is a clear start-up error
        (FatalStartupError). Connecting waits for the first ``send``."""
        try:
            connect_options(self.config, name=self.client_name)
        except ConfigError as err:
            raise FatalStartupError(f"sink {self.id!r}: {err}") from err

    def stop_new_requests(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.close()
            except Exception as err:  # noqa: BLE001  closing must not fail the shutdown
                log.debug("closing the NATS connection of sink %s: %r", self.id, err)

    # ------------------------------------------------------------------ connection

    async def _ensure(self) -> JetStreamContext | Outcome:
        """The JetStream context of a live connection, or the outcome of every event
        when there is none (retry; sink fault when the server refuses the credentials)."""
        async with self._lock:
            nc = self._nc
            if nc is not None and nc.is_closed:  # nats-py gave up reconnecting
                self._nc = self._js = nc = None
            if nc is None:
                try:
                    nc = await connect(self.config, name=self.client_name,
                                       disconnected_cb=self._disconnected,
                                       reconnected_cb=self._reconnected)
                except NatsConnectError as err:
                    if err.code == "auth":
                        return Outcome.sink_fault(f"auth: {err.message}")
                    return Outcome.retry(f"connection: {err.message}")
                except ConfigError as err:  # a secret file vanished since start
                    return Outcome.sink_fault(f"config: {err}")
                self._nc, self._js = nc, nc.jetstream(timeout=self.config.publish_timeout_s)
                self.ctx.set_connected(True)
                log_event(log, logging.INFO, "NATS sink connected", sink=self.id,
                          server=nc.connected_url.netloc if nc.connected_url else "?",
                          client=self.client_name)
            if not nc.is_connected:  # reconnecting: fail fast, the forwarder paces retries
                return Outcome.retry("connection: reconnecting to NATS")
            assert self._js is not None
            if not self._stream_checked:
                await self._create_stream(self._js)
            return self._js

    async def _disconnected(self) -> None:
        self.ctx.set_connected(False)

    async def _reconnected(self) -> None:
        self.ctx.set_connected(True)

    async def _create_stream(self, js: JetStreamContext) -> None:
        """Create the stream when it does not exist; never change an existing one."""
        spec = self.config.create_stream
        assert spec is not None
        subjects = spec.subjects or default_stream_subjects(self.config.subject, self.ctx.site)
        name = self.config.stream
        try:
            try:
                info = await js.stream_info(name)
            except js_errors.NotFoundError:
                await js.add_stream(StreamConfig(
                    name=name, subjects=subjects, storage=StorageType(spec.storage),
                    retention=RetentionPolicy(spec.retention), num_replicas=spec.replicas,
                    max_age=spec.max_age_s or None, max_bytes=spec.max_bytes,
                    max_msgs=spec.max_msgs, discard=DiscardPolicy(spec.discard),
                    duplicate_window=spec.duplicate_window_s))
                log_event(log, logging.INFO, "NATS stream created", sink=self.id, stream=name,
                          subjects=",".join(subjects))
            else:
                missing = set(subjects) - set(info.config.subjects or [])
                if missing:
                    log_event(log, logging.WARNING, "NATS stream exists with other subjects; "
                              "left unchanged", sink=self.id, stream=name,
                              has=",".join(info.config.subjects or []),
                              wanted=",".join(sorted(missing)))
        except (js_errors.Error, nats_errors.Error, TimeoutError) as err:
            # publishes then tell the operator what is wrong (no stream, wrong stream)
            log_event(log, logging.ERROR, "cannot create the NATS stream", sink=self.id,
                      stream=name, error=f"{type(err).__name__}: {err}")
            return
        self._stream_checked = True

    # ------------------------------------------------------------------ sending

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        ready = await self._ensure()
        if isinstance(ready, Outcome):
            return [ready] * len(batch)
        js = ready

        async def publish(events: list[StoredEvent]) -> list[Outcome]:
            return [await self._publish(js, events[0])]

        by_seq = await send_in_key_order(
            [[ev] for ev in batch], publish, self.concurrency,
            stopping=lambda: self._stopping,
            dead_letter_blocks=self.config.on_dead_letter != "continue")
        return [by_seq[ev.seq] for ev in batch]

    def subject_of(self, ev: StoredEvent) -> str:
        """The subject of one event; ValueError when a value is not a valid token."""
        doc = ev.doc
        return _subject(self.config.subject, doc.get("site") or self.ctx.site, ev.type,
                        ev.event_class.value, doc.get("source"),
                        partition_of(ev.ordering_key, ev.id, self.config.partitions))

    def headers_of(self, ev: StoredEvent) -> dict[str, str]:
        """The message headers; ValueError for a value with a control character (it
        would end the header line and could forge another header)."""
        headers = {"Nats-Msg-Id": ev.id, "X-Correlation-ID": ev.correlation_id,
                   "Edge-Event-Type": ev.type}
        if ev.ordering_key is not None:
            headers["Edge-Ordering-Key"] = ev.ordering_key
        if ev.sha256:  # taken at ingest: a relay checks the body against it before sending
            headers["Edge-Body-Sha256"] = ev.sha256
        for name, value in headers.items():
            if _CONTROL.search(value):
                raise ValueError(f"header {name} value {value[:80]!r} contains a control "
                                 "character")
        return headers

    async def _publish(self, js: JetStreamContext, ev: StoredEvent) -> Outcome:
        if not self.config.matches(ev.type):
            return Outcome.unrouted(f"sink {self.id} does not carry {ev.type} any more")
        try:
            subject = self.subject_of(ev)
        except ValueError as err:
            return Outcome.dead_letter(f"invalid subject: {err}")
        try:
            headers = self.headers_of(ev)
        except ValueError as err:
            return Outcome.dead_letter(f"unsafe header value: {err}")
        timeout = self.config.publish_timeout_s
        try:  # nats-py bounds the wait for the PubAck by ``timeout`` itself
            ack = await js.publish(subject, ev.body, timeout=timeout,
                                   stream=self.config.stream, headers=headers)
        except (js_errors.NoStreamResponseError, nats_errors.NoRespondersError):
            return Outcome.sink_fault(
                f"no stream takes subject {subject!r}: create stream {self.config.stream} "
                "with subjects covering it (see the sink's README), or set create_stream")
        except js_errors.APIError as err:
            return self._api_error(err, subject)
        except nats_errors.MaxPayloadError as err:
            return Outcome.dead_letter(f"message larger than the server's max_payload: {err}")
        except nats_errors.BadSubjectError as err:
            return Outcome.dead_letter(f"invalid subject {subject!r}: {err}")
        except (nats_errors.TimeoutError, TimeoutError):
            return Outcome.retry(f"no PubAck within {timeout:g} s")
        except (nats_errors.Error, OSError) as err:  # closed, reconnecting, stale, buffer full
            return Outcome.retry(f"connection: {type(err).__name__}: {err}")
        if ack.duplicate:
            return Outcome.duplicate(reason=f"JetStream already has Nats-Msg-Id {ev.id} "
                                     f"(stream {ack.stream}, seq {ack.seq})")
        return Outcome.delivered()

    def _api_error(self, err: js_errors.APIError, subject: str) -> Outcome:
        text = f"{err.description} (code {err.code}, err_code {err.err_code})"
        if err.err_code == ERR_MESSAGE_TOO_LARGE:
            return Outcome.dead_letter(f"the stream refuses the message: {text}", err.code)
        if err.err_code == ERR_WRONG_STREAM:
            return Outcome.sink_fault(
                f"subject {subject!r} belongs to another stream than {self.config.stream}: "
                f"{text}; fix the stream's subjects or the sink's stream", err.code)
        if err.err_code == ERR_STREAM_NOT_FOUND:
            return Outcome.sink_fault(
                f"stream {self.config.stream} not found for subject {subject!r}: {text}",
                err.code)
        # stream full with discard new, no quorum, storage failure: the stream, not the event
        return Outcome.sink_fault(f"JetStream refused the publish to {subject!r}: {text}",
                                  err.code)


@functools.lru_cache(maxsize=4096)  # a site's types × classes × sources × partitions
def _subject(template: str, site: str, type_: str, cls: str, source: str | None,
             partition: int) -> str:
    values: dict[str, Any] = {"site": site, "type": type_, "class": cls, "source": source,
                              "partition": partition}
    return render_subject(template, values)
