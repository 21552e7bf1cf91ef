"""Alert rules: every bad field named, each condition kind breached, clear or
unable to say, and the hysteresis that opens one alert per incident and
resolves it after enough clear windows."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.alerting import (
    AlertTransition,
    ConditionResult,
    RuleState,
    SloMeasurement,
    WindowFindings,
    acknowledge,
    advance,
    applies_to,
    check_alert_rule,
    evaluate_condition,
    resolve,
)
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError

VERSION = "models/cnn/versions/2"
SLO = "serviceLevelObjectives/availability"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
OPENED = pb.ALERT_EVENT_TYPE_OPENED
UPDATED = pb.ALERT_EVENT_TYPE_UPDATED
RESOLVED = pb.ALERT_EVENT_TYPE_RESOLVED


def a_rule(**fields: object) -> pb.AlertRule:
    """A valid dataset-drift rule on models/cnn, with ``fields`` set."""
    rule = pb.AlertRule(
        name="alertRules/drift",
        model="models/cnn",
        drift=pb.DriftCondition(scope=pb.DRIFT_SCOPE_DATASET),
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(rule, name).extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(rule, name).CopyFrom(value)
        else:
            setattr(rule, name, value)
    return rule


def violations(rule: pb.AlertRule) -> set[str]:
    with pytest.raises(InvalidArgumentError) as caught:
        check_alert_rule(rule)
    return {v.field for v in caught.value.violations}


def window(index: int, rows: int = 1000) -> pb.Window:
    return pb.Window(index=index, row_count=rows, closed=True)


def dataset_drift(index: int, drifted: int, tested: int = 30, share: float = 0.3) -> WindowFindings:
    report = pb.DriftReport(
        model_version=VERSION,
        window=window(index),
        dataset=pb.DatasetDrift(
            drifted_features=drifted,
            tested_features=tested,
            drifted_share=drifted / tested if tested else 0.0,
            share_threshold=share,
            drifted=tested > 0 and drifted / tested >= share,
        ),
    )
    return WindowFindings(model_version=VERSION, window=window(index), drift=report)


def retrain(job: str = "", days: float | None = None) -> pb.AlertAction:
    action = pb.AlertAction(retrain=pb.RetrainAction(training_job=job))
    if days is not None:
        action.retrain.labelled_data_window.FromTimedelta(timedelta(days=days))
    return action


def rollback(alias: str = "") -> pb.AlertAction:
    return pb.AlertAction(rollback=pb.RollbackAction(alias=alias))


# --- check_alert_rule -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model_version": VERSION, "trigger_windows": 100, "resolve_windows": 100},
        {"drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE, feature="age")},
        {"drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_PREDICTION)},
        {"performance": pb.PerformanceCondition(metric=pb.PERFORMANCE_METRIC_F1)},
        {
            "performance": pb.PerformanceCondition(
                metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=0.0
            )
        },
        {"slo": pb.SloCondition(service_level_objective=SLO, burn_rate_threshold=14.4)},
        {"outliers": pb.OutlierCondition(max_outlier_rate=0.05)},
        {"actions": [rollback(), rollback("production"), retrain(), retrain("trainingJobs/j", 1)]},
        {"actions": [retrain(days=3650)], "severity": pb.ALERT_SEVERITY_CRITICAL},
        {"display_name": "x" * 256},
    ],
)
def test_valid_rules_pass(fields: dict[str, object]) -> None:
    check_alert_rule(a_rule(**fields))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model": ""}, "model"),
        ({"model": "models/Not_Valid"}, "model"),
        ({"model_version": "models/other/versions/1"}, "model_version"),
        ({"model_version": "models/cnn@production"}, "model_version"),
        ({"model_version": "versions/1"}, "model_version"),
        ({"drift": pb.DriftCondition()}, "drift.scope"),
        ({"drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE)}, "drift.feature"),
        (
            {"drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE, feature="x" * 129)},
            "drift.feature",
        ),
        (
            {"drift": pb.DriftCondition(scope=pb.DRIFT_SCOPE_DATASET, feature="age")},
            "drift.feature",
        ),
        ({"performance": pb.PerformanceCondition()}, "performance.metric"),
        (
            {
                "performance": pb.PerformanceCondition(
                    metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=-0.01
                )
            },
            "performance.max_degradation",
        ),
        (
            {
                "performance": pb.PerformanceCondition(
                    metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=math.inf
                )
            },
            "performance.max_degradation",
        ),
        (
            {
                "performance": pb.PerformanceCondition(
                    metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=math.nan
                )
            },
            "performance.max_degradation",
        ),
        ({"slo": pb.SloCondition()}, "slo.service_level_objective"),
        ({"slo": pb.SloCondition(service_level_objective="slos/a")}, "slo.service_level_objective"),
        (
            {"slo": pb.SloCondition(service_level_objective=SLO, burn_rate_threshold=0)},
            "slo.burn_rate_threshold",
        ),
        ({"outliers": pb.OutlierCondition()}, "outliers.max_outlier_rate"),
        ({"outliers": pb.OutlierCondition(max_outlier_rate=1.0)}, "outliers.max_outlier_rate"),
        ({"trigger_windows": 101}, "trigger_windows"),
        ({"trigger_windows": -1}, "trigger_windows"),
        ({"resolve_windows": 101}, "resolve_windows"),
        ({"severity": 9}, "severity"),
        ({"actions": [rollback()] * 5}, "actions"),
        ({"actions": [rollback(), pb.AlertAction()]}, "actions[1]"),
        ({"actions": [rollback("Production")]}, "actions[0].rollback.alias"),
        ({"actions": [rollback("prod-")]}, "actions[0].rollback.alias"),
        ({"actions": [retrain("jobs/j")]}, "actions[0].retrain.training_job"),
        ({"actions": [retrain(days=1 / 48)]}, "actions[0].retrain.labelled_data_window"),
        ({"actions": [retrain(days=3651)]}, "actions[0].retrain.labelled_data_window"),
        ({"display_name": "x" * 257}, "display_name"),
    ],
)
def test_each_violation_names_its_field(fields: dict[str, object], field: str) -> None:
    assert violations(a_rule(**fields)) == {f"alert_rule.{field}"}


def test_a_rule_without_condition_is_refused() -> None:
    assert violations(pb.AlertRule(model="models/cnn")) == {"alert_rule.condition"}


def test_every_violation_is_reported_at_once_under_the_callers_prefix() -> None:
    rule = a_rule(
        model="cnn",
        drift=pb.DriftCondition(),
        trigger_windows=500,
        actions=[pb.AlertAction()],
        display_name="x" * 300,
    )

    with pytest.raises(InvalidArgumentError) as caught:
        check_alert_rule(rule, field_prefix="rule")

    assert {v.field for v in caught.value.violations} == {
        "rule.model",
        "rule.drift.scope",
        "rule.trigger_windows",
        "rule.actions[0]",
        "rule.display_name",
    }


def test_applies_to_versions_of_its_model_while_enabled() -> None:
    assert applies_to(a_rule(), VERSION)
    assert not applies_to(a_rule(), "models/cnn2/versions/2")
    assert applies_to(a_rule(model_version=VERSION), VERSION)
    assert not applies_to(a_rule(model_version=VERSION), "models/cnn/versions/3")
    assert not applies_to(a_rule(disabled=True), VERSION)


# --- evaluate_condition -----------------------------------------------------------


def test_dataset_drift_breached_and_clear() -> None:
    breached = evaluate_condition(a_rule(), dataset_drift(41, drifted=12))
    clear = evaluate_condition(a_rule(), dataset_drift(41, drifted=3))

    assert breached == ConditionResult(
        True, 0.4, 0.3, "dataset drift: 12 of 30 features drifted (share 0.40 >= 0.30)"
    )
    assert clear.breached is False
    assert clear.value == pytest.approx(0.1)
    assert clear.description == "dataset drift: 3 of 30 features drifted (share 0.10 < 0.30)"


def test_drift_cannot_say_without_a_verdict() -> None:
    insufficient = dataset_drift(41, drifted=30)
    assert insufficient.drift is not None
    insufficient.drift.insufficient_data = True
    no_report = WindowFindings(model_version=VERSION, window=window(41))

    for findings in (insufficient, no_report, dataset_drift(41, drifted=0, tested=0)):
        result = evaluate_condition(a_rule(), findings)
        assert result.breached is None
        assert math.isnan(result.value)


def feature_findings(
    *features: pb.FeatureDrift, prediction: pb.FeatureDrift | None = None
) -> WindowFindings:
    report = pb.DriftReport(model_version=VERSION, window=window(7), features=features)
    if prediction is not None:
        report.prediction.CopyFrom(prediction)
    return WindowFindings(model_version=VERSION, window=window(7), drift=report)


def test_feature_drift_uses_the_corrected_p_value_and_the_verdict() -> None:
    age = pb.FeatureDrift(
        feature="age",
        test=pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV,
        statistic=0.2,
        p_value=0.001,
        adjusted_p_value=0.004,
        threshold=0.05,
        drifted=True,
    )
    income = pb.FeatureDrift(
        feature="income",
        test=pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV,
        p_value=0.3,
        adjusted_p_value=0.6,
        threshold=0.05,
    )
    findings = feature_findings(age, income)
    rule = a_rule(drift=pb.DriftCondition(scope=pb.DRIFT_SCOPE_FEATURE, feature="age"))

    result = evaluate_condition(rule, findings)
    assert (result.breached, result.value, result.threshold) == (True, 0.004, 0.05)
    assert result.description == "drift of feature 'age': Kolmogorov-Smirnov p-value 0.004 < 0.05"

    rule.drift.feature = "income"
    assert evaluate_condition(rule, findings).breached is False
    assert evaluate_condition(rule, findings).value == 0.6

    rule.drift.feature = "missing"
    assert evaluate_condition(rule, findings).breached is None


def test_prediction_drift_uses_the_distance() -> None:
    rule = a_rule(drift=pb.DriftCondition(scope=pb.DRIFT_SCOPE_PREDICTION))
    prediction = pb.FeatureDrift(
        feature="prediction",
        test=pb.DRIFT_TEST_JENSEN_SHANNON,
        statistic=0.15,
        threshold=0.1,
        drifted=True,
    )

    result = evaluate_condition(rule, feature_findings(prediction=prediction))

    assert (result.breached, result.value, result.threshold) == (True, 0.15, 0.1)
    assert result.description == "prediction drift: Jensen-Shannon 0.15 >= 0.1"
    assert evaluate_condition(rule, feature_findings()).breached is None


def performance_findings(
    *metrics: pb.MetricComparison, insufficient: bool = False
) -> WindowFindings:
    report = pb.PerformanceReport(
        model_version=VERSION,
        window=window(3),
        labelled_rows=500,
        metrics=metrics,
        insufficient_data=insufficient,
    )
    return WindowFindings(model_version=VERSION, window=window(3), performance=report)


ACCURACY = pb.MetricComparison(
    metric=pb.PERFORMANCE_METRIC_ACCURACY,
    value=0.87,
    registered_value=0.90,
    degradation=0.03,
    max_degradation=0.02,
    degraded=True,
)
ECE = pb.MetricComparison(
    metric=pb.PERFORMANCE_METRIC_EXPECTED_CALIBRATION_ERROR,
    value=0.05,
    registered_value=0.04,
    degradation=0.01,
    max_degradation=0.02,
    degraded=False,
)


def test_performance_follows_the_report_without_an_override() -> None:
    rule = a_rule(performance=pb.PerformanceCondition(metric=pb.PERFORMANCE_METRIC_ACCURACY))

    result = evaluate_condition(rule, performance_findings(ACCURACY, ECE))

    assert result.breached is True
    assert result.value == 0.87
    assert result.threshold == pytest.approx(0.88)
    assert (
        result.description
        == "accuracy 0.87 against the registered 0.9: 0.03 worse, more than the 0.02 allowed"
    )


def test_performance_override_replaces_the_tolerance() -> None:
    lenient = a_rule(
        performance=pb.PerformanceCondition(
            metric=pb.PERFORMANCE_METRIC_ACCURACY, max_degradation=0.05
        )
    )
    strict = a_rule(
        performance=pb.PerformanceCondition(
            metric=pb.PERFORMANCE_METRIC_EXPECTED_CALIBRATION_ERROR, max_degradation=0.005
        )
    )
    findings = performance_findings(ACCURACY, ECE)

    assert evaluate_condition(lenient, findings).breached is False
    assert evaluate_condition(lenient, findings).threshold == pytest.approx(0.85)
    result = evaluate_condition(strict, findings)
    assert result.breached is True
    assert result.threshold == pytest.approx(0.045)  # calibration error: higher is worse


def test_performance_cannot_say_without_labels_metric_or_registered_value() -> None:
    rule = a_rule(performance=pb.PerformanceCondition(metric=pb.PERFORMANCE_METRIC_ROC_AUC))
    unregistered = pb.MetricComparison(metric=pb.PERFORMANCE_METRIC_ROC_AUC, value=0.7)
    accuracy_rule = a_rule(
        performance=pb.PerformanceCondition(metric=pb.PERFORMANCE_METRIC_ACCURACY)
    )

    assert evaluate_condition(rule, performance_findings(ACCURACY)).breached is None
    assert evaluate_condition(rule, performance_findings(unregistered)).breached is None
    assert (
        evaluate_condition(
            accuracy_rule, performance_findings(ACCURACY, insufficient=True)
        ).breached
        is None
    )
    assert evaluate_condition(accuracy_rule, WindowFindings(VERSION, window(3))).breached is None


def slo_findings(*, good: int, total: int, window_good: int, window_total: int) -> WindowFindings:
    slo = pb.ServiceLevelObjective(
        name=SLO, model="models/cnn", indicator=pb.SERVICE_LEVEL_INDICATOR_AVAILABILITY, goal=0.99
    )
    sli = good / total if total else 1.0
    status = pb.SloStatus(
        sli=sli,
        good_count=good,
        total_count=total,
        error_budget_remaining=1 - (1 - sli) / 0.01,
        met=sli >= 0.99,
    )
    measured = SloMeasurement(
        slo=slo, status=status, window_good=window_good, window_total=window_total
    )
    return WindowFindings(model_version=VERSION, window=window(5), slos={SLO: measured})


def test_slo_burn_rate_over_the_window() -> None:
    rule = a_rule(slo=pb.SloCondition(service_level_objective=SLO, burn_rate_threshold=14.4))

    # 15% bad against a 1% budget: 15 times the sustainable rate.
    fast = evaluate_condition(
        rule, slo_findings(good=9990, total=10000, window_good=850, window_total=1000)
    )
    # 1% bad: exactly the sustainable rate.
    slow = evaluate_condition(
        rule, slo_findings(good=9990, total=10000, window_good=990, window_total=1000)
    )
    empty = evaluate_condition(
        rule, slo_findings(good=9990, total=10000, window_good=0, window_total=0)
    )

    assert fast.breached is True
    assert fast.value == pytest.approx(15.0)
    assert fast.threshold == 14.4
    assert "burning its error budget at 15x (>= 14.4x)" in fast.description
    assert slow.breached is False
    assert slow.value == pytest.approx(1.0)
    assert empty.breached is None


def test_slo_without_burn_rate_fires_when_not_met() -> None:
    rule = a_rule(slo=pb.SloCondition(service_level_objective=SLO))

    missed = evaluate_condition(
        rule, slo_findings(good=980, total=1000, window_good=0, window_total=0)
    )
    met = evaluate_condition(
        rule, slo_findings(good=995, total=1000, window_good=0, window_total=0)
    )
    other = a_rule(slo=pb.SloCondition(service_level_objective="serviceLevelObjectives/other"))

    assert (missed.breached, missed.value, missed.threshold) == (True, 0.98, 0.99)
    assert "SLI 0.98 < goal 0.99" in missed.description
    assert (met.breached, met.value) == (False, 0.995)
    assert (
        evaluate_condition(
            other, slo_findings(good=1, total=1, window_good=1, window_total=1)
        ).breached
        is None
    )


def outlier_findings(outliers: int, predictions: int = 1000, errors: int = 0) -> WindowFindings:
    succeeded = predictions - errors
    report = pb.OperationsReport(
        model_version=VERSION,
        prediction_count=predictions,
        error_count=errors,
        outlier_count=outliers,
        outlier_rate=outliers / succeeded if succeeded else 0.0,
    )
    return WindowFindings(model_version=VERSION, window=window(9), operations=report)


def test_outlier_rate_above_the_limit() -> None:
    rule = a_rule(outliers=pb.OutlierCondition(max_outlier_rate=0.02))

    above = evaluate_condition(rule, outlier_findings(25))
    at = evaluate_condition(rule, outlier_findings(20))

    assert (above.breached, above.value, above.threshold) == (True, 0.025, 0.02)
    assert above.description == "outliers: 25 of 1000 successful predictions (rate 0.025 > 0.02)"
    assert at.breached is False
    assert evaluate_condition(rule, outlier_findings(0, predictions=10, errors=10)).breached is None
    assert evaluate_condition(rule, WindowFindings(VERSION, window(9))).breached is None


# --- advance: the hysteresis ------------------------------------------------------

BREACH = ConditionResult(
    True, 0.4, 0.3, "dataset drift: 12 of 30 features drifted (share 0.40 >= 0.30)"
)
CLEAR = ConditionResult(
    False, 0.1, 0.3, "dataset drift: 3 of 30 features drifted (share 0.10 < 0.30)"
)
UNKNOWN = ConditionResult(None, math.nan, math.nan, "drift: too few rows (12) for a verdict")


class Monitor:
    """Feeds one rule window after window (indices from 40), keeping its state
    and every event, as the service would."""

    def __init__(self, rule: pb.AlertRule, start: int = 40) -> None:
        self.rule = rule
        self.state = RuleState()
        self.events: list[AlertTransition] = []
        self._index = itertools.count(start)
        self._names = (f"alerts/a{n}" for n in itertools.count(1))

    def feed(self, results: Sequence[ConditionResult]) -> list[AlertTransition]:
        new: list[AlertTransition] = []
        for result in results:
            index = next(self._index)
            findings = WindowFindings(model_version=VERSION, window=window(index))
            now = T0 + timedelta(minutes=index)
            self.state, events = advance(
                self.rule, self.state, result, findings, now=now, new_alert_name=self._name
            )
            new += events
        self.events += new
        return new

    def _name(self) -> str:
        return next(self._names)

    def kinds(self) -> list[int]:
        return [event.event_type for event in self.events]


def test_opens_exactly_after_trigger_windows() -> None:
    monitor = Monitor(a_rule(trigger_windows=3))

    assert monitor.feed([BREACH, BREACH]) == []
    assert monitor.state.consecutive_breaches == 2
    [(kind, alert)] = monitor.feed([BREACH])

    assert kind == OPENED
    assert alert.name == "alerts/a1"
    assert alert.alert_rule == "alertRules/drift"
    assert alert.model_version == VERSION
    assert alert.state == pb.ALERT_STATE_FIRING
    assert alert.severity == pb.ALERT_SEVERITY_WARNING
    assert (
        alert.summary
        == "dataset drift: 12 of 30 features drifted (share 0.40 >= 0.30) in windows 40-42"
    )
    assert (alert.value, alert.threshold, alert.breached_windows) == (0.4, 0.3, 3)
    assert alert.trigger_window.index == 42
    assert alert.open_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=42)
    assert alert.update_time == alert.open_time
    assert list(alert.actions) == []
    assert monitor.state.open_alert == alert


def test_zero_trigger_windows_means_one() -> None:
    monitor = Monitor(a_rule(severity=pb.ALERT_SEVERITY_CRITICAL))

    [(kind, alert)] = monitor.feed([BREACH])

    assert kind == OPENED
    assert alert.summary.endswith(" in window 40")
    assert alert.severity == pb.ALERT_SEVERITY_CRITICAL


def test_a_clear_window_breaks_the_streak() -> None:
    monitor = Monitor(a_rule(trigger_windows=3))

    assert monitor.feed([BREACH, BREACH, CLEAR, BREACH, BREACH]) == []
    assert monitor.state == RuleState(consecutive_breaches=2, first_breach=43, last_breach=44)
    [(kind, alert)] = monitor.feed([BREACH])

    assert kind == OPENED
    assert alert.summary.endswith("in windows 43-45")


def test_one_alert_per_incident_however_long() -> None:
    monitor = Monitor(a_rule(trigger_windows=2))

    monitor.feed([BREACH] * 6)

    assert monitor.kinds() == [OPENED, UPDATED, UPDATED, UPDATED, UPDATED]
    assert {event.alert.name for event in monitor.events} == {"alerts/a1"}
    assert [event.alert.breached_windows for event in monitor.events] == [2, 3, 4, 5, 6]
    last = monitor.events[-1].alert
    assert last.summary.endswith("in windows 40-45")
    assert last.trigger_window.index == 41
    assert last.update_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=45)
    assert last.open_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=41)


def test_an_update_refreshes_the_numbers() -> None:
    monitor = Monitor(a_rule())
    monitor.feed([BREACH])

    worse = ConditionResult(
        True, 0.6, 0.3, "dataset drift: 18 of 30 features drifted (share 0.60 >= 0.30)"
    )
    [(kind, alert)] = monitor.feed([worse])

    assert kind == UPDATED
    assert (alert.value, alert.breached_windows) == (0.6, 2)
    assert alert.summary == f"{worse.description} in windows 40-41"


def test_resolves_after_resolve_windows_clear_windows() -> None:
    monitor = Monitor(a_rule(trigger_windows=1, resolve_windows=3))
    monitor.feed([BREACH])

    assert monitor.feed([CLEAR, CLEAR]) == []
    assert monitor.state.consecutive_clears == 2
    [(kind, alert)] = monitor.feed([CLEAR])

    assert kind == RESOLVED
    assert alert.name == "alerts/a1"
    assert alert.state == pb.ALERT_STATE_RESOLVED
    assert alert.resolve_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=43)
    assert alert.summary.endswith("in window 40; resolved: clear for 3 consecutive windows")
    assert monitor.state == RuleState()


def test_zero_resolve_windows_means_trigger_windows() -> None:
    monitor = Monitor(a_rule(trigger_windows=2))
    monitor.feed([BREACH, BREACH])

    assert monitor.feed([CLEAR]) == []
    assert [kind for kind, _ in monitor.feed([CLEAR])] == [RESOLVED]


def test_a_breach_resets_the_clear_count() -> None:
    monitor = Monitor(a_rule(resolve_windows=3))
    monitor.feed([BREACH, CLEAR, CLEAR])

    [(kind, alert)] = monitor.feed([BREACH])
    assert kind == UPDATED
    assert alert.summary.endswith("in 2 of windows 40-43")
    assert monitor.feed([CLEAR, CLEAR]) == []
    assert [kind for kind, _ in monitor.feed([CLEAR])] == [RESOLVED]


def test_windows_that_cannot_say_change_nothing() -> None:
    monitor = Monitor(a_rule(trigger_windows=2, resolve_windows=2))
    monitor.feed([BREACH])
    streak = monitor.state

    assert monitor.feed([UNKNOWN] * 5) == []
    assert monitor.state == streak
    monitor.feed([BREACH, CLEAR])
    open_state = monitor.state
    assert monitor.feed([UNKNOWN] * 5) == []
    assert monitor.state == open_state
    assert monitor.kinds() == [OPENED]
    assert [kind for kind, _ in monitor.feed([CLEAR])] == [RESOLVED]


def test_a_new_incident_opens_a_new_alert() -> None:
    monitor = Monitor(a_rule())

    monitor.feed([BREACH, CLEAR, BREACH])

    assert monitor.kinds() == [OPENED, RESOLVED, OPENED]
    assert [event.alert.name for event in monitor.events] == ["alerts/a1", "alerts/a1", "alerts/a2"]
    assert monitor.events[-1].alert.breached_windows == 1
    assert monitor.events[-1].alert.summary.endswith("in window 42")


def test_actions_are_listed_pending_in_order() -> None:
    monitor = Monitor(a_rule(actions=[rollback("production"), retrain()]))

    [(_, alert)] = monitor.feed([BREACH])

    assert [(a.kind, a.state) for a in alert.actions] == [
        (pb.ACTION_KIND_ROLLBACK, pb.ACTION_STATE_PENDING),
        (pb.ACTION_KIND_RETRAIN, pb.ACTION_STATE_PENDING),
    ]


def test_an_acknowledged_alert_stays_open_and_still_resolves() -> None:
    monitor = Monitor(a_rule())
    monitor.feed([BREACH])
    assert monitor.state.open_alert is not None
    acked = acknowledge(monitor.state.open_alert, principal="ops@x", comment="looking", now=T0)
    monitor.state = replace(monitor.state, open_alert=acked)

    [(kind, alert)] = monitor.feed([BREACH])
    assert kind == UPDATED
    assert alert.state == pb.ALERT_STATE_ACKNOWLEDGED
    assert alert.acknowledged_by == "ops@x"
    assert [kind for kind, _ in monitor.feed([CLEAR])] == [RESOLVED]


def test_an_alert_resolved_elsewhere_ends_the_incident() -> None:
    monitor = Monitor(a_rule(trigger_windows=2))
    monitor.feed([BREACH, BREACH])
    assert monitor.state.open_alert is not None
    closed = resolve(monitor.state.open_alert, now=T0, reason="the rule was disabled")
    monitor.state = replace(monitor.state, open_alert=closed)

    assert monitor.feed([BREACH]) == []  # a fresh streak, not an update of a closed alert
    assert [kind for kind, _ in monitor.feed([BREACH])] == [OPENED]
    assert monitor.events[-1].alert.name == "alerts/a2"


def test_advance_leaves_its_inputs_alone() -> None:
    monitor = Monitor(a_rule())
    monitor.feed([BREACH])
    before = monitor.state
    assert before.open_alert is not None
    snapshot = before.open_alert.SerializeToString()

    monitor.feed([BREACH])
    monitor.events[-1].alert.summary = "changed by a caller"

    assert before.open_alert.SerializeToString() == snapshot
    assert monitor.state.open_alert is not None
    assert monitor.state.open_alert.summary != "changed by a caller"


def test_state_round_trips_through_json() -> None:
    monitor = Monitor(a_rule(resolve_windows=3))
    monitor.feed([BREACH, BREACH, CLEAR])
    alert = monitor.state.open_alert
    assert alert is not None

    assert RuleState.from_json(monitor.state.to_json(), alert) == monitor.state
    assert RuleState.from_json(RuleState().to_json(), None) == RuleState()


def test_a_stored_incident_resolved_elsewhere_starts_afresh() -> None:
    monitor = Monitor(a_rule(trigger_windows=2))
    monitor.feed([BREACH, BREACH, BREACH])
    alert = monitor.state.open_alert
    assert alert is not None
    stored = monitor.state.to_json()

    assert RuleState.from_json(stored, None) == RuleState()
    disabled = resolve(alert, now=T0, reason="the rule was disabled")
    assert RuleState.from_json(stored, disabled) == RuleState()


# --- acknowledge and resolve ------------------------------------------------------


def firing() -> pb.Alert:
    alert = pb.Alert(name="alerts/a1", state=pb.ALERT_STATE_FIRING, summary="drift in window 4")
    alert.open_time.FromDatetime(T0)
    return alert


def test_acknowledge_records_who_and_why() -> None:
    later = T0 + timedelta(minutes=5)
    original = firing()

    acked = acknowledge(original, principal="ops@example.com", comment="on it", now=later)

    assert acked.state == pb.ALERT_STATE_ACKNOWLEDGED
    assert (acked.acknowledged_by, acked.acknowledge_comment) == ("ops@example.com", "on it")
    assert acked.acknowledge_time.ToDatetime(tzinfo=UTC) == later
    assert acked.update_time.ToDatetime(tzinfo=UTC) == later
    assert original.state == pb.ALERT_STATE_FIRING


def test_acknowledging_again_changes_nothing() -> None:
    acked = acknowledge(firing(), principal="a", comment="first", now=T0)

    again = acknowledge(acked, principal="b", comment="second", now=T0 + timedelta(hours=1))

    assert again == acked


def test_a_resolved_alert_cannot_be_acknowledged() -> None:
    resolved = resolve(firing(), now=T0, reason="the rule was deleted")

    with pytest.raises(FailedPreconditionError) as caught:
        acknowledge(resolved, principal="a", comment="", now=T0)

    assert caught.value.reason == "ALERT_RESOLVED"


def test_resolve_is_final_and_idempotent() -> None:
    later = T0 + timedelta(hours=2)
    resolved = resolve(firing(), now=later, reason="the rule was disabled")

    assert resolved.state == pb.ALERT_STATE_RESOLVED
    assert resolved.summary == "drift in window 4; resolved: the rule was disabled"
    assert resolved.resolve_time.ToDatetime(tzinfo=UTC) == later
    assert resolve(resolved, now=later + timedelta(hours=1), reason="again") == resolved


def test_resolving_an_acknowledged_alert_keeps_the_acknowledgement() -> None:
    acked = acknowledge(firing(), principal="a", comment="c", now=T0)

    resolved = resolve(acked, now=T0, reason="the rule was deleted")

    assert resolved.state == pb.ALERT_STATE_RESOLVED
    assert resolved.acknowledged_by == "a"
