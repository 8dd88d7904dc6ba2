"""Shared fixtures for tests/ and plugins/; component fixtures live in ``tests/fixtures/``.

Long soak runs are marked ``@pytest.mark.slow``: they run with ``EDGE_SOAK=1`` (``make
soak``); the default suite (``make test``, CI) runs their short forms only.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.gateway",
    "tests.fixtures.mosquitto",
    "tests.fixtures.opcua",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EDGE_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak run: set EDGE_SOAK=1 (make soak)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
