"""Packaging: the files the arm64 image's build stage copies are enough to build the wheel,
and the wheel carries what the daemon needs at run time. (No container engine runs the
Dockerfile in CI; this checks the part of it that breaks when the project layout changes.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _build_stage_sources(dockerfile: Path) -> list[str]:
    """Sources of the COPY lines of the stage named ``build`` (not ``COPY --from``)."""
    sources: list[str] = []
    in_build = False
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            in_build = words[-2:] == ["AS", "build"]
        elif in_build and words[0] == "COPY" and not words[1].startswith("--"):
            sources.extend(words[1:-1])
    return sources


def test_docker_build_stage_copies_enough_to_build_the_wheel(tmp_path: Path) -> None:
    sources = _build_stage_sources(ROOT / "Dockerfile.arm64")
    assert "pyproject.toml" in sources and "edge" in sources
    context = tmp_path / "src"
    context.mkdir()
    for name in sources:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, context / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, context / name)
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
