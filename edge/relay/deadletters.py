"""Dead letters and parked keys of the relay tier, shared by every relay through JetStream.

The gateway keeps dead letters in its SQLite outbox; relays on several machines need one
shared place, so a relay keeps them in JetStream (DESIGN invariants 2 and 4):

- The dead-letter stream (``relay.dlq_stream``, subjects ``<dlq_subject>.<sink>.<key
  hash>``) holds every dead-lettered event (``Edge-Kind: dead_letter``, with status, reason
  and the receiver's answer) and every later event of a parked key (``Edge-Kind:
  parked``), as the envelope it was consumed as. An event leaves the main stream's
  consumer (it is acknowledged) only after its copy here was stored (PubAck).
- The parked bucket (``relay.parked_bucket``) has one entry per parked (sink, key):
  ``{"state": "parked" | "replay" | "discard", ...}``. While ``parked``, the relay that
  owns the key's partition moves each later event of the key to the dead-letter stream.
  An operator sets ``replay`` or ``discard`` (``edge relay dlq replay|discard``); the
  owning relay then sends the key's dead-lettered and parked events again in their
  order (before any later event of the key) or drops them, audited in its log, and
  removes the entry. Every change of an entry is a compare-and-set on its revision.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

from edge.relay.config import RelayConfig

__all__ = ["DeadLetterEntry", "DeadLetters", "ParkState"]

HEADER_LIMIT = 1024  # bytes of a reason or answer kept in a header


@dataclass(slots=True)
class ParkState:
    """One parked (sink, key) as the bucket holds it, with the revision it was read at."""

    sink: str
    key: str
    state: str  # parked | replay | discard
    revision: int
    doc: dict[str, Any]


@dataclass(slots=True)
class DeadLetterEntry:
    """One message of the dead-letter stream."""

    seq: int
    subject: str
    body: bytes
    headers: dict[str, str]

    @property
    def kind(self) -> str:
        return self.headers.get("Edge-Kind", "dead_letter")


def _clean(text: str | None) -> str:
    """A header value: one line, bounded."""
    if not text:
        return ""
    return " ".join(str(text).split())[:HEADER_LIMIT]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


class DeadLetters:
    def __init__(self, js: Any, cfg: RelayConfig) -> None:
        self.js = js
        self.cfg = cfg
        self.kv: Any = None

    async def setup(self) -> None:
        """Create the dead-letter stream and the parked bucket when missing."""
        from nats.js.errors import BucketNotFoundError, NotFoundError

        try:
            await self.js.stream_info(self.cfg.dlq_stream)
        except NotFoundError:
            await self.js.add_stream(name=self.cfg.dlq_stream,
                                     subjects=[f"{self.cfg.dlq_subject}.>"])
        try:
            self.kv = await self.js.key_value(self.cfg.parked_bucket)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(bucket=self.cfg.parked_bucket, history=1)

    # ------------------------------------------------------------------ names

    def subject(self, sink: str, key: str) -> str:
        return f"{self.cfg.dlq_subject}.{sink}.{key_hash(key)}"

    @staticmethod
    def entry_name(sink: str, key: str) -> str:
        return f"{sink}.{key_hash(key)}"

    # ------------------------------------------------------------------ dead letters

    async def put(self, sink: str, *, event_id: str, key: str | None, body: bytes,
                  source_subject: str, source_seq: int, kind: str, reason: str,
                  status: int | None = None, answer: str | None = None,
                  behind: str | None = None) -> int:
        """Store one event in the dead-letter stream; returns its sequence there. Raises
        when the stream did not confirm (the caller must not acknowledge the original)."""
        headers = {
            "Edge-Kind": kind,
            "Edge-Sink": sink,
            "Edge-Event-Id": event_id,
            "Edge-Reason": _clean(reason),
            "Edge-Source-Subject": source_subject,
            "Edge-Source-Seq": str(source_seq),
            "Edge-Time": f"{time.time():.3f}",
        }
        if key is not None:
            headers["Edge-Ordering-Key"] = _clean(key)
        if status is not None:
            headers["Edge-Status"] = str(status)
        if answer:
            headers["Edge-Answer"] = _clean(answer)
        if behind:
            headers["Edge-Parked-Behind"] = behind
        subject = self.subject(sink, key if key is not None else event_id)
        ack = await self.js.publish(subject, body, stream=self.cfg.dlq_stream, headers=headers)
        return int(ack.seq)

    async def entries(self, sink: str | None = None, key: str | None = None
                      ) -> list[DeadLetterEntry]:
        """Dead-letter messages in stream order: of one (sink, key), one sink, or all."""
        if sink is not None and key is not None:
            subject = self.subject(sink, key)
        elif sink is not None:
            subject = f"{self.cfg.dlq_subject}.{sink}.*"
        else:
            subject = f"{self.cfg.dlq_subject}.>"
        from nats.js.errors import NotFoundError

        out: list[DeadLetterEntry] = []
        seq = 0
        while True:
            try:
                raw = await self.js.get_msg(self.cfg.dlq_stream, seq=seq + 1, subject=subject,
                                            next=True)
            except NotFoundError:
                return out
            seq = int(raw.seq)
            out.append(DeadLetterEntry(seq, raw.subject, raw.data or b"",
                                       {k: str(v) for k, v in (raw.headers or {}).items()}))

    async def remove(self, seq: int) -> None:
        from nats.js.errors import NotFoundError

        try:
            await self.js.delete_msg(self.cfg.dlq_stream, seq)
        except NotFoundError:
            pass  # removed already (a replay that was interrupted after it)

    # ------------------------------------------------------------------ parked keys

    async def park(self, sink: str, key: str, *, event_id: str, reason: str) -> None:
        """Park ``key`` for ``sink`` (a no-op when it is parked already)."""
        from nats.js.errors import KeyWrongLastSequenceError

        doc = {"sink": sink, "key": key, "state": "parked", "event_id": event_id,
               "reason": _clean(reason), "since": time.time(), "followers": 0}
        try:
            await self.kv.create(self.entry_name(sink, key), orjson.dumps(doc))
        except KeyWrongLastSequenceError:
            pass  # parked already: its first dead letter stays the reason

    async def state(self, sink: str, key: str) -> ParkState | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(self.entry_name(sink, key))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        doc = orjson.loads(entry.value)
        return ParkState(sink, key, str(doc.get("state", "parked")), int(entry.revision), doc)

    async def all_states(self) -> list[ParkState]:
        from nats.js.errors import NoKeysError

        try:
            names = await self.kv.keys()
        except NoKeysError:
            return []
        out = []
        for name in names:
            sink, _, _ = name.partition(".")
            entry = await self._get(name)
            if entry is None:
                continue
            doc = orjson.loads(entry.value)
            out.append(ParkState(str(doc.get("sink", sink)), str(doc["key"]),
                                 str(doc.get("state", "parked")), int(entry.revision), doc))
        return out

    async def _get(self, name: str) -> Any:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None
        return entry if entry.value else None

    async def request(self, sink: str, key: str, state: str, *, by: str, why: str
                      ) -> str | None:
        """An operator's ``replay`` or ``discard`` of the dead letters of (sink, key):
        ``key`` is an ordering key, or the event id of a keyless event. Marks a parked key;
        creates the entry when the key is not parked (``on_dead_letter: continue``, or a
        keyless event) but has dead letters. Returns None when done, else why not."""
        from nats.js.errors import KeyWrongLastSequenceError

        park = await self.state(sink, key)
        if park is not None:
            if await self.set_state(park, state, by=by, why=why):
                return None
            return "the parked key changed meanwhile; run the command again"
        entries = await self.entries(sink, key)
        if not entries:
            return f"no dead letters of {key!r} for sink {sink!r}"
        first = entries[0].headers
        doc = {"sink": sink, "key": key, "state": state, "by": by, "why": why,
               "event_id": first.get("Edge-Event-Id", ""),
               "reason": first.get("Edge-Reason", ""), "since": time.time(), "followers": 0}
        try:
            await self.kv.create(self.entry_name(sink, key), orjson.dumps(doc))
        except KeyWrongLastSequenceError:
            return "the key was parked meanwhile; run the command again"
        return None

    async def set_state(self, park: ParkState, state: str, **extra: Any) -> bool:
        """Compare-and-set the entry's state; False when it changed since it was read."""
        from nats.js.errors import KeyWrongLastSequenceError

        doc = dict(park.doc, state=state, **extra)
        try:
            rev = await self.kv.update(self.entry_name(park.sink, park.key), orjson.dumps(doc),
                                       last=park.revision)
        except KeyWrongLastSequenceError:
            return False
        park.revision, park.state, park.doc = int(rev), state, doc
        return True

    async def unpark(self, park: ParkState) -> bool:
        """Remove the entry if it is unchanged since it was read."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await self.kv.delete(self.entry_name(park.sink, park.key), last=park.revision)
        except KeyWrongLastSequenceError:
            return False
        return True
