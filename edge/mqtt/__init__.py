"""Shared MQTT protocol code of the ``mqtt`` source and the ``mqtt`` sink.

- ``config``      broker connection keys (url, client id, protocol, TLS, login), validated
- ``topics``      topic templates: ``{name}`` captures, ``+``, ``#``, ``{site}``
- ``connection``  the paho client on the event loop: connect, reconnect reasons, I/O pump

Importing ``config`` and ``topics`` is cheap; ``connection`` imports paho-mqtt, so the
components import it in their factories only.
"""
