"""No secret anywhere: every secret-bearing config key points to a file holding a marker of
its own; the gateway (and a relay) run against real loopback services, through the happy
and the error paths (a broker that takes the password, an ERP that answers 401 and refuses
the OAuth client, NATS, an OPC UA endpoint that refuses the connection, a TLS handshake
with a plain broker); then no marker may appear in any log line (JSON and text), in any
answer of the local API, in the output of any CLI verb that reads the config, nor in the
``repr``/``str`` of the loaded config or of the components the gateway builds.

The keys are every ``SecretFile`` field of the config models, so a new secret key is
covered by construction: the test fails until the config below sets it. The verbs are
every verb of ``edge.cli.main`` that takes a config: a new one fails the test until it is
run here or excluded with a reason.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import subprocess
import sys
import textwrap
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nkeys
import pytest
from pydantic import BaseModel

from edge.app import Gateway
from edge.cli.main import build_parser
from edge.config import (
    SECRET_MARK,
    ApiConfig,
    GatewayConfigBase,
    build_config_model,
    load_config,
)
from edge.registry import default_registry
from edge.relay.config import RelayFileConfigBase
from edge.sim.erp import ErpReceiver
from tests.fixtures.gateway_process import GatewayProcess
from tests.fixtures.mosquitto import make_test_pki
from tests.support import config_models, eventually, free_port, http_sink_yaml

BROKER = "127.0.0.1:1883"  # the shared mosquitto: any user and password are accepted
NATS = "nats://127.0.0.1:4222"  # the shared NATS server

# Verbs run against the running gateway (they ask its API).
WHILE_RUNNING = {"status", "sink resume", "lot release", "healthcheck"}

# Verbs that take a config but are not run here, and why.
NOT_RUN = {
    "outbox salvage": "needs an outbox file moved aside after corruption; it reads no secret",
}


# --------------------------------------------------------------------------- secret keys


def _is_secret(annotation: Any) -> bool:
    if SECRET_MARK in getattr(annotation, "__metadata__", ()):
        return True
    return any(_is_secret(a) for a in typing.get_args(annotation))


def _secret_field(field_info: Any) -> bool:
    return SECRET_MARK in field_info.metadata or _is_secret(field_info.annotation)


def secret_keys() -> set[str]:
    """``Model.field`` of every ``SecretFile`` field a gateway or relay config can hold
    (built-in and installed components)."""
    reg = default_registry()
    return {f"{name}.{option}"
            for base in (GatewayConfigBase, RelayFileConfigBase)
            for name, model in config_models(build_config_model(reg, base)).items()
            for option, info in model.model_fields.items() if _secret_field(info)}


def keys_set(cfg: BaseModel) -> set[str]:
    """``Model.field`` of every ``SecretFile`` field set in a loaded config."""
    out: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, BaseModel):
            for option, info in type(value).model_fields.items():
                item = getattr(value, option, None)
                if isinstance(item, str) and _secret_field(info):
                    out.add(f"{type(value).__name__}.{option}")
                else:
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(cfg)
    return out


def config_verbs() -> set[str]:
    """Every ``edge`` verb that takes a config (``-c``/``--config`` or a FILE argument)."""
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
        options = {o for a in parser._actions for o in a.option_strings}
        files = {a.dest for a in parser._actions if not a.option_strings}
        if path and ("--config" in options or "file" in files):
            found.add(" ".join(path))

    walk(build_parser(), [])
    return found


# --------------------------------------------------------------------------- the secrets


@dataclass
class Secrets:
    """Files with markers: ``markers`` maps a file to the text that must never show."""

    folder: Path
    markers: dict[str, str] = field(default_factory=dict)

    def text(self, name: str, value: str | None = None) -> str:
        value = value or f"leak{len(self.markers):02d}{secrets.token_hex(10)}"
        path = self.folder / name
        path.write_text(value + "\n")
        path.chmod(0o600)
        self.markers[str(path)] = value
        return str(path)

    def pem(self, path: Path) -> str:
        """A certificate or key file; its marker is a line of its base64 body."""
        path.chmod(0o600)
        body = [line for line in path.read_text().splitlines() if not line.startswith("-----")]
        self.markers[str(path)] = max(body, key=len)
        return str(path)

    def der(self, path: Path) -> str:
        """A DER certificate; its marker is a piece of the file's base64."""
        path.chmod(0o600)
        self.markers[str(path)] = base64.b64encode(path.read_bytes()).decode()[240:300]
        return str(path)

    def leaks(self, text: str) -> list[str]:
        return [f"{Path(f).name} ({m})" for f, m in self.markers.items() if m in text]


