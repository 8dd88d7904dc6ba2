"""Resolve and check the configured nodes against the server, once per connect.

Contract: ``await resolve(client, source_id, cfg, timeout_s)`` returns a ``Resolved``
(every configured reference → its NodeId and what was read of it) or raises
``FatalStartupError`` listing EVERY problem with its location, e.g.::

    sources[station7].monitored[3].node: BadNodeIdUnknown (ns=2;s=Station7.Nope)
    sources[station7].triggers[0].when: true does not fit the node's data type Int32

A source knows only its id, so locations name it as ``sources[<id>]``. Network failures
raise as they are (the caller classifies them as retryable).

All checks are batched: one TranslateBrowsePaths and one Read per 500 nodes, so a source
with thousands of monitored items starts in a few round trips.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from asyncua import Client, ua

from edge.plugin import FatalStartupError
from edge.sources.opcua.config import OpcUaSourceConfig

__all__ = ["NodeInfo", "Resolved", "resolve", "value_kind"]

CHUNK = 500

_NUMERIC_TYPES = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 26, 27, 28, 50}
_NUMERIC_VARIANTS = {
    ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
    ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64,
    ua.VariantType.Float, ua.VariantType.Double,
}
_ROOTS = {"Objects": "0:Objects", "Types": "0:Types", "Views": "0:Views"}


@dataclass
class NodeInfo:
    """What the server said about one configured node reference."""

    ref: str
    node_id: ua.NodeId
    node_class: int = 0
    data_type: ua.NodeId | None = None
    data_type_name: str = "?"
    user_access: int = 0
    variant_type: ua.VariantType | None = None
    value: Any = None

    @property
    def historizes(self) -> bool:
        return bool(self.user_access & ua.AccessLevel.HistoryRead.mask)

    @property
    def writable(self) -> bool:
        return bool(self.user_access & ua.AccessLevel.CurrentWrite.mask)

    @property
    def readable(self) -> bool:
        return bool(self.user_access & ua.AccessLevel.CurrentRead.mask)


@dataclass
class Resolved:
    nodes: dict[str, NodeInfo] = field(default_factory=dict)

    def __getitem__(self, ref: str) -> NodeInfo:
        return self.nodes[ref]


def value_kind(info: NodeInfo) -> str:
    """``bool`` | ``number`` | ``string`` | ``other`` from the value's type, else DataType."""
    vt = info.variant_type
    if vt is not None and vt is not ua.VariantType.Null:
        if vt is ua.VariantType.Boolean:
            return "bool"
        if vt in _NUMERIC_VARIANTS:
            return "number"
        if vt is ua.VariantType.String:
            return "string"
        return "other"
    dt = info.data_type
    if dt is not None and dt.NamespaceIndex == 0 and isinstance(dt.Identifier, int):
        if dt.Identifier == 1:
            return "bool"
        if dt.Identifier in _NUMERIC_TYPES:
            return "number"
        if dt.Identifier == 12:
            return "string"
    return "other"


async def resolve(
    client: Client, source_id: str, cfg: OpcUaSourceConfig, timeout_s: float
) -> Resolved:
    """Resolve every configured node; raise FatalStartupError with located issues."""
    where = f"sources[{source_id}]"
    refs: dict[str, str] = {}  # ref -> first location (for messages)
    for i, m in enumerate(cfg.monitored):
        refs.setdefault(m.node, f"{where}.monitored[{i}].node")
    for i, t in enumerate(cfg.triggers):
        refs.setdefault(t.node, f"{where}.triggers[{i}].node")
        for name, ref in t.read.items():
            refs.setdefault(ref, f"{where}.triggers[{i}].read.{name}")
        if t.ack is not None:
            refs.setdefault(t.ack.node, f"{where}.triggers[{i}].ack.node")

    issues: list[str] = []
    ids = await _node_ids(client, refs, issues, timeout_s)
    infos = await _read_infos(client, ids, refs, issues, timeout_s)
    resolved = Resolved(infos)
    _check_duplicates(cfg, resolved, where, issues)
    await _check_items(client, cfg, resolved, where, issues, timeout_s)
    if issues:
        raise FatalStartupError("; ".join(issues))
    return resolved


