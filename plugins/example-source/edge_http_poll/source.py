"""The poll loop of ``http_poll``: poll, commit, then advance the cursor."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx

from edge.plugin import (
    ComponentContext,
    FatalStartupError,
    InputError,
    OutboxFullError,
    Submission,
    log_event,
    make_event,
    validate_data,
)
from edge_http_poll import HttpPollConfig

log = logging.getLogger(__name__)


class HttpPollSource:
    def __init__(self, config: HttpPollConfig, ctx: ComponentContext) -> None:
        if ctx.ingest is None:
            raise FatalStartupError("http_poll is a source: it needs ctx.ingest")
        self.id = config.id
        self.config = config
        self.ctx = ctx
        self.ingest = ctx.ingest
        self.cursor_file = Path(ctx.state_dir) / "http_poll" / f"{config.id}.cursor"

    async def run(self) -> None:
        cursor = await asyncio.to_thread(self._load_cursor)
        async with httpx.AsyncClient(timeout=self.config.timeout_s) as client:
            while True:
                records = await self._poll(client, cursor)
                if records:
                    await self._store(records)
                    cursor = records[-1][self.config.id_field]
                    await asyncio.to_thread(self._save_cursor, cursor)  # the ack
                if len(records) < self.config.max_records:
                    await asyncio.sleep(self.config.interval_s)

    async def _poll(self, client: httpx.AsyncClient, cursor: Any) -> list[dict[str, Any]]:
        """The station's records after ``cursor`` ([] when there is nothing usable)."""
        params = {} if cursor is None else {self.config.cursor_param: str(cursor)}
        try:
            async with asyncio.timeout(self.config.timeout_s):
                resp = await client.get(self.config.url, params=params)
            resp.raise_for_status()
            records = resp.json()
        except (httpx.HTTPError, OSError, TimeoutError, ValueError) as err:
            self._problem("station_unreachable", f"poll failed: {type(err).__name__}: {err}")
            return []
        id_field = self.config.id_field
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and id_field in r for r in records):
            self._problem("bad_answer", f"answer is not a JSON array of objects with "
                                        f"{id_field!r}; nothing stored")
            return []
        self.ctx.set_connected(True)
        self.ctx.set_condition("station_unreachable", None, "warning")
        self.ctx.set_condition("bad_answer", None, "warning")
        return records[: self.config.max_records]

    async def _store(self, records: list[dict[str, Any]]) -> None:
        """Commit the records; returns only once they are stored. A record that breaks the
        catalogue model of its event type is quarantined (kept with the reason) instead."""
        items = []
        for record in records:
            try:
                data = validate_data(self.config.event, record)
            except InputError as err:
                await self._quarantine(record, err)
                continue
            items.append(Submission(make_event(type=self.config.event, site=self.ctx.site,
                                               source=self.id, data=data),
                                    dedupe_key=str(record[self.config.id_field])))
        if not items:
            return
        while True:
            try:
                await self.ingest.submit(items, chain=self.id)
                return
            except OutboxFullError:
                # Not stored: keep the cursor (the station keeps the records) and wait.
                self.ctx.set_condition("backpressure", "outbox refuses events", "warning")
                await self.ingest.wait_accepting()
                self.ctx.set_condition("backpressure", None, "warning")
            # Any other OutboxError escapes: the gateway restarts the source with backoff,
            # and the cursor has not moved.

    async def _quarantine(self, record: dict[str, Any], err: InputError) -> None:
        raw = json.dumps(record, default=str).encode()
        meta = {"id": record.get(self.config.id_field), "url": self.config.url}
        while True:
            try:
                await self.ingest.quarantine(self.id, err.reason, raw, meta, err.detail)
                return
            except OutboxFullError:
                await self.ingest.wait_accepting()

    def _problem(self, code: str, message: str) -> None:
        self.ctx.set_connected(False)
        self.ctx.set_condition(code, message, "warning")
        log_event(log, logging.WARNING, message, source=self.id, url=self.config.url)

    def _load_cursor(self) -> Any:
        try:
            return json.loads(self.cursor_file.read_text())
        except FileNotFoundError:
            return None

    def _save_cursor(self, cursor: Any) -> None:
        self.cursor_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cursor_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cursor))
        os.replace(tmp, self.cursor_file)  # a lost cursor only re-reads: dedupe maps them