def _creds(seed: str) -> str:
    claims = base64.urlsafe_b64encode(secrets.token_bytes(48)).decode().rstrip("=")
    return (f"-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.{claims}.sig\n"
            "------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")


def _seed() -> str:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def _item(**options: Any) -> str:
    """One item of a ``sources:`` or ``sinks:`` list, one option a line."""
    first, *rest = options.items()
    return (f"  - {first[0]}: {first[1]}\n"
            + "".join(f"    {k}: {v}\n" for k, v in rest))


def _nats_sink(sink_id: str, stream: str, auth: str) -> str:
    """A ``nats`` sink publishing to ``stream`` (made by the sink, in memory, on the
    relay's default subjects) with ``auth``."""
    return (f"  - id: {sink_id}\n    type: nats\n    servers: ['{NATS}']\n"
            f"    stream: {stream}\n    create_stream: {{storage: memory}}\n"
            "    connect_timeout_s: 2\n    reconnect_wait_s: 0.2\n"
            "    retry: {initial_backoff_s: 0.05, max_backoff_s: 0.5}\n"
            f"    auth: {auth}\n")


@dataclass
class Setup:
    config: Path
    relay_config: Path
    secrets: Secrets
    api: str
    relay_api: str
    topic: str
    token: str
    stream: str


