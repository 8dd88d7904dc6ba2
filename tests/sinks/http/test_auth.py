"""HTTP sink authentication: API key, bearer file, OAuth2 client credentials, mTLS."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.outbox import queries
from edge.sim.erp import ErpReceiver
from tests.support import eventually, metric, result, sink_yaml


async def test_api_key_header_from_file(gateways, tmp_path: Path):
    (tmp_path / "erp.key").write_text("k-123\n")
    erp = await ErpReceiver(require_auth=lambda h: h.get("x-api-key") == "k-123").start()
    try:
        gw = await gateways(sink_yaml(erp.url, extra="auth: {type: api_key, key_file: erp.key}"))
        await gw.pipeline.submit([result("A")])
        await erp.wait_for(lambda e: len(e.events) == 1)
        assert [r.status for r in erp.requests] == [200]
    finally:
        await erp.stop()


async def test_bearer_token_file_is_reread_once_on_401(gateways, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("old")
    current = {"value": "old"}
    erp = await ErpReceiver(
        require_auth=lambda h: h.get("authorization") == f"Bearer {current['value']}").start()
    try:
        gw = await gateways(sink_yaml(erp.url, extra="auth: {type: bearer, token_file: token}"))
        await gw.pipeline.submit([result("A", 0)])
        await erp.wait_for(lambda e: len(e.events) == 1)
        # the ERP rotates the token; the operator (or a credential agent) rewrites the file
        current["value"] = "new"
        token.write_text("new\n")
        await gw.pipeline.submit([result("A", 1)])
        await erp.wait_for(lambda e: len(e.events) == 2)
        assert [r.status for r in erp.requests] == [200, 401, 200]
    finally:
        await erp.stop()


async def test_bad_credentials_fault_the_sink_and_keep_the_event(gateways, tmp_path: Path):
    """401 after one refresh: the sink is faulted, not the event (it was a dead letter)."""
    (tmp_path / "token").write_text("wrong")
    erp = await ErpReceiver(require_auth=lambda h: False).start()
    try:
        gw = await gateways(sink_yaml(erp.url, extra="auth: {type: bearer, token_file: token}"))
        await gw.pipeline.submit([result("A")])
        await erp.wait_for(lambda e: len(e.requests) >= 2)
        assert {r.status for r in erp.requests} == {401}
        assert metric(gw.metrics.events_dead_lettered, "erp") == 0
        assert (await gw.outbox.stats())["events"] == 1
        assert await gw.outbox.read(queries.dlq_list) == []
    finally:
        await erp.stop()


async def test_oauth2_token_is_cached_and_refetched_once_on_401(gateways, tmp_path: Path):
    (tmp_path / "secret").write_text("s3cret")
    erp = await ErpReceiver(oauth_client=("gateway", "s3cret")).start()
    try:
        gw = await gateways(sink_yaml(erp.url, extra=f"""\
            auth:
              type: oauth2_client_credentials
              token_url: {erp.url}/oauth/token
              client_id: gateway
              client_secret_file: secret
            """))
        await gw.pipeline.submit([result(f"L{i}", i) for i in range(20)])
        await erp.wait_for(lambda e: len(e.events) == 20)
        assert erp.tokens_issued == 1  # one token for 20 concurrent requests
        erp.expire_tokens()
        await gw.pipeline.submit([result("A", 99)])
        await erp.wait_for(lambda e: len(e.events) == 21)
        assert erp.tokens_issued == 2
        assert [r.status for r in erp.requests[-2:]] == [401, 200]
    finally:
        await erp.stop()


async def test_oauth2_wrong_secret_faults_the_sink_and_keeps_the_event(gateways,
                                                                     tmp_path: Path):
    (tmp_path / "secret").write_text("wrong")
    erp = await ErpReceiver(oauth_client=("gateway", "s3cret")).start()
    try:
        gw = await gateways(sink_yaml(erp.url, extra=f"""\
            auth:
              type: oauth2_client_credentials
              token_url: {erp.url}/oauth/token
              client_id: gateway
              client_secret_file: secret
            """))
        await gw.pipeline.submit([result("A")])
        await eventually(lambda: gw.forwarders["erp"].last_error is not None)
        assert "token endpoint answered 401" in gw.forwarders["erp"].last_error
        assert metric(gw.metrics.events_dead_lettered, "erp") == 0
        assert (await gw.outbox.stats())["events"] == 1  # kept for when the secret is fixed
    finally:
        await erp.stop()


# ---------------------------------------------------------------- mTLS


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca: bool = False,
          san: str | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    def write(name: str, cert: x509.Certificate, key) -> None:
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test plant CA", ca_key, ca=True)
    write("ca", ca, ca_key)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    write("server", _cert("127.0.0.1", srv_key, ca, ca_key, san="127.0.0.1"), srv_key)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    write("client", _cert("gateway", cli_key, ca, ca_key), cli_key)
    return {k: str(tmp_path / k) for k in ("ca.pem", "server.pem", "server.key",
                                             "client.pem", "client.key")}


async def test_mtls_with_a_private_ca(gateways, pki):
    erp = await ErpReceiver(certfile=pki["server.pem"], keyfile=pki["server.key"],
                            ca_file=pki["ca.pem"], require_client_cert=True).start()
    try:
        gw = await gateways(sink_yaml(erp.url, extra=f"""\
            tls: {{ca_file: {pki['ca.pem']}, cert_file: {pki['client.pem']},
                  key_file: {pki['client.key']}}}
            """))
        await gw.pipeline.submit([result("A")])
        await erp.wait_for(lambda e: len(e.events) == 1)
    finally:
        await erp.stop()


async def test_tls_without_the_private_ca_is_refused_and_retried(gateways, pki):
    erp = await ErpReceiver(certfile=pki["server.pem"], keyfile=pki["server.key"]).start()
    try:
        gw = await gateways(sink_yaml(erp.url))  # system CAs only: the server is not trusted
        await gw.pipeline.submit([result("A")])
        await eventually(lambda: gw.forwarders["erp"].last_error is not None)
        assert "CERTIFICATE_VERIFY_FAILED" in gw.forwarders["erp"].last_error
        assert erp.events == []
        assert (await gw.outbox.stats())["events"] == 1
    finally:
        await erp.stop()


def test_ssl_context_is_built_with_the_client_chain(pki):
    from edge.tls import TlsConfig, client_context

    ctx = client_context(TlsConfig(ca_file=pki["ca.pem"], cert_file=pki["client.pem"],
                                      key_file=pki["client.key"]), "sink 'erp'")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
