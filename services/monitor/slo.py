"""Service level objectives: checked, and measured from counts of predictions.

The contract is ``conveyor.monitor.v1.ServiceLevelObjective`` and ``SloStatus``.
This module holds only the arithmetic, free of gRPC and storage, so the
servicer (which counts a model's non-shadow predictions over the rolling
period), the Prometheus export and the alert rules (:mod:`.alerting`, which
burns the budget window by window) all compute the same numbers:

- :func:`good_mask` says which predictions are good, vectorised over a batch;
- :func:`slo_status` turns good and total counts into the SLI, the error budget
  left and the verdict;
- :func:`burn_rate` is how many times faster than sustainable a window spent
  the budget (1.0 spends it exactly over the rolling period).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.shared.errors import FieldViolation, InvalidArgumentError, raise_if_any
from conveyor.shared.names import parse_model_name, parse_model_version_ref
from conveyor.shared.wellknown import to_timedelta

DEFAULT_ROLLING_PERIOD: Final = timedelta(days=28)
MIN_ROLLING_PERIOD: Final = timedelta(hours=1)
MAX_ROLLING_PERIOD: Final = timedelta(days=30)
MAX_DISPLAY_NAME: Final = 256

_INDICATORS: Final = (pb.SERVICE_LEVEL_INDICATOR_LATENCY, pb.SERVICE_LEVEL_INDICATOR_AVAILABILITY)


def check_slo(
    slo: pb.ServiceLevelObjective, *, field_prefix: str = "service_level_objective"
) -> None:
    """INVALID_ARGUMENT naming every bad field of ``slo`` at once, so a caller
    fixes a request in one round trip. ``field_prefix`` is where the SLO sits in
    the request. Output-only fields and ``name`` (which Create ignores and
    Update resolves) are the servicer's business, not checked here."""
    violations = model_scope_violations(slo.model, slo.model_version, field_prefix=field_prefix)
    if slo.indicator not in _INDICATORS:
        violations.append(
            FieldViolation(f"{field_prefix}.indicator", "required: LATENCY or AVAILABILITY")
        )
    threshold = to_timedelta(slo.latency_threshold)
    if slo.indicator == pb.SERVICE_LEVEL_INDICATOR_LATENCY and not (
        slo.HasField("latency_threshold") and threshold is not None and threshold > timedelta(0)
    ):
        violations.append(
            FieldViolation(
                f"{field_prefix}.latency_threshold",
                "required for LATENCY: a duration greater than 0",
            )
        )
    if not 0.0 < slo.goal < 1.0:  # also refuses NaN
        violations.append(
            FieldViolation(f"{field_prefix}.goal", f"a fraction in (0, 1), got {slo.goal}")
        )
    period = to_timedelta(slo.rolling_period)
    if slo.HasField("rolling_period") and not (
        period is not None and MIN_ROLLING_PERIOD <= period <= MAX_ROLLING_PERIOD
    ):
        violations.append(
            FieldViolation(f"{field_prefix}.rolling_period", "1 hour to 30 days when set")
        )
    violations.extend(display_name_violations(slo.display_name, field_prefix=field_prefix))
    raise_if_any(violations, "invalid service level objective")


def resolved_rolling_period(slo: pb.ServiceLevelObjective) -> timedelta:
    """The period compliance is measured over; unset means 28 days."""
    if slo.HasField("rolling_period"):
        return slo.rolling_period.ToTimedelta()
    return DEFAULT_ROLLING_PERIOD