def write_configs(tmp_path: Path, erp: ErpReceiver) -> Setup:
    s = Secrets(tmp_path / "secrets")
    s.folder.mkdir()
    pki = make_test_pki(tmp_path / "pki")
    ca, cert, key = s.pem(pki.ca), s.pem(pki.client_cert), s.pem(pki.client_key)
    server_cert = s.pem(pki.server_cert)
    subprocess.run([sys.executable, "-m", "edge", "certs", "--dir", str(tmp_path / "opcua"),
                    "--uri", "urn:leaks:edge"], check=True, capture_output=True, timeout=60)
    opcua_cert = s.der(tmp_path / "opcua" / "edge-gateway.der")
    opcua_key = s.pem(tmp_path / "opcua" / "edge-gateway.pem")
    api_port, relay_port = free_port(), free_port()
    token_file = s.text("api-token")
    run_id = secrets.token_hex(4)
    topic = f"leaks/{run_id}"
    site = f"leaks{run_id}"  # the NATS subjects of this run are its own
    mqtt_sub = textwrap.indent(textwrap.dedent(f"""\
        subscriptions:
          - topic: {topic}/{{station}}
            event: inspection.result
            ordering_key: "lot:{{lot_id}}"
            fields: {{lot_id: lot, serial: sn, result: result, message_id: msg_id}}
        """), " " * 4)
    http_auths = {
        "erp_bearer": f"{{type: bearer, token_file: {s.text('bearer')}}}",
        "erp_key": f"{{type: api_key, key_file: {s.text('api-key')}}}",
        "erp_oauth": (f"{{type: oauth2_client_credentials, token_url: '{erp.url}/oauth/token', "
                      f"client_id: edge, client_secret_file: {s.text('oauth')}}}"),
    }
    sinks = "".join(http_sink_yaml(erp.url, sink_id=sid, extra=f"auth: {auth}\n",
                                   routes="[{events: ['*'], method: POST, path: /events}]")
                    for sid, auth in http_auths.items())
    sinks += (f"  - id: plant\n    type: mqtt\n    url: mqtt://{BROKER}\n"
              f"    client_id: edge-leaks-{run_id}\n    username: edge\n"
              f"    password_file: {s.text('mqtt-sink')}\n"
              f"    routes: [{{events: ['*'], topic: 'leaks-out/{run_id}/{{type}}'}}]\n")
    stream = f"LEAKS_{run_id}"
    sinks += _nats_sink("js_user", stream, f"{{type: user_password, user: edge, password_file: "
                                   f"{s.text('nats-password')}}}")
    sinks += _nats_sink("js_token", stream, f"{{type: token, token_file: {s.text('nats-token')}}}")
    sinks += _nats_sink("js_nkey", stream, f"{{type: nkey, nkey_seed_file: "
                                   f"{s.text('nats-nkey', _seed())}}}")
    creds = s.text("nats-creds", _creds(_seed()))
    sinks += _nats_sink("js_creds", stream, f"{{type: creds, creds_file: {creds}}}")
    sources = (
        _item(id="line1", type="mqtt", url=f"mqtt://{BROKER}",
              client_id=f"edge-leaks-src-{run_id}", username="edge",
              password_file=s.text("mqtt-source"), reconnect_initial_s=0.05,
              reconnect_max_s=0.5) + mqtt_sub
        + _item(id="line2", type="mqtt", url=f"mqtts://{BROKER}",
                client_id=f"edge-leaks-tls-{run_id}",
                tls=f"{{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}",
                username="edge", password_file=s.text("mqtt-source-tls"),
                reconnect_initial_s=0.05, reconnect_max_s=0.5) + mqtt_sub
        + _item(id="station", type="opcua", endpoint=f"opc.tcp://127.0.0.1:{free_port()}",
                username="operator", password_file=s.text("opcua-password"),
                security=f"{{policy: Basic256Sha256, mode: Sign, cert_file: {opcua_cert}, "
                         f"key_file: {opcua_key}, server_cert_file: {server_cert}}}",
                connect_timeout_s=0.5, reconnect_max_s=1,
                monitored='[{node: "ns=2;s=Station.Temperature"}]'))
    body = (f"site: {site}\nstate_dir: {tmp_path / 'state'}\n"
            f'api: {{listen: "127.0.0.1:{api_port}", token_file: {token_file}}}\n'
            f"audit: {{checkpoint_key_file: {s.text('audit-key')}, export: {{type: http, "
            f"url: '{erp.url}/audit', token_file: {s.text('audit-token')}, ca_file: {ca}, "
            "interval_s: 1}}\n"
            f"sources:\n{sources}sinks:\n{sinks}")
    config = tmp_path / "edge.yaml"
    config.write_text(body)
    relay_config = tmp_path / "relay.yaml"
    relay_config.write_text(
        f"site: {site}\nrelay: {{stream: {stream}, servers: ['{NATS}'], "
        f"listen: '127.0.0.1:{relay_port}', connect_timeout_s: 1, "
        f"auth: {{type: creds, creds_file: {creds}}}}}\nsinks:\n"
        + http_sink_yaml(erp.url, sink_id="erp_bearer", extra=f"auth: {http_auths['erp_bearer']}\n",
                         routes="[{events: ['*'], method: POST, path: /events}]"))
    return Setup(config, relay_config, s, f"http://127.0.0.1:{api_port}",
                 f"http://127.0.0.1:{relay_port}", topic, s.markers[token_file], stream)


# --------------------------------------------------------------------------- running


def edge(*args: str, cwd: Path) -> str:
    """``edge ARGS``: stdout and stderr together (the exit status does not matter here)."""
    env = {k: v for k, v in os.environ.items() if k != "EDGE_API_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "edge", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    return f"$ edge {' '.join(args)}\n{done.stdout}{done.stderr}"


def publish(topic: str, n: int) -> None:
    import paho.mqtt.publish as mqtt_publish

    host, port = BROKER.split(":")
    for i in range(n):
        payload = f'{{"msg_id": "m{i}", "lot": "L{i}", "sn": "S{i}", "result": "OK"}}'
        mqtt_publish.single(f"{topic}/st1", payload, qos=1, hostname=host, port=int(port))


async def api_answers(base: str, token: str, paths: list[str]) -> str:
    out = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=10) as client:
        for path in paths:
            resp = await client.get(base + path)
            out.append(f"GET {path} {resp.status_code}\n{resp.text}")
    return "\n".join(out)


async def wait_for(proc: GatewayProcess, *texts: str, timeout: float = 30.0) -> None:
    for text in texts:
        await proc.await_line(text, timeout=timeout)


