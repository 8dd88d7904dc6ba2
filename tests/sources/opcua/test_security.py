"""Secure channel, user login and server identity against a real asyncua station."""

from __future__ import annotations

import shutil

import pytest

from edge.sources.opcua.security import load_certificate, thumbprint
from tests.fixtures.opcua import events_of, wait_connected, wait_failed
from tests.support import eventually, http_sink_yaml, metric

pytestmark = pytest.mark.opcua


def _der_thumb(path) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return thumbprint(load_certificate(path).public_bytes(Encoding.DER))


def _body(st, certs, security: str, erp_url: str, *, login: bool = False) -> str:
    lines = [
        "sources:",
        "  - id: station7",
        "    type: opcua",
        f"    endpoint: {st.endpoint}",
        f"    security: {security}",
        "    monitored:",
        f"      - {{node: \"{st.node_id('Temperature')}\", sampling_ms: 0}}",
    ]
    if login:
        lines += ["    username: gateway", "    password_file: password"]
    return "\n".join(lines) + "\nsinks:\n" + http_sink_yaml(erp_url)


async def test_sign_and_encrypt_basic256sha256_with_pinned_server_and_login(
    opcua_station, opcua_certs, erp, gateways, tmp_path
):
    c = opcua_certs
    st = await opcua_station(security=["Basic256Sha256"], cert_file=c.server_cert,
                             key_file=c.server_key, users={"gateway": "s3cret"})
    (tmp_path / "password").write_text("s3cret\n")
    gw = await gateways(_body(
        st, c, f"{{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {c.client_cert}, "
               f"key_file: {c.client_key}, server_cert_file: {c.server_cert}}}",
        erp.url, login=True))
    await wait_connected(gw, "station7")
    await st.write("Temperature", 30.5)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 30.5
                                     for e in events_of(r, "machine.reading")), 30)
    assert gw.status["station7"].error is None


@pytest.mark.parametrize("policy,mode", [
    ("Aes128_Sha256_RsaOaep", "Sign"),
    ("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
])
async def test_other_policies_with_a_trust_folder(
    opcua_station, opcua_certs, erp, gateways, tmp_path, policy, mode
):
    c = opcua_certs
    st = await opcua_station(security=[policy], cert_file=c.server_cert, key_file=c.server_key)
    trust = tmp_path / "trusted"
    trust.mkdir()
    shutil.copy(c.server_cert, trust / "station7.der")
    gw = await gateways(_body(
        st, c, f"{{policy: {policy}, mode: {mode}, cert_file: {c.client_cert}, "
               f"key_file: {c.client_key}, trust_dir: trusted}}", erp.url))
    await wait_connected(gw, "station7")
    await st.write("Temperature", 31.5)
    await erp.wait_for(lambda r: any(e["data"]["value"] == 31.5
                                     for e in events_of(r, "machine.reading")), 30)


async def test_wrong_pinned_server_certificate_is_refused_clearly(
    opcua_station, opcua_certs, erp, gateways
):
    c = opcua_certs
    st = await opcua_station(security=["Basic256Sha256"], cert_file=c.server_cert,
                             key_file=c.server_key)
    gw = await gateways(_body(
        st, c, f"{{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {c.client_cert}, "
               f"key_file: {c.client_key}, server_cert_file: {c.wrong_cert}}}", erp.url))
    error = await wait_failed(gw, "station7")
    assert "server certificate mismatch" in error
    assert _der_thumb(c.server_cert) in error  # what the server presents
    assert _der_thumb(c.wrong_cert) in error  # what the config pins
    assert gw.status["station7"].restarts == 0
    assert metric(gw.metrics.source_connected, "station7") == 0
    assert not erp.events


async def test_server_not_in_trust_folder_is_refused(opcua_station, opcua_certs, erp, gateways,
                                                     tmp_path):
    c = opcua_certs
    st = await opcua_station(security=["Basic256Sha256"], cert_file=c.server_cert,
                             key_file=c.server_key)
    trust = tmp_path / "trusted"
    trust.mkdir()
    shutil.copy(c.wrong_cert, trust / "other.der")
    gw = await gateways(_body(
        st, c, f"{{policy: Basic256Sha256, mode: Sign, cert_file: {c.client_cert}, "
               f"key_file: {c.client_key}, trust_dir: trusted}}", erp.url))
    error = await wait_failed(gw, "station7")
    assert "server certificate refused (BadCertificateUntrusted)" in error
    assert _der_thumb(c.server_cert) in error


async def test_policy_the_server_does_not_offer_is_named(opcua_station, opcua_certs, erp,
                                                         gateways):
    c = opcua_certs
    st = await opcua_station(security=["Basic256Sha256"], cert_file=c.server_cert,
                             key_file=c.server_key)
    gw = await gateways(_body(
        st, c, f"{{policy: Aes256_Sha256_RsaPss, mode: Sign, cert_file: {c.client_cert}, "
               f"key_file: {c.client_key}, server_cert_file: {c.server_cert}}}", erp.url))
    error = await wait_failed(gw, "station7")
    assert "offers no endpoint with security Aes256_Sha256_RsaPss/Sign" in error
    assert "Basic256Sha256/SignAndEncrypt" in error


async def test_wrong_password_is_retried_with_a_clear_error(opcua_station, opcua_certs, erp,
                                                            gateways, tmp_path):
    c = opcua_certs
    st = await opcua_station(security=["Basic256Sha256"], cert_file=c.server_cert,
                             key_file=c.server_key, users={"gateway": "s3cret"})
    (tmp_path / "password").write_text("wrong")
    gw = await gateways(_body(
        st, c, f"{{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {c.client_cert}, "
               f"key_file: {c.client_key}, server_cert_file: {c.server_cert}}}",
        erp.url, login=True))
    status = gw.status["station7"]
    await eventually(lambda: status.state == "retrying", timeout=30, what="the login to be refused")
    assert "refused the login of gateway" in (status.error or "")
    assert "wrong" not in (status.error or "")  # the password never shows
