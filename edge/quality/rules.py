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
      sla:                              # delivery SLAs per event type
        - {type: lot.status, within_s: 60}
      reconcile:                        # read the lot status back from the ERP / QMS
        every_s: 300
        recent_s: 86400
        sources:
          - {sink: erp, path: "/lots/{lot_id}/status", field: status}
          - {sink: qms, path: "/lots/{lot_id}", field: disposition, kind: qms}

A reconciliation source reads through an ``http`` sink (its base URL, auth and TLS).
``kind`` (``erp`` or ``qms``; by default the sink id when it is one of those) decides
which decisions of that system are applied locally (``apply``; default: a QMS's
``released`` and ``rejected``, nothing of an ERP — its differences are reported only).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "CAPA_FIELDS",
    "DEFAULT_STATUS_MAP",
    "CapaRule",
    "QualityConfig",
    "ReconcileConfig",
    "ReconcileSource",
    "SlaConfig",
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


# remote status words → lot states (lower case; a source's ``statuses`` adds or overrides)
DEFAULT_STATUS_MAP: dict[str, str] = {
    "released": "released", "release": "released", "available": "released",
    "unrestricted": "released", "free": "released", "approved": "released",
    "accepted": "released", "usable": "released",
    "hold": "hold", "on_hold": "hold", "on hold": "hold", "held": "hold",
    "blocked": "hold", "locked": "hold",
    "quarantine": "quarantine", "quarantined": "quarantine",
    "quality_inspection": "quarantine", "in_inspection": "quarantine",
    "rejected": "rejected", "reject": "rejected", "scrapped": "rejected",
    "returned": "rejected", "return_to_supplier": "rejected",
}
_DECISION = Literal["released", "hold", "quarantine", "rejected"]
_LOT_STATE_NAMES = ("released", "hold", "quarantine", "rejected")
_SYSTEM = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class ReconcileSource(BaseModel):
    """One system the lot status is read from, through an ``http`` sink's client config."""

    model_config = _STRICT

    sink: str = Field(description="id of an http sink: its url, auth and tls are used")
    path: str = Field("/lots/{lot_id}/status",
                      description="GET path under the sink's url; {lot_id} is the lot id as "
                                  "one percent-encoded path segment")
    field: str = Field("status", description="answer field with the lot's status "
                                             "(dotted for nested objects: lot.status)")
    decided_by_field: str = Field("decided_by", description="answer field naming who decided")
    decided_at_field: str = Field("decided_at",
                                  description="answer field with when it was decided (ISO)")
    system: str | None = Field(None, description="name shown in reports and metrics "
                                                 "(default: the sink id)")
    kind: Literal["erp", "qms"] | None = Field(
        None, description="erp or qms (default: the sink id when it is one of those)")
    apply: list[_DECISION] | None = Field(
        None, description="decisions of this system applied to the local lot "
                          "(default: released and rejected for a qms, none for an erp)")
    statuses: dict[str, str] = Field(
        default_factory=dict, description="this system's status words → lot states "
                                          "(released, hold, quarantine, rejected)")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        names = re.findall(r"{([^}]*)}", v)
        if names != ["lot_id"]:
            raise ValueError("must contain {lot_id} once and no other placeholder, "
                             f"got {v!r}")
        return v

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, v: dict[str, str]) -> dict[str, str]:
        for word, state in v.items():
            if state not in _LOT_STATE_NAMES:
                raise ValueError(f"{word}: must map to one of {', '.join(_LOT_STATE_NAMES)}, "
                                 f"got {state!r}")
        return {k.strip().lower(): s for k, s in v.items()}

    @model_validator(mode="after")
    def _kind(self) -> ReconcileSource:
        if self.system is not None and not _SYSTEM.match(self.system):
            raise ValueError(f"system: letters, digits, '_', '.', '-', got {self.system!r}")
        if self.kind is None:
            if self.sink.lower() in ("erp", "qms"):
                self.kind = "erp" if self.sink.lower() == "erp" else "qms"
            else:
                raise ValueError(f"kind: say whether sink {self.sink!r} is the erp or the qms "
                                 "(kind: erp | qms)")
        if self.apply is None:
            self.apply = ["released", "rejected"] if self.kind == "qms" else []
        return self

    @property
    def name(self) -> str:
        return self.system or self.sink

    def state_of(self, raw: str) -> str | None:
        """The lot state a status word of this system means (None: not a known word)."""
        word = raw.strip().lower()
        return self.statuses.get(word) or DEFAULT_STATUS_MAP.get(word)


class ReconcileConfig(BaseModel):
    model_config = _STRICT

    every_s: float = Field(300.0, gt=0, description="seconds between reconciliation rounds")
    recent_s: float = Field(86400.0, ge=0, description="also read lots decided this recently "
                                                      "(besides lots with an open episode)")
    max_lots: int = Field(1000, ge=1, description="at most this many lots per round "
                                                  "(most recently changed first)")
    concurrency: int = Field(4, ge=1, le=64, description="reads in flight per system")
    timeout_s: float = Field(10.0, gt=0, description="timeout of one read")
    sources: list[ReconcileSource] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ReconcileConfig:
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"sources: system {sorted(dup)[0]!r} is named twice (set "
                             "system: to tell them apart)")
        return self


class SlaConfig(BaseModel):
    model_config = _STRICT

    type: str = Field(min_length=1, description="event type, e.g. lot.status")
    within_s: float = Field(gt=0, description="an event of this type still undelivered to "
                                              "a sink after this long breaches the SLA")


class QualityConfig(BaseModel):
    model_config = _STRICT

    stuck_after_s: float = Field(
        3600.0, gt=0, description="a lot with a receipt or results and no disposition "
                                 "(or on hold without a decision) this long is stuck")
    lot_retention_days: float = Field(
        90.0, gt=0, description="released and rejected lots are removed from the lots "
                                "table this long after their last change")
    sla: list[SlaConfig] = Field(default_factory=list,
                                 description="delivery SLAs per event type")
    reconcile: ReconcileConfig | None = Field(
        None, description="read lot statuses back from the ERP / QMS (off when absent)")
    notification_types: list[str] = Field(
        default_factory=lambda: ["supplier.case", "notification", "capa.request"],
        description="event types listed when they fail or are dead-lettered")

    @field_validator("sla")
    @classmethod
    def _sla(cls, v: list[SlaConfig]) -> list[SlaConfig]:
        types = [s.type for s in v]
        dup = {t for t in types if types.count(t) > 1}
        if dup:
            raise ValueError(f"type {sorted(dup)[0]!r} has two SLAs")
        return v