async def run_gateway(setup: Setup, erp: ErpReceiver, tmp_path: Path, *, text_lines: bool
                      ) -> tuple[list[str], str]:
    """Run ``edge run`` until every secret path has been taken; (log lines, API and CLI
    output while it ran)."""
    config = setup.config
    if text_lines:
        config = tmp_path / "edge-text.yaml"
        config.write_text(setup.config.read_text() + "logging: {format: text}\n")
    proc = GatewayProcess(config).start()
    seen = ""
    try:
        await wait_for(proc, "gateway started", "MQTT connected")  # the password taken
        await asyncio.to_thread(publish, setup.topic, 3)
        # refused credentials (401) on the bearer, api key and OAuth sinks; the TLS
        # handshake with a plain broker and the OPC UA connection failed
        await wait_for(proc, "refuses the gateway's credentials", "cannot get the endpoints")
        await erp.wait_for(lambda e: e.request_count >= 2, within_s=30)
        if not text_lines:
            seen += await api_answers(setup.api, setup.token, [
                "/", "/healthz", "/readyz", "/status", "/metrics", "/dlq", "/lots", "/trace"])
            c = str(config)
            verbs = (["status", "-c", c], ["status", "-c", c, "--json"],
                     ["sink", "resume", "erp_bearer", "-c", c, "--reason", "rotated",
                      "--by", "qa"],
                     ["lot", "release", "L1", "-c", c, "--reason", "checked", "--by", "qa"],
                     ["healthcheck", "-c", c], ["healthcheck", "-c", c, "--ready"])
            outputs = await asyncio.gather(*(asyncio.to_thread(edge, *verb, cwd=tmp_path)
                                             for verb in verbs))
            seen += "".join(outputs)
    finally:
        proc.stop()
    return proc.lines, seen


def offline_verbs(setup: Setup, tmp_path: Path) -> tuple[set[str], str]:
    """The verbs that read the outbox or the config with the gateway stopped."""
    c = str(setup.config)
    runs = {
        "check-config": [["check-config", c]],
        "outbox stats": [["outbox", "stats", "-c", c]],
        "outbox reroute": [["outbox", "reroute", "-c", c, "--from", "erp_bearer", "--to",
                            "erp_key", "--reason", "moved"]],
        "outbox discard": [["outbox", "discard", "-c", c, "--sink", "nope", "--reason", "x"]],
        "dlq list": [["dlq", "list", "-c", c, "--json"]],
        "dlq show": [["dlq", "show", "1", "-c", c]],
        "dlq replay": [["dlq", "replay", "1", "-c", c, "--reason", "again"]],
        "dlq discard": [["dlq", "discard", "1", "-c", c, "--reason", "gone"]],
        "trace": [["trace", "--key", "lot:L1", "-c", c, "--json"]],
        "audit verify": [["audit", "verify", "-c", c, "--json"]],
        "lots": [["lots", "-c", c]],
        "certs": [["certs", "-c", c, "--dir", str(tmp_path / "new-certs")]],
        "relay dlq list": [["relay", "dlq", "list", "-c", str(setup.relay_config)]],
        "relay dlq replay": [["relay", "dlq", "replay", "-c", str(setup.relay_config),
                              "--sink", "erp_bearer", "--key", "lot:L1", "--reason", "x"]],
        "relay dlq discard": [["relay", "dlq", "discard", "-c", str(setup.relay_config),
                               "--sink", "erp_bearer", "--key", "lot:L1", "--reason", "x"]],
    }
    with ThreadPoolExecutor(4) as pool:
        outputs = pool.map(lambda args: edge(*args, cwd=tmp_path),
                           [args for runs_of in runs.values() for args in runs_of])
        return set(runs), "".join(outputs)


async def run_relay(setup: Setup, tmp_path: Path) -> tuple[list[str], str]:
    proc = GatewayProcess(setup.relay_config, verb="relay").start()
    try:
        await wait_for(proc, "relay started")
        answers = await api_answers(setup.relay_api, "", ["/healthz", "/readyz", "/status",
                                                          "/metrics"])
    finally:
        proc.stop()
    return proc.lines, answers


# --------------------------------------------------------------------------- the tests


