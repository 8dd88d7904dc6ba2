"""OPC UA source: configuration checked at load (located messages), the bounded notification
queue, and ``edge certs``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.cli.main import main
from edge.config import load_config_text
from edge.errors import ConfigError
from edge.sources.opcua.queue import Gap, NotificationQueue
from edge.sources.opcua.security import application_uri_of, load_certificate, thumbprint

SINK = """
sinks:
  - id: erp
    type: http
    url: http://127.0.0.1:9
    routes: [{events: ["*"], method: POST, path: /events}]
"""


def issues(source_yaml: str, tmp_path: Path) -> list[str]:
    for name in ("c.der", "k.pem"):
        (tmp_path / name).write_text("x")
    text = "site: s\nstate_dir: st\nsources:\n" + textwrap.indent(
        textwrap.dedent(source_yaml), "  ") + SINK
    with pytest.raises(ConfigError) as err:
        load_config_text(text, base_dir=tmp_path)
    return [str(i) for i in err.value.issues]


def ok(source_yaml: str, tmp_path: Path):
    text = "site: s\nstate_dir: st\nsources:\n" + textwrap.indent(
        textwrap.dedent(source_yaml), "  ") + SINK
    return load_config_text(text, base_dir=tmp_path).sources[0]


BASE = """\
- id: st7
  type: opcua
  endpoint: opc.tcp://127.0.0.1:4840
"""


def test_a_full_config_loads(tmp_path):
    for name in ("gw.der", "gw.pem", "station7.der", "pw"):
        (tmp_path / name).write_text("x")
    src = ok(BASE + """\
  security: {policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: gw.der,
             key_file: gw.pem, server_cert_file: station7.der}
  username: gateway
  password_file: pw
  monitored:
    - {node: "ns=2;s=Station7.Temperature", sampling_ms: 500, deadband: {absolute: 0.5},
       static: {station: "7"}, ordering_key: "{station}"}
    - {node: "/Objects/2:Station7/2:SpindleSpeed", event: machine.speed, class: normal}
    - {node: "nsu=urn:plc;i=42"}
  triggers:
    - node: "ns=2;s=Station7.ResultReady"
      when: true
      event: inspection.result
      ordering_key: "lot:{lot_id}"
      read: {lot_id: "ns=2;s=Station7.LotId", result: "ns=2;s=Station7.Result"}
      ack: {node: "ns=2;s=Station7.ResultReady", value: false}
""", tmp_path)
    assert src.security.server_cert_file == str(tmp_path / "station7.der")
    assert src.monitored[0].mapping().event_class is None  # default by type: low
    assert src.monitored[1].event == "machine.speed"
    assert src.triggers[0].ack.value is False


@pytest.mark.parametrize("snippet,expected", [
    ("""\
  security: {policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: c.der, key_file: k.pem}
  monitored: [{node: "i=2258"}]
""", "sources[0].security: set server_cert_file (pin the server certificate) or trust_dir"),
    ("""\
  security: {policy: None, mode: Sign}
  monitored: [{node: "i=2258"}]
""", "sources[0].security: policy None and mode Sign do not go together"),
    ("""\
  security: {policy: Basic256Sha256, mode: Sign, server_cert_file: c.der}
  monitored: [{node: "i=2258"}]
""", "sources[0].security: cert_file and key_file required with policy Basic256Sha256"),
    ("""\
  security: {policy: Basic128Rsa15, mode: Sign}
  monitored: [{node: "i=2258"}]
""", "sources[0].security.policy: must be one of None, Basic256Sha256, "
     "Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss, got 'Basic128Rsa15'"),
    ("""\
  security: {policy: Basic256Sha256, mode: Sign, cert_file: c.der, key_file: k.pem,
             trust_dir: nowhere}
  monitored: [{node: "i=2258"}]
""", "sources[0].security.trust_dir: directory not found"),
    ("""\
  monitored: [{node: "i=2258"}, {node: "Station7.Temperature"}]
""", "sources[0].monitored[1].node: 'Station7.Temperature' is neither a NodeId"),
    ("""\
  monitored: [{node: "/Objects/Station7/2:Temperature"}]
""", "sources[0].monitored[0].node: browse path step 'Station7' must be "
     "<namespace index>:<BrowseName>"),
    ("""\
  monitored: [{node: "i=2258", deadband: {absolute: 1, percent: 5}}]
""", "sources[0].monitored[0].deadband: set exactly one of absolute or percent"),
    ("""\
  monitored: [{node: "i=2258", deadband: {percent: 150}}]
""", "sources[0].monitored[0].deadband.percent: Input should be less than or equal to 100"),
    ("""\
  monitored: [{node: "i=2258", sampling: 100}]
""", "sources[0].monitored[0].sampling: unknown key (allowed: node, event, "),
    ("""\
  username: gateway
  monitored: [{node: "i=2258"}]
""", "sources[0]: username needs password_file"),
    ("""\
  monitored: []
""", "sources[0]: configure at least one of monitored or triggers"),
    ("""\
  monitored: [{node: "i=2258"}, {node: "i=2258"}]
