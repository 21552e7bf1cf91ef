"""Alert rules: checked, evaluated window by window, and turned into alerts.

The contract is ``conveyor.monitor.v1`` (``AlertRule`` and its conditions and
actions, ``Alert``, ``AlertState``, ``AlertEventType``). Free of gRPC and
storage: when a window of a model version closes, the service gathers what the
window produced into :class:`WindowFindings`, and for each rule that
:func:`applies_to` the version it calls :func:`evaluate_condition` (breached,
clear, or cannot say) and :func:`advance`, which moves the rule's
:class:`RuleState` and returns the alert events to store and broadcast.

Hysteresis keeps one alert per incident however long it lasts: an alert opens
after ``trigger_windows`` breaching windows in a row, each later breaching
window updates it, and it resolves after ``resolve_windows`` clear windows in
a row. A window that cannot say (too few rows, no report, no labels yet)
leaves every counter where it was, so sparse data neither opens nor resolves.

The conditions themselves (what a window produced, and whether a rule's
condition held in it) are :mod:`.conditions`'s, re-exported here.

Where the contract leaves room, this module chooses:

- Clear windows are counted only while an alert is open, and a breach streak
  that a clear window breaks is forgotten, so an idle rule's state is
  ``RuleState()`` (nothing worth storing).
- Actions are listed PENDING when the alert opens; the service runs them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final, NamedTuple

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.conditions import (
    METRIC_NAMES,
    ConditionResult,
    SloMeasurement,
    WindowFindings,
    evaluate_condition,
)
from conveyor.services.monitor.slo import display_name_violations, model_scope_violations
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    PreconditionViolation,
    raise_if_any,
)
from conveyor.shared.names import check_id, parse_resource_name

MAX_ACTIONS: Final = 4
MAX_WINDOWS: Final = 100
MAX_FEATURE_NAME: Final = 128
MIN_LABELLED_DATA_WINDOW: Final = timedelta(hours=1)
MAX_LABELLED_DATA_WINDOW: Final = timedelta(days=3650)
DEFAULT_SEVERITY: Final = pb.ALERT_SEVERITY_WARNING
_SLOS: Final = "serviceLevelObjectives"

_OPEN_STATES: Final = (pb.ALERT_STATE_FIRING, pb.ALERT_STATE_ACKNOWLEDGED)


def check_alert_rule(rule: pb.AlertRule, *, field_prefix: str = "alert_rule") -> None:
    """INVALID_ARGUMENT naming every bad field of ``rule`` at once. Whether
    an SLO condition's objective exists and belongs to the rule's model needs
    storage, so the servicer checks that."""
    p = field_prefix
    violations = model_scope_violations(rule.model, rule.model_version, field_prefix=p)
    kind = rule.WhichOneof("condition")
    if kind is None:
        violations.append(
            FieldViolation(f"{p}.condition", "required: drift, performance, slo or outliers")
        )
    elif kind == "drift":
        _check_drift(rule.drift, f"{p}.drift", violations)
    elif kind == "performance":
        condition = rule.performance
        if condition.metric not in METRIC_NAMES:
            violations.append(FieldViolation(f"{p}.performance.metric", "required"))
        tolerance = condition.max_degradation
        if condition.HasField("max_degradation") and not 0 <= tolerance < math.inf:
            violations.append(
                FieldViolation(f"{p}.performance.max_degradation", "a finite number, at least 0")
            )
    elif kind == "slo":
        field = f"{p}.slo.service_level_objective"
        objective = rule.slo.service_level_objective
        violations += _violations(lambda: parse_resource_name(objective, _SLOS, field=field))
        threshold = rule.slo.burn_rate_threshold
        if rule.slo.HasField("burn_rate_threshold") and not 0 < threshold < math.inf:
            violations.append(
                FieldViolation(f"{p}.slo.burn_rate_threshold", "a finite number greater than 0")
            )
    elif not 0 < rule.outliers.max_outlier_rate < 1:
        violations.append(FieldViolation(f"{p}.outliers.max_outlier_rate", "a rate in (0, 1)"))
    for name in ("trigger_windows", "resolve_windows"):
        if not 0 <= getattr(rule, name) <= MAX_WINDOWS:
            violations.append(FieldViolation(f"{p}.{name}", f"0 to {MAX_WINDOWS}"))
    if rule.severity not in pb.AlertSeverity.values():
        violations.append(FieldViolation(f"{p}.severity", "INFO, WARNING or CRITICAL"))
    if len(rule.actions) > MAX_ACTIONS:
        violations.append(FieldViolation(f"{p}.actions", f"at most {MAX_ACTIONS} actions"))
    for index, action in enumerate(rule.actions):
        _check_action(action, f"{p}.actions[{index}]", violations)
    violations.extend(display_name_violations(rule.display_name, field_prefix=p))
    raise_if_any(violations, "invalid alert rule")


def applies_to(rule: pb.AlertRule, model_version: str) -> bool:
    """Whether ``rule`` watches ``model_version``: a version of its model, and
    the one it names if it names one. Disabled rules watch nothing."""
    if rule.disabled:
        return False
    if rule.model_version:
        return model_version == rule.model_version
    return model_version.startswith(f"{rule.model}/versions/")


@dataclass(frozen=True)
class RuleState:
    """Where one rule stands on one model version between windows."""

    consecutive_breaches: int = 0
    """Breaching windows in a row, up to the latest evaluated window."""
    consecutive_clears: int = 0
    """Clear windows in a row while an alert is open (0 otherwise)."""
    open_alert: pb.Alert | None = None
    """The incident's alert, FIRING or ACKNOWLEDGED, as stored now (the
    service's acknowledgements and action progress included)."""
    first_breach: int | None = None
    """Index of the first breaching window of the streak or incident."""
    last_breach: int | None = None
    """Index of its latest breaching window."""

    def to_json(self) -> str:
        """The state for storage; the open alert is stored apart, by name."""
        return json.dumps(
            {
                "consecutive_breaches": self.consecutive_breaches,
                "consecutive_clears": self.consecutive_clears,
                "open_alert": self.open_alert.name if self.open_alert else None,
                "first_breach": self.first_breach,
                "last_breach": self.last_breach,
            }
        )

    @classmethod
    def from_json(cls, text: str, open_alert: pb.Alert | None) -> RuleState:
        """The state :meth:`to_json` stored, with the rule's open alert for this
        version as stored now (None, or a resolved one, when there is none).
        When the stored incident's alert was resolved elsewhere (the rule was
        disabled), its streak is over too: a fresh streak must open the next one."""
        data = json.loads(text)
        if open_alert is not None and open_alert.state not in _OPEN_STATES:
            open_alert = None
        stored_alert = data["open_alert"]
        if stored_alert and (open_alert is None or open_alert.name != stored_alert):
            return cls(open_alert=open_alert)
        return cls(
            consecutive_breaches=int(data["consecutive_breaches"]),
            consecutive_clears=int(data["consecutive_clears"]) if open_alert else 0,
            open_alert=open_alert,
            first_breach=data["first_breach"],
            last_breach=data["last_breach"],
        )


