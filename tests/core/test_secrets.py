"""Secrets fail early and clearly (issue #13 item 2).

``check-config`` reads every ``SecretFile`` of the config (sources, sinks, auth and TLS
blocks); an unreadable, missing or empty one is a located error (exit 2), a secret readable
by group or others a warning. ``edge run`` exits 2 with the same located lines instead of a
traceback. Operator commands load the example config without systemd's
``CREDENTIALS_DIRECTORY`` and never print a traceback for an outbox they cannot open.

The tests run as root, which reads a file whatever its mode, so "exists but unreadable" is
made with a link to ``/proc/self/mem``: a regular file (``Path.is_file()`` is true, so the
load-time existence check passes) whose read at offset 0 fails with EIO for every user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.cli.common import open_outbox_or_exit
from edge.config import check_secret_files, load_config, secret_files
from tests.support import free_port, sink_yaml

ROOT = Path(__file__).resolve().parents[2]


def edge(*args: str, cwd: Path, env: dict[str, str] | None = None,
         drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("EDGE_API_TOKEN", *drop)}
    return subprocess.run([sys.executable, "-m", "edge", *args], cwd=cwd, text=True,
                          capture_output=True, env={**base, **(env or {})}, timeout=120)


def unreadable(path: Path) -> Path:
    """A path that exists as a regular file but cannot be read, even by root."""
    path.symlink_to("/proc/self/mem")
    assert path.is_file()
    return path


def config(tmp: Path, *, password_file: str = "secrets/mqtt", token_file: str | None = None
           ) -> Path:
    """A gateway config with one mqtt source whose password comes from ``password_file``."""
    api = f"api: {{listen: 127.0.0.1:{free_port()}, token_file: {token_file}}}\n" \
        if token_file else ""
    text = textwrap.dedent(f"""\
        site: t
        state_dir: state
        sources:
          - id: line1
            type: mqtt
            url: mqtt://127.0.0.1:{free_port()}
            username: edge
            password_file: {password_file}
            connect_timeout_s: 1
            subscriptions:
              - {{topic: a/b, event: inspection.result}}
        """) + api + sink_yaml("http://127.0.0.1:9/")
    (tmp / "secrets").mkdir(exist_ok=True)
    path = tmp / "edge.yaml"
    path.write_text(text)
    return path


def secret(tmp: Path, name: str, text: str, mode: int = 0o600) -> Path:
    (tmp / "secrets").mkdir(exist_ok=True)
    p = tmp / "secrets" / name
    p.write_text(text)
    p.chmod(mode)
    return p


def test_secret_files_finds_every_secret_of_the_example_config():
    cfg = load_config(ROOT / "config" / "plant.example.yaml", check_files=False,
                      env={"CREDENTIALS_DIRECTORY": "/creds"})
    found = dict(secret_files(cfg))
    assert found["sources[0].password_file"] == "/creds/mqtt"          # a source
    assert found["sources[2].password_file"] == "/creds/station7"      # opcua
    assert found["sinks[1].auth.key_file"] == "/creds/qms"             # an auth block
    assert found["sinks[6].auth.password_file"] == "/creds/nats"       # nats sink auth
    assert "sources[0].tls.key_file" in found                          # TLS
    assert "site" not in found and "state_dir" not in found


def test_check_config_fails_on_a_secret_that_exists_but_cannot_be_read(tmp_path: Path):
    path = config(tmp_path)
    unreadable(tmp_path / "secrets" / "mqtt")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "sources[0].password_file: cannot read secret file" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["folder", "dangling link", "missing"])
def test_check_config_names_a_secret_that_is_not_a_file(tmp_path: Path, kind: str):
    path = config(tmp_path)
    p = tmp_path / "secrets" / "mqtt"
    if kind == "folder":
        p.mkdir()
    elif kind == "dangling link":
        p.symlink_to(tmp_path / "gone")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2
    expected = {"folder": "is a folder, not a file",
                "dangling link": "which does not exist", "missing": "file not found"}[kind]
    assert "sources[0].password_file" in r.stderr and expected in r.stderr, r.stderr


def test_an_empty_secret_is_an_error(tmp_path: Path):
    path = config(tmp_path)
    secret(tmp_path, "mqtt", "\n")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2
    assert f"sources[0].password_file: secret file {tmp_path}/secrets/mqtt is empty" in r.stderr


def test_a_secret_readable_by_others_is_a_warning_and_strict_fails(tmp_path: Path):
    path = config(tmp_path)
    p = secret(tmp_path, "mqtt", "pw", mode=0o644)
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: sources[0].password_file" in r.stderr and "mode 644" in r.stderr
    assert edge("check-config", "--strict", str(path), cwd=tmp_path).returncode == 1
    p.chmod(0o600)
    r = edge("check-config", "--strict", str(path), cwd=tmp_path)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_api_tokens_empty_short_and_long_enough(tmp_path: Path):
    secret(tmp_path, "mqtt", "pw")
    path = config(tmp_path, token_file="secrets/api")
    tok = tmp_path / "secrets" / "api"

    secret(tmp_path, "api", "")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2 and f"api.token_file: secret file {tok} is empty" in r.stderr

    secret(tmp_path, "api", "# only a comment\n")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2 and f"token file {tok} has no token" in r.stderr

    secret(tmp_path, "api", "ops short\n")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 2
    assert f"api.token_file: {tok} line 1: token is 5 characters, at least 16" in r.stderr

    secret(tmp_path, "api", "ops 0123456789abcdef  # the operators\n")
    r = edge("check-config", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_certificates_readable_by_others_are_no_warning(tmp_path: Path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "ca.pem").chmod(0o644)
    cfg = load_config(config(tmp_path, password_file="ca.pem"))  # any SecretFile ...
    errors, warnings = check_secret_files(cfg)
    assert warnings and not errors  # ... a password readable by all is one
    text = (tmp_path / "edge.yaml").read_text().replace(
        "password_file: ca.pem", "password_file: ca.pem\n    tls: {ca_file: ca.pem}"
    ).replace("url: mqtt://", "url: mqtts://")
    (tmp_path / "edge.yaml").write_text(text)
    cfg = load_config(tmp_path / "edge.yaml")
    _, warnings = check_secret_files(cfg)
    assert [w.location for w in warnings] == ["sources[0].password_file"]


def test_edge_run_exits_2_with_located_lines_for_an_unreadable_secret(tmp_path: Path):
    path = config(tmp_path)
    unreadable(tmp_path / "secrets" / "mqtt")
    r = edge("run", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{path}: invalid configuration" in r.stderr
    assert "sources[0].password_file: cannot read secret file" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """config/plant.example.yaml with state_dir in tmp (certs and schemas beside it)."""
    for name in ("schemas",):
        if (ROOT / "config" / name).is_dir():
            shutil.copytree(ROOT / "config" / name, tmp_path / name)
    text = (ROOT / "config" / "plant.example.yaml").read_text()
    lines = [f"state_dir: {tmp_path / 'state'}" if line.startswith("state_dir:") else line
             for line in text.splitlines()]
    (tmp_path / "edge.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("verb", [["outbox", "stats", "-c"], ["dlq", "list", "-c"],
                                  ["status", "-c"]])
def test_operator_commands_load_the_example_without_credentials_directory(
        example: Path, verb: list[str]):
    r = edge(*verb, "edge.yaml", cwd=example, drop=("CREDENTIALS_DIRECTORY",))
    assert "CREDENTIALS_DIRECTORY" not in r.stderr and "invalid configuration" not in r.stderr
    assert r.returncode == 1, r.stderr  # got past the config: no outbox / nothing answers
    assert "no outbox at" in r.stderr or "not running" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["folder", "not a database"])
def test_an_outbox_that_cannot_be_opened_is_one_line(tmp_path: Path, kind: str,
                                                     capsys: pytest.CaptureFixture[str]):
    db = tmp_path / "outbox.db"
    if kind == "folder":
        db.mkdir()
    else:
        db.write_text("not sqlite\n" * 100)
    with pytest.raises(SystemExit) as exc:
        open_outbox_or_exit(str(db))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edge: cannot open the outbox {db}: ") and err.count("\n") == 1


@pytest.mark.parametrize("verb", [["outbox", "stats", "-c"], ["dlq", "list", "-c"]])
def test_operator_commands_on_an_outbox_they_cannot_open_say_one_line(tmp_path: Path,
                                                                      verb: list[str]):
    (tmp_path / "state" / "outbox.db").mkdir(parents=True)  # a folder in its place
    (tmp_path / "edge.yaml").write_text(f"site: s\nstate_dir: {tmp_path / 'state'}\n")
    r = edge(*verb, "edge.yaml", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "cannot open the outbox" in r.stderr and "Traceback" not in r.stderr
