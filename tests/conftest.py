"""Shared fixtures. Component-specific fixtures live in ``tests/fixtures/<name>.py``."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.gateway",
    "tests.fixtures.mosquitto",
    "tests.fixtures.opcua",
]
