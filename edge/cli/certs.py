"""``edge certs`` — the gateway's OPC UA client certificate.

``edge certs [-c CONFIG] [--dir DIR] [--uri URI] [--hostname NAME] [--force]`` creates (or
keeps, when still valid) a self-signed application instance certificate (DER) and its
private key (PEM, mode 0600) and prints both paths, the application URI and the SHA-1
thumbprint an OPC UA server's administrator compares before trusting it.

- Default folder: ``<state_dir>/certs`` of the config given with ``-c``, else ``./certs``.
- Default application URI: ``urn:<hostname>:edge-gateway:<site>``. The OPC UA source
  reads the URI back from the certificate, so the two can never disagree.
- An existing pair is kept while it is valid for that URI and host name (nothing to
  re-trust on the servers); ``--force`` makes a new key and certificate.

``edge certs --show FILE`` prints the thumbprint, subject, URI and validity of any
certificate (e.g. a station's, to check it before pinning it in ``server_cert_file``).
Exit codes: 0 ok, 1 failure, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

CERT_NAME = "edge-gateway.der"
KEY_NAME = "edge-gateway.pem"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "certs", help="create the OPC UA client certificate, or show a certificate",
        description="Create (or keep, while valid) the gateway's OPC UA client certificate "
                    "and key, and print their paths and the thumbprint.",
    )
    p.add_argument("-c", "--config", help="config file (for state_dir and site)")
    p.add_argument("--dir", help="output folder (default: <state_dir>/certs or ./certs)")
    p.add_argument("--uri", help="application URI (default: urn:<hostname>:edge-gateway:<site>)")
    p.add_argument("--hostname", help="host name in the certificate (default: this host)")
    p.add_argument("--force", action="store_true", help="make a new key and certificate")
    p.add_argument("--show", metavar="FILE", help="print the details of a certificate and exit")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if args.show:
        return _show(Path(args.show))
    site = None
    out_dir = Path(args.dir) if args.dir else None
    if args.config:
        from edge.cli.common import load_or_exit

        cfg = load_or_exit(args.config, check_files=False)
        site = cfg.site
        out_dir = out_dir or Path(cfg.state_dir) / "certs"
    out_dir = out_dir or Path("certs")
    host = args.hostname or socket.gethostname()
    uri = args.uri or f"urn:{host}:edge-gateway" + (f":{site}" if site else "")
    if not uri.startswith(("urn:", "http://", "https://")):
        print(f"--uri must be a URN or URL, got {uri!r}", file=sys.stderr)
        return 2
    try:
        cert, key, created = create_client_certificate(out_dir, uri, host, force=args.force)
    except (OSError, ValueError) as err:
        print(f"cannot create the certificate in {out_dir}: {err}", file=sys.stderr)
        return 1
    info = describe(cert)
    print(f"{'created' if created else 'kept existing (still valid)'}:")
    print(f"  certificate:     {cert.resolve()}")
    print(f"  private key:     {key.resolve()} (mode 600, keep it secret)")
    print(f"  application URI: {info['uri']}")
    print(f"  thumbprint:      {info['thumbprint']} (SHA-1)")
    print(f"  valid until:     {info['not_after']}")
    print("Give the certificate to the OPC UA server's administrator; they check the "
          "thumbprint and trust it. Then in the source config:")
    print(f"  security: {{policy: Basic256Sha256, mode: SignAndEncrypt, cert_file: {cert}, "
          f"key_file: {key}, server_cert_file: <the server's certificate>}}")
    return 0


def create_client_certificate(
    out_dir: Path, uri: str, host: str, *, force: bool = False
) -> tuple[Path, Path, bool]:
    """Create or keep the pair; returns (cert path, key path, created?)."""
    import asyncio

    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out_dir.mkdir(parents=True, exist_ok=True)
    cert, key = out_dir / CERT_NAME, out_dir / KEY_NAME
    if force:
        for p in (cert, key):
            p.unlink(missing_ok=True)
    before = (cert.read_bytes() if cert.is_file() else None,
              key.read_bytes() if key.is_file() else None)
    old_umask = os.umask(0o077)  # the key is created readable by its owner only
    try:
        asyncio.run(setup_self_signed_certificate(
            key, cert, uri, host, [ExtendedKeyUsageOID.CLIENT_AUTH],
            {"organizationName": "edge-gateway"},
        ))
    finally:
        os.umask(old_umask)
    key.chmod(0o600)
    cert.chmod(0o644)  # the certificate is public
    created = (cert.read_bytes(), key.read_bytes()) != before
    return cert, key, created


def describe(path: Path) -> dict[str, str]:
    from edge.sources.opcua.security import application_uri_of, load_certificate, thumbprint

    cert = load_certificate(path)
    from cryptography.hazmat.primitives.serialization import Encoding

    return {
        "thumbprint": thumbprint(cert.public_bytes(Encoding.DER)),
        "subject": cert.subject.rfc4514_string(),
        "uri": application_uri_of(cert) or "(none: not usable as an OPC UA application cert)",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _show(path: Path) -> int:
    from edge.errors import FatalStartupError

    try:
        info = describe(path)
    except FatalStartupError as err:
        print(str(err), file=sys.stderr)
        return 1
    for k in ("thumbprint", "subject", "uri", "not_before", "not_after"):
        print(f"{k + ':':<12} {info[k]}")
    return 0