async def _node_ids(
    client: Client, refs: dict[str, str], issues: list[str], timeout_s: float
) -> dict[str, ua.NodeId]:
    out: dict[str, ua.NodeId] = {}
    ns_array: list[str] | None = None
    paths: list[str] = []
    for ref, loc in refs.items():
        if ref.startswith("/"):
            paths.append(ref)
            continue
        text = ref
        if text.startswith("nsu="):
            if ns_array is None:
                async with asyncio.timeout(timeout_s):
                    ns_array = await client.get_namespace_array()
            uri, _, rest = text[4:].partition(";")
            if uri not in ns_array:
                issues.append(f"{loc}: namespace {uri!r} is not on the server "
                              f"(it has {', '.join(ns_array)})")
                continue
            text = f"ns={ns_array.index(uri)};{rest}"
        try:
            out[ref] = ua.NodeId.from_string(text)
        except (ValueError, ua.UaError) as err:
            issues.append(f"{loc}: not a valid NodeId ({err})")
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        rel = ["/" + "/".join(_ROOTS.get(s, s) for s in p.split("/")[1:]) for p in chunk]
        async with asyncio.timeout(timeout_s):
            results = await client.translate_browsepaths(
                ua.NodeId(ua.Int32(ua.ObjectIds.RootFolder)), rel)
        for ref, res in zip(chunk, results, strict=True):
            if not res.StatusCode.is_good() or not res.Targets:
                issues.append(f"{refs[ref]}: {res.StatusCode.name} (no node at {ref})")
                continue
            target = res.Targets[0].TargetId  # an ExpandedNodeId; keep the local part
            out[ref] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
    return out


_ATTRS = (ua.AttributeIds.NodeClass, ua.AttributeIds.DataType, ua.AttributeIds.UserAccessLevel,
          ua.AttributeIds.Value)


