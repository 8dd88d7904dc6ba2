"""``FaultyErp``: the stand-in ERP behind a loopback TCP relay, with faults switched at run time.

HTTP-level faults (5xx, 429, 422, 3xx, 401, slow answers) are answered by the ERP itself
through ``ErpReceiver.intercept``; connection-level faults (reset, response lost after the
apply, down) are real TCP behaviour of ``edge.sim.tcp_relay.TcpRelay``. The gateway is
given ``erp.url`` (the relay). The README of this folder lists the faults and their
parameters.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Iterable
from email.utils import formatdate
from typing import Any

import orjson

from edge.sim.erp import Answer, ErpReceiver, RequestRecord
from edge.sim.tcp_relay import TcpRelay

__all__ = ["FAULTS", "FaultyErp"]

FAULTS = ("none", "5xx", "429_seconds", "429_date", "slow", "reset", "lost_after_apply",
          "down", "422", "3xx", "401")


class FaultyErp:
    def __init__(self, *, seed: int | None = None) -> None:
        self.receiver = ErpReceiver()
        self.relay: TcpRelay | None = None
        self.rng = random.Random(seed)
        self.fault = "none"
        self.params: dict[str, Any] = {}
        self.faults_applied: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> FaultyErp:
        await self.receiver.start()
        self.relay = await TcpRelay.start(self.receiver.port)
        self.relay.rng = random.Random(self.rng.random())
        self.receiver.intercept = self._intercept
        return self

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        await self.receiver.stop()

    async def __aenter__(self) -> FaultyErp:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        assert self.relay is not None, "start() first"
        return self.relay.http_url()

    # ------------------------------------------------------------------ records

    @property
    def requests(self) -> list[RequestRecord]:
        return self.receiver.requests

    @property
    def applied(self) -> list[dict[str, Any]]:
        """Events applied, in order; an event applied again appears again."""
        return self.receiver.events

    def applied_message_ids(self) -> set[str]:
        return {str(mid) for e in self.receiver.events
                if (mid := (e.get("data") or {}).get("message_id")) is not None}

    async def wait_for(self, predicate: Any, within_s: float) -> None:
        await self.receiver.wait_for(lambda _r: predicate(self), within_s)

    # ------------------------------------------------------------------ faults

    async def set_fault(self, name: str, **params: Any) -> None:
        """Switch to fault ``name`` (replacing the previous one); see the README's table."""
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")
        await self.clear()
        if name == "none":
            return
        self.fault, self.params = name, params
        self.faults_applied[name] += 1
        share = float(params.get("share", 1.0))
        relay = self.relay
        assert relay is not None
        if name == "reset":
            relay.reset_share = share
        elif name == "lost_after_apply":
            relay.lose_response_share = share
        elif name == "down":
            await relay.cut("reset")
        elif name == "slow":
            self.receiver.latency_s = float(params.get("latency_s", 1.0))

    async def clear(self) -> None:
        """Back to normal service."""
        self.fault, self.params = "none", {}
        self.receiver.latency_s = 0.0
        if self.relay is not None:
            self.relay.reset_share = self.relay.lose_response_share = 0.0
            if self.relay.mode != "up":
                await self.relay.restore()

    async def _intercept(self, events: list[dict[str, Any]], headers: dict[str, str]
                         ) -> Answer | None:
        name, params = self.fault, self.params
        if name in ("none", "slow", "reset", "lost_after_apply", "down"):
            return None
        if self.rng.random() >= float(params.get("share", 1.0)):
            return None
        if name == "5xx":
            return Answer(int(params.get("status", 503)), body="unavailable", fault=name)
        if name in ("429_seconds", "429_date"):
            return Answer(429, {"Retry-After": retry_after(name, params)}, "slow down", name)
        if name == "422":
            types = set(_as_tuple(params.get("types", ("nonconformance",))))
            bad = [e.get("id") for e in events if e.get("type") in types]
            if not bad:
                return None
            body = orjson.dumps({"error": "rejected type", "ids": bad}).decode()
            return Answer(422, body=body, fault=name)
        if name == "3xx":
            return Answer(int(params.get("status", 307)), {"Location": "/moved"}, "", name)
        if name == "401":
            return Answer(401, body='{"error":"unauthorized"}', fault=name)
        raise AssertionError(name)


def retry_after(name: str, params: dict[str, Any]) -> str:
    """The Retry-After value of a 429: delay-seconds, or an HTTP-date at least that far."""
    seconds = float(params.get("retry_after_s", 2))
    if name == "429_seconds":
        return str(math.ceil(seconds))
    return formatdate(math.ceil(time.time() + seconds), usegmt=True)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(str(v) for v in value)
    raise TypeError(f"types must be a string or a list of strings, got {value!r}")

