"""Shared fixtures for tests/ and plugins/; component fixtures live in ``tests/fixtures/``.

Soak runs are marked ``@pytest.mark.slow``: the default suite (``make test``, CI) runs them
in a short form (about a minute); ``EDGE_SOAK=1`` (``make soak``) runs them for
``EDGE_SOAK_MINUTES`` (default 10).
"""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.gateway",
    "tests.fixtures.mosquitto",
    "tests.fixtures.opcua",
]
