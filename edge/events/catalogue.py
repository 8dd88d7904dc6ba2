"""The event catalogue: the canonical event types, their data models and their defaults.

Every type has

- a pydantic model of its ``data`` (``schema_version`` on the class; the version is stamped
  on each event's envelope at ingest). Models allow extra fields (plants add their own) and
  check the declared ones;
- a default event class (``critical`` / ``high`` / ``normal`` / ``low``: DESIGN invariant 5);
- a default ordering key template (``lot:{lot_id}`` for the lot-scoped types, DESIGN
  invariant 4), used when the source configures none.

``validate_data(type, data)`` returns the normalized data or raises ``InputError`` with
reason ``invalid_data`` and a detail naming the field. Types outside the catalogue are
allowed and are not validated (class ``normal``, ordering key ``lot:{lot_id}`` when the
data has a lot). The reference for operators and receivers is ``docs/events.md``;
``edge print-schema --events`` prints the JSON Schemas.

Normalizations a plant needs: identifiers (``lot_id``, ``serial``, ``station`` …) become
strings (PLCs send numbers); ``result`` accepts pass/ok/good/true/1 and
fail/nok/bad/reject/false/0 and becomes ``pass`` or ``fail``; ``lot.status``'s ``status``
and a notification's ``audience`` are lower-cased. Fields sent as ``null`` are dropped
(except a reading's ``value``).
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from edge.errors import InputError

__all__ = [
    "CATALOGUE",
    "LOT_SCOPED_TYPES",
    "LOT_STATUSES",
    "SCHEMAS",
    "CapaRequest",
    "EventData",
    "EventSpec",
    "InspectionResult",
    "LotStatus",
    "MachineAlarm",
    "MachineReading",
    "MaterialReceipt",
    "Nonconformance",
    "Notification",
    "ProductionCount",
    "QualityHold",
    "QualityRelease",
    "SupplierCase",
    "default_ordering_key",
    "json_schemas",
    "spec_for",
    "validate_data",
]

ClassName = Literal["critical", "high", "normal", "low"]

# ----------------------------------------------------------------------------- field types

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
    """Numbers become strings (``42`` and ``42.0`` → ``"42"``); booleans stay invalid."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v).is_integer() else str(v)
    return v


def _lower(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


# An identifier: a non-blank string; numbers are accepted and turned into strings.
Text = Annotated[str, BeforeValidator(_text), AfterValidator(_not_blank),
                 Field(json_schema_extra={"minLength": 1})]
# (constraints sit before the validator so the JSON Schema names them correctly)
Number = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_bool)]
Quantity = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_not_bool)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_not_bool)]
Count = Annotated[int, Field(ge=0), BeforeValidator(_not_bool)]
PositiveCount = Annotated[int, Field(ge=1), BeforeValidator(_not_bool)]
Result = Annotated[Literal["pass", "fail"], BeforeValidator(_result)]
LotState = Literal["released", "hold", "quarantine", "rejected"]
LOT_STATUSES: tuple[str, ...] = ("released", "hold", "quarantine", "rejected")
Audience = Annotated[str, BeforeValidator(_lower),
                     StringConstraints(pattern=r"^[a-z][a-z0-9_.-]*$")]
Reason = Annotated[str, AfterValidator(_not_blank), Field(json_schema_extra={"minLength": 1})]


def _req(description: str, **kwargs: Any) -> Any:
    return Field(description=description, **kwargs)


def _opt(description: str, **kwargs: Any) -> Any:
    return Field(None, description=description, **kwargs)


# ----------------------------------------------------------------------------- models


