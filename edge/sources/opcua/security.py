"""Secure channel and user identity of the ``opcua`` source.

Contract: ``await configure(client, cfg)`` prepares ``client`` before ``connect()``:

- username + password (read from ``password_file`` now, never logged);
- with a security policy: loads the client certificate and key, takes the client's
  application URI from the certificate (or checks ``application_uri`` against it), asks
  the server for its endpoints over an unsecured discovery channel and checks the
  certificate the server presents BEFORE any secret is sent:
  * ``server_cert_file``: it must be that certificate (byte for byte);
  * ``trust_dir``: it must validate against the trusted certificates / CAs in that folder
    (time range, application URI, trust, revocation); the same validator then re-checks
    the server at every session creation, also on reconnects.

Raises ``FatalStartupError`` with a clear message (thumbprints, what to do) for anything a
retry cannot fix: wrong or untrusted server certificate, no endpoint with the configured
policy and mode, unusable client certificate. Raises ``RetryableStartupError`` when the
server cannot be reached.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asyncua import Client, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edge.plugin import FatalStartupError, RetryableStartupError, read_secret
from edge.sources.opcua.config import OpcUaSourceConfig

__all__ = ["application_uri_of", "configure", "load_certificate", "security_warnings",
           "thumbprint"]

CERT_WARN_DAYS = 30  # a pinned or client certificate this close to its end is reported

POLICY_CLASSES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}

# Trust + time + URI + revocation; key-usage bits are not required (many PLC servers do not
# set non-repudiation), the peer must present a server certificate.
_VALIDATION = (
    CertificateValidatorOptions.TIME_RANGE
    | CertificateValidatorOptions.URI
    | CertificateValidatorOptions.TRUSTED
    | CertificateValidatorOptions.REVOKED
    | CertificateValidatorOptions.PEER_SERVER
)


def thumbprint(der: bytes) -> str:
    """The OPC UA thumbprint of a certificate: SHA-1 of its DER bytes, hex upper case."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def load_certificate(path: str | Path) -> x509.Certificate:
    """A certificate from a DER or PEM file; FatalStartupError naming the file if unusable."""
    try:
        data = Path(path).read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (OSError, ValueError) as err:
        raise FatalStartupError(f"cannot load certificate {path}: {err}") from err


