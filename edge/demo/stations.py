"""Simulated equipment of the demo: one ``StationGroup`` per protocol.

A group brings up its simulator, tells ``demo.yaml`` where it is (``env()`` values for
``${EDGE_DEMO_...}``), produces data while the demo runs and, at the end, names the
records that must have reached the ERP. Adding a protocol to the demo (e.g. the OPC UA
station of ``edge.sim.opcua_station``) means: its source block in ``demo.yaml`` with its
own ``${EDGE_DEMO_...}`` variables, a class here implementing ``StationGroup``, and one
line in ``edge.demo.runner.station_groups``.
"""

from __future__ import annotations

from typing import Any, Protocol

from edge.sim.mqtt_station import StationSimulator

__all__ = ["MqttStations", "OpcUaStation", "StationGroup"]


class StationGroup(Protocol):
    label: str
    source_ids: list[str]  # gateway sources reading this group (must be in demo.yaml)

    def env(self) -> dict[str, str]:
        """``${EDGE_DEMO_...}`` values this group's source block needs."""
        ...

    async def start(self) -> None:
        """Bring the simulator up (before the gateway starts)."""
        ...

    async def run(self) -> None:
        """Produce data until ``stop()`` (called once the sources are connected)."""
        ...

    def stop(self) -> None: ...

    async def close(self) -> None:
        """Wait for outstanding confirmations (the demo then judges what arrived)."""
        ...

    async def shutdown(self) -> None:
        """Shut the simulator down (after the gateway stopped); idempotent."""
        ...

    @property
    def sent(self) -> int:
        """Records produced."""
        ...

    def confirmed(self) -> set[str]:
        """Keys of the records the gateway was responsible for (see ``key_of``)."""
        ...

    def key_of(self, event: dict[str, Any]) -> str | None:
        """The key of a record as it arrives at the ERP (an event envelope)."""
        ...


class MqttStations:
    """Inspection stations publishing over MQTT (QoS 1) to the demo broker.

    A record counts as confirmed when the broker sent PUBACK to the station; from then on
    only the gateway can lose it. Events carry the publisher's ``msg_id`` as
    ``data.message_id`` (see ``demo.yaml``).
    """

    label = "MQTT stations"
    source_ids = ["line1"]

    def __init__(self, broker_url: str, protocol: str, *, site: str, stations: int,
                 rate: float) -> None:
        self.broker_url = broker_url
        self.protocol = protocol
        self.sim = StationSimulator(broker_url, site=site, stations=stations, rate=rate,
                                    protocol=protocol, client_id="edge-demo-stations")
        self._closed = False

    def env(self) -> dict[str, str]:
        return {"EDGE_DEMO_MQTT_URL": self.broker_url,
                "EDGE_DEMO_MQTT_PROTOCOL": self.protocol}

    async def start(self) -> None:
        await self.sim.start()

    async def run(self) -> None:
        await self.sim.run()

    def stop(self) -> None:
        self.sim.stop()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.sim.close(ack_timeout=10)

    async def shutdown(self) -> None:
        await self.close()

    @property
    def sent(self) -> int:
        return self.sim.publisher.published

    def confirmed(self) -> set[str]:
        return set(self.sim.publisher.acked)

    def key_of(self, event: dict[str, Any]) -> str | None:
        data = event.get("data")
        key = data.get("message_id") if isinstance(data, dict) else None
        return str(key) if key is not None else None


class OpcUaStation:
    """An OPC UA inspection station (``edge.sim.opcua_station``) read by the ``station7``
    source: readings as monitored items, results by the ResultReady trigger.

    The station works as real ones do with a handshake: it writes a result, sets
    ResultReady and waits until the gateway wrote ResultReady back to false — which the
    gateway does only after the result is committed. A result counts as confirmed then;
    from that moment only the gateway can lose it.
    """

    label = "OPC UA station"
    source_ids = ["station7"]

    def __init__(self, *, rate: float = 1.0, lot_period_s: float = 8.0) -> None:
        self.period_s = 1.0 / rate
        self.lot_period_s = lot_period_s
        self.station: Any = None
        self.results = 0
        self._acked: set[str] = set()
        self._stop = False
        self._closed = False

    def env(self) -> dict[str, str]:
        return {"EDGE_DEMO_OPCUA_ENDPOINT": self.station.endpoint}

    async def start(self) -> None:
        from edge.sim.opcua_station import start_station

        self.station = await start_station(port=0, name="Station7", auto=False,
                                           handshake=True)

    async def run(self) -> None:
        import asyncio
        import math
        import random

        loop = asyncio.get_running_loop()
        t0 = lot_started = loop.time()
        st = self.station
        while not self._stop:
            now = loop.time()
            if now - lot_started >= self.lot_period_s:
                st.next_lot()
                lot_started = now
            await st.write("Temperature", round(20.0 + 2.0 * math.sin((now - t0) / 30.0)
                                                + random.gauss(0, 0.05), 3))
            await st.write("SpindleSpeed", round(12000 + random.gauss(0, 15), 1))
            written = await st.publish_result()
            self.results += 1
            try:
                async with asyncio.timeout(30):
                    await st.wait_acknowledged()
            except TimeoutError:
                continue  # not stored (ERP outage does not matter here: the outbox does)
            self._acked.add(str(written["Serial"]))
            await asyncio.sleep(self.period_s)

    def stop(self) -> None:
        self._stop = True

    async def close(self) -> None:
        return None  # every confirmed result was acknowledged by the gateway already

    async def shutdown(self) -> None:
        # after the gateway stopped: stopping the server earlier would show up as a
        # connection loss (and a reconnect) in the gateway's last seconds
        if not self._closed and self.station is not None:
            self._closed = True
            await self.station.stop()

    @property
    def sent(self) -> int:
        return self.results

    def confirmed(self) -> set[str]:
        return set(self._acked)

    def key_of(self, event: dict[str, Any]) -> str | None:
        data = event.get("data")
        if event.get("source") != "station7" or event.get("type") != "inspection.result":
            return None
        serial = data.get("serial") if isinstance(data, dict) else None
        return str(serial) if serial is not None else None