class EventData(BaseModel):
    """Base of every catalogue model: extra fields are allowed and kept."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=False)

    # bumped when a declared field is removed, renamed, or changes type or meaning
    schema_version: ClassVar[int] = 1
    # declared fields kept in the data even when null
    keep_null: ClassVar[tuple[str, ...]] = ()


def _limits_in_order(lower: float | None, upper: float | None) -> None:
    if lower is not None and upper is not None and lower > upper:
        raise ValueError(f"lower ({lower:g}) is above upper ({upper:g})")


class MaterialReceipt(EventData):
    """Goods received for a lot (a warehouse scanner, the ERP's goods receipt)."""

    lot_id: Text = _req("the lot received (the plant's lot id)")
    material: Text | None = _opt("material / part number")
    supplier: Text | None = _opt("supplier id; rules and supplier cases use it")
    supplier_lot: Text | None = _opt("the supplier's own lot or batch number")
    quantity: Quantity | None = _opt("quantity received")
    unit: str | None = _opt("unit of the quantity, e.g. pcs, kg")
    purchase_order: Text | None = _opt("purchase order the goods belong to")
    receipt_id: Text | None = _opt("the receipt's own id (scanner or ERP document)")
    location: Text | None = _opt("where the goods were put, e.g. a warehouse bin")
    operator: Text | None = _opt("who booked the receipt")


class InspectionResult(EventData):
    """One measured or judged characteristic of one sample or part of a lot."""

    lot_id: Text = _req("the lot the part or sample belongs to")
    result: Result = _req("pass or fail (ok/nok, good/bad, true/false, 1/0 accepted)")
    characteristic: Text | None = _opt("what was inspected, e.g. bore_diameter")
    measured: Number | None = _opt("the measured value")
    unit: str | None = _opt("unit of measured, lower and upper, e.g. mm")
    lower: Number | None = _opt("lower specification limit")
    upper: Number | None = _opt("upper specification limit")
    sample: Text | None = _opt("sample number or id within the lot")
    serial: Text | None = _opt("serial number of the part")
    supplier: Text | None = _opt("supplier of the lot (receiving inspection)")
    station: Text | None = _opt("inspection station")
    operator: Text | None = _opt("inspector")

    @model_validator(mode="after")
    def _limits(self) -> InspectionResult:
        _limits_in_order(self.lower, self.upper)
        return self


class LotStatus(EventData):
    """A disposition of a lot, decided at the edge or in the ERP / QMS."""

    lot_id: Text = _req("the lot")
    status: Annotated[LotState, BeforeValidator(_lower)] = _req(
        "released | hold | quarantine | rejected")
    reason: str | None = _opt("why (free text)")
    decided_by: Text | None = _opt("who decided: a person, or a system such as qms")


class QualityHold(EventData):
    """A lot is put on hold: the line must stop using it until it is released."""

    lot_id: Text = _req("the lot held")
    reason: Reason = _req("why, e.g. 'measured 10.2 above upper limit 10.05'")
    inspection_event_id: str | None = _opt("id of the failing inspection.result")
    serial: Text | None = _opt("the failing part")
    characteristic: Text | None = _opt("the failing characteristic")
    supplier: Text | None = _opt("supplier of the lot")
    decided_by: Text | None = _opt("who placed the hold (absent: the gateway's rules)")


class QualityRelease(EventData):
    """A held lot is released: an explicit decision, with who and why."""

    lot_id: Text = _req("the lot released")
    reason: Reason = _req("why it may be used again")
    decided_by: Text = _req("who decided (person or system)")
    hold_event_id: str | None = _opt("id of the quality.hold this release ends")


class Nonconformance(EventData):
    """One part or sample that failed its specification."""

    lot_id: Text = _req("the lot of the part")
    reason: Reason = _req("what is wrong, e.g. 'measured 10.2 above upper limit 10.05'")
    serial: Text | None = _opt("the failing part")
    sample: Text | None = _opt("the failing sample")
    characteristic: Text | None = _opt("the failing characteristic")
    measured: Number | None = _opt("the measured value")
    unit: str | None = _opt("unit of measured and the limits")
    lower: Number | None = _opt("lower specification limit")
    upper: Number | None = _opt("upper specification limit")
    supplier: Text | None = _opt("supplier of the lot")
    station: Text | None = _opt("where it was found")
    inspection_event_id: str | None = _opt("id of the failing inspection.result")

    @model_validator(mode="after")
    def _limits(self) -> Nonconformance:
        _limits_in_order(self.lower, self.upper)
        return self


class SupplierCase(EventData):
    """A supplier quality case for a lot (one per hold episode of a supplied lot)."""

    lot_id: Text = _req("the lot received from the supplier")
    supplier: Text = _req("the supplier")
    reason: Reason = _req("what was found")
    characteristic: Text | None = _opt("the failing characteristic")
    material: Text | None = _opt("material / part number")
    supplier_lot: Text | None = _opt("the supplier's lot or batch number")
    inspection_event_id: str | None = _opt("id of the failing inspection.result")


class CapaRequest(EventData):
    """Repeated nonconformances of one supplier's characteristic: a corrective and
    preventive action is requested."""

    supplier: Text = _req("the supplier")
    characteristic: Text = _req("the characteristic that keeps failing")
    count: PositiveCount | None = _opt("nonconformances counted in the window")
    window_s: Seconds | None = _opt("length of the counting window, seconds")
    reason: str | None = _opt("summary")
    lot_ids: list[Text] | None = _opt("lots with nonconformances in the window")
    nonconformance_ids: list[str] | None = _opt(
        "event ids of the nonconformances counted")


class Notification(EventData):
    """A message for people: procurement, planning, the line …"""

    audience: Audience = _req(
        "who it is for: procurement, planning, quality, line, warehouse, maintenance "
        "(or a plant's own name; lower case)")
    subject: Reason = _req("one line")
    message: str | None = _opt("the text")
    severity: Literal["info", "warning", "critical"] | None = _opt(
        "info | warning | critical")
    lot_id: Text | None = _opt("the lot it is about")
    supplier: Text | None = _opt("the supplier it is about")
    cause_event_id: str | None = _opt("id of the event that caused it")


class ProductionCount(EventData):
    """Parts produced (a counter of a machine or a line)."""

    count: Count = _req("parts counted")
    scrap: Count | None = _opt("of which scrap")
    lot_id: Text | None = _opt("the lot produced")
    material: Text | None = _opt("material / part number")
    station: Text | None = _opt("machine or station")


class MachineReading(EventData):
    """A sample of a signal; ``value`` may be null only beside a non-Good ``status`` (a
    sensor that reports a failure has no value, and that is worth knowing)."""

    keep_null: ClassVar[tuple[str, ...]] = ("value",)

    value: float | int | bool | str | None = _req(
        "the value (null only with a Bad or Uncertain status)")
    status: str | None = _opt("quality of the value (OPC UA StatusCode name)")
    signal: Text | None = _opt("what was measured, e.g. temperature")
    unit: str | None = _opt("unit of the value")
    station: Text | None = _opt("machine or station")

    @model_validator(mode="after")
    def _value_or_bad_status(self) -> MachineReading:
        if self.value is None and (self.status is None or self.status.startswith("Good")):
            raise ValueError("value: a reading without a value needs a Bad or Uncertain "
                             "status")
        return self


class MachineAlarm(EventData):
    """An alarm or event a machine reports (OPC UA Alarms & Conditions): one event per
    notification — an alarm raised, acknowledged, cleared, or its state re-sent by a
    refresh. ``event_id`` is the server's EventId: a refresh of a state already stored is
    the same event, not a second one."""

    event_id: Reason = _req("the server's EventId (hex); the event's identity")
    severity: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_not_bool)] = _req(
        "OPC UA severity, 1 (lowest) to 1000 (highest)")
    severity_class: str | None = _opt("the plant's name for the severity band, e.g. critical")
    source: Text | None = _opt("what raised it (OPC UA SourceName), e.g. Station7.Temperature")
    source_node: str | None = _opt("NodeId of the source (OPC UA SourceNode)")
    condition: str | None = _opt("name of the condition (ConditionName), e.g. Overheat")
    condition_id: str | None = _opt("NodeId of the condition: the same for every state "
                                    "change of one alarm")
    branch_id: str | None = _opt("NodeId of the branch (a previous state kept for ack)")
    event_type: str | None = _opt("NodeId of the OPC UA event type")
    message: str | None = _opt("the text the machine shows")
    time: str | None = _opt("when it happened at the machine (ISO-8601 UTC)")
    active: bool | None = _opt("the alarm is active (ActiveState)")
    acked: bool | None = _opt("acknowledged by an operator (AckedState)")
    confirmed: bool | None = _opt("confirmed (ConfirmedState)")
    retain: bool | None = _opt("the condition is still of interest (active or not acked)")
    refresh: bool | None = _opt("true when re-sent by a ConditionRefresh (after a "
                                "(re)connect): the state at that time, not a new change")
    station: Text | None = _opt("machine or station")


