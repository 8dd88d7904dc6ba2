"""Packaging: the files the arm64 image's build stage copies, as the build context after
``.dockerignore``, are enough to build the wheel; the wheel carries what the daemon needs at
run time and its ``edge`` entry point runs, the image's health probe included. (No
container engine runs the Dockerfile in CI; this checks the part of it that breaks when the
project layout changes. tests/container checks the rest that can be checked without one.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.arm64"


def _copy_sources(dockerfile: Path, *, stage: str | None) -> list[str]:
    """Context sources of the COPY lines (not ``COPY --from``) of the stage named ``stage``,
    or of every stage with ``stage=None``."""
    sources: list[str] = []
    in_stage = stage is None
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM" and stage is not None:
            in_stage = words[-2:] == ["AS", stage]
        elif in_stage and words[0] == "COPY" and not words[1].startswith("--"):
            sources.extend(w.rstrip("/") for w in words[1:-1])
    return sources


def _dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore`` as (exception, regex) rules: ``*`` and ``?`` stay within one path
    element, ``**`` spans any number, ``!`` re-includes; comments and blanks skipped."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part))
        rules.append((exception, re.compile(regex + r"\Z")))
    return rules


def _in_context(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last rule matching the path or one of its parent folders wins."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exception, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = exception
    return included


def _build_context(dest: Path) -> list[str]:
    """Copy the files the build stage's COPY lines take from the context into ``dest``;
    return their relative paths."""
    rules = _dockerignore_rules(ROOT / ".dockerignore")
    copied = []
    for source in _copy_sources(DOCKERFILE, stage="build"):
        src = ROOT / source
        files = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
        for path in files:
            rel = path.relative_to(ROOT).as_posix()
            if _in_context(rel, rules):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest / rel)
                copied.append(rel)
    return copied


def test_the_build_context_is_what_the_dockerfile_copies():
    """.dockerignore lets in every COPY source and nothing else at the top (.git, .venv,
    tests and state folders stay out of the context and so out of the image)."""
    rules = _dockerignore_rules(ROOT / ".dockerignore")
    top = {p.name for p in ROOT.iterdir() if _in_context(p.name, rules)}
    sources = _copy_sources(DOCKERFILE, stage=None)
    assert top == {s.split("/")[0] for s in sources}
    assert all(_in_context(s, rules) for s in sources)
    assert not _in_context("edge/__pycache__/app.cpython-311.pyc", rules)
    assert not _in_context("config/edge-demo-state/outbox.db", rules)


def test_docker_build_stage_copies_enough_to_build_the_wheel(tmp_path: Path) -> None:
    context = tmp_path / "src"
    context.mkdir()
    copied = _build_context(context)
    assert "pyproject.toml" in copied and "edge/cli/main.py" in copied
    assert "requirements/linux-aarch64.lock" in copied
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
         str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    [wheel] = (tmp_path / "wheels").glob("edge_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "edge/resources/demo.yaml" in names  # `edge demo` runs from the wheel alone
    assert "edge/cli/main.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    assert any(n.endswith("/licenses/LICENSE") for n in names)

    # its `edge` script runs from the installed wheel, the image's health probe included
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("EDGE_API_TOKEN", None)
    run = tmp_path / "run"
    run.mkdir()

    def edge(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(target / "bin" / "edge"), *args], cwd=run, env=env,
                              capture_output=True, text=True, timeout=60)

    where = subprocess.run([sys.executable, "-c", "import edge; print(edge.__file__)"],
                           cwd=run, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    version = edge("--version")
    assert version.returncode == 0 and "edge-gateway" in version.stdout, version.stderr
    cfg = run / "edge.yaml"
    cfg.write_text(f"site: s\nstate_dir: {run / 'state'}\n"
                   f"api: {{listen: '127.0.0.1:{free_port()}'}}\n")
    probe = edge("healthcheck", "-c", str(cfg))
    assert probe.returncode == 1 and "not running" in probe.stderr, probe.stderr
