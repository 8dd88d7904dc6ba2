"""Shared MQTT protocol code of the ``mqtt`` source and the ``mqtt`` sink.

- ``config``      broker connection keys (url, client id, protocol, TLS, login), validated
- ``topics``      topic templates: ``{name}`` captures, ``+``, ``#``, ``{site}``
- ``connection``  the paho client on the event loop: connect, failure reasons, I/O pump
- ``decoding``    cheaper receiving in paho (same objects), installed by ``connection``
- ``supervisor``  credentials at start, one attempt at a time, on-demand connecting (sink),
                  a reconnect loop with capped, jittered backoff (source)

Importing ``config`` and ``topics`` is cheap; ``connection`` and ``supervisor`` import
paho-mqtt, so the components import them in their factories only. ``README.md`` beside
this file says what each user shares and what stays with it.
"""
