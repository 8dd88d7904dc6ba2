"""The fault campaign's tests share the MQTT fixtures (``tests.fixtures.mosquitto``)."""

from __future__ import annotations

import os

import pytest


def fault_cycles(default: int) -> int:
    """``EDGE_FAULT_CYCLES`` when set (the long form), else ``default``."""
    return int(os.environ.get("EDGE_FAULT_CYCLES") or default)


@pytest.fixture
def cycles() -> int:
    return fault_cycles(20)
