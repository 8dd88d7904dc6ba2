"""OPC UA values and statuses as the ``opcua`` source stores them.

- ``jsonable(v)``        a variant's value → JSON-friendly data (arrays, structures, texts,
                         ids, bytes, DateTime as ISO-8601 with ``Z``)
- ``status_name(code)``  a StatusCode → ``Good``, ``BadSensorFailure``, ``Good|Overflow``
- ``source_ts(dv)``      a DataValue's SourceTimestamp (else ServerTimestamp, else now),
                         always timezone-aware UTC
- ``sample_key(...)``    the dedupe key of one monitored sample

Timestamps are written with ``edge.timefmt.iso_z``. Its output is part of every dedupe key
(``sample_key``, the trigger key ``trigger:<node>@<raise>``) and must never change: a
sample read live before an upgrade and again from history after it would be stored twice.
Every timestamp the source formats is timezone-aware UTC (asyncua decodes DateTime as
such; ``source_ts`` and the watermark parser make naive ones UTC), for which ``iso_z`` is
byte for byte what the source wrote before (tests/sources/opcua/test_values.py).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from asyncua import ua

from edge.timefmt import iso_z

__all__ = ["OVERFLOW_BITS", "jsonable", "sample_key", "source_ts", "status_name"]

OVERFLOW_BITS = 0x0480  # InfoType=DataValue + Overflow: the server's item queue dropped


def jsonable(v: Any) -> Any:
    """An OPC UA value as JSON-friendly data (arrays, structures, texts, ids, bytes)."""
    t = type(v)
    if v is None or t is float or t is int or t is bool or t is str:
        return v
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, datetime):
        return iso_z(v)
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, ua.LocalizedText):
        return v.Text
    if isinstance(v, ua.QualifiedName):
        return f"{v.NamespaceIndex}:{v.Name}"
    if isinstance(v, ua.NodeId):
        return v.to_string()
    if isinstance(v, ua.StatusCode):
        return v.name
    if isinstance(v, uuid.UUID):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)
                if f.name != "Encoding"}
    return str(v)


_STATUS_NAMES: dict[int, str] = {}


def status_name(code: ua.StatusCode | None) -> str:
    """``Good``, ``BadSensorFailure``, ``Good|Overflow`` … (cached per code)."""
    value = 0 if code is None else code.value
    name = _STATUS_NAMES.get(value)
    if name is None:
        name = ua.StatusCode(ua.UInt32(value & 0xFFFF0000)).name
        if value & OVERFLOW_BITS == OVERFLOW_BITS:
            name += "|Overflow"
        if len(_STATUS_NAMES) < 4096:
            _STATUS_NAMES[value] = name
    return name


def source_ts(dv: ua.DataValue) -> datetime:
    """SourceTimestamp, else ServerTimestamp, else now; always timezone-aware UTC."""
    ts = dv.SourceTimestamp or dv.ServerTimestamp
    if ts is None:
        return datetime.now(UTC)
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def sample_key(node: str, ts: datetime, value: Any, status: ua.StatusCode | None) -> str:
    """Identity of one sample: ``<node>@<source timestamp>#<digest of value and status>``.

    The timestamp alone is not enough: a server may report a second value in the same
    clock tick, or a new status (``UncertainLastUsableValue``) with the old timestamp; those
    are different samples. The same sample read live and again by HistoryRead gives the
    same key (the status's InfoBits — Overflow — are left out: they describe the queue,
    not the sample). ``value`` is the JSON-friendly form (``jsonable``)."""
    code = 0 if status is None else status.value & 0xFFFF0000
    digest = hashlib.blake2b(orjson.dumps([value, code], default=str,
                                          option=orjson.OPT_SORT_KEYS),
                             digest_size=6).hexdigest()
    return f"{node}@{iso_z(ts)}#{digest}"
