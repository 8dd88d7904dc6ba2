"""Component registry: ``type`` name → config model + factory.

Two kinds of components register here: sources and sinks. Built-ins register through the
same entry-point groups third-party packages use (``edge.sources``, ``edge.sinks``);
drop-in packages in the configured ``plugins_dir`` are imported with a warning. Each entry
point names a ``ComponentType``. (Mapping a record to an event, ``edge.transforms.map``, is
part of a source's config, not a component of its own.)

Contract for component modules: importing the module must be cheap (config model only);
heavy client libraries are imported inside the factory, so start-up stays fast and a
config check never needs asyncua or paho.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from edge.errors import ConfigError

__all__ = ["ComponentType", "Registry", "default_registry"]

log = logging.getLogger(__name__)

Kind = Literal["source", "sink"]
GROUPS: dict[Kind, str] = {
    "source": "edge.sources",
    "sink": "edge.sinks",
}


@dataclass(frozen=True)
class ComponentType:
    """A registrable component: its kind, ``type`` name, config model and factory.

    ``factory(config, ctx)`` validates and builds the component without doing I/O.
    """

    kind: Kind
    type: str
    config_model: builtins.type[BaseModel]
    factory: Callable[..., Any]
    description: str = ""


class Registry:
    def __init__(self) -> None:
        self._types: dict[Kind, dict[str, ComponentType]] = {k: {} for k in GROUPS}
        self._loaded_dirs: set[str] = set()

    def register(self, component: ComponentType) -> None:
        existing = self._types[component.kind].get(component.type)
        if existing is not None and existing is not component:
            log.warning(
                "%s type %r registered twice; keeping the first", component.kind, component.type
            )
            return
        self._types[component.kind][component.type] = component

    def get(self, kind: Kind, type_name: str) -> ComponentType:
        try:
            return self._types[kind][type_name]
        except KeyError:
            allowed = ", ".join(sorted(self._types[kind])) or "(none)"
            raise ConfigError(
                f"unknown {kind} type {type_name!r}; one of {allowed}"
            ) from None

    def types(self, kind: Kind) -> dict[str, ComponentType]:
        return dict(self._types[kind])

    def load_entry_points(self) -> None:
        """Register every component the installed distributions name in the entry-point
        groups, the gateway's own built-ins included (``pyproject.toml``)."""
        for kind, group in GROUPS.items():
            for ep in entry_points(group=group):
                self._register_ref(kind, ep.name, ep.value)

    def _register_ref(self, kind: Kind, name: str, ref: str) -> None:
        module_name, _, attr = ref.partition(":")
        try:
            module = importlib.import_module(module_name)
            component = getattr(module, attr or "COMPONENT")
        except (ImportError, AttributeError) as err:
            log.warning("cannot load %s type %r from %s: %s", kind, name, ref, err)
            return
        if not isinstance(component, ComponentType) or component.kind != kind:
            log.warning("%s does not name a %s ComponentType; ignored", ref, kind)
            return
        if component.type != name:
            # the config's ``type:`` is the component's own name; a different entry-point
            # name would make `edge components` and the package metadata disagree
            log.warning("entry point %r names %s type %r; registered as %r", name, kind,
                        component.type, component.type)
        self.register(component)

    def load_plugins_dir(self, path: str | Path) -> list[str]:
        """Import every package in ``path`` that defines ``COMPONENTS`` or ``COMPONENT``.

        Returns the names loaded. A plugin that fails to import is a ConfigError naming it:
        a configured plugin that silently vanished would strand its rows.
        """
        root = Path(path)
        key = str(root.resolve())
        if key in self._loaded_dirs:
            return []
        if not root.is_dir():
            raise ConfigError(f"is not a directory: {root}", location="plugins_dir")
        loaded: list[str] = []
        for pkg in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
            mod_name = f"edge_plugin_{pkg.name}"
            spec = importlib.util.spec_from_file_location(
                mod_name, pkg / "__init__.py", submodule_search_locations=[str(pkg)]
            )
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as err:  # noqa: BLE001 - any plugin error becomes a config error
                sys.modules.pop(mod_name, None)
                raise ConfigError(
                    f"plugin {pkg.name!r} failed to import: {err!r}", location="plugins_dir"
                ) from err
            components = list(getattr(module, "COMPONENTS", []))
            if hasattr(module, "COMPONENT"):
                components.append(module.COMPONENT)
            for component in components:
                if isinstance(component, ComponentType):
                    self.register(component)
            log.warning(
                "loaded third-party plugin %r from %s (not part of the edge distribution)",
                pkg.name,
                pkg,
            )
            loaded.append(pkg.name)
        self._loaded_dirs.add(key)
        return loaded


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry with built-ins and installed entry points loaded."""
    global _default
    if _default is None:
        _default = Registry()
        _default.load_entry_points()
    return _default
