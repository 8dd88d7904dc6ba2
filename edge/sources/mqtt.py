"""``type: mqtt`` — subscribe to an MQTT broker and store each message as a canonical event.

Contract (DESIGN invariants 1, 3 and 4):
- QoS 1 with manual acknowledgement: a message is PUBACKed only after the outbox COMMIT
  that stored its event (or its quarantine record), in arrival order. Events are stored
  in arrival order too, also when a write fails and is retried.
- Only redeliveries are matched. Without ``dedupe_key`` a message's key is the SHA-256 of
  topic and payload, matched only when the broker flags the copy as a resend (DUP, after a
  crash or a lost connection between commit and PUBACK) or replays a retained message, and
  only against the newest ``2 × max_held`` keys of the source (what can be unacked at a
  crash): the copy maps to the stored event's id. A device that publishes the same payload
  twice gets two events. A ``dedupe_key`` template is an identity (a station-assigned
  message id): any message with a key stored within ``outbox.dedupe_window_s`` maps to
  that event, flagged or not.
- A write that fails (budget full, storage fault) is never acked nor quarantined: the
  source retries with backoff and the broker keeps the messages.
- Persistent session: a stable ``client_id`` (default ``edge-<site>-<id>``), MQTT 3.1.1
  ``clean_session=False``, MQTT 5 ``clean_start=False`` with ``session_expiry_s`` > 0, so
  the broker keeps messages while the gateway is down.
- Unusable input (not JSON, larger than ``max_payload_bytes``, fails mapping or
  validation, a topic no subscription matches) is quarantined with a reason code, counted,
  logged once per (reason, topic) burst and acked once the quarantine record is committed:
  a poison message never blocks the session. The source never crashes on input. A record
  that makes storing fail by itself (a bug, not an outbox error) is quarantined as
  ``internal_error``; a quarantine record that cannot be written is retried, not dropped.
- Backpressure: when the outbox refuses events (budget full) nothing is acked; the source
  waits until it accepts again and retries the same messages. The broker stops sending
  once ``max_inflight_messages`` messages are unacked; reading pauses at ``max_held``.
- Connection failures (broker down, bad credentials, TLS verification) are logged with a
  clear reason and retried with capped exponential backoff and jitter inside ``run()``.

Topic templates: ``plant/{site}/line/{line}/station/{station}/inspection``. Each ``{name}``
is one whole topic level, subscribed as ``+`` and captured into the event's ``data``;
``+`` matches a level without capturing and a final ``#`` matches the rest. ``{site}`` is
not a wildcard: it is replaced by the gateway's ``site``, so gateways of several plants
can share a broker without reading each other's data (capture a plant level under any
other name, e.g. ``{plant}``).

This module holds the config model only (cheap to import); the client (paho-mqtt) is
loaded by the factory.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from edge.config import SecretFile, SourceConfigBase, StrictModel
from edge.errors import ConfigError
from edge.registry import ComponentType
from edge.transforms.map import MappingConfig, template_fields

if TYPE_CHECKING:
    from edge.components import ComponentContext, Source

__all__ = [
    "COMPONENT",
    "MqttConnectionConfig",
    "MqttSourceConfig",
    "MqttTlsConfig",
    "SubscriptionConfig",
    "TopicTemplate",
]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names a ``{...}`` template may use besides data fields: see ``Mapper.map``.
_TEMPLATE_BUILTINS = {"site", "source"}


@dataclass(frozen=True)
class TopicTemplate:
    """A parsed topic template: literal levels, ``{name}`` captures, ``+`` and a final ``#``."""

    template: str
    levels: tuple[str, ...]

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        """Parse and check a template; ValueError names the offending level."""
        if not template:
            raise ValueError("must not be empty")
        if "\x00" in template:
            raise ValueError("must not contain a NUL character")
        levels = tuple(template.split("/"))
        seen: set[str] = set()
        for i, level in enumerate(levels):
            if level == "#":
                if i != len(levels) - 1:
                    raise ValueError(f"'#' must be the last level, got {template!r}")
                continue
            if level == "+":
                continue
            if level.startswith("{") and level.endswith("}"):
                name = level[1:-1]
                if not _NAME_RE.match(name):
                    raise ValueError(f"{level!r} is not a valid {{name}} level in {template!r}")
                if name in seen:
                    raise ValueError(f"{{{name}}} is used twice in {template!r}")
                seen.add(name)
                continue
            if any(ch in level for ch in "{}+#"):
                raise ValueError(
                    f"level {level!r} of {template!r}: a {{name}}, '+' or '#' must be a whole "
                    "topic level"
                )
        return cls(template, levels)

    @property
    def captures(self) -> list[str]:
        return [lv[1:-1] for lv in self.levels if lv.startswith("{") and lv[1:-1] != "site"]

    def subscription_filter(self, site: str) -> str:
        """The MQTT filter to subscribe: ``{site}`` → the gateway's site, ``{name}`` → ``+``."""
        out = []
        for lv in self.levels:
            if lv == "{site}":
                out.append(site)
            elif lv.startswith("{"):
                out.append("+")
            else:
                out.append(lv)
        return "/".join(out)


