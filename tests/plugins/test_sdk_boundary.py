"""The plugin SDK boundary: built-in components use only what a third-party plugin can.

Every module of a component bundle (``edge/sources/<name>/``, ``edge/sinks/<name>/``) may
import from ``edge`` only

- ``edge.plugin`` (the public SDK),
- its own package (``edge.sources.opcua.*`` inside the OPC UA source),
- shared protocol code that lives beside the components (``edge.mqtt``, ``edge.nats``),
- ``edge.timefmt`` (time and duration formatting),

plus the names in ``INTERNAL_BY_NATURE``, each with the reason it cannot go through the
SDK. Any other ``edge`` import means a built-in relies on something a plugin author cannot
rely on: export it from ``edge.plugin`` or move it into the bundle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edge.plugin

ROOT = Path(__file__).resolve().parents[2]
EDGE = ROOT / "edge"

SHARED = ("edge.plugin", "edge.mqtt", "edge.nats", "edge.timefmt")

# (module path relative to the repository, imported edge module) → why it is allowed.
INTERNAL_BY_NATURE: dict[tuple[str, str], str] = {}

# The other direction: (module path, imported component module) → why the core needs it.
CORE_USES_OF_COMPONENTS: dict[tuple[str, str], str] = {
    ("edge/cli/certs.py", "edge.sources.opcua.security"):
        "`edge certs` makes and inspects the OPC UA source's client certificate "
        "(imported inside the command)",
}

# Libraries a component imports in its factory, never through the SDK.
HEAVY = ("asyncua", "paho", "httpx", "aiohttp", "httpcore", "anyio", "starlette", "uvicorn",
         "aiosqlite", "sqlite3", "cryptography", "amqtt", "nats")


def _bundles() -> list[Path]:
    return sorted(p for kind in ("sources", "sinks") for p in (EDGE / kind).iterdir()
                  if (p / "__init__.py").is_file())


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module a file imports, relative imports resolved against ``module``;
    ``from edge import x`` counts as ``edge.x``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "edge":
                found.extend((node.lineno, f"edge.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, base))
    return found


def _allowed(imported: str, own: str) -> bool:
    def within(prefix: str) -> bool:
        return imported == prefix or imported.startswith(prefix + ".")

    return within(own) or any(within(p) for p in SHARED)


def violations() -> list[str]:
    out: list[str] = []
    for bundle in _bundles():
        own = _module_name(bundle / "__init__.py")
        for path in sorted(bundle.rglob("*.py")):
            module = _module_name(path)
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text(), filename=rel)
            for lineno, imported in _imported(tree, module, path.name == "__init__.py"):
                if imported != "edge" and not imported.startswith("edge."):
                    continue
                if _allowed(imported, own) or (rel, imported) in INTERNAL_BY_NATURE:
                    continue
                out.append(f"{rel}:{lineno} imports {imported}")
    return out


def test_components_import_only_the_sdk_their_package_and_shared_protocol_code():
    found = violations()
    assert not found, ("component modules reach past edge.plugin:\n  " + "\n  ".join(found))


def test_the_core_never_imports_a_component():
    """The registry finds components by entry point; nothing else names one."""
    found = []
    for path in sorted(EDGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(("edge/sources/", "edge/sinks/")):
            continue
        tree = ast.parse(path.read_text())
        for lineno, imported in _imported(tree, _module_name(path), path.name == "__init__.py"):
            if imported.startswith(("edge.sources.", "edge.sinks.")) and (
                    rel, imported) not in CORE_USES_OF_COMPONENTS:
                found.append(f"{rel}:{lineno} imports {imported}")
    assert not found


def test_the_example_plugins_import_only_the_sdk():
    """What plugins/ teaches is what a third party can do: import ``edge.plugin``."""
    found = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        if path.name.startswith("test_"):
            continue
        rel = str(path.relative_to(ROOT))
        for lineno, imported in _imported(ast.parse(path.read_text()), "plugin", False):
            if imported.split(".")[0] == "edge" and imported != "edge.plugin":
                found.append(f"{rel}:{lineno} imports {imported}")
    assert not found


def test_the_allow_list_names_imports_that_exist():
    """A stale entry would silently allow the next, unrelated use of that module."""
    used = set()
    for bundle in _bundles():
        for path in bundle.rglob("*.py"):
            module = _module_name(path)
            tree = ast.parse(path.read_text())
            rel = str(path.relative_to(ROOT))
            used |= {(rel, m) for _, m in _imported(tree, module, path.name == "__init__.py")}
    assert set(INTERNAL_BY_NATURE) <= used, set(INTERNAL_BY_NATURE) - used
    for rel, imported in CORE_USES_OF_COMPONENTS:
        path = ROOT / rel
        tree = ast.parse(path.read_text())
        assert imported in {m for _, m in _imported(tree, _module_name(path), False)}, rel


def test_bundles_are_found():
    names = {_module_name(b / "__init__.py") for b in _bundles()}
    assert {"edge.sources.mqtt", "edge.sources.opcua", "edge.sinks.http",
            "edge.sinks.mqtt"} <= names


def test_relative_imports_resolve_to_the_package():
    tree = ast.parse("from . import config\nfrom .nodes import x\nfrom .. import mqtt\n")
    assert [m for _, m in _imported(tree, "edge.sources.opcua.source", False)] == [
        "edge.sources.opcua", "edge.sources.opcua.nodes", "edge.sources"]
    assert [m for _, m in _imported(tree, "edge.sources.opcua", True)] == [
        "edge.sources.opcua", "edge.sources.opcua.nodes", "edge.sources"]


def test_every_exported_name_exists():
    missing = [name for name in edge.plugin.__all__ if not hasattr(edge.plugin, name)]
    assert not missing
    assert len(set(edge.plugin.__all__)) == len(edge.plugin.__all__)


def test_importing_the_sdk_loads_no_heavy_library():
    code = ("import sys, edge.plugin\n"
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True)
    assert out.stdout.split() == []
