"""Alert rule conditions: what one closed window of a model version produced
(:class:`WindowFindings`), and whether a rule's condition held in it
(:func:`evaluate_condition`: breached, clear, or cannot say), with the
numbers in words.

Where the contract leaves room, this module chooses:

- Performance compares the metric's degradation against the registered value;
  a metric without a registered value (or missing from the report) cannot say.
  The alert's threshold is the worst acceptable metric value (registered value
  minus the tolerance, plus for calibration error), in the value's units.
- The SLO condition without a burn-rate threshold reads the SLO's status over
  its rolling period; one without predictions there is met (its SLI is 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.slo import burn_rate

_HIGHER_IS_WORSE: Final = (pb.PERFORMANCE_METRIC_EXPECTED_CALIBRATION_ERROR,)
METRIC_NAMES: Final = {
    pb.PERFORMANCE_METRIC_ACCURACY: "accuracy",
    pb.PERFORMANCE_METRIC_F1: "f1",
    pb.PERFORMANCE_METRIC_ROC_AUC: "roc_auc",
    pb.PERFORMANCE_METRIC_EXPECTED_CALIBRATION_ERROR: "ece",
}
_TEST_NAMES: Final = {
    pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV: "Kolmogorov-Smirnov",
    pb.DRIFT_TEST_POPULATION_STABILITY_INDEX: "PSI",
    pb.DRIFT_TEST_WASSERSTEIN: "Wasserstein",
    pb.DRIFT_TEST_CHI_SQUARED: "chi-squared",
    pb.DRIFT_TEST_JENSEN_SHANNON: "Jensen-Shannon",
}


@dataclass(frozen=True)
class SloMeasurement:
    """An SLO as measured when a window closed."""

    slo: pb.ServiceLevelObjective
    """The objective (its goal and indicator)."""
    status: pb.SloStatus
    """Its compliance over its rolling period, up to the window's end."""
    window_good: int
    """Good predictions within the window alone (for the burn rate)."""
    window_total: int
    """Predictions the SLO counts within the window alone."""


@dataclass(frozen=True)
class WindowFindings:
    """What one closed window of one model version produced: everything a rule
    needs, computed once and shared by all the version's rules."""

    model_version: str
    """The version, ``models/{model}/versions/{version}``."""
    window: pb.Window
    """The closed window."""
    drift: pb.DriftReport | None = None
    """Its drift report; None when the version has no reference."""
    performance: pb.PerformanceReport | None = None
    """Its performance report; None when it cannot be computed."""
    operations: pb.OperationsReport | None = None
    """Its operations report."""
    slos: Mapping[str, SloMeasurement] = field(default_factory=dict)
    """The model's SLOs that count this version, by name."""


@dataclass(frozen=True)
class ConditionResult:
    """One rule's condition in one window."""

    breached: bool | None
    """True or False; None when the window cannot say (no data, no report)."""
    value: float
    """What was measured (see ``Alert.value``); NaN when nothing was."""
    threshold: float
    """What it was compared with; NaN when nothing was."""
    description: str
    """The comparison in words, naming the numbers."""


def evaluate_condition(rule: pb.AlertRule, findings: WindowFindings) -> ConditionResult:
    """Whether ``rule``'s condition held in the window of ``findings``."""
    kind = rule.WhichOneof("condition")
    if kind == "drift":
        return _drift(rule.drift, findings.drift)
    if kind == "performance":
        return _performance(rule.performance, findings.performance)
    if kind == "slo":
        return _slo(rule.slo, findings.slos.get(rule.slo.service_level_objective))
    if kind == "outliers":
        return _outliers(rule.outliers, findings.operations)
    raise ValueError(f"{rule.name or 'the rule'} has no condition; check it first")


def _drift(condition: pb.DriftCondition, report: pb.DriftReport | None) -> ConditionResult:
    if report is None:
        return _unknown("no drift report (the version has no reference)")
    if report.insufficient_data:
        return _unknown(f"drift: too few rows ({report.window.row_count}) for a verdict")
    if condition.scope == pb.DRIFT_SCOPE_DATASET:
        dataset = report.dataset
        if dataset.tested_features == 0:
            return _unknown("dataset drift: no feature was tested")
        compared = ">=" if dataset.drifted else "<"
        return ConditionResult(
            dataset.drifted,
            dataset.drifted_share,
            dataset.share_threshold,
            f"dataset drift: {dataset.drifted_features} of {dataset.tested_features} features "
            f"drifted (share {dataset.drifted_share:.2f} {compared} {dataset.share_threshold:.2f})",
        )
    if condition.scope == pb.DRIFT_SCOPE_PREDICTION:
        if not report.HasField("prediction"):
            return _unknown("prediction drift: the reference carries no outputs")
        return _feature_drift("prediction drift", report.prediction)
    for feature in report.features:
        if feature.feature == condition.feature:
            return _feature_drift(f"drift of feature {feature.feature!r}", feature)
    return _unknown(f"drift: feature {condition.feature!r} is not in the report")