class AlertTransition(NamedTuple):
    """An alert event to store and send to ``WatchAlerts`` watchers."""

    event_type: pb.AlertEventType.ValueType
    alert: pb.Alert
    """The alert after the event (a copy the caller owns)."""


def advance(
    rule: pb.AlertRule,
    state: RuleState,
    result: ConditionResult,
    findings: WindowFindings,
    *,
    now: datetime,
    new_alert_name: Callable[[], str],
) -> tuple[RuleState, list[AlertTransition]]:
    """The rule's state after the window of ``findings`` and the alert events
    it caused: OPENED after ``trigger_windows`` breaching windows in a row
    (0 means 1) when no alert of the rule is open for the version, UPDATED for
    each later breaching window, RESOLVED after ``resolve_windows`` clear ones
    in a row (0 means ``trigger_windows``). ``new_alert_name`` is called only
    when an alert opens. ``state`` is not changed."""
    if result.breached is None:
        return state, []
    trigger = rule.trigger_windows or 1
    alert = state.open_alert
    if alert is not None and alert.state not in _OPEN_STATES:
        state, alert = RuleState(), None  # resolved elsewhere: that incident is over
    index = findings.window.index if findings.window.HasField("index") else None
    if not result.breached:
        if alert is None:
            return RuleState(), []
        clears = state.consecutive_clears + 1
        if clears < (rule.resolve_windows or trigger):
            return replace(state, consecutive_breaches=0, consecutive_clears=clears), []
        resolved = resolve(alert, now=now, reason=f"clear for {clears} consecutive windows")
        return RuleState(), [AlertTransition(pb.ALERT_EVENT_TYPE_RESOLVED, resolved)]
    breaches = state.consecutive_breaches + 1
    ongoing = alert is not None or state.consecutive_breaches > 0
    # An open alert whose streak was reset (its rule's condition changed)
    # has no first breach on record: the incident's windows start here.
    first = state.first_breach if ongoing and state.first_breach is not None else index
    after = RuleState(breaches, 0, alert, first, index)
    if alert is not None:
        updated = pb.Alert()
        updated.CopyFrom(alert)
        updated.breached_windows += 1
        _describe(updated, result, first, index, now)
        after = replace(after, open_alert=updated)
        return after, [AlertTransition(pb.ALERT_EVENT_TYPE_UPDATED, _copy(updated))]
    if breaches < trigger:
        return after, []
    opened = pb.Alert(
        name=new_alert_name(),
        alert_rule=rule.name,
        model_version=findings.model_version,
        state=pb.ALERT_STATE_FIRING,
        severity=rule.severity or DEFAULT_SEVERITY,
        breached_windows=breaches,
        actions=[
            pb.ActionExecution(kind=_action_kind(a), state=pb.ACTION_STATE_PENDING)
            for a in rule.actions
        ],
    )
    opened.trigger_window.CopyFrom(findings.window)
    opened.open_time.FromDatetime(now)
    _describe(opened, result, first, index, now)
    return replace(after, open_alert=opened), [
        AlertTransition(pb.ALERT_EVENT_TYPE_OPENED, _copy(opened))
    ]


