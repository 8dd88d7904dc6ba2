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

__all__ = ["MqttStations", "StationGroup"]


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
        """Wait for outstanding confirmations, then shut the simulator down."""
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

    @property
    def sent(self) -> int:
        return self.sim.publisher.published

    def confirmed(self) -> set[str]:
        return set(self.sim.publisher.acked)

    def key_of(self, event: dict[str, Any]) -> str | None:
        data = event.get("data")
        key = data.get("message_id") if isinstance(data, dict) else None
        return str(key) if key is not None else None
