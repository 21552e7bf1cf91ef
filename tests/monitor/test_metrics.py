"""The monitor's Prometheus metrics, scraped over HTTP as Prometheus would after
observing report protos: counters, window, drift, performance and SLO gauges,
open alerts, reports replacing their predecessors, and forgotten series."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest
from google.protobuf import duration_pb2
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.metrics import SERIES, MonitorMetrics
from conveyor.shared.metrics_http import MetricsServer, start_metrics_server

VERSION_3 = "models/churn/versions/3"
VERSION_4 = "models/churn/versions/4"
V3 = {"model": "churn", "version": "3"}
V4 = {"model": "churn", "version": "4"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"conveyor_monitor_{name}", tuple(sorted(labels.items()))))


def series_of(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of a metric's samples, in a stable order."""
    found = [dict(labels) for sample, labels in samples if sample == f"conveyor_monitor_{name}"]
    return sorted(found, key=lambda labels: sorted(labels.items()))


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(timedelta(seconds=seconds))
    return message


@pytest.fixture
def metrics() -> MonitorMetrics:
    return MonitorMetrics()


@pytest.fixture
def server(metrics: MonitorMetrics) -> Iterator[MetricsServer]:
    served = start_metrics_server("127.0.0.1:0", metrics.registry)
    yield served
    served.close()


def operations(version: str, *, index: int, closed: bool, error_rate: float) -> pb.OperationsReport:
    return pb.OperationsReport(
        model_version=version,
        window=pb.Window(index=index, closed=closed, row_count=1000),
        prediction_count=1000,
        error_count=round(error_rate * 1000),
        error_rate=error_rate,
        throughput=12.5,
        latency_p50=duration(0.004),
        latency_p90=duration(0.009),
        latency_p95=duration(0.012),
        latency_p99=duration(0.031),
        outlier_count=20,
        outlier_rate=0.0204,
    )


def drift_report(version: str) -> pb.DriftReport:
    return pb.DriftReport(
        model_version=version,
        features=[
            pb.FeatureDrift(
                feature="age",
                type=pb.FEATURE_TYPE_NUMERICAL,
                test=pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV,
                statistic=0.21,
                p_value=0.001,
                adjusted_p_value=0.003,
                threshold=0.05,
                drifted=True,
            ),
            pb.FeatureDrift(
                feature="income",
                type=pb.FEATURE_TYPE_NUMERICAL,
                test=pb.DRIFT_TEST_WASSERSTEIN,
                statistic=0.04,
                threshold=0.1,
            ),
            pb.FeatureDrift(
                feature="city",
                type=pb.FEATURE_TYPE_CATEGORICAL,
                test=pb.DRIFT_TEST_CHI_SQUARED,
                statistic=math.nan,  # no value in the window
            ),
        ],
        prediction=pb.FeatureDrift(
            feature="prediction",
            type=pb.FEATURE_TYPE_CATEGORICAL,
            test=pb.DRIFT_TEST_JENSEN_SHANNON,
            statistic=0.13,
            threshold=0.1,
            drifted=True,
        ),
        dataset=pb.DatasetDrift(
            drifted_features=1, tested_features=2, drifted_share=0.5, drifted=True
        ),
    )


def slo(version: str, *, sli: float) -> pb.ServiceLevelObjective:
    goal = 0.99
    return pb.ServiceLevelObjective(
        name="serviceLevelObjectives/churn-latency",
        model="models/churn",
        model_version=version,
        indicator=pb.SERVICE_LEVEL_INDICATOR_LATENCY,
        goal=goal,
        status=pb.SloStatus(
            sli=sli, error_budget_remaining=1 - (1 - sli) / (1 - goal), met=sli >= goal
        ),
    )


