"""Every module of the ``edge`` package imports alone, in a fresh interpreter.

An import cycle stays hidden while its modules are always imported in the same order (the
gateway's start-up, the rest of this suite): the module that closes the cycle finds the
other one complete. Imported first and alone, the other module finds it half-initialised,
and ``from x import y`` fails. Each module gets its own ``python -c "import edge.x.y"``.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edge"
NOT_IMPORTED = {"edge.__main__"}  # importing it runs the command line
WORKERS = 4  # the interpreters mostly wait for the disk and each other: a few in parallel


def edge_modules() -> list[str]:
    """Every module and package under ``edge/``, found on disk (importing nothing)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return [name for name in names if name not in NOT_IMPORTED]


def import_alone(module: str) -> str | None:
    """The end of the traceback when ``module`` fails to import on its own, else None."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode == 0:
        return None
    return "\n".join(proc.stderr.strip().splitlines()[-3:])


def test_every_module_of_edge_imports_alone_in_a_fresh_interpreter() -> None:
    modules = edge_modules()
    assert "edge.outbox.audit" in modules and "edge.plugin" in modules  # the walk works
    with ThreadPoolExecutor(WORKERS) as pool:
        errors = dict(zip(modules, pool.map(import_alone, modules), strict=True))
    failed = {module: error for module, error in errors.items() if error is not None}
    assert not failed, f"{len(failed)} of {len(modules)} modules fail to import alone:\n" + \
        "\n".join(f"--- {module}\n{error}" for module, error in failed.items())