def _feature_drift(label: str, drift: pb.FeatureDrift) -> ConditionResult:
    """The report's verdict, with the corrected p-value (p-value tests) or the
    distance (distance tests) as the value."""
    test = _TEST_NAMES.get(drift.test, "test")
    if drift.HasField("adjusted_p_value") or drift.HasField("p_value"):
        p_value = drift.adjusted_p_value if drift.HasField("adjusted_p_value") else drift.p_value
        compared = "<" if drift.drifted else ">="
        text = f"{test} p-value {p_value:.3g} {compared} {drift.threshold:.3g}"
        return ConditionResult(drift.drifted, p_value, drift.threshold, f"{label}: {text}")
    compared = ">=" if drift.drifted else "<"
    text = f"{test} {drift.statistic:.3g} {compared} {drift.threshold:.3g}"
    return ConditionResult(drift.drifted, drift.statistic, drift.threshold, f"{label}: {text}")


def _performance(
    condition: pb.PerformanceCondition, report: pb.PerformanceReport | None
) -> ConditionResult:
    name = METRIC_NAMES.get(condition.metric, "metric")
    if report is None:
        return _unknown(f"{name}: no performance report")
    if report.insufficient_data:
        return _unknown(f"{name}: too few labelled predictions ({report.labelled_rows})")
    metric = next((m for m in report.metrics if m.metric == condition.metric), None)
    if metric is None:
        return _unknown(f"{name}: not in the report")
    if not metric.HasField("degradation") or not metric.HasField("registered_value"):
        return _unknown(f"{name} {metric.value:.3g}: no registered value to compare with")
    if condition.HasField("max_degradation"):
        tolerance = condition.max_degradation
        degraded = metric.degradation > tolerance
    else:
        tolerance, degraded = metric.max_degradation, metric.degraded
    worse = condition.metric in _HIGHER_IS_WORSE
    limit = metric.registered_value + tolerance if worse else metric.registered_value - tolerance
    change = "worse" if metric.degradation >= 0 else "better"
    return ConditionResult(
        degraded,
        metric.value,
        limit,
        f"{name} {metric.value:.3g} against the registered {metric.registered_value:.3g}: "
        f"{abs(metric.degradation):.3g} {change}, {'more than' if degraded else 'within'} "
        f"the {tolerance:.3g} allowed",
    )


def _slo(condition: pb.SloCondition, measured: SloMeasurement | None) -> ConditionResult:
    name = condition.service_level_objective
    if measured is None:
        return _unknown(f"{name}: not measured for this version")
    goal = measured.slo.goal
    if condition.HasField("burn_rate_threshold"):
        threshold = condition.burn_rate_threshold
        good, total = measured.window_good, measured.window_total
        rate = burn_rate(measured.slo, good=good, total=total)
        if rate is None:
            return _unknown(f"{name}: no prediction counted in the window")
        compared = ">=" if rate >= threshold else "<"
        return ConditionResult(
            rate >= threshold,
            rate,
            threshold,
            f"{name} burning its error budget at {rate:.3g}x ({compared} {threshold:.3g}x): "
            f"{total - good} of {total} predictions bad in the window, goal {goal:.6g}",
        )
    status = measured.status
    compared = ">=" if status.met else "<"
    return ConditionResult(
        not status.met,
        status.sli,
        goal,
        f"{name}: SLI {status.sli:.6g} {compared} goal {goal:.6g} "
        f"({status.good_count} of {status.total_count} good, "
        f"{status.error_budget_remaining:.0%} of the error budget left)",
    )


def _outliers(
    condition: pb.OutlierCondition, report: pb.OperationsReport | None
) -> ConditionResult:
    if report is None:
        return _unknown("outliers: no operations report")
    succeeded = report.prediction_count - report.error_count
    if succeeded <= 0:
        return _unknown("outliers: no successful prediction in the window")
    limit = condition.max_outlier_rate
    breached = report.outlier_rate > limit
    return ConditionResult(
        breached,
        report.outlier_rate,
        limit,
        f"outliers: {report.outlier_count} of {succeeded} successful predictions "
        f"(rate {report.outlier_rate:.3g} {'>' if breached else '<='} {limit:.3g})",
    )


def _unknown(description: str) -> ConditionResult:
    return ConditionResult(None, math.nan, math.nan, description)
