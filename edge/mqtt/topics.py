"""MQTT topic templates: parse, turn into a subscription filter, match with captures.

``plant/{site}/line/{line}/station/{station}/inspection``: each ``{name}`` is one whole
topic level, subscribed as ``+`` and captured; ``+`` matches a level without capturing and
a final ``#`` matches the rest. ``{site}`` is not a wildcard: it is replaced by the
gateway's ``site``, so gateways of several plants can share a broker without reading each
other's data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CompiledTopic", "TopicTemplate"]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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


