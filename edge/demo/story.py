"""The quality story of the demo: the warehouse scanner and the MES around the stations.

A ``StationGroup`` (source ``mes`` in ``demo.yaml``) that publishes, over MQTT at QoS 1:

- goods receipts (``plant/<site>/warehouse/<location>/receipt``), with the supplier;
- lot dispositions (``plant/<site>/mes/lot/<lot>/status``), as the MES passes on what the
  QMS or the production order decided.

The story, told as ``---`` lines while the demo runs::

    --- receipt: lot LStation7-0001, 500 pcs BRG-6204 from supplier acme (warehouse scanner)
    --- receipt: lot LWH-0002, 200 pcs SHF-1120 from supplier globex (never inspected)
    --- hold: lot LStation7-0001 episode 1 (bore_diameter 10.21 above upper limit 10.05):
        on hold on the line's broker, supplier case for acme
    --- supplier case for acme, lot LStation7-0001: in the QMS and on the supplier portal
    --- release: lot LStation7-0001 released by QMS: A. Inspector (sorted 100 %, 1 part
        scrapped); the line's hold topic now says released
    --- stuck: lot LWH-0002 (globex) received 15 s ago, no result, no disposition

The OPC UA station inspects the received lot (its current lot) and one of its parts fails
on cue; the MES releases it a few seconds after the hold. The second receipt is never
inspected: once ``quality.stuck_after_s`` (15 s in the demo) has passed it is a stuck lot (``/status``, the
status page's *Lots* table, ``edge lots``, ``edge_lots_stuck``).

Around the story the MES does what a plant's would, so that only the story's lot sticks
out: a lot of the other stations that has seen no result for a while (the station moved
on) and never failed is released ("all parts passed"), and a lot on hold is released by
the QMS a few seconds after its episode opened (its next failure opens the next episode).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.sim.mqtt_station import Publisher, lot_status, receipt

if TYPE_CHECKING:
    from edge.app import Gateway
    from edge.demo.stations import OpcUaStation
    from edge.sim.erp import ErpReceiver

__all__ = ["PlantStory"]

STUCK_LOT = "LWH-0002"
SUPPLIER = "acme"
DECIDED_BY = "QMS: A. Inspector"


class PlantStory:
    """The warehouse scanner and the MES (see the module doc)."""

    label = "warehouse and MES"
    source_ids = ["mes"]

    def __init__(self, broker_url: str, protocol: str, *, site: str, opcua: OpcUaStation,
                 out: Callable[[str], None], passed_after_s: float = 1.5,
                 hold_for_s: float = 3.0) -> None:
        self.site = site
        self.opcua = opcua
        self.out = out
        self.passed_after_s = passed_after_s
        self.hold_for_s = hold_for_s
        self.publisher = Publisher(broker_url, protocol=protocol, client_id="edge-demo-warehouse-mes")
        self.gateway: Gateway | None = None  # set by the runner once the gateway started
        self.qms: ErpReceiver | None = None
        self.portal: ErpReceiver | None = None
        self.story_lots: set[str] = {STUCK_LOT}
        self.decided: set[tuple[str, int]] = set()  # (lot, episode) the MES decided
        self.told: set[str] = set()
        self._stop = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ StationGroup

    def env(self) -> dict[str, str]:
        return {}  # the broker's URL comes from the MQTT stations (the same broker)

    async def start(self) -> None:
        await asyncio.to_thread(self.publisher.start)

    async def run(self) -> None:
        assert self.gateway is not None, "the runner sets the gateway before run()"
        mes = asyncio.create_task(self._mes(), name="demo-mes")
        try:
            with contextlib.suppress(TimeoutError):
                await self._story()
            await self._stop.wait()
        finally:
            mes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mes

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self.publisher.wait_acked, 10)
            await asyncio.to_thread(self.publisher.stop)

    async def shutdown(self) -> None:
        await self.close()

    @property
    def sent(self) -> int:
        return self.publisher.published

    def confirmed(self) -> set[str]:
        return set(self.publisher.acked)

    def key_of(self, event: dict[str, Any]) -> str | None:
        data = event.get("data")
        key = data.get("message_id") if isinstance(data, dict) else None
        return str(key) if key is not None else None

    # ------------------------------------------------------------------ the story

    def _lot(self, lot_id: str) -> Any:
        assert self.gateway is not None
        return self.gateway.outbox.quality.lots.get(lot_id)

    async def _until(self, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Wait until ``check()`` is truthy (TimeoutError after ``timeout_s``) or the demo
        stops (returns None)."""
        async with asyncio.timeout(timeout_s):
            while not self._stop.is_set():
                found = check()
                if found:
                    return found
                await asyncio.sleep(0.1)
        return None

    async def _story(self) -> None:
        station = self.opcua.station
        lot = station.lot_id
        self.story_lots.add(lot)
        self.publisher.publish(*receipt(self.site, lot, supplier=SUPPLIER, quantity=500))
        self.out(f"--- receipt: lot {lot}, 500 pcs BRG-6204 from supplier {SUPPLIER} "
                 "(warehouse scanner)")
        self.publisher.publish(*receipt(self.site, STUCK_LOT, supplier="globex",
                                        material="SHF-1120", quantity=200, location="WH2"))
        self.out(f"--- receipt: lot {STUCK_LOT}, 200 pcs SHF-1120 from supplier globex "
                 "(never inspected)")
        if not await self._until(lambda: (row := self._lot(lot)) is not None
                                 and row.supplier == SUPPLIER):
            return
        await asyncio.sleep(1.0)  # a few good parts first
        station.fail_next(1)
        row = await self._until(lambda: (r := self._lot(lot)) is not None and r.blocked and r)
        if row is None:
            return
        self.out(f"--- hold: lot {lot} episode {row.episode} ({row.reason}): on hold on the "
                 f"line's broker, supplier case for {SUPPLIER}")
        if await self._until(lambda: self._case_arrived(lot)):
            self.out(f"--- supplier case for {SUPPLIER}, lot {lot}: in the QMS and on the "
                     "supplier portal")
        await asyncio.sleep(2.0)
        reason = "sorted 100 %, 1 part scrapped"
        self.publisher.publish(*lot_status(self.site, lot, "released", decided_by=DECIDED_BY,
                                           reason=reason))
        if await self._until(lambda: (r := self._lot(lot)) is not None
                             and r.state == "released"):
            self.out(f"--- release: lot {lot} released by {DECIDED_BY} ({reason}); the "
                     "line's hold topic now says released")

    def _case_arrived(self, lot: str) -> bool:
        """The lot's supplier case reached the QMS (an envelope) and the portal (the case
        itself: the portal's route sends ``data`` only)."""
        qms = self.qms is None or any(
            e.get("type") == "supplier.case" and (e.get("data") or {}).get("lot_id") == lot
            for e in self.qms.events)
        portal = self.portal is None or any(e.get("lot_id") == lot for e in self.portal.events)
        return qms and portal

    async def _mes(self) -> None:
        """Dispositions of the other lots, and the stuck lot's line."""
        assert self.gateway is not None
        gw = self.gateway
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for row in list(gw.outbox.quality.lots.values()):
                if row.lot_id in self.story_lots or (row.lot_id, row.episode) in self.decided:
                    continue
                if row.state == "unknown" and now - (row.last_at or row.first_seen) \
                        > self.passed_after_s:
                    self._decide(row.lot_id, row.episode, "MES", "all parts passed")
                elif row.state == "hold" and now - (row.opened_at or now) > self.hold_for_s:
                    self._decide(row.lot_id, row.episode, DECIDED_BY, "sorted, parts scrapped")
            if STUCK_LOT not in self.told:
                section = await gw.lot_monitor.section(gw.outbox)
                if any(s.get("lot_id") == STUCK_LOT for s in section.get("stuck_lots", [])):
                    self.told.add(STUCK_LOT)
                    self.out(f"--- stuck: lot {STUCK_LOT} (globex) received "
                             f"{section['stuck_after_s']:g} s ago or more, no result, no "
                             "disposition (status page: Lots)")

    def _decide(self, lot: str, episode: int, by: str, reason: str) -> None:
        self.decided.add((lot, episode))
        self.publisher.publish(*lot_status(self.site, lot, "released", decided_by=by,
                                           reason=reason))