def good_mask(
    slo: pb.ServiceLevelObjective,
    status_codes: npt.NDArray[np.integer[Any]],
    latencies_s: npt.NDArray[np.floating[Any]],
) -> npt.NDArray[np.bool_]:
    """Which predictions are good, one flag per row: succeeded (status 0) for
    AVAILABILITY, succeeded within ``latency_threshold`` (inclusive) for
    LATENCY. Vectorised because the servicer counts whole rolling periods."""
    codes = np.asarray(status_codes)
    latencies = np.asarray(latencies_s, dtype=np.float64)
    if codes.shape != latencies.shape:
        raise ValueError(f"{codes.shape} status codes but {latencies.shape} latencies")
    succeeded: npt.NDArray[np.bool_] = codes == 0
    if slo.indicator == pb.SERVICE_LEVEL_INDICATOR_AVAILABILITY:
        return succeeded
    if slo.indicator == pb.SERVICE_LEVEL_INDICATOR_LATENCY:
        threshold_s = slo.latency_threshold.ToTimedelta().total_seconds()
        within: npt.NDArray[np.bool_] = latencies <= threshold_s
        return succeeded & within
    raise ValueError(f"{slo.name or 'the SLO'} has no indicator; check it with check_slo first")


def slo_status(
    slo: pb.ServiceLevelObjective, *, good: int, total: int, evaluate_time: datetime
) -> pb.SloStatus:
    """Compliance from counts over the rolling period: the SLI (1 without
    predictions: nothing failed), the unspent share of the error budget
    (negative once overspent, so dashboards show by how much) and whether
    the SLI reaches the goal."""
    sli = _sli(good, total)
    status = pb.SloStatus(
        sli=sli,
        total_count=total,
        good_count=good,
        error_budget_remaining=1.0 - (1.0 - sli) / (1.0 - slo.goal),
        met=sli >= slo.goal,
    )
    status.evaluate_time.FromDatetime(evaluate_time)
    return status


def burn_rate(slo: pb.ServiceLevelObjective, *, good: int, total: int) -> float | None:
    """How many times faster than sustainable these predictions spend the
    error budget: the bad fraction over the budgeted one (``1 - goal``). 1.0
    would spend exactly the budget over the rolling period; a fast-burn page
    typically fires at 14.4. None without predictions: no rate to speak of."""
    if total == 0:
        return None
    return (1.0 - _sli(good, total)) / (1.0 - slo.goal)


def model_scope_violations(
    model: str, model_version: str, *, field_prefix: str
) -> list[FieldViolation]:
    """Violations of a ``model`` (required, ``models/{model}``) and an optional
    ``model_version`` that must be an exact version of that model (an alias
    moves, so it cannot scope an SLO or an alert rule). Shared with alert rules."""
    violations: list[FieldViolation] = []
    model_id = ""
    if not model:
        violations.append(FieldViolation(f"{field_prefix}.model", "required: models/{model}"))
    else:
        try:
            model_id = parse_model_name(model, field=f"{field_prefix}.model")
        except InvalidArgumentError as error:
            violations.extend(error.violations)
    if not model_version:
        return violations
    field = f"{field_prefix}.model_version"
    try:
        ref = parse_model_version_ref(model_version, field=field)
    except InvalidArgumentError as error:
        violations.extend(error.violations)
        return violations
    if ref.version is None:
        violations.append(
            FieldViolation(field, f"a version, models/{{model}}/versions/{{version}}, not {ref}")
        )
    elif model_id and ref.model != model_id:
        violations.append(FieldViolation(field, f"{model_version} is not a version of {model}"))
    return violations


def display_name_violations(display_name: str, *, field_prefix: str) -> list[FieldViolation]:
    """A display name of more than 256 characters, as a violation."""
    if len(display_name) <= MAX_DISPLAY_NAME:
        return []
    return [
        FieldViolation(
            f"{field_prefix}.display_name",
            f"at most {MAX_DISPLAY_NAME} characters, got {len(display_name)}",
        )
    ]


def _sli(good: int, total: int) -> float:
    if not 0 <= good <= total:
        raise ValueError(f"{good} good of {total} predictions")
    return good / total if total else 1.0


__all__ = [
    "DEFAULT_ROLLING_PERIOD",
    "MAX_ROLLING_PERIOD",
    "MIN_ROLLING_PERIOD",
    "burn_rate",
    "check_slo",
    "display_name_violations",
    "good_mask",
    "model_scope_violations",
    "resolved_rolling_period",
    "slo_status",
]