def resolve(alert: pb.Alert, *, now: datetime, reason: str) -> pb.Alert:
    """A copy of ``alert`` RESOLVED at ``now``, ``reason`` (e.g. "the rule was
    disabled") added to its summary; an already resolved alert unchanged, as
    resolving is final."""
    resolved = _copy(alert)
    if resolved.state == pb.ALERT_STATE_RESOLVED:
        return resolved
    resolved.state = pb.ALERT_STATE_RESOLVED
    resolved.summary = f"{resolved.summary}; resolved: {reason}" if resolved.summary else reason
    resolved.resolve_time.FromDatetime(now)
    resolved.update_time.FromDatetime(now)
    return resolved


def acknowledge(alert: pb.Alert, *, principal: str, comment: str, now: datetime) -> pb.Alert:
    """A copy of ``alert`` ACKNOWLEDGED by ``principal``. It stays open and
    still resolves by clear windows. Acknowledging again changes nothing (a
    retried call must not move the time or the author); FAILED_PRECONDITION
    once resolved, since resolution is final."""
    acknowledged = _copy(alert)
    if alert.state == pb.ALERT_STATE_RESOLVED:
        raise FailedPreconditionError(
            f"{alert.name} is resolved and cannot be acknowledged",
            reason="ALERT_RESOLVED",
            violations=[PreconditionViolation("ALERT_STATE", alert.name, "the alert is resolved")],
        )
    if alert.state == pb.ALERT_STATE_ACKNOWLEDGED:
        return acknowledged
    acknowledged.state = pb.ALERT_STATE_ACKNOWLEDGED
    acknowledged.acknowledged_by = principal
    acknowledged.acknowledge_comment = comment
    acknowledged.acknowledge_time.FromDatetime(now)
    acknowledged.update_time.FromDatetime(now)
    return acknowledged


