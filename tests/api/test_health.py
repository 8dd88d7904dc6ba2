"""/healthz and /readyz against a real gateway with its API on a loopback port."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from edge.errors import FatalStartupError
from tests.support import api_yaml, free_port, http_sink_yaml, submission


async def test_alive_and_ready_with_a_sink(gateways, erp):
    port = free_port()
    await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        alive = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert (alive.status_code, alive.json()) == (200, {"status": "alive"})
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")


async def test_ready_does_not_depend_on_the_receiver(gateways, erp):
    """Storing while the ERP is down is the job: readiness stays green."""
    port = free_port()
    erp.outage(True)
    gw = await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    await gw.pipeline.submit([submission("L1")])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/readyz")).status_code == 200


async def test_not_ready_under_backpressure(gateways, erp):
    # A budget smaller than the empty database: only protected rows, nothing to expire.
    port = free_port()
    gw = await gateways(api_yaml(port) + "outbox: {max_size_mb: 0.01}\nsinks:\n"
                        + http_sink_yaml(erp.url))
    assert not gw.outbox.accepting
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        ready = await client.get("/readyz")
        alive = await client.get("/healthz")
    assert ready.status_code == 503
    assert [r["code"] for r in ready.json()["reasons"]] == ["backpressure"]
    assert alive.status_code == 200


async def test_not_ready_once_the_outbox_is_closed(gateways, erp):
    port = free_port()
    gw = await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/readyz")).status_code == 200
        await gw.outbox.close()
        ready = await client.get("/readyz")
        status = await client.get("/status")
        alive = await client.get("/healthz")
    assert ready.status_code == 503
    assert [r["code"] for r in ready.json()["reasons"]] == ["outbox_closed"]
    assert status.status_code == 503 and "closed" in status.json()["error"]
    assert alive.status_code == 200


async def test_not_ready_without_sinks(gateways):
    port = free_port()
    await gateways(api_yaml(port) + "sinks: []\n")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert [r["code"] for r in ready.json()["reasons"]] == ["no_sinks"]


async def test_a_taken_port_is_a_clear_startup_error(gateways, erp):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(FatalStartupError) as info:
            await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))
    assert str(info.value) == f"api.listen 127.0.0.1:{port}: address already in use"


async def test_not_ready_while_outbox_writes_fail_with_a_storage_fault(gateways, erp):
    """Invariant 1: a storage fault at run time (here a corrupt page reported by SQLite in
    the middle of a write) stops acking; health says so until a write commits again."""
    import sqlite3

    from edge.errors import OutboxStorageError

    port = free_port()
    gw = await gateways(api_yaml(port) + "sinks:\n" + http_sink_yaml(erp.url))

    def corrupt_page(conn: sqlite3.Connection) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    with pytest.raises(OutboxStorageError):
        await gw.outbox._write(corrupt_page)
    with pytest.raises(OutboxStorageError):  # a submit in the same transaction fails too
        await asyncio.gather(gw.pipeline.submit([submission("L1")]),
                             gw.outbox._write(corrupt_page))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert [r["code"] for r in ready.json()["reasons"]] == ["outbox_storage"]
        await gw.pipeline.submit([submission("L2")])  # the disk is fine again
        assert (await client.get("/readyz")).status_code == 200