@dataclass(frozen=True)
class CompiledTopic:
    """A template bound to a site: ``match(topic)`` → captures, or None if it does not match.

    Matching follows MQTT filter rules (``+`` one level, a final ``#`` also matches the
    parent level, wildcards never match a first level starting with ``$``); it runs as
    one compiled regular expression per subscription.
    """

    filter: str
    _rx: re.Pattern[str]
    _names: tuple[str, ...]
    _wild_first: bool

    @classmethod
    def build(cls, template: TopicTemplate, site: str) -> CompiledTopic:
        parts: list[str] = []
        names: list[str] = []
        levels = template.levels
        for lv in levels:
            if lv == "{site}":
                parts.append(re.escape(site))
            elif lv.startswith("{"):
                parts.append("([^/]*)")
                names.append(lv[1:-1])
            elif lv == "+":
                parts.append("[^/]*")
            elif lv == "#":
                parts.append("#")
            else:
                parts.append(re.escape(lv))
        if parts[-1] == "#":
            body = "/".join(parts[:-1])
            pattern = f"{body}(?:/.*)?" if body else ".*"
        else:
            pattern = "/".join(parts)
        wild_first = levels[0] in ("+", "#") or (levels[0].startswith("{")
                                                 and levels[0] != "{site}")
        return cls(template.subscription_filter(site), re.compile(pattern, re.DOTALL),
                   tuple(names), wild_first)

    def match(self, topic: str) -> dict[str, str] | None:
        if self._wild_first and topic.startswith("$"):
            return None  # MQTT: wildcards do not match $SYS-style topics
        m = self._rx.fullmatch(topic)
        if m is None:
            return None
        return dict(zip(self._names, m.groups(), strict=True))