async def _read_infos(
    client: Client, ids: dict[str, ua.NodeId], refs: dict[str, str], issues: list[str],
    timeout_s: float,
) -> dict[str, NodeInfo]:
    items = list(ids.items())
    infos: dict[str, NodeInfo] = {}
    step = max(1, CHUNK // len(_ATTRS))
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        params = ua.ReadParameters()
        for _, nid in chunk:
            for attr in _ATTRS:
                params.NodesToRead.append(ua.ReadValueId(NodeId=nid, AttributeId=attr))
        async with asyncio.timeout(timeout_s):
            values = await client.uaclient.read(params)
        for k, (ref, nid) in enumerate(chunk):
            nc, dt, acc, val = values[k * 4:(k + 1) * 4]
            loc = refs[ref]
            if not _good(nc) or nc.Value is None:
                issues.append(f"{loc}: {_status(nc)} ({ref})")
                continue
            info = NodeInfo(ref, nid, node_class=int(nc.Value.Value))
            if info.node_class != ua.NodeClass.Variable:
                issues.append(f"{loc}: {ref} is a{_article(info.node_class)} "
                              f"{ua.NodeClass(info.node_class).name}, not a Variable")
                continue
            if _good(dt) and dt.Value is not None:
                info.data_type = dt.Value.Value
            if _good(acc) and acc.Value is not None:
                info.user_access = int(acc.Value.Value)
            if val.Value is not None:
                info.variant_type = val.Value.VariantType
                info.value = val.Value.Value
            infos[ref] = info
    if infos:
        await _name_types(client, list(infos.values()), timeout_s)
    return infos


def _good(dv: ua.DataValue) -> bool:
    return dv.StatusCode is None or dv.StatusCode.is_good()


def _status(dv: ua.DataValue) -> str:
    return "Good" if dv.StatusCode is None else dv.StatusCode.name


def _article(node_class: int) -> str:
    name = ua.NodeClass(node_class).name
    return "n" if name[:1] in "AEIOU" else ""


async def _name_types(client: Client, infos: list[NodeInfo], timeout_s: float) -> None:
    """Fill ``data_type_name`` (BrowseName of the DataType) for readable messages."""
    types = {i.data_type for i in infos if i.data_type is not None}
    names: dict[ua.NodeId, str] = {}
    for t in types:
        if t.NamespaceIndex == 0 and isinstance(t.Identifier, int):
            names[t] = ua.ObjectIdNames.get(t.Identifier, str(t))
    missing = [t for t in types if t not in names]
    if missing:
        params = ua.ReadParameters()
        for t in missing:
            params.NodesToRead.append(ua.ReadValueId(NodeId=t, AttributeId=ua.AttributeIds.BrowseName))
        async with asyncio.timeout(timeout_s):
            values = await client.uaclient.read(params)
        for t, dv in zip(missing, values, strict=True):
            names[t] = dv.Value.Value.Name if _good(dv) and dv.Value else str(t)
    for i in infos:
        if i.data_type is not None:
            i.data_type_name = names.get(i.data_type, str(i.data_type))


def _check_duplicates(
    cfg: OpcUaSourceConfig, resolved: Resolved, where: str, issues: list[str]
) -> None:
    seen: dict[ua.NodeId, str] = {}
    for i, m in enumerate(cfg.monitored):
        info = resolved.nodes.get(m.node)
        if info is None:
            continue
        if info.node_id in seen:
            issues.append(f"{where}.monitored[{i}].node: {m.node} is the same node as "
                          f"{seen[info.node_id]}")
        seen[info.node_id] = f"monitored {m.node}"


async def _check_items(
    client: Client, cfg: OpcUaSourceConfig, resolved: Resolved, where: str, issues: list[str],
    timeout_s: float,
) -> None:
    percent: list[tuple[str, NodeInfo]] = []
    for i, m in enumerate(cfg.monitored):
        info = resolved.nodes.get(m.node)
        if info is None:
            continue
        loc = f"{where}.monitored[{i}]"
        if not info.readable:
            issues.append(f"{loc}.node: {m.node} is not readable for this user")
        if m.deadband is not None:
            if value_kind(info) != "number":
                issues.append(f"{loc}.deadband: needs a numeric node; {m.node} is "
                              f"{info.data_type_name}")
            elif m.deadband.percent is not None:
                percent.append((f"{loc}.deadband.percent", info))
    for i, t in enumerate(cfg.triggers):
        loc = f"{where}.triggers[{i}]"
        info = resolved.nodes.get(t.node)
        if info is not None:
            kind = value_kind(info)
            ok = {
                "bool": isinstance(t.when, bool),
                "number": isinstance(t.when, (int, float)) and not isinstance(t.when, bool),
                "string": isinstance(t.when, str),
            }.get(kind, False)
            if not ok:
                shown = str(t.when).lower() if isinstance(t.when, bool) else repr(t.when)
                issues.append(f"{loc}.when: {shown} does not fit the node's data type "
                              f"{info.data_type_name}")
        if t.ack is not None:
            ack = resolved.nodes.get(t.ack.node)
            if ack is not None and not ack.writable:
                issues.append(f"{loc}.ack.node: {t.ack.node} is not writable for this user")
    for k in range(0, len(percent), CHUNK):
        chunk = percent[k:k + CHUNK]
        paths = []
        for _, info in chunk:
            bp = ua.BrowsePath()
            bp.StartingNode = info.node_id
            bp.RelativePath = ua.RelativePath.from_string("/0:EURange")
            paths.append(bp)
        async with asyncio.timeout(timeout_s):
            results = await client.uaclient.translate_browsepaths_to_nodeids(paths)
        for (loc, info), res in zip(chunk, results, strict=True):
            if not res.StatusCode.is_good() or not res.Targets:
                issues.append(f"{loc}: the server has no EURange for {info.ref}; "
                              "use an absolute deadband")
