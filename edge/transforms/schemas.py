"""Moved: the data models of the event types are the event catalogue,
``edge.events.catalogue`` (docs/events.md). These names stay for existing imports."""

from __future__ import annotations

from edge.events.catalogue import SCHEMAS, validate_data

__all__ = ["SCHEMAS", "validate_data"]