class MqttTlsConfig(StrictModel):
    ca_file: SecretFile | None = Field(
        None, description="CA bundle (PEM) that signed the broker's certificate; "
        "default: the system trust store")
    cert_file: SecretFile | None = Field(None, description="client certificate (PEM) for mTLS")
    key_file: SecretFile | None = Field(None, description="client private key (PEM) for mTLS")

    @model_validator(mode="after")
    def _pair(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class SubscriptionConfig(MappingConfig):
    """One topic template and how its payloads map to events (see ``MappingConfig``)."""

    topic: str = Field(description="template, e.g. plant/{site}/line/{line}/station/{station}/x")
    qos: int = Field(1, description="0 (may lose messages) or 1 (acked after commit)")

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        TopicTemplate.parse(v)
        return v

    @field_validator("qos", mode="before")
    @classmethod
    def _qos(cls, v: Any) -> Any:
        if isinstance(v, bool) or v not in (0, 1, "0", "1"):
            raise ValueError(
                f"must be 0 or 1, got {v!r} (QoS 2 state lives only in the client's memory "
                "and is lost on a crash; QoS 1 with the outbox dedupe gives exactly-once "
                "storage)"
            )
        return int(v)

    @model_validator(mode="after")
    def _template_names(self) -> SubscriptionConfig:
        """With ``fields``, every template name must be a field, capture or static key."""
        if not self.fields:
            return self
        known = (set(self.fields) | set(self.static) | _TEMPLATE_BUILTINS
                 | set(TopicTemplate.parse(self.topic).captures))
        for key in ("ordering_key", "dedupe_key"):
            template = getattr(self, key)
            for name in template_fields(template) if template else []:
                root = name.split(".")[0].split("[")[0]
                if root not in known and root != "data":
                    allowed = ", ".join(sorted(known))
                    raise ValueError(
                        f"{key} uses {{{name}}}, which is neither a mapped field, a topic "
                        f"capture nor a static field (one of {allowed})"
                    )
        return self


def _protocol(v: Any) -> Any:
    text = str(v).strip().lower().removeprefix("v").removeprefix("mqtt")
    if text in ("3.1.1", "311", "3"):
        return "3.1.1"
    if text in ("5", "5.0", "50"):
        return "5"
    raise ValueError(f"must be 3.1.1 or 5, got {v!r}")


class MqttConnectionConfig(StrictModel):
    """Broker connection keys shared by the ``mqtt`` source and the ``mqtt`` sink."""

    url: str = Field(description="mqtt://host:1883 or mqtts://host:8883 (TLS)")
    client_id: str | None = Field(
        None, description="stable client id of the persistent session; default edge-<site>-<id>"
    )
    protocol: Literal["3.1.1", "5"] = Field("5", description="3.1.1 | 5")
    tls: MqttTlsConfig | None = Field(None, description="CA and client certificate for mqtts://")
    username: str | None = None
    password_file: SecretFile | None = Field(None, description="file holding the password")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive")
    connect_timeout_s: float = Field(10, gt=0, le=300, description="TCP+TLS+CONNACK timeout")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        return _protocol(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"must start with mqtt:// or mqtts://, got {v!r}")
        try:
            port = parts.port
        except ValueError as err:
            raise ValueError(f"invalid port in {v!r}") from err
        if not parts.hostname:
            raise ValueError(f"needs a host, e.g. mqtt://127.0.0.1:1883, got {v!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"must be scheme://host:port without a path, got {v!r}")
        if parts.username or parts.password:
            raise ValueError("credentials do not belong in the url: use username and "
                             "password_file")
        if port == 0:
            raise ValueError(f"invalid port in {v!r}")
        return v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^[\x21-\x7e]{1,128}$", v) or v[0] in "+#$":
            raise ValueError(
                f"must be 1-128 printable ASCII characters without spaces, not starting with "
                f"+, # or $, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _connection_consistent(self) -> MqttConnectionConfig:
        if self.tls is not None and self.scheme == "mqtt":
            raise ValueError("tls is set but url uses mqtt://; use mqtts:// for TLS")
        if self.password_file and not self.username:
            raise ValueError("password_file needs a username")
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.scheme == "mqtts" else 1883)


class MqttSourceConfig(SourceConfigBase, MqttConnectionConfig):
    type: Literal["mqtt"]
    reconnect_initial_s: float = Field(1.0, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(60.0, gt=0, description="cap of the reconnect backoff")
    session_expiry_s: int = Field(
        7 * 86400, ge=1, le=0xFFFFFFFF,
        description="MQTT 5: how long the broker keeps the session while disconnected")
    max_inflight_messages: int = Field(
        1000, ge=1, le=65535,
        description="unacked QoS 1 window (MQTT 5 Receive Maximum; for 3.1.1 the broker's "
        "max_inflight_messages applies)")
    max_batch: int = Field(500, ge=1, le=10_000, description="messages per outbox commit")
    max_payload_bytes: int = Field(
        256 * 1024, ge=1, le=256 * 1024 * 1024, description="larger payloads are quarantined")
    subscriptions: list[SubscriptionConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> MqttSourceConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        seen: dict[str, int] = {}
        for i, sub in enumerate(self.subscriptions):
            if sub.topic in seen:
                raise ValueError(
                    f"subscriptions[{i}].topic {sub.topic!r} repeats subscriptions[{seen[sub.topic]}]"
                )
            seen[sub.topic] = i
        return self


def mqtt_ssl_context(cfg: MqttConnectionConfig, who: str) -> ssl.SSLContext | None:
    """TLS context for an mqtts:// url (None for mqtt://); ConfigError names ``who``."""
    if cfg.scheme != "mqtts":
        return None
    tls = cfg.tls
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file if tls else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls is not None and tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"cannot load the TLS files of {who}: {err}", location="tls") from err
    return ctx


def _factory(cfg: MqttSourceConfig, ctx: ComponentContext) -> Source:
    from edge.sources.mqtt_source import MqttSource  # paho only when an mqtt source is used

    return MqttSource(cfg, ctx)


COMPONENT = ComponentType(
    kind="source",
    type="mqtt",
    config_model=MqttSourceConfig,
    factory=_factory,
    description="MQTT 3.1.1/5 subscriber, QoS 1 acked after the outbox commit",
)
