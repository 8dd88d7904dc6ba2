"""CAPA trigger: N nonconformances of one supplier's characteristic within the window emit
one ``capa.request``; the counts live in the outbox and survive a restart."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from edge.rules import CapaRule
from tests.quality.support import SPEC, capa, failing, receipt, rules_keys, stored

T0 = time.time() - 3000  # source times of the results, seconds apart


async def test_three_nonconformances_within_the_window_emit_one_request(lines) -> None:
    ln = await lines(SPEC, capa(3, window_s=3600))
    await ln.submit(receipt("A", supplier="acme"), receipt("B", supplier="acme"))
    await ln.submit(failing("A", "S1", at=T0))
    await ln.submit(failing("B", "S2", at=T0 + 60))
    assert stored(ln.path, "capa.request") == []
    [third] = await ln.submit(failing("B", "S3", at=T0 + 120))
    [req] = stored(ln.path, "capa.request")
    d = req["data"]
    assert (d["supplier"], d["characteristic"], d["count"]) == ("acme", "bore", 3)
    assert d["lot_ids"] == ["A", "B"] and len(d["nonconformance_ids"]) == 3
    assert set(d["nonconformance_ids"]) == {
        e["id"] for e in stored(ln.path, "nonconformance")}
    assert req["correlation_id"] == third  # the result that reached the threshold
    assert req["ordering_key"] == "supplier:acme"
    [key] = [k for k in rules_keys(ln.path) if k.startswith("capa:")]
    assert key == f"capa:acme:bore:{d['window_start']}"
    # counting starts afresh: the 4th and 5th do not emit, the 6th does
    await ln.submit(failing("B", "S4", at=T0 + 180), failing("B", "S5", at=T0 + 240))
    assert len(stored(ln.path, "capa.request")) == 1
    await ln.submit(failing("B", "S6", at=T0 + 300))
    assert len(stored(ln.path, "capa.request")) == 2


async def test_nonconformances_outside_the_window_or_of_other_groups_do_not_count(
        lines) -> None:
    ln = await lines(SPEC, capa(2, window_s=600))
    await ln.submit(receipt("A", supplier="acme"), receipt("C", supplier="other"))
    await ln.submit(failing("A", "S1", at=T0))
    await ln.submit(failing("A", "S2", at=T0 + 700))  # the first fell out of the window
    await ln.submit(failing("A", "S3", characteristic="width", at=T0 + 710))
    await ln.submit(failing("C", "S4", at=T0 + 720))  # another supplier
    await ln.submit(failing("N", "S5", at=T0 + 730))  # no supplier known: not counted
    assert stored(ln.path, "capa.request") == []
    await ln.submit(failing("A", "S6", at=T0 + 800))
    [req] = stored(ln.path, "capa.request")
    assert (req["data"]["characteristic"], req["data"]["count"]) == ("bore", 2)


async def test_counts_survive_a_restart(lines) -> None:
    ln = await lines(SPEC, capa(3))
    await ln.submit(receipt("A", supplier="acme"))
    await ln.submit(failing("A", "S1", at=T0), failing("A", "S2", at=T0 + 1))
    await ln.restart()
    await ln.submit(failing("A", "S3", at=T0 + 2))
    assert len(stored(ln.path, "capa.request")) == 1


async def test_a_threshold_reached_by_two_calls_at_once_emits_one_request(lines) -> None:
    """Each call counts 1 of 2 from the committed state, neither emits; together they
    reach the threshold in the outbox, and the catch-up after the commit emits once."""
    ln = await lines(SPEC, capa(2))
    await ln.submit(receipt("A", supplier="acme"))
    await asyncio.gather(ln.submit(failing("A", "S1", at=T0), chain="st1"),
                         ln.submit(failing("A", "S2", at=T0 + 1), chain="st2"))
    [req] = stored(ln.path, "capa.request")
    assert req["data"]["count"] == 2
    assert await ln.pipeline.catch_up() == 0
    assert ln.outbox.quality.due() == []


async def test_capa_rules_are_checked_at_load() -> None:
    with pytest.raises(ValidationError, match="must be fields of supplier"):
        CapaRule(type="capa", nonconformances=3, window_s=60, by=["vendor"])
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        CapaRule(type="capa", nonconformances=1, window_s=60)
    with pytest.raises(ValidationError, match="names a field twice"):
        CapaRule(type="capa", nonconformances=2, window_s=60, by=["supplier", "supplier"])
    with pytest.raises(ValidationError, match="window_s"):
        CapaRule(type="capa", nonconformances=2, window_s=0)
