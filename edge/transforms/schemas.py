"""Data schemas of the canonical event types (pydantic; extra fields are kept).

``validate_data(type, data)`` returns the normalized ``data`` or raises
``InputError("invalid_data", …)`` naming the field. Types without a schema pass through
unchanged (custom events are allowed; only the envelope is fixed).

Normalizations a plant needs: lot ids and serials become strings (PLCs send numbers);
``result`` accepts pass/ok/good/true/1 and fail/nok/bad/reject/false/0 and becomes
``pass`` or ``fail``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from edge.errors import InputError

__all__ = ["SCHEMAS", "validate_data"]

_PASS = {"pass", "ok", "good", "true", "1", "passed", "accept", "accepted", "io"}
_FAIL = {"fail", "nok", "bad", "false", "0", "failed", "reject", "rejected", "nio", "ng"}


def _result(v: Any) -> Any:
    key = str(v).strip().lower() if not isinstance(v, bool) else str(v).lower()
    if key in _PASS:
        return "pass"
    if key in _FAIL:
        return "fail"
    return v


def _text(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v).is_integer() else str(v)
    return v


Text = Annotated[str, BeforeValidator(_text)]
Result = Annotated[Literal["pass", "fail"], BeforeValidator(_result)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=False)


class InspectionResult(_Data):
    lot_id: Text
    serial: Text | None = None
    result: Result
    measured: float | None = None
    characteristic: str | None = None


class MachineReading(_Data):
    """A sample; ``value`` may be null only beside a non-Good ``status`` (a sensor that
    reports a failure has no value, and that is worth knowing)."""

    value: float | int | bool | str | None
    status: str | None = None

    @model_validator(mode="after")
    def _value_or_bad_status(self) -> MachineReading:
        if self.value is None and (self.status is None or self.status.startswith("Good")):
            raise ValueError("value: a reading without a value needs a Bad or Uncertain "
                             "status")
        return self


class ProductionCount(_Data):
    count: int
    lot_id: Text | None = None


class LotStatus(_Data):
    lot_id: Text
    status: str


class QualityHold(_Data):
    lot_id: Text
    reason: str


class Nonconformance(_Data):
    lot_id: Text
    serial: Text | None = None
    reason: str


SCHEMAS: dict[str, type[_Data]] = {
    "inspection.result": InspectionResult,
    "machine.reading": MachineReading,
    "production.count": ProductionCount,
    "lot.status": LotStatus,
    "quality.hold": QualityHold,
    "quality.release": LotStatus,
    "nonconformance": Nonconformance,
}


def validate_data(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS.get(event_type)
    if schema is None:
        return data
    try:
        model = schema.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "data"
        raise InputError(
            "invalid_data", f"{event_type}: {where}: {first['msg']} (got {first.get('input')!r})"
        ) from err
    out = model.model_dump(exclude_none=True)
    if schema is MachineReading and "value" not in out:
        out["value"] = None  # a Bad sample says so explicitly: no value
    return out