def test_ingest_is_counted_by_version_and_refusals_by_reason(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    for _ in range(2):
        metrics.count_ingest(VERSION_3, accepted=30, duplicates=2)
    metrics.count_ingest(VERSION_4, accepted=5)
    metrics.count_rejected("invalid", 3)
    metrics.count_rejected("queue_full")
    metrics.count_rejected("invalid", 0)
    metrics.count_feedback(accepted=5, matched=7)
    metrics.count_feedback(accepted=1)

    samples = scrape(server.port)
    assert value(samples, "predictions_accepted_total", **V3) == 60
    assert value(samples, "predictions_duplicate_total", **V3) == 4
    assert value(samples, "predictions_accepted_total", **V4) == 5
    assert value(samples, "predictions_duplicate_total", **V4) is None  # never counted
    assert value(samples, "predictions_rejected_total", reason="invalid") == 3
    assert value(samples, "predictions_rejected_total", reason="queue_full") == 1
    assert value(samples, "feedback_accepted_total") == 6
    assert value(samples, "feedback_matched_predictions_total") == 7


def test_an_operations_report_sets_the_window_gauges(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    metrics.observe_operations(operations(VERSION_3, index=41, closed=True, error_rate=0.02))

    samples = scrape(server.port)
    assert value(samples, "window_predictions", **V3) == 1000
    assert value(samples, "window_error_rate", **V3) == pytest.approx(0.02)
    assert value(samples, "window_predictions_per_second", **V3) == pytest.approx(12.5)
    assert value(samples, "window_outlier_rate", **V3) == pytest.approx(0.0204)
    assert value(samples, "window_latency_seconds", **V3, quantile="0.5") == pytest.approx(0.004)
    assert value(samples, "window_latency_seconds", **V3, quantile="0.99") == pytest.approx(0.031)
    assert value(samples, "window_last_closed_index", **V3) == 41

    # A report on the window still filling updates the gauges but not the index.
    metrics.observe_operations(operations(VERSION_3, index=42, closed=False, error_rate=0.05))
    samples = scrape(server.port)
    assert value(samples, "window_error_rate", **V3) == pytest.approx(0.05)
    assert value(samples, "window_last_closed_index", **V3) == 41


def test_a_drift_report_sets_feature_prediction_and_dataset_gauges(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    metrics.observe_drift(drift_report(VERSION_3))

    samples = scrape(server.port)
    age = {**V3, "feature": "age", "test": "kolmogorov_smirnov"}
    income = {**V3, "feature": "income", "test": "wasserstein"}
    city = {**V3, "feature": "city", "test": "chi_squared"}
    assert value(samples, "feature_drift_statistic", **age) == pytest.approx(0.21)
    assert value(samples, "feature_drift_p_value", **age) == pytest.approx(0.003)  # corrected
    assert value(samples, "feature_drifted", **age) == 1
    assert value(samples, "feature_drift_statistic", **income) == pytest.approx(0.04)
    assert value(samples, "feature_drift_p_value", **income) is None  # a distance
    assert value(samples, "feature_drifted", **income) == 0
    assert math.isnan(value(samples, "feature_drift_statistic", **city) or 0.0)
    prediction = {**V3, "test": "jensen_shannon"}
    assert value(samples, "prediction_drift_statistic", **prediction) == pytest.approx(0.13)
    assert value(samples, "prediction_drifted", **prediction) == 1
    assert value(samples, "prediction_drift_p_value", **prediction) is None
    assert value(samples, "dataset_drifted_share", **V3) == 0.5
    assert value(samples, "dataset_drifted", **V3) == 1


def test_a_drift_report_replaces_the_previous_ones_series(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    metrics.observe_drift(drift_report(VERSION_3))
    metrics.observe_drift(drift_report(VERSION_4))
    later = drift_report(VERSION_3)
    del later.features[1:]
    later.features[0].test = pb.DRIFT_TEST_WASSERSTEIN
    later.features[0].ClearField("adjusted_p_value")
    later.ClearField("prediction")
    later.dataset.drifted = False

    metrics.observe_drift(later)

    samples = scrape(server.port)
    assert series_of(samples, "feature_drift_statistic") == [
        {**V4, "feature": "age", "test": "kolmogorov_smirnov"},
        {**V3, "feature": "age", "test": "wasserstein"},
        {**V4, "feature": "city", "test": "chi_squared"},
        {**V4, "feature": "income", "test": "wasserstein"},
    ]
    assert series_of(samples, "feature_drift_p_value") == [
        {**V4, "feature": "age", "test": "kolmogorov_smirnov"}
    ]
    assert series_of(samples, "prediction_drifted") == [{**V4, "test": "jensen_shannon"}]
    assert value(samples, "dataset_drifted", **V3) == 0


def test_a_performance_report_sets_each_metric_by_its_registry_key(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    report = pb.PerformanceReport(
        model_version=VERSION_3,
        labelled_rows=400,
        label_coverage=0.4,
        metrics=[
            pb.MetricComparison(
                metric=pb.PERFORMANCE_METRIC_ACCURACY,
                value=0.85,
                registered_value=0.9,
                degradation=0.05,
                max_degradation=0.02,
                degraded=True,
            ),
            pb.MetricComparison(metric=pb.PERFORMANCE_METRIC_ROC_AUC, value=0.93),
            pb.MetricComparison(
                metric=pb.PERFORMANCE_METRIC_EXPECTED_CALIBRATION_ERROR,
                value=0.03,
                registered_value=0.04,
                degradation=-0.01,
            ),
        ],
    )
    metrics.observe_performance(report)

    samples = scrape(server.port)
    accuracy, roc_auc, ece = ({**V3, "metric": key} for key in ("accuracy", "roc_auc", "ece"))
    assert value(samples, "performance_value", **accuracy) == pytest.approx(0.85)
    assert value(samples, "performance_registered_value", **accuracy) == pytest.approx(0.9)
    assert value(samples, "performance_degradation", **accuracy) == pytest.approx(0.05)
    assert value(samples, "performance_degraded", **accuracy) == 1
    assert value(samples, "performance_value", **roc_auc) == pytest.approx(0.93)
    assert value(samples, "performance_registered_value", **roc_auc) is None
    assert value(samples, "performance_degradation", **roc_auc) is None
    assert value(samples, "performance_degradation", **ece) == pytest.approx(-0.01)
    assert value(samples, "performance_degraded", **ece) == 0
    assert value(samples, "performance_label_coverage", **V3) == pytest.approx(0.4)

    # A one-class window has no ROC-AUC: its series goes.
    del report.metrics[1]
    metrics.observe_performance(report)
    samples = scrape(server.port)
    assert value(samples, "performance_value", **roc_auc) is None
    assert value(samples, "performance_value", **accuracy) == pytest.approx(0.85)


def test_slo_gauges_follow_the_slos_version_and_are_forgotten(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    metrics.observe_slo(slo(VERSION_3, sli=0.995))

    samples = scrape(server.port)
    labels = {"slo": "churn-latency", **V3}
    assert value(samples, "slo_sli", **labels) == pytest.approx(0.995)
    assert value(samples, "slo_goal", **labels) == pytest.approx(0.99)
    assert value(samples, "slo_error_budget_remaining", **labels) == pytest.approx(0.5)
    assert value(samples, "slo_met", **labels) == 1

    # Updated to cover every version: the version label becomes empty.
    metrics.observe_slo(slo("", sli=0.98))
    samples = scrape(server.port)
    every_version = {"slo": "churn-latency", "model": "churn", "version": ""}
    assert series_of(samples, "slo_sli") == [every_version]
    assert value(samples, "slo_error_budget_remaining", **every_version) == pytest.approx(-1.0)
    assert value(samples, "slo_met", **every_version) == 0

    metrics.forget_slo("serviceLevelObjectives/churn-latency")
    assert not [name for name, _ in scrape(server.port) if "slo_" in name]


def test_open_alerts_are_replaced_as_a_whole(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    metrics.set_open_alerts(
        {
            ("models/churn", "ALERT_SEVERITY_CRITICAL"): 2,
            ("models/churn", "warning"): 1,
            ("models/churn", "ALERT_SEVERITY_UNSPECIFIED"): 1,  # unset means WARNING
            ("models/fraud", "INFO"): 3,
        }
    )
    samples = scrape(server.port)
    assert value(samples, "open_alerts", model="churn", severity="critical") == 2
    assert value(samples, "open_alerts", model="churn", severity="warning") == 2
    assert value(samples, "open_alerts", model="fraud", severity="info") == 3

    metrics.set_open_alerts({("models/churn", "critical"): 1})
    samples = scrape(server.port)
    assert series_of(samples, "open_alerts") == [{"model": "churn", "severity": "critical"}]
    assert value(samples, "open_alerts", model="churn", severity="critical") == 1


def observe_everything(metrics: MonitorMetrics, version: str) -> None:
    metrics.count_ingest(version, accepted=10, duplicates=1)
    metrics.observe_operations(operations(version, index=3, closed=True, error_rate=0.01))
    metrics.observe_drift(drift_report(version))
    metrics.observe_performance(
        pb.PerformanceReport(
            model_version=version,
            metrics=[pb.MetricComparison(metric=pb.PERFORMANCE_METRIC_F1, value=0.8)],
        )
    )


def test_forget_version_removes_that_versions_series_only(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    for version in (VERSION_3, VERSION_4):
        observe_everything(metrics, version)
    metrics.observe_slo(slo(VERSION_3, sli=0.995))
    metrics.count_feedback(accepted=1)

    metrics.forget_version(VERSION_3)

    samples = scrape(server.port)
    remaining = [dict(labels) for name, labels in samples if name.startswith("conveyor_monitor_")]
    assert [labels for labels in remaining if labels.get("version") == "3"] == [
        {"slo": "churn-latency", **V3}
    ] * 4  # SLOs are forgotten by forget_slo
    assert value(samples, "predictions_accepted_total", **V4) == 10
    assert value(samples, "window_error_rate", **V4) == pytest.approx(0.01)
    assert value(samples, "performance_value", **V4, metric="f1") == pytest.approx(0.8)
    assert value(samples, "feedback_accepted_total") == 1

    # A version observed again starts from zero.
    metrics.count_ingest(VERSION_3, accepted=2)
    assert value(scrape(server.port), "predictions_accepted_total", **V3) == 2


def test_forget_model_removes_everything_of_the_model(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    observe_everything(metrics, VERSION_3)
    observe_everything(metrics, "models/fraud/versions/1")
    metrics.observe_slo(slo(VERSION_3, sli=0.995))
    metrics.set_open_alerts({("models/churn", "critical"): 1, ("models/fraud", "critical"): 1})

    metrics.forget_model("models/churn")

    samples = scrape(server.port)
    models = {
        dict(labels)["model"]
        for name, labels in samples
        if name.startswith("conveyor_monitor_") and "model" in dict(labels)
    }
    assert models == {"fraud"}


def test_every_series_is_documented_and_typed(
    metrics: MonitorMetrics, server: MetricsServer
) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
        families = {
            family.name: family
            for family in text_string_to_metric_families(response.read().decode())
        }
    for name, (kind, _, documentation) in SERIES.items():
        family = families[f"conveyor_monitor_{name}"]
        assert family.type == ("counter" if kind is Counter else "gauge")
        assert family.documentation == documentation
    assert "process_cpu_seconds" in families  # the process's own metrics


def test_malformed_names_are_refused(metrics: MonitorMetrics) -> None:
    with pytest.raises(ValueError, match=r"models/\{model\}/versions/\{version\}"):
        metrics.observe_operations(pb.OperationsReport(model_version="models/churn@canary"))
    with pytest.raises(ValueError, match=r"models/\{model\}/versions"):
        metrics.count_ingest("models/churn/versions/0", accepted=1)
    with pytest.raises(ValueError, match=r"is not models/\{model\}$"):
        metrics.forget_model("churn")
    with pytest.raises(ValueError, match="serviceLevelObjectives"):
        metrics.forget_slo("alerts/x")
    with pytest.raises(ValueError, match="no status"):
        metrics.observe_slo(pb.ServiceLevelObjective(name="serviceLevelObjectives/x"))
    with pytest.raises(ValueError, match="not an AlertSeverity"):
        metrics.set_open_alerts({("models/churn", "urgent"): 1})
