"""The fault campaign's tests share the MQTT fixtures (``tests.fixtures.mosquitto``)."""

from __future__ import annotations

import pytest

from tests.faults.harness import fault_cycles


@pytest.fixture
def cycles() -> int:
    return fault_cycles(20)