def _check_drift(condition: pb.DriftCondition, p: str, violations: list[FieldViolation]) -> None:
    if condition.scope not in (
        pb.DRIFT_SCOPE_DATASET,
        pb.DRIFT_SCOPE_PREDICTION,
        pb.DRIFT_SCOPE_FEATURE,
    ):
        violations.append(FieldViolation(f"{p}.scope", "required: DATASET, PREDICTION or FEATURE"))
    if (
        condition.scope == pb.DRIFT_SCOPE_FEATURE
        and not 0 < len(condition.feature) <= MAX_FEATURE_NAME
    ):
        violations.append(
            FieldViolation(
                f"{p}.feature", f"required for FEATURE: 1 to {MAX_FEATURE_NAME} characters"
            )
        )
    elif condition.scope != pb.DRIFT_SCOPE_FEATURE and condition.feature:
        violations.append(
            FieldViolation(f"{p}.feature", "must be empty unless the scope is FEATURE")
        )


def _check_action(action: pb.AlertAction, p: str, violations: list[FieldViolation]) -> None:
    kind = action.WhichOneof("action")
    if kind is None:
        violations.append(FieldViolation(p, "required: rollback or retrain"))
    elif kind == "rollback" and action.rollback.alias:
        alias = action.rollback.alias
        violations += _violations(lambda: check_id(alias, field=f"{p}.rollback.alias"))
    elif kind == "retrain":
        retrain = action.retrain
        if job := retrain.training_job:
            field = f"{p}.retrain.training_job"
            violations += _violations(lambda: parse_resource_name(job, "trainingJobs", field=field))
        window = retrain.labelled_data_window
        if retrain.HasField("labelled_data_window") and not (
            MIN_LABELLED_DATA_WINDOW <= window.ToTimedelta() <= MAX_LABELLED_DATA_WINDOW
        ):
            violations.append(
                FieldViolation(f"{p}.retrain.labelled_data_window", "1 hour to 3,650 days when set")
            )


def _violations(parse: Callable[[], object]) -> list[FieldViolation]:
    """The violations a raising name parser reports, so a check goes on to the
    next field instead of stopping at the first bad one."""
    try:
        parse()
    except InvalidArgumentError as error:
        return list(error.violations)
    return []


def _describe(
    alert: pb.Alert, result: ConditionResult, first: int | None, last: int | None, now: datetime
) -> None:
    """The latest breaching window's numbers on ``alert``, and the windows of
    the incident in its summary ("in windows 41-42", "in 3 of windows 41-45")."""
    alert.value, alert.threshold = result.value, result.threshold
    alert.summary = result.description
    if first is not None and last is not None:
        span, breached = last - first + 1, alert.breached_windows
        if span == breached:
            alert.summary += f" in window {last}" if span == 1 else f" in windows {first}-{last}"
        elif breached < span:
            alert.summary += f" in {breached} of windows {first}-{last}"
        else:  # the incident's earlier windows are not on record
            alert.summary += f" in window {last} ({breached} breaching windows in all)"
    alert.update_time.FromDatetime(now)


def _action_kind(action: pb.AlertAction) -> pb.ActionKind.ValueType:
    if action.WhichOneof("action") == "rollback":
        return pb.ACTION_KIND_ROLLBACK
    return pb.ACTION_KIND_RETRAIN


def _copy(alert: pb.Alert) -> pb.Alert:
    copied = pb.Alert()
    copied.CopyFrom(alert)
    return copied


__all__ = [
    "DEFAULT_SEVERITY",
    "MAX_ACTIONS",
    "MAX_WINDOWS",
    "AlertTransition",
    "ConditionResult",
    "RuleState",
    "SloMeasurement",
    "WindowFindings",
    "acknowledge",
    "advance",
    "applies_to",
    "check_alert_rule",
    "evaluate_condition",
    "resolve",
]
