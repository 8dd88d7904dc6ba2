"""Fixtures shared by the outbox tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.outbox import Outbox


@pytest.fixture
async def erp_outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    """An open outbox that routes every event to one sink, ``erp``; its maintenance does
    not run during a test (budget and pruning are called explicitly where tested)."""
    ob = Outbox(tmp_path, router=lambda ev: ["erp"], maintenance_interval_s=3600)
    await ob.open()
    try:
        yield ob
    finally:
        await ob.close()