@pytest.fixture
async def erp_refusing() -> Any:
    """The ERP stand-in refusing every request (401) and the OAuth client (401)."""
    receiver = ErpReceiver(require_auth=lambda headers: False,
                           oauth_client=("edge", "not-what-the-gateway-has"))
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def test_no_secret_in_logs_api_cli_or_repr(tmp_path: Path, erp_refusing: ErpReceiver):
    setup = write_configs(tmp_path, erp_refusing)
    s = setup.secrets

    # every secret key of the config models is set (a new one must be added above)
    cfg = load_config(setup.config)
    relay_cfg = load_config(setup.relay_config)
    assert secret_keys() - keys_set(cfg) - keys_set(relay_cfg) == set()

    # repr and str of the config and of the components the gateway builds, running (the
    # sources connecting, the sinks with their secrets read)
    gw = Gateway(cfg.model_copy(update={"state_dir": str(tmp_path / "in-process"),
                                        "api": ApiConfig(enabled=False)}))
    await gw.start()
    try:
        await eventually(lambda: gw.status["line1"].connected, what="line1 connected")
        await asyncio.to_thread(publish, setup.topic, 1)
        await erp_refusing.wait_for(lambda e: e.request_count >= 1, within_s=30)
        roots = [cfg, relay_cfg, gw, *gw.sources.values(), *gw.sinks.values()]
        shown = {f"{type(o).__module__}.{type(o).__qualname__}": s.leaks(f"{o!r}\n{o}")
                 for o in _reachable(roots)}
    finally:
        await gw.stop()
    found = {f"repr/str of {where}": leaks for where, leaks in shown.items() if leaks}

    json_lines, seen_json = await run_gateway(setup, erp_refusing, tmp_path, text_lines=False)
    assert json_lines and json_lines[0].startswith("{"), json_lines[:3]
    text_lines, _ = await run_gateway(setup, erp_refusing, tmp_path, text_lines=True)
    assert text_lines and not text_lines[0].startswith("{"), text_lines[:3]
    (ran, seen_offline), (relay_lines, relay_answers) = await asyncio.gather(
        asyncio.to_thread(offline_verbs, setup, tmp_path), run_relay(setup, tmp_path))
    await _delete_stream(setup.stream)

    # every verb that takes a config was run, or is excluded with a reason
    assert config_verbs() - ran - set(NOT_RUN) - {"run", "relay", *WHILE_RUNNING} == set()

    # the answers are real ones (the token was taken), not refusals
    assert "GET /status 200" in seen_json and "GET /metrics 200" in seen_json, seen_json[:2000]
    assert "GET /status 200" in relay_answers, relay_answers[:2000]
    everything = {
        "log lines (JSON)": "\n".join(json_lines),
        "log lines (text)": "\n".join(text_lines),
        "relay log lines": "\n".join(relay_lines),
        "API answers and CLI output while running": seen_json,
        "relay API answers": relay_answers,
        "CLI output": seen_offline,
    }
    found.update({where: s.leaks(text) for where, text in everything.items()
                  if s.leaks(text)})
    assert found == {}, "\n\n".join(
        f"secrets in {where}: {leaks}\n" + "\n".join(
            line for line in everything.get(where, "").splitlines()
            if s.leaks(line))[:3000] for where, leaks in found.items())


async def _delete_stream(name: str) -> None:
    import nats

    nc = await nats.connect(NATS)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


def _reachable(roots: list[Any], depth: int = 3) -> list[Any]:
    """The objects and the gateway's own objects they hold (attributes, lists, dicts), a
    few levels deep; strings are left out (a component holds its secret as one)."""
    seen: dict[int, Any] = {}
    level = list(roots)
    for _ in range(depth):
        nxt: list[Any] = []
        for obj in level:
            if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
                continue
            seen[id(obj)] = obj
            if isinstance(obj, dict):
                nxt.extend(obj.values())
            elif isinstance(obj, (list, tuple, set)):
                nxt.extend(obj)
            elif type(obj).__module__.startswith("edge."):
                attrs = getattr(obj, "__dict__", {}) or {}
                slots = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ())]
                nxt.extend(attrs.values())
                nxt.extend(getattr(obj, n) for n in slots if hasattr(obj, n))
        level = nxt
    return [o for o in seen.values() if not isinstance(o, (dict, list, tuple, set))]
