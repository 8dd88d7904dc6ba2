"""Edge quality rules: decisions that must take effect on the line with the cloud down.

``spec_limits``: an inspection result whose measured value is outside its limits, or that
the station reported as ``fail``, produces

- a ``nonconformance`` event for the part (critical; correlation id of the inspection, so
  ``edge trace`` shows the lineage), and
- a ``quality.hold`` for its lot (critical), once per lot within the dedupe window.

A rule is called once per submission and returns what it derives from that one (its
cause). The pipeline stores them right after their cause, in the SAME transaction, marked
``derived`` (DESIGN invariant 4), so a hold can never be lost while its cause was kept and
never overtakes an event of its lot that arrived after the cause. Derived events take the
cause's ordering key (``lot:{lot_id}`` unless the source configured another) and its
correlation id. They carry no dedupe key of their own except the hold's ``hold:{lot}``
(one hold per lot within ``outbox.dedupe_window_s``): a redelivered cause is matched by
the outbox, and what was derived from it is dropped with it.

Route ``quality.hold`` to a local sink (e.g. an MQTT topic the line controller subscribes
to) as well as to the ERP, and the line stops the lot even while the ERP is unreachable.

Config::

    rules:
      - type: spec_limits
        events: [inspection.result]
        field: measured                 # data field holding the value
        characteristic: bore_diameter   # optional: only results for this characteristic
        lower: 9.95                     # optional lower / upper limit (at least one)
        upper: 10.05
        hold: true                      # emit quality.hold for the lot (default true)
        nonconformance: true            # emit nonconformance per failed part (default true)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.components import Submission
from edge.events import Event, make_event

__all__ = ["SpecLimitsRule", "build_rules"]


class SpecLimitsRule(BaseModel):
    # edge.config imports this module, so the strict base is spelled out here
    model_config = ConfigDict(extra="forbid")

    type: Literal["spec_limits"]
    events: list[str] = Field(default_factory=lambda: ["inspection.result"], min_length=1)
    field: str = Field("measured", description="data field with the measured value")
    characteristic: str | None = Field(
        None, description="apply only to results with this data.characteristic")
    lower: float | None = None
    upper: float | None = None
    hold: bool = True
    nonconformance: bool = True

    @model_validator(mode="after")
    def _limits(self) -> SpecLimitsRule:
        if self.lower is None and self.upper is None:
            raise ValueError("needs lower, upper or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) is above upper ({self.upper})")
        return self

    def violation(self, data: dict[str, Any]) -> str | None:
        """Why this result fails, or None when it passes."""
        value = data.get(self.field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.lower is not None and value < self.lower:
                return f"{self.field} {value} below lower limit {self.lower}"
            if self.upper is not None and value > self.upper:
                return f"{self.field} {value} above upper limit {self.upper}"
        if data.get("result") == "fail":
            return "station reported fail"
        return None


RuleConfig = SpecLimitsRule


class SpecLimits:
    """Callable rule for ``Pipeline``: one submission in → what it derives out."""

    def __init__(self, config: SpecLimitsRule, site: str) -> None:
        self.config = config
        self.site = site

    def _applies(self, event: Event) -> bool:
        if event.type not in self.config.events:
            return False
        wanted = self.config.characteristic
        return wanted is None or event.data.get("characteristic") == wanted

    def __call__(self, item: Submission) -> list[Submission]:
        """The nonconformance and hold derived from ``item`` (empty when it passes)."""
        ev = item.event
        if not self._applies(ev):
            return []
        reason = self.config.violation(ev.data)
        lot = ev.data.get("lot_id")
        if reason is None or lot is None:
            return []
        out: list[Submission] = []
        key = ev.ordering_key
        common = {"lot_id": lot, "reason": reason, "inspection_event_id": ev.id}
        if self.config.nonconformance:
            nc = {**common, "serial": ev.data.get("serial"),
                  "characteristic": ev.data.get("characteristic"),
                  "measured": ev.data.get(self.config.field),
                  "lower": self.config.lower, "upper": self.config.upper}
            out.append(Submission(
                make_event(type="nonconformance", site=self.site, source="rules",
                           data={k: v for k, v in nc.items() if v is not None},
                           ordering_key=key, correlation_id=ev.correlation_id,
                           source_ts=ev.source_ts),
                derived=True))
        if self.config.hold:
            out.append(Submission(
                make_event(type="quality.hold", site=self.site, source="rules",
                           data=common, ordering_key=key,
                           correlation_id=ev.correlation_id, source_ts=ev.source_ts),
                dedupe_key=f"hold:{lot}", derived=True))
        return out


def build_rules(configs: Sequence[RuleConfig], site: str) -> list[SpecLimits]:
    return [SpecLimits(c, site) for c in configs]
