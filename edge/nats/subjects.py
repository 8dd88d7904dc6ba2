"""Subjects and partitions of the JetStream tier, shared by the ``nats`` sink (which
publishes) and ``edge relay`` (which consumes one durable consumer per partition).

Contract:
- ``partition_of(ordering_key, event_id, partitions)`` is stable across processes,
  machines and releases: the first 8 bytes of SHA-256 of the ordering key (the event id
  when the event has none), big-endian, modulo ``partitions``. All events of one key land
  in one partition, so one relay at a time delivers them, in stream order.
- A subject template names ``{site}``, ``{type}``, ``{class}``, ``{source}`` and
  ``{partition}``; ``{type}`` may span tokens (``inspection.result``). The default
  ``plant.{site}.p{partition}.{type}`` puts the partition before the type so a relay can
  filter one partition with ``plant.*.p3.>``.
- Every rendered token must be a valid subject token: not empty, no whitespace, no ``*``
  or ``>``; ``{site}``, ``{class}``, ``{source}`` and ``{partition}`` must be one token
  (no ``.``). ``render_subject`` raises ``ValueError`` naming the placeholder otherwise.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

__all__ = [
    "DEFAULT_FILTER",
    "DEFAULT_SUBJECT",
    "partition_filter",
    "partition_of",
    "render_subject",
    "template_placeholders",
]

DEFAULT_SUBJECT = "plant.{site}.p{partition}.{type}"
DEFAULT_FILTER = "plant.*.p{partition}.>"

PLACEHOLDERS = frozenset({"site", "type", "class", "source", "partition"})
MULTI_TOKEN = frozenset({"type"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_BAD_TOKEN = re.compile(r"[\s*>]")


def partition_of(ordering_key: str | None, event_id: str, partitions: int) -> int:
    """The partition (0 … partitions-1) of an event: a stable hash of its ordering key,
    or of its id when it has no key."""
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    key = ordering_key if ordering_key else event_id
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def template_placeholders(template: str) -> list[str]:
    """The placeholder names of ``template`` in order; ValueError for an unknown one."""
    names = _PLACEHOLDER.findall(template)
    unknown = [n for n in names if n not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}; allowed: "
                         + ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS)))
    return names


def render_subject(template: str, values: Mapping[str, object]) -> str:
    """Fill ``template``; ValueError when a value is missing or would not be a valid
    subject token (see the module contract)."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values or values[name] is None or values[name] == "":
            raise ValueError(f"no value for {{{name}}}")
        value = str(values[name])
        tokens = value.split(".") if name in MULTI_TOKEN else [value]
        if name not in MULTI_TOKEN and "." in value:
            raise ValueError(f"{{{name}}} value {value!r} contains '.' (one subject token)")
        for token in tokens:
            if not token or _BAD_TOKEN.search(token):
                raise ValueError(f"{{{name}}} value {value!r} is not a valid subject token "
                                 "(empty, whitespace, '*' or '>')")
        return value

    subject = _PLACEHOLDER.sub(fill, template)
    if any(not t for t in subject.split(".")):
        raise ValueError(f"subject {subject!r} has an empty token")
    return subject


def partition_filter(template: str, partition: int) -> str:
    """The consumer filter of one partition, e.g. ``plant.*.p{partition}.>`` → ``plant.*.p3.>``."""
    if "{partition}" not in template:
        raise ValueError("the filter must name {partition}")
    return template.replace("{partition}", str(partition))
