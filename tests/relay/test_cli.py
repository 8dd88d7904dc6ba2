"""``edge relay`` and ``edge relay dlq`` as an operator types them, and the config errors
a relay's file gets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import load_config_text
from edge.errors import ConfigError
from edge.relay.deadletters import DeadLetters
from edge.relay.relay import Relay
from edge.sim.erp import ErpReceiver
from tests.relay.conftest import Tier
from tests.support import eventually


def edge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=60)


async def test_dlq_list_and_replay_from_the_command_line(tier: Tier, tmp_path: Path) -> None:
    async with ErpReceiver() as erp:
        erp.reject(lambda e: e["data"]["n"] == 0, 422)
        text = tier.relay_yaml(erp.url, relay_id="r1")
        cfg_file = tmp_path / "relay.yaml"
        cfg_file.write_text(text)
        cfg = load_config_text(text, base_dir=tmp_path)
        r = Relay(cfg)  # type: ignore[arg-type]
        await r.start()
        try:
            for n in range(3):
                await tier.publish("A", n)
            dead = DeadLetters(tier.js, r.rc)
            await dead.setup()

            async def parked_two() -> bool:
                return len(await dead.entries("erp", "lot:A")) == 3

            await eventually(parked_two, timeout=30, what="a dead letter and two parked")
            out = await asyncio.to_thread(edge, "relay", "dlq", "list", "-c", str(cfg_file),
                                          "--json", cwd=tmp_path)
            assert out.returncode == 0, out.stderr
            listed = json.loads(out.stdout)
            assert [d["kind"] for d in listed["dead_letters"]] == [
                "dead_letter", "parked", "parked"]
            assert listed["dead_letters"][0]["status"] == "422"
            assert listed["parked"][0]["key"] == "lot:A"
            text_out = await asyncio.to_thread(edge, "relay", "dlq", "list", "-c",
                                               str(cfg_file), cwd=tmp_path)
            assert "1 parked key(s), 3 dead-letter message(s)" in text_out.stdout

            missing = await asyncio.to_thread(
                edge, "relay", "dlq", "replay", "-c", str(cfg_file), "--sink", "erp",
                "--key", "lot:Z", "--reason", "x", cwd=tmp_path)
            assert missing.returncode == 1 and "no dead letters" in missing.stderr

            erp.clear_rejects()
            rep = await asyncio.to_thread(
                edge, "relay", "dlq", "replay", "-c", str(cfg_file), "--sink", "erp",
                "--key", "lot:A", "--reason", "master data fixed", "--by", "qa",
                cwd=tmp_path)
            assert rep.returncode == 0, rep.stderr
            await eventually(lambda: [e["data"]["n"] for e in erp.events] == [0, 1, 2],
                             timeout=30, what="the replayed lot in order")
        finally:
            r.stop()
            await r.close()


async def test_discard_drops_the_dead_letters_and_lets_the_key_flow(tier: Tier,
                                                                     tmp_path: Path) -> None:
    async with ErpReceiver() as erp:
        erp.reject(lambda e: e["data"]["n"] == 0, 400)
        cfg = load_config_text(tier.relay_yaml(erp.url, relay_id="r1"), base_dir=tmp_path)
        r = Relay(cfg)  # type: ignore[arg-type]
        await r.start()
        try:
            await tier.publish("A", 0)
            await tier.publish("A", 1)
            dead = DeadLetters(tier.js, r.rc)
            await dead.setup()

            async def parked() -> bool:
                return len(await dead.entries("erp", "lot:A")) == 2

            await eventually(parked, timeout=30)
            park = await dead.state("erp", "lot:A")
            assert park is not None
            assert await dead.set_state(park, "discard", by="qa", why="test lot")

            async def gone() -> bool:
                return (await dead.state("erp", "lot:A") is None
                        and await dead.entries("erp", "lot:A") == [])

            await eventually(gone, timeout=30, what="the key's dead letters discarded")
            assert erp.events == []
            await tier.publish("A", 2)
            await eventually(lambda: [e["data"]["n"] for e in erp.events] == [2], timeout=30)
        finally:
            r.stop()
            await r.close()


def test_relay_config_errors_are_located(tmp_path: Path) -> None:
    base = ("site: r\nrelay: {stream: S}\nsinks:\n  - {id: erp, type: http, "
            "url: 'http://127.0.0.1:9', routes: [{events: ['*'], method: POST, path: /e}]}\n")
    load_config_text(base, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="remove `sources`"):
        load_config_text(base + "sources:\n  - {id: l, type: mqtt, url: 'mqtt://127.0.0.1:1'"
                         ", subscriptions: [{topic: a, event: inspection.result}]}\n",
                         base_dir=tmp_path)
    with pytest.raises(ConfigError, match="filter"):
        load_config_text(base.replace("{stream: S}", "{stream: S, filter: 'plant.>'}"),
                         base_dir=tmp_path)
    with pytest.raises(ConfigError, match="relay sink ids"):
        load_config_text(base.replace("id: erp", "id: erp.eu"), base_dir=tmp_path)


def test_edge_run_refuses_a_relay_config_and_check_config_accepts_it(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.yaml"
    cfg.write_text("site: r\nrelay: {stream: S, partitions: 8}\nsinks:\n  - {id: erp, type: "
                   "http, url: 'http://127.0.0.1:9', routes: [{events: ['*'], method: POST, "
                   "path: /e}]}\n")
    run = edge("run", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 2 and "edge relay -c FILE" in run.stderr
    check = edge("check-config", str(cfg), cwd=tmp_path)
    assert check.returncode == 0 and "relay of stream S (8 partitions)" in check.stdout


def test_relay_waits_for_an_unreachable_server_and_stops_cleanly(tmp_path: Path) -> None:
    """Relays may start before the NATS cluster: the relay says why it waits and tries
    again; SIGTERM ends it with exit 0 (no restart loop, no traceback)."""
    import signal
    import time

    from tests.fixtures.gateway_process import GatewayProcess
    from tests.support import free_port

    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"site: r\nrelay: {{servers: ['nats://127.0.0.1:{free_port()}'], "
                   "connect_timeout_s: 0.5, listen: null}\nsinks:\n  - {id: erp, type: http, "
                   "url: 'http://127.0.0.1:9', routes: [{events: ['*'], method: POST, "
                   "path: /e}]}\n")
    proc = GatewayProcess(cfg, verb="relay").start()
    try:
        proc.wait_line("NATS not reachable", timeout=30)
        time.sleep(1.5)
        assert proc.proc is not None and proc.proc.poll() is None, "still waiting"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()
    assert not any("Traceback" in line for line in proc.lines), "\n".join(proc.lines)


async def test_relay_with_refused_credentials_exits_2_with_one_line(nats_servers,
                                                                   tmp_path: Path) -> None:
    server = nats_servers('authorization { token: "right-token-123" }\n')
    (tmp_path / "tok").write_text("wrong-token-456\n")
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(f"site: r\nrelay: {{servers: ['{server.url}'], listen: null, auth: "
                   "{type: token, token_file: tok}}\nsinks:\n  - {id: erp, type: http, "
                   "url: 'http://127.0.0.1:9', routes: [{events: ['*'], method: POST, "
                   "path: /e}]}\n")
    run = await asyncio.to_thread(edge, "relay", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "cannot start" in run.stderr and "Traceback" not in run.stderr


async def test_replay_of_a_dead_letter_on_a_continue_sink(tier: Tier, tmp_path: Path) -> None:
    """With ``on_dead_letter: continue`` the lot is not parked: its later events flow, and
    the dead letter can still be replayed from the command line."""
    from tests.support import http_sink_yaml

    async with ErpReceiver() as erp:
        erp.reject(lambda e: e["data"]["n"] == 0, 422)
        sink = http_sink_yaml(erp.url, routes='[{events: ["*"], method: POST, path: /events}]',
                              extra="on_dead_letter: continue\n")
        text = tier.relay_yaml(erp.url, relay_id="r1", sink=sink)
        cfg_file = tmp_path / "relay.yaml"
        cfg_file.write_text(text)
        r = Relay(load_config_text(text, base_dir=tmp_path))  # type: ignore[arg-type]
        await r.start()
        try:
            for n in range(3):
                await tier.publish("A", n)
            await eventually(lambda: [e["data"]["n"] for e in erp.events] == [1, 2],
                             timeout=30, what="the lot going on past its dead letter")
            dead = DeadLetters(tier.js, r.rc)
            await dead.setup()
            assert await dead.state("erp", "lot:A") is None, "not parked"
            erp.clear_rejects()
            rep = await asyncio.to_thread(
                edge, "relay", "dlq", "replay", "-c", str(cfg_file), "--sink", "erp",
                "--key", "lot:A", "--reason", "fixed", cwd=tmp_path)
            assert rep.returncode == 0, rep.stderr
            await eventually(lambda: [e["data"]["n"] for e in erp.events] == [1, 2, 0],
                             timeout=30, what="the replayed dead letter")

            async def cleared() -> bool:
                return (await dead.entries("erp", "lot:A") == []
                        and await dead.state("erp", "lot:A") is None)

            await eventually(cleared, timeout=30)
        finally:
            r.stop()
            await r.close()


def test_relay_with_an_empty_secret_exits_2_with_the_location(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("")
    cfg = tmp_path / "relay.yaml"
    cfg.write_text("site: r\nrelay: {listen: null, auth: {type: token, token_file: tok}}\n"
                   "sinks:\n  - {id: erp, type: http, url: 'http://127.0.0.1:9', "
                   "routes: [{events: ['*'], method: POST, path: /e}]}\n")
    run = edge("relay", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "relay.auth" in run.stderr and "Traceback" not in run.stderr