def application_uri_of(cert: x509.Certificate) -> str | None:
    """The first URI in the certificate's subjectAltName (the OPC UA application URI)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _first_cert(der_chain: bytes) -> bytes:
    """A server may send its certificate followed by its chain; keep the first one."""
    if len(der_chain) < 4:
        return der_chain
    length = int.from_bytes(der_chain[2:4], "big") + 4
    return der_chain[:length]


def _describe(cert_der: bytes) -> str:
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = "unparsable certificate"
    return f"thumbprint {thumbprint(cert_der)} ({subject})"


async def configure(client: Client, cfg: OpcUaSourceConfig) -> str:
    """Set identity and security on ``client``; return a short description for logs."""
    if cfg.username is not None:
        client.set_user(cfg.username)
        client.set_password(read_secret(cfg.password_file) or "")
    sec = cfg.security
    if not sec.enabled:
        if cfg.application_uri:
            client.application_uri = cfg.application_uri
        return "None"
    assert sec.cert_file is not None and sec.key_file is not None  # checked at load
    cert = load_certificate(sec.cert_file)
    uri = application_uri_of(cert)
    if uri is None:
        raise FatalStartupError(
            f"security.cert_file {sec.cert_file} has no application URI in its "
            "subjectAltName; create the certificate with `edge certs`"
        )
    if cfg.application_uri and cfg.application_uri != uri:
        raise FatalStartupError(
            f"application_uri {cfg.application_uri!r} differs from the URI in "
            f"security.cert_file ({uri!r}); servers reject such a client"
        )
    client.application_uri = uri

    endpoint = await _find_endpoint(cfg)
    presented = _first_cert(endpoint.ServerCertificate or b"")
    if not presented:
        raise FatalStartupError(
            f"the server offers {sec.policy}/{sec.mode} but sends no certificate")
    if sec.server_cert_file is not None:
        pinned = _der(load_certificate(sec.server_cert_file))
        if pinned != presented:
            raise FatalStartupError(
                f"server certificate mismatch: {cfg.endpoint} presents {_describe(presented)} "
                f"but security.server_cert_file pins {_describe(pinned)}; if the station's "
                "certificate was renewed, verify the new thumbprint with its owner and "
                "replace server_cert_file"
            )
    if sec.trust_dir is not None:
        validator = await _validator(sec.trust_dir)
        try:
            await validator(x509.load_der_x509_certificate(presented), endpoint.Server)
        except ServiceError as err:
            status = ua.StatusCode(ua.UInt32(err.code))
            raise FatalStartupError(
                f"server certificate refused ({status.name}): {cfg.endpoint} presents "
                f"{_describe(presented)}, which security.trust_dir {sec.trust_dir} does not "
                "trust; after checking the thumbprint with the station's owner, copy the "
                "certificate (or its CA) into trust_dir"
            ) from err
        client.certificate_validator = validator
    mode = getattr(ua.MessageSecurityMode, sec.mode)
    try:
        await client.set_security(
            POLICY_CLASSES[sec.policy],
            certificate=_der(cert),
            private_key=str(sec.key_file),
            server_certificate=presented,
            mode=mode,
        )
    except (ValueError, TypeError, OSError) as err:
        raise FatalStartupError(
            f"cannot use security.key_file {sec.key_file} with cert_file {sec.cert_file}: {err}"
        ) from err
    return f"{sec.policy}/{sec.mode} server {thumbprint(presented)[:16]}"


def security_warnings(cfg: OpcUaSourceConfig, now: datetime | None = None) -> list[str]:
    """What is allowed but unsafe or about to break, one sentence each (no I/O beyond
    reading the configured files): a password sent without a secure channel, a key file
    others can read, a pinned server certificate or the client certificate near its end."""
    out: list[str] = []
    sec = cfg.security
    if cfg.username is not None and not sec.enabled:
        out.append(f"user {cfg.username!r} logs in over security policy None: the password "
                   "crosses the network unencrypted; configure security (edge certs)")
    if sec.enabled and sec.key_file is not None:
        try:
            mode = Path(sec.key_file).stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o077:
            out.append(f"security.key_file {sec.key_file} can be read by other users "
                       f"(mode {mode & 0o777:o}); chmod 600 it")
    when = now or datetime.now(UTC)
    for what, path in (("security.server_cert_file", sec.server_cert_file),
                       ("security.cert_file", sec.cert_file)):
        if not sec.enabled or path is None:
            continue
        try:
            cert = load_certificate(path)
        except FatalStartupError:
            continue  # reported where it is used
        left = cert.not_valid_after_utc - when
        if left < timedelta(days=CERT_WARN_DAYS):
            state = "expired" if left.total_seconds() <= 0 else f"expires in {left.days} days"
            out.append(f"{what} {path} {state} ({cert.not_valid_after_utc:%Y-%m-%d}); renew "
                       "it before the station refuses the channel")
    return out


async def _find_endpoint(cfg: OpcUaSourceConfig) -> ua.EndpointDescription:
    sec = cfg.security
    probe = Client(cfg.endpoint, timeout=cfg.timeout_s)
    try:
        async with asyncio.timeout(cfg.timeout_s):
            endpoints = await probe.connect_and_get_server_endpoints()
    except (OSError, TimeoutError, ua.UaError) as err:
        raise RetryableStartupError(
            f"cannot get the endpoints of {cfg.endpoint}: {err!r}") from err
    uri = POLICY_CLASSES[sec.policy].URI
    mode = getattr(ua.MessageSecurityMode, sec.mode)
    for ep in endpoints:
        if ep.SecurityPolicyUri == uri and ep.SecurityMode == mode:
            return ep
    offered = sorted({f"{ep.SecurityPolicyUri.rpartition('#')[2]}/{ep.SecurityMode.name}"
                      for ep in endpoints})
    raise FatalStartupError(
        f"{cfg.endpoint} offers no endpoint with security {sec.policy}/{sec.mode}; "
        f"it offers {', '.join(offered) or 'nothing'}"
    )


async def _validator(trust_dir: str) -> CertificateValidator:
    root = Path(trust_dir)
    crl = root / "crl"
    store = TrustStore([root], [crl] if crl.is_dir() else [])
    try:
        await store.load()
    except (OSError, ValueError) as err:
        raise FatalStartupError(f"cannot load security.trust_dir {trust_dir}: {err}") from err
    return CertificateValidator(_VALIDATION, store)
