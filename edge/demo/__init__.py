"""``edge demo``: the gateway with its packaged demo.yaml, a broker, stations and an ERP.

See ``edge.demo.runner`` (sequence and contract), ``edge.demo.broker`` (mosquitto or the
embedded broker), ``edge.demo.stations`` (simulated equipment per protocol) and
``edge.demo.summary`` (live line and verdict).
"""

from edge.demo.runner import Demo, DemoOptions

__all__ = ["Demo", "DemoOptions"]
