"""``edge.nats``: the connection keys and ``connect()`` against private nats-servers with a
generated config (users, tokens, TLS). Secrets come from files read at start; a bad one is
a config error before any network I/O; a refused login, a failed TLS handshake and an
unreachable server are told apart (``NatsConnectError.code``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edge.errors import ConfigError
from edge.nats.config import NatsConnection
from edge.nats.connection import NatsConnectError, connect, connect_options
from tests.fixtures.mosquitto import make_test_pki
from tests.support import free_port


def _cfg(**kw: Any) -> NatsConnection:
    return NatsConnection.model_validate(kw, context={"check_files": False})


async def _roundtrip(nc: Any) -> bytes:
    sub = await nc.subscribe("edge.test.echo")
    await nc.publish("edge.test.echo", b"ping")
    msg = await sub.next_msg(timeout=5)
    await nc.close()
    return bytes(msg.data)


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "nats://user:pw@127.0.0.1:4222",
                                 "nats://127.0.0.1:0", "nats://127.0.0.1:4222/x", "nats://"])
def test_bad_server_urls_are_refused_at_load(url: str) -> None:
    with pytest.raises(ValidationError):
        _cfg(servers=[url])


def test_mixed_schemes_and_inline_secrets_are_refused() -> None:
    with pytest.raises(ValidationError, match="mix"):
        _cfg(servers=["nats://a:4222", "tls://b:4222"])
    with pytest.raises(ValidationError):
        _cfg(auth={"type": "user_password", "user": "gw", "password": "inline"})
    with pytest.raises(ValidationError):
        _cfg(auth={"type": "token", "token": "inline"})


def test_secret_files_must_exist_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="file not found"):
        NatsConnection.model_validate(
            {"auth": {"type": "token", "token_file": str(tmp_path / "missing")}})


def test_an_unreadable_or_empty_secret_is_a_config_error_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty") as err:
        connect_options(_cfg(auth={"type": "token", "token_file": str(empty)}), name="t")
    assert err.value.issues[0].location == "auth"
    gone = tmp_path / "gone"
    with pytest.raises(ConfigError, match="cannot read secret file"):
        connect_options(_cfg(auth={"type": "user_password", "user": "gw",
                                   "password_file": str(gone)}), name="t")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked"
        locked.write_text("x")
        locked.chmod(0)
        with pytest.raises(ConfigError):
            connect_options(_cfg(auth={"type": "token", "token_file": str(locked)}), name="t")


def test_relative_secret_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("s3cret\n")
    opts = connect_options(_cfg(auth={"type": "token", "token_file": "tok"}), name="t",
                           config_dir=tmp_path)
    assert opts["token"] == "s3cret"


def test_nkey_and_creds_auth_say_what_they_need(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    seed.write_text("SUAEXAMPLE\n")
    creds = tmp_path / "user.creds"
    creds.write_text("not a creds file\n")
    try:
        import nkeys  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="nkeys"):
            connect_options(_cfg(auth={"type": "nkey", "nkey_seed_file": str(seed)}), name="t")
        return
    with pytest.raises(ConfigError, match="credentials file"):
        connect_options(_cfg(auth={"type": "creds", "creds_file": str(creds)}), name="t")


async def test_user_and_password_from_a_file(nats_servers, tmp_path: Path) -> None:
    server = nats_servers('authorization { user: gw, password: "s3cret-pw" }\n')
    good, bad = tmp_path / "pw", tmp_path / "wrong"
    good.write_text("s3cret-pw\n")
    bad.write_text("guess\n")
    nc = await connect(_cfg(servers=[server.url], auth={
        "type": "user_password", "user": "gw", "password_file": str(good)}), name="edge-t")
    assert await _roundtrip(nc) == b"ping"
    with pytest.raises(NatsConnectError) as err:
        await connect(_cfg(servers=[server.url], auth={
            "type": "user_password", "user": "gw", "password_file": str(bad)}), name="edge-t")
    assert err.value.code == "auth"
    assert "guess" not in str(err.value)  # a secret never shows in an error
    with pytest.raises(NatsConnectError) as err:
        await connect(_cfg(servers=[server.url]), name="edge-t")  # no credentials at all
    assert err.value.code == "auth"


async def test_token_from_a_file(nats_servers, tmp_path: Path) -> None:
    server = nats_servers('authorization { token: "tok-123" }\n')
    (tmp_path / "tok").write_text("tok-123\n")
    nc = await connect(_cfg(servers=[server.url], auth={
        "type": "token", "token_file": str(tmp_path / "tok")}), name="edge-t")
    assert await _roundtrip(nc) == b"ping"


async def test_nkey_seed_from_a_file(nats_servers, tmp_path: Path) -> None:
    """A server that knows the user only by its NKEY public key: the gateway signs the
    server's nonce with the seed read from the file; another seed is refused."""
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    server = nats_servers(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    (tmp_path / "seed").write_bytes(seed + b"\n")
    (tmp_path / "other").write_bytes(other + b"\n")
    nc = await connect(_cfg(servers=[server.url], auth={
        "type": "nkey", "nkey_seed_file": str(tmp_path / "seed")}), name="edge-t")
    assert await _roundtrip(nc) == b"ping"
    with pytest.raises(NatsConnectError) as refused:
        await connect(_cfg(servers=[server.url], connect_timeout_s=2, auth={
            "type": "nkey", "nkey_seed_file": str(tmp_path / "other")}), name="edge-t")
    assert refused.value.code == "auth"


async def test_tls_verifies_the_server_against_the_ca(nats_servers, tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    server = nats_servers(f'tls {{ cert_file: "{pki.server_cert}", key_file: '
                          f'"{pki.server_key}", ca_file: "{pki.ca}", verify: true }}\n')
    mtls = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key)}
    nc = await connect(_cfg(servers=[server.url], tls=mtls), name="edge-t")
    assert await _roundtrip(nc) == b"ping"
    # a server certificate from another CA is refused, and so is a client without one
    with pytest.raises(NatsConnectError) as err:
        await connect(_cfg(servers=[server.url], tls={**mtls, "ca_file": str(pki.rogue_ca)}),
                      name="edge-t")
    assert err.value.code == "tls", err.value.message
    with pytest.raises(NatsConnectError):
        await connect(_cfg(servers=[server.url], tls={"ca_file": str(pki.ca)}), name="edge-t")


async def test_an_unreachable_server_fails_within_the_bounded_first_attempt() -> None:
    cfg = _cfg(servers=[f"nats://127.0.0.1:{free_port()}"], connect_timeout_s=1)
    with pytest.raises(NatsConnectError) as err:
        await connect(cfg, name="edge-t")
    assert err.value.code == "unreachable"


async def test_the_client_reconnects_by_itself_after_a_server_restart(nats_servers) -> None:
    server = nats_servers()
    nc = await connect(_cfg(servers=[server.url], reconnect_wait_s=0.1), name="edge-t")
    try:
        server.stop()
        server.start()
        from tests.support import eventually

        await eventually(lambda: nc.is_connected and nc.stats["reconnects"] >= 1,
                         timeout=30, what="a reconnect")
        sub = await nc.subscribe("edge.test.after")
        await nc.publish("edge.test.after", b"back")
        assert (await sub.next_msg(timeout=5)).data == b"back"
    finally:
        await nc.close()
