"""Fixtures of the quality tests: a real outbox with the pipeline and its rules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge.outbox import Outbox
from edge.pipeline import Pipeline
from edge.rules import build_rules
from tests.quality.support import SPEC


class Line:
    """An outbox in ``state`` routing every event to ``erp``, and the pipeline over it.
    ``restart()`` closes and opens it again (what survives is what the file kept)."""

    def __init__(self, state: Path, rules: Sequence[Any]) -> None:
        self.state = state
        self.rules = list(rules)
        self.outbox: Outbox | None = None
        self.pipeline: Pipeline | None = None

    @property
    def path(self) -> str:
        return str(self.state / "outbox.db")

    async def open(self) -> Line:
        self.outbox = Outbox(self.state, router=lambda ev: ["erp"],
                             maintenance_interval_s=3600)
        await self.outbox.open()
        self.pipeline = Pipeline(self.outbox, build_rules(self.rules, "test-site"))
        return self

    async def close(self) -> None:
        if self.outbox is not None:
            await self.outbox.close()
            self.outbox = None

    async def restart(self) -> None:
        await self.close()
        await self.open()

    async def submit(self, *items: Any, chain: str | None = None) -> list[str]:
        assert self.pipeline is not None
        return await self.pipeline.submit(list(items), chain=chain)

    def lot(self, lot_id: str) -> Any:
        assert self.outbox is not None
        return self.outbox.quality.lots.get(lot_id)


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[Line]:
    """A line with the spec_limits rule 9.95 … 10.05 (hold, nonconformance, supplier case,
    notifications to procurement and planning)."""
    made = await Line(tmp_path / "state", [SPEC]).open()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def lines(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await lines(*rules)`` → an open Line with those rules (closed at teardown)."""
    made: list[Line] = []

    async def make(*rules: Any) -> Line:
        ln = await Line(tmp_path / f"state{len(made)}", rules).open()
        made.append(ln)
        return ln

    try:
        yield make
    finally:
        for ln in made:
            await ln.close()


@pytest.fixture
async def quality_gateways(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await quality_gateways(yaml_body, quality=QualityConfig(...), rules=[...])`` → a
    started Gateway (``tests.fixtures.gateway.gateways`` plus the ``quality:`` section and
    extra rules, see ``with_quality``); all are stopped at teardown. The config is also
    written to ``tmp_path / "edge.yaml"`` for the CLI."""
    import textwrap

    from edge.app import Gateway
    from edge.config import load_config_text
    from tests.quality.support import with_quality

    made: list[Gateway] = []

    async def make(body: str, *, quality: Any = None, rules: Sequence[Any] = (),
                   start: bool = True) -> Gateway:
        text = f"site: test-site\nstate_dir: {tmp_path / 'state'}\n" + textwrap.dedent(body)
        if "\napi:" not in "\n" + body:
            text += "api: {enabled: false}\n"
        (tmp_path / "edge.yaml").write_text(text)
        cfg = with_quality(load_config_text(text, base_dir=tmp_path), rules=rules,
                           quality=quality)
        gw = Gateway(cfg)
        made.append(gw)
        if start:
            await gw.start()
        return gw

    try:
        yield make
    finally:
        for gw in made:
            await gw.stop()
