"""Cheaper decoding of received packets in paho-mqtt (the same objects, built faster).

paho builds a ``Properties`` object for every MQTT 5 packet it reads, PUBLISH included,
and its ``__init__`` rebuilds three lookup tables (property names, types, and which
packets may carry each) every time; ``unpack`` first ``clear()``s the new object by
probing all 27 names. At ingest rates that is ~8 µs of ~11 µs to decode a PUBLISH,
paid on the thread that also maps and acks.

``SharedTableProperties`` is a ``Properties`` subclass that refers to one read-only copy
of those tables and clears only the attributes it holds; everything else (``unpack``,
validation on assignment, ``json()``, ``pack()``) is paho's own code, so a decoded
packet's properties are equal, attribute by attribute, to paho's. paho offers no hook for
the class it decodes into, so ``install()`` sets it as the class paho's packet decoder
(``paho.mqtt._packet``) uses.

Every received message also gets an ``MQTTMessageInfo`` with a ``threading.Condition``
(a lock, a deque and five bound methods): the handle ``publish()`` returns to wait for
an outgoing message, never used for a received one. Nine objects per message, and the
ones of messages held until their commit are what the garbage collector traverses again
and again at ingest rates. ``LazyInfoMessage`` (an ``MQTTMessage``) makes that handle
when ``info`` is first read, as the same object paho would have made, so ``publish()``
is unchanged; ``install()`` makes it the class paho's client builds messages from.

``FastDispatchClient`` (a paho ``Client``) hands each received message straight to
``on_message`` while no per-topic callback is registered (``message_callback_add``):
paho's own dispatch decodes the topic and walks its filter tree with nested generators
for every message first, to find callbacks that do not exist. With a per-topic callback
added it is paho's dispatch again.

``install()`` changes nothing where paho is not laid out as in the versions checked
(2.1, 2.2): ``installed()`` then says False and paho's own classes stay in use.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt import client as _client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["FastDispatchClient", "LazyInfoMessage", "SharedTableProperties", "install",
           "installed"]

_TABLES = Properties(PacketTypes.PUBLISH)  # names, types, properties: never mutated by paho
_COMPRESSED = frozenset(name.replace(" ", "") for name in _TABLES.names)


class SharedTableProperties(Properties):
    """paho's ``Properties`` with its lookup tables shared instead of rebuilt per packet."""

    def __init__(self, packetType: int) -> None:  # noqa: N803 - paho's parameter name
        d = self.__dict__
        d["packetType"] = packetType
        d["types"] = _TABLES.types
        d["names"] = _TABLES.names
        d["properties"] = _TABLES.properties

    def clear(self) -> None:
        for name in _COMPRESSED.intersection(self.__dict__):
            delattr(self, name)


_MESSAGE = _client.MQTTMessage
_INFO_SLOT: Any = _MESSAGE.__dict__.get("info")  # the slot paho keeps the handle in
_MESSAGE_SLOTS = frozenset(getattr(_MESSAGE, "__slots__", ()))
_PAHO_MESSAGE_SLOTS = frozenset({"_topic", "dup", "info", "mid", "payload", "properties",
                                 "qos", "retain", "state", "timestamp"})


class LazyInfoMessage(_MESSAGE):
    """paho's ``MQTTMessage`` whose ``info`` handle is made on first use."""

    __slots__ = ()

    def __init__(self, mid: int = 0, topic: bytes = b"") -> None:
        self.timestamp = 0.0
        self.state = _client.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = b""
        self.qos = 0
        self.retain = False
        self.properties = None

    @property
    def info(self) -> _client.MQTTMessageInfo:
        try:
            return _INFO_SLOT.__get__(self, _MESSAGE)
        except AttributeError:
            made = _client.MQTTMessageInfo(self.mid)
            _INFO_SLOT.__set__(self, made)
            return made

    @info.setter
    def info(self, value: _client.MQTTMessageInfo) -> None:
        _INFO_SLOT.__set__(self, value)


class FastDispatchClient(_client.Client):
    """paho's ``Client``; received messages skip the per-topic callback lookup while no
    per-topic callback is registered (see the module docstring)."""

    _topic_callbacks = False

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._topic_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: _client.MQTTMessage) -> None:
        if self._topic_callbacks or not _DISPATCH_LAYOUT:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message:
            with self._in_callback_mutex:
                try:
                    on_message(self, self._userdata, message)
                except Exception as err:
                    self._easy_log(_client.MQTT_LOG_ERR, "Caught exception in on_message: %s",
                                   err)
                    if not self.suppress_exceptions:
                        raise


# what FastDispatchClient._handle_on_message uses of paho's (2.1, 2.2) private layout
_DISPATCH_LAYOUT = all(hasattr(_client.Client, name) for name in (
    "_handle_on_message", "_easy_log", "message_callback_add"))


def install() -> bool:
    """Make paho decode received packets' properties into ``SharedTableProperties`` and
    build messages as ``LazyInfoMessage``; True when both are (or were already) in use."""
    try:
        from paho.mqtt import _packet
    except ImportError:
        return False
    current: Any = getattr(_packet, "Properties", None)
    if current is Properties and callable(getattr(_packet, "decode_publish", None)):
        _packet.Properties = SharedTableProperties  # type: ignore[misc]
    if (_client.MQTTMessage is _MESSAGE and _MESSAGE_SLOTS == _PAHO_MESSAGE_SLOTS
            and _INFO_SLOT is not None):
        _client.MQTTMessage = LazyInfoMessage  # type: ignore[misc]
    return installed()


def installed() -> bool:
    try:
        from paho.mqtt import _packet
    except ImportError:
        return False
    return (getattr(_packet, "Properties", None) is SharedTableProperties
            and _client.MQTTMessage is LazyInfoMessage)
