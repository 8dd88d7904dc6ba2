"""The parts of config loading that need no validation: ``${ENV}`` substitution and a
peek at ``state_dir``.

Kept apart from ``edge.config`` (pydantic and the component models) so ``edge run`` can read
``state_dir`` and start the outbox integrity check ~0.1 s earlier (before pydantic loads).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from edge.errors import ConfigIssue

__all__ = ["DEFAULT_STATE_DIR", "peek_state_dir", "substitute_env"]

DEFAULT_STATE_DIR = "/var/lib/edge-gateway"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(node: Any, env: Mapping[str, str], path: str, issues: list[ConfigIssue]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a YAML tree; a missing
    variable without default becomes an issue at its location and an empty string."""
    if isinstance(node, dict):
        return {
            k: substitute_env(v, env, f"{path}.{k}" if path else str(k), issues)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [substitute_env(v, env, f"{path}[{i}]", issues) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            issues.append(ConfigIssue(path, f"environment variable {name} is not set"))
            return ""

        return _ENV_RE.sub(repl, node)
    return node


def peek_state_dir(path: str | os.PathLike[str]) -> str | None:
    """``state_dir`` of a config file without validating it (None if it cannot be read).

    Lets ``edge run`` start the outbox integrity check while the full validation runs;
    the validated config decides, this is only a head start.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
        value = raw.get("state_dir", DEFAULT_STATE_DIR)
        value = substitute_env(value, os.environ, "state_dir", [])
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(value, str):
        return None
    state = Path(value)
    return str(state if state.is_absolute() else Path(path).resolve().parent / state)
