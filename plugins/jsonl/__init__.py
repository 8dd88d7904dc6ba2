"""``type: jsonl`` — a drop-in sink plugin: append events to JSON-lines files.

For a local historian, an air-gapped export to a USB stick, or a second copy of every
quality record next to the ERP. Files are ``<directory>/<site>-<YYYY-MM-DD>.jsonl``
(``rotate: hourly`` adds ``-HH``), one canonical envelope per line, fsynced before the
events count as delivered. A crash between write and commit can repeat lines: readers
dedupe by the envelope's ``id``.

Loaded from the config's ``plugins_dir`` like any third-party plugin: it uses only the
public plugin SDK, ``edge.plugin``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from edge.plugin import (
    ComponentContext,
    ComponentType,
    Outcome,
    SinkConfigBase,
    StoredEvent,
    event_matches,
)

__all__ = ["COMPONENT", "JsonlSink", "JsonlSinkConfig"]


class JsonlSinkConfig(SinkConfigBase):
    type: Literal["jsonl"]
    directory: str = Field(description="folder for the .jsonl files (created if missing)")
    events: list[str] = Field(default_factory=lambda: ["*"],
                              description="event types to write; '*' = all, 'a.*' = prefix")
    rotate: Literal["daily", "hourly"] = "daily"
    fsync: bool = Field(True, description="fsync each batch before it counts as delivered")


class JsonlSink:
    def __init__(self, config: JsonlSinkConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.id = config.id
        self.site = ctx.site
        directory = Path(config.directory)
        self.directory = directory if directory.is_absolute() else Path(ctx.state_dir) / directory

    def accepts(self, event_type: str) -> bool:
        return event_matches(self.config.events, event_type)

    async def start(self) -> None:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        return None

    def _path(self) -> Path:
        fmt = "%Y-%m-%d-%H" if self.config.rotate == "hourly" else "%Y-%m-%d"
        return self.directory / f"{self.site}-{datetime.now(UTC).strftime(fmt)}.jsonl"

    def _write(self, lines: bytes) -> None:
        with open(self._path(), "ab") as f:
            f.write(lines)
            f.flush()
            if self.config.fsync:
                os.fsync(f.fileno())

    async def send(self, batch: Sequence[StoredEvent]) -> list[Outcome]:
        try:
            await asyncio.to_thread(self._write, b"".join(ev.body + b"\n" for ev in batch))
        except OSError as err:  # disk full, USB stick pulled: keep the events, retry later
            return [Outcome.retry(f"write failed: {err.strerror or err}")] * len(batch)
        return [Outcome.delivered()] * len(batch)


COMPONENT = ComponentType(
    kind="sink",
    type="jsonl",
    config_model=JsonlSinkConfig,
    factory=JsonlSink,
    description="append events to JSON-lines files (drop-in plugin example)",
)
