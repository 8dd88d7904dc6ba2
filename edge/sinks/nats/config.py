"""Config model of the ``nats`` sink: connection (``edge.nats.config``), stream, subject
template, partitions, the event filter and the optional stream creation."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from edge.nats.config import NatsConnection
from edge.nats.subjects import DEFAULT_SUBJECT, template_placeholders
from edge.plugin import SinkConfigBase, StrictModel, event_matches

__all__ = ["CreateStreamConfig", "NatsSinkConfig", "default_stream_subjects"]

_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_BAD_LITERAL = re.compile(r"[\s*>{}]")


class CreateStreamConfig(StrictModel):
    """The stream the sink creates at its first connection when it does not exist yet.

    An existing stream is never changed (plant IT owns it): the sink only checks that it
    takes the sink's subjects and logs a warning when it does not.
    """

    subjects: list[str] | None = Field(
        None, min_length=1, description="subjects the stream takes; default: derived from "
        "the sink's subject template, e.g. plant.<site>.*.>")
    storage: Literal["file", "memory"] = Field("file", description="file survives a restart")
    retention: Literal["limits", "workqueue", "interest"] = Field(
        "limits", description="limits: kept until max_age_s / max_bytes / max_msgs; "
        "workqueue: removed once a consumer acknowledged it")
    replicas: int = Field(1, ge=1, le=5, description="copies on a cluster (3 in production)")
    max_age_s: float = Field(0, ge=0, description="messages older are removed; 0 = no limit")
    max_bytes: int | None = Field(None, ge=1, description="size limit of the stream")
    max_msgs: int | None = Field(None, ge=1, description="message count limit of the stream")
    discard: Literal["new", "old"] = Field(
        "new", description="at a limit: new refuses publishes (the outbox keeps the events); "
        "old removes the oldest messages (they may not have been consumed yet)")
    duplicate_window_s: float = Field(
        600, gt=0, description="how long a Nats-Msg-Id is remembered for dedupe")


def default_stream_subjects(template: str, site: str) -> list[str]:
    """The subjects that cover every subject ``template`` renders for ``site``: literal
    tokens kept, ``{site}`` filled, a one-token placeholder as ``*``, ``{type}`` (which
    may span tokens) and everything after it as ``>``."""
    out: list[str] = []
    for token in template.split("."):
        if "{" not in token:
            out.append(token)
        elif token == "{site}":
            out.append(site)
        elif "{type}" in token:
            out.append(">")
            break
        else:
            out.append("*")
    return [".".join(out)]


class NatsSinkConfig(SinkConfigBase, NatsConnection):
    type: Literal["nats"]
    stream: str = Field(description="name of the JetStream stream that takes the subjects, "
                        "e.g. EDGE_EVENTS; a publish to any other stream is refused")
    subject: str = Field(
        DEFAULT_SUBJECT, description="subject template: literal tokens and {site}, {type}, "
        "{class}, {source}, {partition}")
    partitions: int = Field(16, ge=1, le=1024, description="{partition} is a stable hash "
                            "of the ordering key modulo this; the relay uses the same number")
    events: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1,
        description="event types this sink carries: '*' all, 'a.b' exact, 'a.*' prefix")
    publish_timeout_s: float = Field(5.0, gt=0, le=300, description="wait for the PubAck at "
                                     "most this long; then the event is a retry")
    max_in_flight_requests: int = Field(
        128, ge=1, le=1024, description="publishes awaiting their PubAck for the whole sink "
        "at most (all lanes; the ceiling of adaptive_concurrency): different ordering keys "
        "in parallel, one key's events one after the other")
    create_stream: CreateStreamConfig | None = Field(
        None, description="create the stream when it does not exist; default off")

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: str) -> str:
        if not _STREAM_NAME.match(v):
            raise ValueError("must be 1-255 letters, digits, '_' or '-' (no '.', '*', '>', "
                             f"spaces), got {v!r}")
        return v

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        template_placeholders(v)  # ValueError names an unknown placeholder
        for token in v.split("."):
            literal = re.sub(r"\{[^{}]*\}", "", token)
            if (not token) or _BAD_LITERAL.search(literal):
                raise ValueError(f"token {token!r} of {v!r} is not a valid subject token "
                                 "(empty, whitespace, '*', '>' or a stray brace)")
        if v.startswith("$"):
            raise ValueError(f"subjects starting with $ are reserved by NATS, got {v!r}")
        return v

    def matches(self, event_type: str) -> bool:
        return event_matches(self.events, event_type)
