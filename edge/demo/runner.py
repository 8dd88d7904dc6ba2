"""``edge demo``: the packaged demo.yaml with its own broker, stations and stand-in ERP.

Sequence::

    stand-ins for the ERP, QMS and supplier portal (in process) → MQTT broker (mosquitto
    child, or embedded) → station groups up → gateway with demo.yaml → sources connected
    → stations publish; the warehouse and MES tell the quality story (``edge.demo.story``:
      receipts, a hold episode with its supplier case, the release, a stuck lot) as
      ``---`` lines; a live line every second; optional ERP outage
    → stop (--duration or Ctrl-C) → stations wait for their PUBACKs → backlog drains
    → verdict: what the stations had confirmed vs what the ERP received

Everything listens on loopback only. State (outbox, broker files) lives in a temporary
directory removed at the end, unless ``state_dir`` is given. The local API listens on
127.0.0.1:8080 when that port is free, else on a free port; its URL is printed.
Returns 0 when nothing was lost or duplicated, 1 otherwise, 130 on a second Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import importlib.util
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.demo.broker import DemoBroker, free_port, start_broker
from edge.demo.stations import MqttStations, OpcUaStation, StationGroup
from edge.demo.story import PlantStory
from edge.demo.summary import Tally, Verdict, snapshot

if TYPE_CHECKING:
    from edge.app import Gateway

__all__ = ["Demo", "DemoOptions", "demo_config_text", "station_groups"]

API_PORT = 8080


@dataclass
class DemoOptions:
    duration_s: float | None = None  # None: until Ctrl-C
    outage_s: float = 0.0  # ERP down this long ...
    outage_at_s: float = 5.0  # ... starting this long after the stations start
    stations: int = 3
    rate: float = 20.0  # messages per second, all stations together
    state_dir: str | None = None
    broker: str = "auto"  # auto | mosquitto | embedded
    api: bool = True
    site: str = "demo-plant"
    drain_timeout_s: float = 60.0
    stuck_after_s: float = 15.0  # quality.stuck_after_s: when the story's unused lot is stuck


def demo_config_text() -> str:
    """The packaged demo configuration (edge/resources/demo.yaml)."""
    return importlib.resources.files("edge").joinpath("resources/demo.yaml").read_text()


def station_groups(broker: DemoBroker, options: DemoOptions,
                   out: Callable[[str], None] = print) -> list[StationGroup]:
    """The simulated equipment of the demo; add a protocol's group here. The warehouse and
    MES (``PlantStory``) come last: they tell their story around the stations."""
    opcua = OpcUaStation()
    return [
        MqttStations(broker.url, broker.protocol, site=options.site,
                     stations=options.stations, rate=options.rate),
        opcua,
        PlantStory(broker.url, broker.protocol, site=options.site, opcua=opcua, out=out),
    ]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True




class Demo:
    def __init__(self, options: DemoOptions, out: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.out = out or (lambda line: print(line, flush=True))
        self.verdict: Verdict | None = None
        self._stop = asyncio.Event()
        self._interrupts = 0
        self._outage_on = False
        self._receivers: list[Any] = []  # the QMS and portal stand-ins

    def stop(self) -> None:
        """End the run as a first Ctrl-C does: the stations stop, the backlog drains, then
        the verdict."""
        self._stop.set()

    # ------------------------------------------------------------------ signals

    def _on_signal(self, main: asyncio.Task[int] | None) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            self.out("stopping: stations stop, the backlog drains, then the verdict "
                     "(Ctrl-C again to quit now)")
            self._stop.set()
        elif main is not None:
            main.cancel()

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, main)
        temporary = self.options.state_dir is None
        workdir = Path(self.options.state_dir or tempfile.mkdtemp(prefix="edge-demo-"))
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        try:
            return await self._run(workdir, temporary)
        except asyncio.CancelledError:
            self.out("demo aborted")
            return 130
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            if temporary:
                shutil.rmtree(workdir, ignore_errors=True)

    async def _run(self, workdir: Path, temporary: bool) -> int:
        from edge.app import Gateway
        from edge.config import load_config_text
        from edge.sim.erp import ErpReceiver

        opts = self.options
        async with contextlib.AsyncExitStack() as stack:
            erp = await ErpReceiver().start()
            stack.push_async_callback(erp.stop)
            qms = await ErpReceiver().start()
            stack.push_async_callback(qms.stop)
            portal = await ErpReceiver().start()
            stack.push_async_callback(portal.stop)
            self._receivers = [qms, portal]
            broker = await start_broker(opts.broker, workdir)
            stack.push_async_callback(broker.stop)
            groups = station_groups(broker, opts, self.out)
            for group in groups:
                await group.start()
                stack.push_async_callback(group.shutdown)
            api_on = opts.api and importlib.util.find_spec("edge.api.server") is not None
            api_port = API_PORT if _port_free(API_PORT) else free_port()
            env = {
                **os.environ,
                "EDGE_DEMO_SITE": opts.site,
                "EDGE_DEMO_STATE_DIR": str(workdir / "state"),
                "EDGE_DEMO_ERP_URL": erp.url,
                "EDGE_DEMO_QMS_URL": qms.url,
                "EDGE_DEMO_PORTAL_URL": portal.url,
                "EDGE_DEMO_STUCK_AFTER_S": f"{opts.stuck_after_s:g}",
                "EDGE_DEMO_API_ENABLED": "true" if api_on else "false",
                "EDGE_DEMO_API_LISTEN": f"127.0.0.1:{api_port}",
            }
            for group in groups:
                env.update(group.env())
            cfg = load_config_text(demo_config_text(), base_dir=workdir, env=env)
            gw = Gateway(cfg)
            stack.push_async_callback(gw.stop)
            await gw.start()
            for group in groups:
                if isinstance(group, PlantStory):
                    group.gateway, group.qms, group.portal = gw, qms, portal
            self._banner(groups, broker, erp.url, workdir, temporary,
                         f"http://127.0.0.1:{api_port}/" if api_on else None)
            if not await self._wait_connected(gw, groups):
                return 1
            self._tally = Tally(groups)
            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                runs = [tg.create_task(g.run()) for g in groups]
                live = tg.create_task(self._live(gw, erp, started))
                outage = tg.create_task(self._outage(erp))
                await self._wait_stop(started)
                for group in groups:
                    group.stop()
                for task in runs:
                    await task
                outage.cancel()
                if self._outage_on:
                    erp.outage(False)
                    self._outage_on = False
                    self.out("--- ERP back (the demo is ending): the backlog drains")
                for group in groups:
                    await group.close()
                await self._drain(groups, erp)
                live.cancel()
            await self._settle(gw)
            line = await snapshot(gw)
            self.out(line.line(time.monotonic() - started, "up"))
            self._collect(erp)
            self.verdict = self._tally.verdict()
            self.out(self.verdict.line())
            if self.verdict.lost_examples:
                self.out(f"  lost, for example: {', '.join(self.verdict.lost_examples)}")
            return 0 if self.verdict.ok else 1

    def _banner(self, groups: list[StationGroup], broker: DemoBroker, erp_url: str,
                workdir: Path, temporary: bool, status_url: str | None) -> None:
        opts = self.options
        what = ", ".join(g.label for g in groups)
        self.out(f"edge demo: {what} → {broker.name} ({broker.url}, MQTT {broker.protocol}) "
                 f"→ gateway → stand-in ERP ({erp_url}), QMS and supplier portal; holds "
                 "back to the broker")
        self.out(f"  state:   {workdir}{' (temporary)' if temporary else ''}")
        if status_url:
            self.out(f"  status:  {status_url}  (JSON {status_url}status, "
                     f"Prometheus {status_url}metrics)")
        if opts.outage_s > 0:
            self.out(f"  outage:  the ERP goes down {opts.outage_at_s:g} s after start, "
                     f"for {opts.outage_s:g} s")
        until = f"for {opts.duration_s:g} s" if opts.duration_s else "until Ctrl-C"
        self.out(f"  running {until}; then the stations stop, the backlog drains and the "
                 "verdict compares what the stations had confirmed with what the ERP received")

    async def _wait_connected(self, gw: Gateway, groups: list[StationGroup]) -> bool:
        status = gw.status
        ids = [sid for g in groups for sid in g.source_ids]
        deadline = time.monotonic() + 20
        while not all(status[sid].connected for sid in ids):
            if time.monotonic() > deadline or self._stop.is_set():
                failed = [f"{sid}: {status[sid].error or _last_error(gw.sources[sid])}"
                          for sid in ids if not status[sid].connected]
                self.out(f"error: sources did not connect: {'; '.join(failed)}")
                return False
            await asyncio.sleep(0.05)
        return True

    async def _wait_stop(self, started: float) -> None:
        timeout = None
        if self.options.duration_s:
            timeout = max(0.0, started + self.options.duration_s - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout)

    def _collect(self, erp: object) -> None:
        """Move what the stand-in ERP accepted into the tally (keeps its memory flat)."""
        events = erp.events  # type: ignore[attr-defined]
        batch = events[:]
        del events[:len(batch)]
        erp.requests.clear()  # type: ignore[attr-defined]
        erp.accepted_ids.clear()  # type: ignore[attr-defined]
        self._tally.add(batch)
        for receiver in self._receivers:  # the QMS and portal: keep only the recent ones
            del receiver.events[:-1000]
            del receiver.requests[:-1000]
            receiver.accepted_ids.clear()

    async def _live(self, gw: object, erp: object, started: float) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._collect(erp)
            snap = await snapshot(gw)  # type: ignore[arg-type]
            state = "DOWN (outage)" if self._outage_on else "up"
            self.out(snap.line(time.monotonic() - started, state))

    async def _outage(self, erp: object) -> None:
        opts = self.options
        if opts.outage_s <= 0:
            return
        await asyncio.sleep(opts.outage_at_s)
        erp.outage(True)  # type: ignore[attr-defined]
        self._outage_on = True
        self.out(f"--- ERP outage for {opts.outage_s:g} s: the gateway keeps storing, "
                 "the backlog grows")
        await asyncio.sleep(opts.outage_s)
        erp.outage(False)  # type: ignore[attr-defined]
        self._outage_on = False
        self.out("--- ERP back: the backlog drains")

    async def _settle(self, gw: object, timeout_s: float = 5.0) -> None:
        """Let the forwarder record the last deliveries, so the final line shows them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not (await snapshot(gw)).backlog:  # type: ignore[arg-type]
                return
            await asyncio.sleep(0.05)

    async def _drain(self, groups: list[StationGroup], erp: object) -> None:
        """Wait until the ERP has every confirmed record (or the drain timeout)."""
        confirmed = [g.confirmed() for g in groups]
        deadline = time.monotonic() + self.options.drain_timeout_s
        while True:
            self._collect(erp)
            missing = self._tally.missing(confirmed)
            if not missing:
                return
            if time.monotonic() > deadline:
                self.out(f"the backlog did not drain within {self.options.drain_timeout_s:g} s "
                         f"({missing} records missing)")
                return
            await asyncio.sleep(0.2)


def _last_error(source: Any) -> str | None:
    """The source's own account of its last failure (built-ins report one in ``status()``)."""
    status = getattr(source, "status", None)
    return status().get("last_error") if callable(status) else None