""", "sources[0]: monitored[1].node 'i=2258' is already monitored by monitored[0].node"),
    ("""\
  triggers: [{node: "i=2258", event: inspection.result, read: {}}]
""", "sources[0].triggers[0].read: name at least one node to read"),
    ("""\
  triggers: [{node: "i=2258", event: inspection.result, read: {lot-id: "i=1"}}]
""", "sources[0].triggers[0].read: 'lot-id' is not a field name"),
])
def test_config_errors_are_located(snippet, expected, tmp_path):
    found = issues(BASE + snippet, tmp_path)
    assert any(expected in i for i in found), found


def test_endpoint_must_be_opc_tcp(tmp_path):
    found = issues("""\
- id: st7
  type: opcua
  endpoint: http://127.0.0.1:4840
  monitored: [{node: "i=2258"}]
""", tmp_path)
    assert any(i.startswith("sources[0].endpoint: must look like opc.tcp://host:4840")
               for i in found), found


def test_importing_the_component_does_not_import_asyncua():
    code = ("import sys, edge.sources.opcua; "
            "sys.exit(1 if 'asyncua' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------------- the queue


async def test_full_queue_drops_the_oldest_notification_counts_it_keeps_markers():
    dropped: list[int] = []
    q = NotificationQueue(3, lambda: dropped.append(1))
    gap = Gap("recreated")
    q.put_nowait(gap)
    for i in range(5):
        q.put_nowait(i)
    assert len(dropped) == 3 and q.dropped == 3
    assert await q.get_batch(10) == [gap, 3, 4]
    q.put_nowait(None)  # asyncua's end-of-subscription sentinel is never dropped either
    q.put_nowait(gap)
    q.put_nowait(7)
    q.put_nowait(8)
    assert await q.get_batch(2) == [None, gap] and await q.get_batch(10) == [8]


async def test_queue_consumer_waits_for_items():
    q = NotificationQueue(10, lambda: None)
    task = asyncio.create_task(q.get_batch(5))
    for _ in range(5):
        await asyncio.sleep(0)  # the task runs up to its wait for an item
    assert not task.done()
    q.put_nowait("x")
    assert await asyncio.wait_for(task, 1) == ["x"]


# --------------------------------------------------------------------------- edge certs


def test_edge_certs_creates_keeps_and_shows(tmp_path, capsys):
    d = tmp_path / "certs"
    assert main(["certs", "--dir", str(d), "--uri", "urn:ipc7:edge-gateway:plant-1",
                 "--hostname", "ipc7"]) == 0
    out = capsys.readouterr().out
    cert = load_certificate(d / "edge-gateway.der")
    from cryptography.hazmat.primitives.serialization import Encoding

    thumb = thumbprint(cert.public_bytes(Encoding.DER))
    assert "created" in out and thumb in out and str((d / "edge-gateway.pem").resolve()) in out
    assert application_uri_of(cert) == "urn:ipc7:edge-gateway:plant-1"
    assert (d / "edge-gateway.pem").stat().st_mode & 0o777 == 0o600

    assert main(["certs", "--dir", str(d), "--uri", "urn:ipc7:edge-gateway:plant-1",
                 "--hostname", "ipc7"]) == 0
    out = capsys.readouterr().out
    assert "kept existing" in out and thumb in out  # nothing to re-trust on the servers

    assert main(["certs", "--dir", str(d), "--uri", "urn:ipc7:edge-gateway:plant-1",
                 "--hostname", "ipc7", "--force"]) == 0
    assert thumb not in capsys.readouterr().out

    assert main(["certs", "--show", str(d / "edge-gateway.der")]) == 0
    assert "urn:ipc7:edge-gateway:plant-1" in capsys.readouterr().out
    assert main(["certs", "--show", str(d / "missing.der")]) == 1


def test_edge_certs_takes_site_and_state_dir_from_the_config(tmp_path, capsys):
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("site: plant-01\nstate_dir: state\n")
    assert main(["certs", "-c", str(cfg), "--hostname", "ipc9"]) == 0
    assert "urn:ipc9:edge-gateway:plant-01" in capsys.readouterr().out
    assert (tmp_path / "state" / "certs" / "edge-gateway.der").is_file()


def test_asyncua_outage_noise_is_filtered_but_real_errors_stay():
    import logging

    from edge.sources.opcua.source import _OutageNoise

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("asyncua.client.ua_session.UaSession", logging.ERROR, "f", 1,
                                 msg, (), info)

    f = _OutageNoise()
    assert not f.filter(record("Publish iteration crashed; retrying in 1s",
                               ConnectionError("Connection is not open")))
    assert f.filter(record("Publish iteration crashed; retrying in 1s", ValueError("bad")))
    assert not f.filter(record("Reconnect attempt failed: %r; retrying in %.1fs"))
    assert f.filter(record("Reconnect failed with security error %r; refreshing endpoints"))
    assert _OutageNoise in {type(x) for x in
                            logging.getLogger("asyncua.client.ua_session.UaSession").filters}
