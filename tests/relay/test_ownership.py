"""Ownership's fencing rule without a server: an owner stops delivering a partition once
its last renewal is older than the lease TTL minus the margin, before the key can expire
and another relay can take it."""

from __future__ import annotations

import asyncio
from typing import Any

from edge.components import StoredEvent
from edge.events import EventClass
from edge.relay.ownership import MARGIN, Ownership
from edge.relay.queue import RelayQueue, Row


async def _noop(*_: Any) -> None:
    return None


def test_holds_only_while_the_last_renewal_is_fresh() -> None:
    now = [100.0]
    own = Ownership(None, "B", "r1", 4, 10.0, _noop, _noop, clock=lambda: now[0])
    own.owned[2] = 7
    own.renewed_at[2] = 100.0
    assert own.holds(2)
    now[0] = 100.0 + 10.0 * (1 - MARGIN) - 0.01
    assert own.holds(2)
    now[0] = 100.0 + 10.0 * (1 - MARGIN)
    assert not own.holds(2), "stops before the key (TTL 10 s) can expire"
    assert not own.holds(3), "never a partition it does not own"


async def test_a_queue_leases_nothing_from_a_partition_it_may_not_deliver() -> None:
    held = {0: True, 1: False}
    queue = RelayQueue(None, fetch_batch=10, max_pending=10,  # type: ignore[arg-type]
                       holds=lambda p: held[p])
    for p in (0, 1):
        feed = queue.feeds.setdefault("erp", {})
        from edge.relay.queue import Feed

        f = Feed("erp", p, None)
        feed[p] = f
        ev = StoredEvent(seq=10 + p, id=f"e{p}", type="inspection.result",
                         event_class=EventClass.high, ordering_key=f"lot:{p}", attempts=0,
                         body=b"{}")
        f.rows[ev.seq] = Row(ev, None, "s")
        queue._where.setdefault("erp", {})[ev.seq] = f
    got = await queue.lease("erp", 10)
    assert [e.id for e in got] == ["e0"]
    held[1] = True
    got = await queue.lease("erp", 10)
    assert [e.id for e in got] == ["e1"], "once held again it delivers"
    await asyncio.sleep(0)