# ----------------------------------------------------------------------------- the catalogue

DataModel = type[EventData]

_KEY_RE = re.compile(r"^([^{}]*)\{([A-Za-z_]\w*)\}$")


@dataclass(frozen=True)
class EventSpec:
    """One catalogue entry: the data model and the defaults of an event type."""

    type: str
    model: DataModel
    event_class: ClassName
    ordering_key: str | None  # "prefix:{field}", or None: no ordering constraint
    example: dict[str, Any] = field(default_factory=dict)
    _key: tuple[str, str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = None
        if self.ordering_key is not None:
            m = _KEY_RE.match(self.ordering_key)
            if m is None:
                raise ValueError(f"{self.type}: ordering key {self.ordering_key!r} must be "
                                 "'prefix:{field}'")
            key = (m.group(1), m.group(2))
        object.__setattr__(self, "_key", key)

    @property
    def schema_version(self) -> int:
        return self.model.schema_version

    @property
    def lot_scoped(self) -> bool:
        """Every event of the type is about one lot (``lot_id`` required) and is ordered
        in it (``lot:{lot_id}``)."""
        lot = self.model.model_fields.get("lot_id")
        return self.ordering_key == "lot:{lot_id}" and lot is not None and lot.is_required()

    def ordering_key_for(self, data: dict[str, Any]) -> str | None:
        """The default ordering key of an event of this type with ``data`` (None when the
        type has none or its field is missing or not a single value)."""
        if self._key is None:
            return None
        prefix, name = self._key
        value = data.get(name)
        if value is None or isinstance(value, (dict, list)) or value == "":
            return None
        return f"{prefix}{value}"

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of ``data`` as the gateway emits it (after normalization)."""
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  **self.model.model_json_schema(mode="serialization")}
        keep = set(self.model.keep_null)
        for name, prop in schema.get("properties", {}).items():
            if name not in schema.get("required", ()) and name not in keep:
                _absent_not_null(prop)  # a null optional field is dropped, not sent
        schema["title"] = self.type
        schema["description"] = " ".join((self.model.__doc__ or "").split())
        schema["x-event-type"] = self.type
        schema["x-schema-version"] = self.schema_version
        schema["x-event-class"] = self.event_class
        schema["x-ordering-key"] = self.ordering_key
        return schema


def _absent_not_null(prop: dict[str, Any]) -> None:
    prop.pop("default", None)
    options = prop.get("anyOf")
    if isinstance(options, list):
        rest = [o for o in options if o != {"type": "null"}]
        if len(rest) == 1:
            del prop["anyOf"]
            prop.update(rest[0])
        else:
            prop["anyOf"] = rest


_LOT = "lot:{lot_id}"

CATALOGUE: dict[str, EventSpec] = {s.type: s for s in (
    EventSpec("material.receipt", MaterialReceipt, "high", _LOT, {
        "lot_id": "L-2026-0412", "material": "BRG-6204", "supplier": "acme-bearings",
        "supplier_lot": "AB-77812", "quantity": 500, "unit": "pcs",
        "purchase_order": "PO-4500012345", "location": "WH1-A03"}),
    EventSpec("inspection.result", InspectionResult, "high", _LOT, {
        "lot_id": "L-2026-0412", "characteristic": "bore_diameter", "measured": 10.07,
        "unit": "mm", "lower": 9.95, "upper": 10.05, "result": "fail", "sample": "3",
        "serial": "SN-000123", "supplier": "acme-bearings", "station": "station7",
        "operator": "jdoe"}),
    EventSpec("lot.status", LotStatus, "critical", _LOT, {
        "lot_id": "L-2026-0412", "status": "hold",
        "reason": "bore_diameter 10.07 above upper limit 10.05", "decided_by": "gateway"}),
    EventSpec("quality.hold", QualityHold, "critical", _LOT, {
        "lot_id": "L-2026-0412", "reason": "measured 10.07 above upper limit 10.05",
        "inspection_event_id": "01968a1e-4f2b-7c3d-9a10-5b6c7d8e9f01"}),
    EventSpec("quality.release", QualityRelease, "critical", _LOT, {
        "lot_id": "L-2026-0412", "reason": "sorted 100 %, 4 parts scrapped",
        "decided_by": "mmiller"}),
    EventSpec("nonconformance", Nonconformance, "critical", _LOT, {
        "lot_id": "L-2026-0412", "serial": "SN-000123", "characteristic": "bore_diameter",
        "measured": 10.07, "lower": 9.95, "upper": 10.05,
        "reason": "measured 10.07 above upper limit 10.05",
        "inspection_event_id": "01968a1e-4f2b-7c3d-9a10-5b6c7d8e9f01"}),
    EventSpec("supplier.case", SupplierCase, "critical", _LOT, {
        "lot_id": "L-2026-0412", "supplier": "acme-bearings",
        "characteristic": "bore_diameter", "reason": "measured 10.07 above upper limit 10.05",
        "inspection_event_id": "01968a1e-4f2b-7c3d-9a10-5b6c7d8e9f01"}),
    EventSpec("capa.request", CapaRequest, "high", "supplier:{supplier}", {
        "supplier": "acme-bearings", "characteristic": "bore_diameter", "count": 3,
        "window_s": 604800, "lot_ids": ["L-2026-0412", "L-2026-0419"],
        "reason": "3 nonconformances of bore_diameter within 7 days"}),
    EventSpec("notification", Notification, "high", _LOT, {
        "audience": "procurement", "severity": "warning",
        "subject": "Lot L-2026-0412 of acme-bearings on hold",
        "lot_id": "L-2026-0412", "supplier": "acme-bearings"}),
    EventSpec("production.count", ProductionCount, "normal", _LOT, {
        "count": 120, "scrap": 2, "lot_id": "L-2026-0415", "station": "press3"}),
    EventSpec("machine.reading", MachineReading, "low", None, {
        "signal": "temperature", "value": 21.5, "unit": "C", "station": "station7"}),
    EventSpec("machine.alarm", MachineAlarm, "high", "alarm:{source}", {
        "event_id": "6f1c0e2a9b8d4c3e", "severity": 600, "severity_class": "high",
        "source": "Station7.Temperature", "condition": "Overheat",
        "condition_id": "ns=2;s=Station7.Alarms.Overheat",
        "event_type": "i=2915", "message": "Temperature above 60 C",
        "time": "2026-03-12T08:14:03.500Z", "active": True, "acked": False,
        "retain": True, "station": "station7"}),
)}

LOT_SCOPED_TYPES: frozenset[str] = frozenset(t for t, s in CATALOGUE.items() if s.lot_scoped)

# type → data model (kept for edge.transforms.schemas)
SCHEMAS: dict[str, type[EventData]] = {t: s.model for t, s in CATALOGUE.items()}


def spec_for(event_type: str) -> EventSpec | None:
    """The catalogue entry of ``event_type``; None for a type outside the catalogue."""
    return CATALOGUE.get(event_type)


def default_ordering_key(event_type: str | None, data: dict[str, Any]) -> str | None:
    """The catalogue's key for a catalogue type; otherwise ``lot:{lot_id}`` when ``data``
    has a lot, else None."""
    spec = CATALOGUE.get(event_type) if event_type is not None else None
    if spec is not None:
        return spec.ordering_key_for(data)
    lot = data.get("lot_id")
    if lot is None or isinstance(lot, (dict, list)) or lot == "":
        return None
    return f"lot:{lot}"


def validate_data(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked against the catalogue model of ``event_type`` and normalized; a
    type outside the catalogue is returned unchanged. Raises ``InputError("invalid_data",
    detail)``; the detail names the type and each failing field."""
    spec = CATALOGUE.get(event_type)
    if spec is None:
        return data
    fast = _FAST.get(event_type)
    if fast is not None:
        out = fast.check(data)
        if out is not None:
            return out
    return _validate_model(event_type, spec.model, data)


def _validate_model(event_type: str, model: DataModel, data: dict[str, Any]
                    ) -> dict[str, Any]:
    """``validate_data`` by the pydantic model (every record the fast path declines)."""
    try:
        obj = model.model_validate(data)
    except ValidationError as err:
        raise InputError("invalid_data", f"{event_type}: {_explain(err)}") from err
    out = obj.model_dump(exclude_none=True)
    for name in model.keep_null:
        out.setdefault(name, None)
    return out


# ----------------------------------------------------------------------------- fast path
#
# ``validate_data`` runs once per ingested record. For the records plants send every
# second (identifiers as strings or numbers, finite numbers, a recognisable result) a
# check compiled per model from its field types gives the very dict pydantic gives, in a
# third of the time; anything else — a value of another type, a missing required field,
# a limit pair a model validator looks at, a nested extra value — returns None from the
# check and goes through pydantic, which also makes every error message. A test compares
# both paths over generated records of every type.

_SLOW: Any = object()  # "pydantic decides"
_DROP: Any = object()  # an optional field that pydantic drops (None)
_EXACT_FLOAT = 2 ** 53  # ints converted to float only where the conversion is exact
_ATOMIC = (str, int, float, bool)


def _fast_text(v: Any) -> Any:
    t = type(v)
    if t is str:
        return v if v.strip() else _SLOW
    if t is int:
        return str(v) if -_EXACT_FLOAT < v < _EXACT_FLOAT else _SLOW
    if t is float:
        return _text(v) if math.isfinite(v) else _SLOW
    return _SLOW


def _fast_str(v: Any) -> Any:
    return v if type(v) is str else _SLOW


def _fast_number(v: Any) -> Any:
    t = type(v)
    if t is float:
        return v if math.isfinite(v) else _SLOW
    if t is int and -_EXACT_FLOAT < v < _EXACT_FLOAT:
        return float(v)
    return _SLOW


def _fast_quantity(v: Any) -> Any:
    v = _fast_number(v)
    return v if v is _SLOW or v >= 0 else _SLOW


def _fast_seconds(v: Any) -> Any:
    v = _fast_number(v)
    return v if v is _SLOW or v > 0 else _SLOW


def _fast_count(v: Any) -> Any:
    return v if type(v) is int and 0 <= v < 2 ** 63 else _SLOW


def _fast_positive(v: Any) -> Any:
    return v if type(v) is int and 1 <= v < 2 ** 63 else _SLOW


def _fast_result(v: Any) -> Any:
    if type(v) not in _ATOMIC:
        return _SLOW
    r = _result(v)
    return r if r == "pass" or r == "fail" else _SLOW


def _fast_reason(v: Any) -> Any:
    return v if type(v) is str and v.strip() else _SLOW


def _fast_bool(v: Any) -> Any:
    return v if type(v) is bool else _SLOW


def _fast_scalar(v: Any) -> Any:
    """``float | int | bool | str`` (a reading's value): every such value is kept as is."""
    return v if type(v) in _ATOMIC else _SLOW


_FAST_KINDS: list[tuple[Any, Any]] = [
    (Text, _fast_text), (str, _fast_str), (Number, _fast_number),
    (Quantity, _fast_quantity), (Seconds, _fast_seconds), (Count, _fast_count),
    (PositiveCount, _fast_positive), (Result, _fast_result), (Reason, _fast_reason),
    (bool, _fast_bool),
    (float | int | bool | str, _fast_scalar),
]


def _fast_kind(hint: Any) -> tuple[Any, bool]:
    """(check, optional) of a field annotation: ``check`` is None for an annotation the
    fast path does not know; ``optional``: None is a valid value."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args:
            optional = True
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    for known, check in _FAST_KINDS:
        if hint == known:
            return check, optional
    return None, optional


def _limits_guard(out: dict[str, Any]) -> bool:
    lower, upper = out.get("lower"), out.get("upper")
    return lower is None or upper is None or lower <= upper


def _reading_guard(out: dict[str, Any]) -> bool:
    return out.get("value") is not None


# Models with a model validator take the fast path only where a guard says the validator
# would pass; a model validator without a guard here keeps its model on pydantic.
_GUARDS: dict[str, Any] = {
    "InspectionResult._limits": _limits_guard,
    "Nonconformance._limits": _limits_guard,
    "MachineReading._value_or_bad_status": _reading_guard,
}


class _FastCheck:
    """The compiled check of one model (see above); ``check`` returns None to mean
    "ask pydantic"."""

    __slots__ = ("fields", "guards", "keep_null", "names")

    def __init__(self, fields: list[tuple[str, Any, bool]], guards: list[Any],
                 keep_null: tuple[str, ...]) -> None:
        self.fields = fields  # (name, check, droppable) in declaration order
        self.names = frozenset(f[0] for f in fields)
        self.guards = guards
        self.keep_null = keep_null

    @classmethod
    def build(cls, model: DataModel) -> _FastCheck | None:
        decorators = model.__pydantic_decorators__
        if (decorators.field_validators or decorators.root_validators
                or decorators.validators or decorators.model_serializers
                or decorators.field_serializers or decorators.computed_fields
                or model.model_config.get("extra") != "allow"
                or any(f.alias or f.validation_alias for f in model.model_fields.values())):
            return None
        guards = []
        for name in decorators.model_validators:
            guard = _GUARDS.get(f"{model.__name__}.{name}")
            if guard is None:
                return None
            guards.append(guard)
        hints = typing.get_type_hints(model, include_extras=True)
        fields = []
        for name, info in model.model_fields.items():
            check, optional = _fast_kind(hints[name])  # check None: pydantic decides
            # absent (or None): dropped only where pydantic's default is None, dropped too
            droppable = optional and not info.is_required() and info.default is None
            fields.append((name, check, droppable))
        return cls(fields, guards, model.keep_null)

    def check(self, data: dict[str, Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        get = data.get
        for name, check, droppable in self.fields:
            v = get(name)
            if v is None:
                if not droppable:
                    return None
                continue
            if check is None:
                return None
            v = check(v)
            if v is _SLOW:
                return None
            out[name] = v
        names = self.names
        for k, v in data.items():
            if k in names:
                continue
            if type(k) is not str:
                return None
            if v is None:
                continue
            if type(v) not in _ATOMIC:
                return None
            out[k] = v
        for guard in self.guards:
            if not guard(out):
                return None
        for name in self.keep_null:
            out.setdefault(name, None)
        return out


_FAST: dict[str, _FastCheck] = {
    t: check for t, s in CATALOGUE.items() if (check := _FastCheck.build(s.model)) is not None
}


def _explain(err: ValidationError, limit: int = 3) -> str:
    """``field: problem (got value)`` per failing field, the first ``limit`` of them."""
    seen: dict[str, str] = {}
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        where = str(loc[0]) if loc else ""
        for step in loc[1:]:  # list indexes; union member tags are not field names
            if not isinstance(step, int):
                break
            where += f"[{step}]"
        if where in seen:
            continue
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "missing":
            seen[where] = f"{where}: required field is missing"
        elif where:
            seen[where] = f"{where}: {msg} (got {_short(e.get('input'))})"
        else:
            seen[where] = msg
    parts = list(seen.values())
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f"; and {more} more" if more > 0 else "")


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def json_schemas() -> dict[str, dict[str, Any]]:
    """Type → JSON Schema of its ``data``, for ``edge print-schema --events``."""
    return {t: s.json_schema() for t, s in CATALOGUE.items()}
