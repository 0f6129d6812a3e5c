"""Alert rules: CRUD, and the backtest over stored history."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from pydantic import AfterValidator, Field, StringConstraints, ValidationError, model_validator
from sqlalchemy import func, select

from iotmeter.alerting.book import rule_of
from iotmeter.alerting.evaluate import Event, State, heard, render, step, tick
from iotmeter.api.deps import AFTER_COMMIT, SessionDep, StateDep
from iotmeter.api.schemas import (
    MAX_ID,
    AlertSeverity,
    DeviceId,
    DeviceType,
    DisplayName,
    ErrorResponse,
    InputModel,
    Offset,
    OutputModel,
    Page,
)
from iotmeter.api.timerange import format_time, parse_instant_us
from iotmeter.db.base import utcnow
from iotmeter.db.models import AlertRule, AlertRuleState, Device
from iotmeter.errors import NotFound, Unprocessable, ValidationFailed
from iotmeter.ids import FIELD_NAME_RE
from iotmeter.storage.timeseries.base import SeriesQuery

MAX_PAGE = 500
MAX_BACKTEST_DEVICES = 100
MAX_BACKTEST_POINTS = 500_000

router = APIRouter(prefix="/alert-rules", tags=["alert rules"])
RuleIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The rule id.")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}

RuleKind = Literal["threshold", "rate_of_change", "no_data", "anomaly"]
Operator = Literal[">", ">=", "<", "<=", "outside"]


def _field_name(name: str) -> str:
    if FIELD_NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"{name!r} cannot be a reading's name: 1-64 letters, digits, '_', '.' or '-', not "
            "starting with '_' and not 'time'"
        )
    return name


FieldName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9.\-][A-Za-z0-9_.\-]{0,63}$"),
    AfterValidator(_field_name),
    Field(description="A reading's name, as devices send it (`temperature`).", examples=["t"]),
]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Template = Annotated[
    str,
    StringConstraints(min_length=1, max_length=500, pattern=r"^[^\u0000]*$"),
    Field(
        description="The alert's message; `{device}`, `{field}`, `{value}`, `{threshold}`, "
        "`{rule}` and `{severity}` are filled in.",
        examples=["{device}: {field} is {value} ({threshold})"],
    ),
]
DEFAULT_MESSAGE = "{rule}: {device} {field} = {value} ({threshold})"


class RuleFields(InputModel):
    """Every field of a rule; which ones a kind needs is checked in `_check`."""

    name: DisplayName
    kind: RuleKind
    device_id: DeviceId | None = Field(None, description="Scope: one device...")
    device_type: DeviceType | None = Field(None, description="...or every device of a type.")
    field: FieldName | None = None
    operator: Operator | None = None
    threshold: Finite | None = None
    low: Finite | None = None
    high: Finite | None = None
    hysteresis: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="How far back inside the value must come to clear (the clear threshold)."
    )
    duration_s: Annotated[float, Field(ge=0, le=86400 * 30, allow_inf_nan=False)] = Field(
        0.0, description="How long the condition must hold before firing (pending until then)."
    )
    timeout_s: Annotated[float, Field(gt=0, le=86400 * 30, allow_inf_nan=False)] | None = None
    k: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] | None = None
    half_life: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    warmup: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    flap_window_s: Annotated[float, Field(ge=0, le=86400 * 30, allow_inf_nan=False)] = Field(
        0.0, description="After an alert resolves, the rule does not fire again for this long."
    )
    severity: AlertSeverity = "warning"
    message: Template = DEFAULT_MESSAGE
    enabled: bool = True


def check_rule(rule: dict[str, Any]) -> None:
    """What a kind needs and what makes no sense; raises ValueError saying what to fix."""
    kind = rule["kind"]
    if rule.get("device_id") is not None and rule.get("device_type") is not None:
        raise ValueError("give device_id (one device) or device_type (all of a type), not both")
    if kind in ("threshold", "rate_of_change", "anomaly") and rule.get("field") is None:
        raise ValueError(f"a {kind} rule needs the field it watches")
    if kind in ("threshold", "rate_of_change"):
        operator = rule.get("operator")
        if operator is None:
            raise ValueError(f"a {kind} rule needs an operator: >, >=, <, <= or outside")
        if operator == "outside":
            low, high = rule.get("low"), rule.get("high")
            if low is None or high is None:
                raise ValueError("operator 'outside' needs low and high")
            if low > high:
                raise ValueError(f"low ({low:g}) is above high ({high:g}); swap them")
            if 2 * rule.get("hysteresis", 0.0) > high - low:
                raise ValueError("hysteresis is more than half of high - low: it could never clear")
        elif rule.get("threshold") is None:
            raise ValueError(f"operator {operator!r} needs a threshold")
    if kind == "no_data" and rule.get("timeout_s") is None:
        raise ValueError("a no_data rule needs timeout_s (seconds of silence before it fires)")
    if kind == "anomaly":
        for name in ("k", "half_life", "warmup"):
            if rule.get(name) is None:
                raise ValueError(f"an anomaly rule needs {name} (k, half_life, warmup)")
    if kind != "no_data" and rule.get("timeout_s") is not None:
        raise ValueError("timeout_s is for no_data rules only")


class RuleCreate(RuleFields):
    @model_validator(mode="after")
    def _check(self) -> RuleCreate:
        check_rule(self.model_dump())
        return self


class RuleUpdate(InputModel):
    """The fields to change; the result must still be a valid rule."""

    name: DisplayName | None = None
    device_id: DeviceId | None = None
    device_type: DeviceType | None = None
    field: FieldName | None = None
    operator: Operator | None = None
    threshold: Finite | None = None
    low: Finite | None = None
    high: Finite | None = None
    hysteresis: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    duration_s: Annotated[float, Field(ge=0, le=86400 * 30, allow_inf_nan=False)] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=86400 * 30, allow_inf_nan=False)] | None = None
    k: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] | None = None
    half_life: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    warmup: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    flap_window_s: Annotated[float, Field(ge=0, le=86400 * 30, allow_inf_nan=False)] | None = None
    severity: AlertSeverity | None = None
    message: Template | None = None
    enabled: bool | None = None


class RuleRead(OutputModel):
    id: int
    name: str
    kind: str
    device_id: str | None
    device_type: str | None
    field: str | None
    operator: str | None
    threshold: float | None
    low: float | None
    high: float | None
    hysteresis: float
    duration_s: float
    timeout_s: float | None
    k: float | None
    half_life: int | None
    warmup: int | None
    flap_window_s: float
    severity: str
    message: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


class BacktestAlert(OutputModel):
    device_id: str
    fired_at: str = Field(description="Device time the alert would have fired.")
    resolved_at: str | None = Field(description="When it would have resolved (null: still open).")
    value: float | None
    extreme_value: float | None
    breach_count: int
    message: str


class Backtest(OutputModel):
    rule_id: int
    start: str
    stop: str
    devices: int
    readings: int
    alerts: list[BacktestAlert]
    suppressed: int


async def _get(session: SessionDep, rule_id: int) -> AlertRule:
    rule = await session.get(AlertRule, rule_id)
    if rule is None:
        raise NotFound(f"alert rule {rule_id} not found; list them with GET /api/v1/alert-rules")
    return rule


@router.post("", status_code=status.HTTP_201_CREATED, summary="Create an alert rule")
async def create_rule(
    body: RuleCreate, session: SessionDep, state: StateDep, response: Response
) -> RuleRead:
    """The rule is evaluated from the next reading on (no_data rules: from now)."""
    now = utcnow()
    rule = AlertRule(**body.model_dump(), created_at=now, updated_at=now)
    session.add(rule)
    await session.flush()
    session.info.setdefault(AFTER_COMMIT, []).append(state.alert_rules_changed)
    response.headers["Location"] = f"/api/v1/alert-rules/{rule.id}"
    return RuleRead.model_validate(rule)


@router.get("", summary="List alert rules")
async def list_rules(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Offset = 0,
) -> Page[RuleRead]:
    total = await session.scalar(select(func.count()).select_from(AlertRule)) or 0
    rows = await session.scalars(
        select(AlertRule).order_by(AlertRule.id).limit(limit).offset(offset)
    )
    return Page[RuleRead](
        items=[RuleRead.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{rule_id}", responses=NOT_FOUND, summary="Get an alert rule")
async def get_rule(rule_id: RuleIdPath, session: SessionDep) -> RuleRead:
    return RuleRead.model_validate(await _get(session, rule_id))


@router.patch("/{rule_id}", responses=NOT_FOUND, summary="Change an alert rule")
async def update_rule(
    rule_id: RuleIdPath, body: RuleUpdate, session: SessionDep, state: StateDep
) -> RuleRead:
    rule = await _get(session, rule_id)
    changes = body.model_dump(exclude_unset=True)
    merged = {column: getattr(rule, column) for column in RuleFields.model_fields}
    merged.update(changes)
    try:
        RuleCreate.model_validate(merged, strict=False)
    except ValidationError as exc:
        problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise Unprocessable(f"the changed rule would not be valid: {problems}") from None
    for name, value in changes.items():
        setattr(rule, name, value)
    rule.updated_at = utcnow()
    await session.flush()
    session.info.setdefault(AFTER_COMMIT, []).append(state.alert_rules_changed)
    return RuleRead.model_validate(rule)


@router.delete(
    "/{rule_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=NOT_FOUND,
    summary="Delete an alert rule (its alerts stay)",
)
async def delete_rule(rule_id: RuleIdPath, session: SessionDep, state: StateDep) -> None:
    rule = await _get(session, rule_id)
    await session.delete(rule)
    session.info.setdefault(AFTER_COMMIT, []).append(state.alert_rules_changed)


class RuleDeviceState(OutputModel):
    device_id: str
    status: Literal["ok", "pending", "firing"] = Field(
        description="`pending`: the condition holds but not yet for `duration_s`."
    )
    pending_since: str | None
    last_value: float | None
    last_reading_at: str | None
    breach_count: int
    suppressed: int


@router.get("/{rule_id}/devices", responses=NOT_FOUND, summary="The rule's state per device")
async def rule_devices(
    rule_id: RuleIdPath, session: SessionDep, state: StateDep
) -> list[RuleDeviceState]:
    """Each device the rule has seen: ok, pending (since when) or firing, with its last value.
    Live from the evaluating sink when this process runs it, else as last saved (at most a few
    seconds old)."""
    await _get(session, rule_id)
    states: dict[str, State] = {}
    sink = state.alert_sink
    if sink is not None:
        states = {
            device_id: found
            for (owner, device_id), found in list(sink.states.items())
            if owner == rule_id
        }
    else:
        rows = await session.execute(
            select(AlertRuleState.device_id, AlertRuleState.state).where(
                AlertRuleState.rule_id == rule_id
            )
        )
        states = {str(device_id): State.from_json(data) for device_id, data in rows}
    return [
        RuleDeviceState(
            device_id=device_id,
            status="firing"
            if found.firing
            else "pending"
            if found.pending_since_us is not None
            else "ok",
            pending_since=format_time(found.pending_since_us)
            if found.pending_since_us is not None and not found.firing
            else None,
            last_value=found.last_value,
            last_reading_at=format_time(found.last_epoch_us)
            if found.last_epoch_us is not None
            else None,
            breach_count=found.breaches,
            suppressed=found.suppressed,
        )
        for device_id, found in sorted(states.items())
    ]


@router.post(
    "/{rule_id}/backtest",
    responses=NOT_FOUND,
    summary="Run the rule over stored history; raises nothing",
)
async def backtest(
    rule_id: RuleIdPath,
    session: SessionDep,
    state: StateDep,
    start: Annotated[str, Query(description="RFC 3339, epoch, `now` or relative (`-24h`).")],
    stop: Annotated[str, Query(description="Same forms; default now.")] = "now",
) -> Backtest:
    """The alerts the rule would have raised between `start` and `stop`, computed by the same
    code as live evaluation, without writing anything. `no_data` rules look at the gaps between
    stored readings. At most 100 devices and 500,000 readings per backtest."""
    row = await _get(session, rule_id)
    rule = rule_of(row)
    now_us = time.time_ns() // 1000
    start_us = parse_instant_us(start, "start", now_us)
    stop_us = parse_instant_us(stop, "stop", now_us)
    if stop_us <= start_us:
        raise ValidationFailed("stop must be after start")
    if rule.device_id is not None:
        devices = [rule.device_id]
    else:
        query = select(Device.id).order_by(Device.id)
        if rule.device_type is not None:
            query = query.where(Device.type == rule.device_type)
        devices = list((await session.scalars(query.limit(MAX_BACKTEST_DEVICES + 1))).all())
        if len(devices) > MAX_BACKTEST_DEVICES:
            raise ValidationFailed(
                f"the rule's scope holds more than {MAX_BACKTEST_DEVICES} devices; backtest a "
                "copy scoped to one device or type"
            )
    alerts: list[BacktestAlert] = []
    readings = suppressed = 0
    for device_id in devices:
        points = await state.timeseries.query(
            SeriesQuery(
                device_id,
                start_us,
                stop_us,
                fields=[rule.field] if rule.field else None,
                limit=MAX_BACKTEST_POINTS + 1,
            )
        )
        series = sorted((point.epoch_us, point.value) for point in points)
        readings += len(series)
        if readings > MAX_BACKTEST_POINTS:
            raise ValidationFailed(
                f"more than {MAX_BACKTEST_POINTS} readings in the range; shorten it"
            )
        device_state = State()
        open_alert: dict[str, Any] | None = None
        last_us = start_us
        for epoch_us, value in series:
            events: list[Event]
            if rule.kind == "no_data":
                events = tick(rule, device_state, device_id, epoch_us, last_us)
                events += heard(rule, device_state, device_id, epoch_us)
                last_us = epoch_us
            else:
                events = list(step(rule, device_state, device_id, epoch_us, float(value)))
            for event in events:
                if event.kind == "fired":
                    open_alert = {
                        "device_id": device_id,
                        "fired_at": format_time(event.at_us),
                        "resolved_at": None,
                        "value": event.value,
                        "extreme_value": event.state.extreme,
                        "breach_count": event.state.breaches,
                        "message": render(rule.message, event),
                    }
                    alerts.append(BacktestAlert(**open_alert))
                elif event.kind in ("breach", "resolved") and alerts:
                    current = alerts[-1]
                    if current.device_id == device_id and current.resolved_at is None:
                        current.extreme_value = event.state.extreme
                        current.breach_count = event.state.breaches
                        if event.kind == "resolved":
                            current.resolved_at = format_time(event.at_us)
                elif event.kind == "suppressed":
                    suppressed += 1
        if rule.kind == "no_data":
            for event in tick(rule, device_state, device_id, stop_us, last_us):
                alerts.append(
                    BacktestAlert(
                        device_id=device_id,
                        fired_at=format_time(event.at_us),
                        resolved_at=None,
                        value=None,
                        extreme_value=None,
                        breach_count=1,
                        message=render(rule.message, event),
                    )
                )
    return Backtest(
        rule_id=rule.id,
        start=format_time(start_us),
        stop=format_time(stop_us),
        devices=len(devices),
        readings=readings,
        alerts=alerts,
        suppressed=suppressed,
    )
