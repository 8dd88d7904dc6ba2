"""Config models of the edge quality rules and the ``quality:`` section.

Plain config, no expressions: a rule is a ``type`` and a few fields, validated at load with
messages that name the field. ``edge.config`` reads ``rules:`` and ``quality:`` with these
models (through ``edge.rules``); the behaviour lives in ``edge.quality.engine``.

``spec_limits``: an inspection result outside its limits (or reported ``fail`` by its
station) is a failure of its lot: one ``nonconformance`` per failed part, and — when the
lot is not on hold — a new hold episode (``docs/quality.md``)::

    rules:
      - type: spec_limits
        events: [inspection.result]
        field: measured                 # data field holding the value
        characteristic: bore_diameter   # optional: only results for this characteristic
        lower: 9.95                     # optional lower / upper limit (at least one)
        upper: 10.05
        hold: true                      # a failure opens a hold episode (default true)
        nonconformance: true            # a nonconformance per failed part (default true)
        supplier_case: true             # a supplier.case per episode of a supplied lot
        notify: [procurement, planning] # a notification per audience and episode

``capa``: N nonconformances with the same values of the ``by`` fields within ``window_s``
emit one ``capa.request``::

    rules:
      - type: capa
        nonconformances: 3
        window_s: 604800                # 7 days
        by: [supplier, characteristic]

``quality:`` (one section)::

    quality:
      stuck_after_s: 3600               # a lot without a disposition this long is stuck
      lot_retention_days: 90            # released / rejected lots are forgotten after this
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "CAPA_FIELDS",
    "CapaRule",
    "QualityConfig",
    "RuleConfig",
    "SpecLimitsRule",
]

# edge.config imports this module, so the strict base is spelled out here
_STRICT = ConfigDict(extra="forbid")

# nonconformance fields a CAPA rule may count by
CAPA_FIELDS = ("supplier", "characteristic", "station", "material")
_AUDIENCE = re.compile(r"^[a-z][a-z0-9_.-]*$")


class SpecLimitsRule(BaseModel):
    model_config = _STRICT

    type: Literal["spec_limits"]
    events: list[str] = Field(default_factory=lambda: ["inspection.result"], min_length=1)
    field: str = Field("measured", description="data field with the measured value")
    characteristic: str | None = Field(
        None, description="apply only to results with this data.characteristic")
    lower: float | None = None
    upper: float | None = None
    hold: bool = Field(True, description="a failure of a lot not on hold opens a hold "
                                         "episode (quality.hold, lot.status, supplier.case, "
                                         "notifications)")
    nonconformance: bool = Field(True, description="a nonconformance per failed part")
    supplier_case: bool = Field(True, description="a supplier.case per episode when the "
                                                  "lot's supplier is known")
    notify: list[str] = Field(
        default_factory=lambda: ["procurement", "planning"],
        description="audiences that get a notification per episode")

    @model_validator(mode="after")
    def _limits(self) -> SpecLimitsRule:
        if self.lower is None and self.upper is None:
            raise ValueError("needs lower, upper or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) is above upper ({self.upper})")
        return self

    @field_validator("notify")
    @classmethod
    def _audiences(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for name in v:
            if not _AUDIENCE.match(name):
                raise ValueError(f"audience {name!r} must be lower case letters, digits, "
                                 "'_', '.' or '-' (e.g. procurement)")
            if name not in out:
                out.append(name)
        return out

    def applies(self, event_type: str, data: dict[str, Any]) -> bool:
        if event_type not in self.events:
            return False
        return self.characteristic is None or data.get("characteristic") == self.characteristic

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


class CapaRule(BaseModel):
    model_config = _STRICT

    type: Literal["capa"]
    nonconformances: int = Field(ge=2, description="how many nonconformances with the same "
                                                   "`by` values within the window")
    window_s: float = Field(gt=0, description="length of the window, seconds")
    by: list[str] = Field(default_factory=lambda: ["supplier", "characteristic"],
                          description=f"fields to group by: {', '.join(CAPA_FIELDS)}")

    @field_validator("by")
    @classmethod
    def _by(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"needs at least one field of {', '.join(CAPA_FIELDS)}")
        for name in v:
            if name not in CAPA_FIELDS:
                raise ValueError(f"must be fields of {', '.join(CAPA_FIELDS)}, got {name!r}")
        if len(set(v)) != len(v):
            raise ValueError("names a field twice")
        return v

    @property
    def key(self) -> str:
        """Names the rule's counts in the outbox: a rule with another threshold, window or
        grouping counts afresh."""
        return f"{'+'.join(self.by)}/{self.nonconformances}/{self.window_s:g}"


RuleConfig = Annotated[SpecLimitsRule | CapaRule, Field(discriminator="type")]


class QualityConfig(BaseModel):
    model_config = _STRICT

    stuck_after_s: float = Field(
        3600.0, gt=0, description="a lot with a receipt or results and no disposition "
                                 "(or on hold without a decision) this long is stuck")
    lot_retention_days: float = Field(
        90.0, gt=0, description="released and rejected lots are removed from the lots "
                                "table this long after their last change")
