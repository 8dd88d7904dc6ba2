"""Dead configuration in a loaded config: warnings ``check-config`` prints (exit 1 with
``--strict``). Pure functions over the validated config, no I/O.

Three checks, each conservative (a warning only when the config shows the thing is dead):

- a sink route (``routes[].events``, the nats sink's ``events``) naming an exact event type
  that no source mapping produces and no rule derives; ``*`` and ``a.*`` patterns are never
  dead, and nothing is said when a source of an unknown shape (a plugin without ``event``
  keys) might produce anything;
- a source mapping (subscription, file, monitored item, trigger, alarm) whose event type no
  sink route consumes (its events would be stored and never sent);
- a ``spec_limits`` rule whose ``field`` none of the mappings of its event types provides
  (``fields``, ``read``, ``static``); a mapping without an explicit field list (a monitored
  item, Sparkplug B metrics) might provide anything, so it silences the warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from edge.delivery import event_matches
from edge.errors import ConfigIssue

__all__ = ["DERIVED_TYPES", "OPERATOR_TYPES", "lint"]

DERIVED_TYPES = frozenset({"quality.hold", "nonconformance", "supplier.case", "notification",
                           "capa.request", "lot.status", "quality.release"})
"""Types the quality rules and lot reconciliation derive (edge.quality)."""

OPERATOR_TYPES = frozenset({"lot.status", "quality.release"})
"""Types an operator's lot decision (``edge lot release``) produces with no rule at all."""


def _mappings(source: BaseModel, where: str) -> Iterator[tuple[str, BaseModel]]:
    """Every nested model of a source with a string ``event`` (its event type)."""
    for name in type(source).model_fields:
        value = getattr(source, name, None)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel) and isinstance(getattr(item, "event", None), str):
                loc = f"{where}.{name}[{i}]" if isinstance(value, list) else f"{where}.{name}"
                yield loc, item


def _routes(sink: BaseModel, where: str) -> Iterator[tuple[str, list[str]]]:
    """``(location, patterns)`` of each route of a sink."""
    routes = getattr(sink, "routes", None)
    if isinstance(routes, list):
        for i, route in enumerate(routes):
            events = getattr(route, "events", None)
            if isinstance(events, list):
                yield f"{where}.routes[{i}].events", events
    events = getattr(sink, "events", None)
    if isinstance(events, list):
        yield f"{where}.events", events


def _provided_fields(mapping: BaseModel) -> set[str] | None:
    """Data fields a mapping sets, or None when it does not say (anything may come)."""
    explicit = [getattr(mapping, key, None) for key in ("fields", "read")]
    if not any(isinstance(v, dict) and v for v in explicit):
        return None
    out: set[str] = set()
    for key in ("fields", "read", "static"):
        value = getattr(mapping, key, None)
        if isinstance(value, dict):
            out.update(value)
    return out


def lint(cfg: Any) -> list[ConfigIssue]:
    """Every dead-configuration warning of a loaded gateway config, located."""
    out: list[ConfigIssue] = []
    produced: dict[str, list[tuple[str, BaseModel]]] = {}
    unknown_source = False
    for i, source in enumerate(cfg.sources):
        found = list(_mappings(source, f"sources[{i}]"))
        if not found:
            unknown_source = True
        for loc, mapping in found:
            produced.setdefault(mapping.event, []).append((loc, mapping))  # type: ignore[attr-defined]

    rules = list(getattr(cfg, "rules", []) or [])
    quality = getattr(cfg, "quality", None)
    derives = bool(rules) or getattr(quality, "reconcile", None) is not None
    producible = set(produced) | set(OPERATOR_TYPES) | (set(DERIVED_TYPES) if derives else set())

    consumers: list[str] = []
    for j, sink in enumerate(cfg.sinks):
        for loc, patterns in _routes(sink, f"sinks[{j}]"):
            consumers.extend(patterns)
            if unknown_source:
                continue
            for pattern in patterns:
                if pattern == "*" or pattern.endswith(".*") or pattern in producible:
                    continue
                out.append(ConfigIssue(loc, f"no source, rule or operator action produces "
                                            f"event type {pattern!r}: this route never sends"))

    for event_type, mappings in produced.items():
        if not event_matches(consumers, event_type):
            for loc, _ in mappings:
                out.append(ConfigIssue(f"{loc}.event", f"no sink route consumes event type "
                                                       f"{event_type!r}: its events are stored "
                                                       "and never sent"))

    for k, rule in enumerate(rules):
        field = getattr(rule, "field", None)
        events = getattr(rule, "events", None)
        if getattr(rule, "type", None) != "spec_limits" or not isinstance(field, str):
            continue
        matching = [m for t, ms in produced.items() if event_matches(events or [], t) for _, m in ms]
        if not matching or unknown_source:
            continue
        provided = [_provided_fields(m) for m in matching]
        if any(p is None or field in p for p in provided):
            continue
        out.append(ConfigIssue(f"rules[{k}].field", f"no mapping of {', '.join(events or [])} "
                                                     f"provides field {field!r}: the rule "
                                                     "never sees a value"))
    return out
