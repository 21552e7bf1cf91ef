"""References, monitoring configs and the drift, performance and operations
reports over gRPC, their numbers checked against SciPy and scikit-learn."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor import packed_windows
from conveyor.shared.errors import InvalidArgumentError
from tests.monitor.conftest import Suite, a_schema, records, reference_rows, reference_stream
from tests.support.registry import expect_error, refused

WINDOW = 400


async def monitored(
    suite: Suite, model_id: str = "fraud", rows: int = 800
) -> tuple[str, np.ndarray]:
    version = await suite.register(model_id)
    reference = np.random.default_rng(100).normal(size=(rows, 4))
    await suite.set_reference(version, reference)
    await suite.configure(
        f"models/{model_id}", ["window"], window=pb.WindowSpec(row_count=WINDOW, min_rows=100)
    )
    return version, reference


async def drift(
    suite: Suite, version: str, index: int, *, distributions: bool = False
) -> pb.DriftReport:
    reply = await suite.monitor.GetDriftReport(
        rpc.GetDriftReportRequest(
            model_version=version,
            window=pb.WindowSelector(index=index),
            include_distributions=distributions,
        ),
        timeout=30,
    )
    return reply.drift_report


async def test_drift_statistics_are_scipys_and_a_half_sigma_shift_is_flagged(suite: Suite) -> None:
    version, reference = await monitored(suite)
    rng = np.random.default_rng(101)
    stable = rng.normal(size=(WINDOW, 4))
    shifted = rng.normal(size=(WINDOW, 4))
    shifted[:, 2] += 0.5

    await suite.log(records(version, stable, prefix="a"))
    await suite.log(records(version, shifted, prefix="b"))

    first = await drift(suite, version, 0)
    second = await drift(suite, version, 1)
    assert [f.feature for f in first.features] == ["x0", "x1", "x2", "x3"]
    for j, feature in enumerate(first.features):
        expected = stats.ks_2samp(reference[:, j], stable[:, j])
        assert feature.test == pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV
        assert feature.statistic == pytest.approx(expected.statistic, abs=1e-12)
        assert feature.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert not first.dataset.drifted
    assert [f.drifted for f in second.features] == [False, False, True, False]
    assert second.features[2].adjusted_p_value < 0.05
    assert second.correction == pb.MULTIPLE_TESTING_CORRECTION_BENJAMINI_HOCHBERG
    assert second.reference == f"{version}/reference"
    assert second.reference_rows == 800
    assert second.prediction.feature == "prediction"  # the reference carries outputs


async def test_distributions_come_on_request(suite: Suite) -> None:
    version, _ = await monitored(suite)
    await suite.log(records(version, np.random.default_rng(102).normal(size=(WINDOW, 4))))

    plain = await drift(suite, version, 0)
    detailed = await drift(suite, version, 0, distributions=True)

    assert not plain.features[0].HasField("distribution")
    histogram = detailed.features[0].distribution
    assert len(histogram.bin_edges) == len(histogram.reference_counts) + 1
    assert sum(histogram.reference_counts) == 800
    assert sum(histogram.current_counts) == WINDOW


async def test_a_closed_windows_drift_report_is_served_as_stored_until_it_is_stale(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    version, reference = await monitored(suite)
    values = np.random.default_rng(112).normal(size=(WINDOW, 4))
    batch = records(version, values)
    batch[0].subject_key = "customer-1"
    await suite.log(batch)
    packed_reads: list[bool] = []
    read_packed = packed_windows.get

    def spy(*args: Any, **kwargs: Any) -> packed_windows.FeatureRows | None:
        found = read_packed(*args, **kwargs)
        packed_reads.append(found is not None)
        return found

    monkeypatch.setattr(packed_windows, "get", spy)

    def assert_scipys(report: pb.DriftReport, reference: np.ndarray, current: np.ndarray) -> None:
        for j, feature in enumerate(report.features):
            expected = stats.ks_2samp(reference[:, j], current[:, j])
            assert feature.current_count == current.shape[0]
            assert feature.statistic == pytest.approx(expected.statistic, abs=1e-12)
            assert feature.p_value == pytest.approx(expected.pvalue, rel=1e-9)

    stored = await drift(suite, version, 0)
    again = await drift(suite, version, 0)
    assert again == stored  # the evaluator's report, compute_time and all
    assert packed_reads == []

    # The config changed: computed again under it, from the packed columns.
    await suite.configure(
        "models/fraud",
        ["drift.numerical_test"],
        drift=pb.DriftConfig(
            numerical_test=pb.DriftTestSpec(test=pb.DRIFT_TEST_POPULATION_STABILITY_INDEX)
        ),
    )
    recomputed = await drift(suite, version, 0)
    assert {f.test for f in recomputed.features} == {pb.DRIFT_TEST_POPULATION_STABILITY_INDEX}
    assert recomputed.compute_time.ToNanoseconds() > stored.compute_time.ToNanoseconds()
    assert await drift(suite, version, 0) == recomputed  # kept: served as computed
    await suite.configure(
        "models/fraud",
        ["drift.numerical_test"],
        drift=pb.DriftConfig(
            numerical_test=pb.DriftTestSpec(test=pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV)
        ),
    )
    assert_scipys(await drift(suite, version, 0), reference, values)
    assert packed_reads == [True, True]

    # A new reference: computed against it.
    new_reference = np.random.default_rng(113).normal(size=(500, 4))
    await suite.set_reference(version, new_reference)
    assert_scipys(await drift(suite, version, 0), new_reference, values)

    # An erased row is gone from the report, read from the rows again.
    await suite.monitor.ErasePredictions(
        rpc.ErasePredictionsRequest(subject_key="customer-1"), timeout=10
    )
    assert_scipys(await drift(suite, version, 0), new_reference, values[1:])
    assert packed_reads == [True, True, True, False]


async def test_performance_follows_late_labels(suite: Suite) -> None:
    version, _ = await monitored(suite)
    rng = np.random.default_rng(103)
    values = rng.normal(size=(WINDOW, 4))
    batch = records(version, values)
    await suite.log(batch)
    probabilities = np.array([list(r.outputs) for r in batch])
    labels = (values[:, 0] + rng.normal(scale=0.8, size=WINDOW) > 0).astype(int)

    before = await suite.monitor.GetPerformanceReport(
        rpc.GetPerformanceReportRequest(model_version=version), timeout=30
    )
    await suite.monitor.LogFeedback(
        rpc.LogFeedbackRequest(
            feedback=[
                pb.Feedback(model="models/fraud", request_id=f"r{i}", label=int(labels[i]))
                for i in range(300)
            ]
        ),
        timeout=30,
    )
    after = await suite.monitor.GetPerformanceReport(
        rpc.GetPerformanceReportRequest(model_version=version), timeout=30
    )

    assert before.performance_report.labelled_rows == 0
    report = after.performance_report
    assert report.labelled_rows == 300
    assert report.label_coverage == pytest.approx(300 / WINDOW)
    metrics = {m.metric: m for m in report.metrics}
    predicted = probabilities[:300].argmax(axis=1)
    truth = labels[:300]
    assert metrics[pb.PERFORMANCE_METRIC_ACCURACY].value == pytest.approx(
        accuracy_score(truth, predicted)
    )
    assert metrics[pb.PERFORMANCE_METRIC_F1].value == pytest.approx(f1_score(truth, predicted))
    assert metrics[pb.PERFORMANCE_METRIC_ROC_AUC].value == pytest.approx(
        roc_auc_score(truth, probabilities[:300, 1])
    )
    accuracy = metrics[pb.PERFORMANCE_METRIC_ACCURACY]
    assert accuracy.registered_value == pytest.approx(0.97)  # the registry's test metric
    assert accuracy.degradation == pytest.approx(0.97 - accuracy.value)
    assert accuracy.degraded == (accuracy.degradation > 0.02)
    assert sum(b.count for b in report.calibration_bins) == 300


async def test_time_ranges_and_windows_that_do_not_exist(suite: Suite) -> None:
    version, _ = await monitored(suite)
    now = time.time()
    await suite.log(
        records(version, np.random.default_rng(104).normal(size=(50, 4)), time_s=now - 3600)
    )

    request = rpc.GetOperationsReportRequest(model_version=version)
    request.window.time_range.start_time.FromMicroseconds(int((now - 7200) * 1e6))
    request.window.time_range.end_time.FromMicroseconds(int(now * 1e6))
    ranged = await suite.monitor.GetOperationsReport(request, timeout=10)
    assert ranged.operations_report.prediction_count == 50
    assert not ranged.operations_report.window.HasField("index")

    no_window = await refused(
        suite.monitor.GetDriftReport(rpc.GetDriftReportRequest(model_version=version), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert no_window.reason == "NO_WINDOW"
    await expect_error(
        suite.monitor.GetDriftReport(
            rpc.GetDriftReportRequest(model_version=version, window=pb.WindowSelector(index=7)),
            timeout=10,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    backwards = rpc.GetDriftReportRequest(model_version=version)
    backwards.window.time_range.start_time.FromMicroseconds(int(now * 1e6))
    backwards.window.time_range.end_time.FromMicroseconds(int((now - 1) * 1e6))
    await expect_error(
        suite.monitor.GetDriftReport(backwards, timeout=10), grpc.StatusCode.INVALID_ARGUMENT
    )
    for name, code in [
        ("models/fraud", grpc.StatusCode.INVALID_ARGUMENT),
        ("models/fraud/versions/9", grpc.StatusCode.NOT_FOUND),
        ("models/ghost@production", grpc.StatusCode.NOT_FOUND),
    ]:
        await expect_error(
            suite.monitor.GetOperationsReport(
                rpc.GetOperationsReportRequest(model_version=name), timeout=10
            ),
            code,
        )


async def test_a_version_without_a_reference_has_no_drift_report(suite: Suite) -> None:
    version = await suite.register("bare")
    await suite.configure("models/bare", ["window"], window=pb.WindowSpec(row_count=100))
    await suite.log(records(version, np.random.default_rng(105).normal(size=(100, 4))))

    error = await refused(
        suite.monitor.GetDriftReport(rpc.GetDriftReportRequest(model_version=version), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    operations = await suite.monitor.GetOperationsReport(
        rpc.GetOperationsReportRequest(model_version=version), timeout=10
    )

    assert error.reason == "NO_REFERENCE"
    assert operations.operations_report.prediction_count == 100
    await expect_error(
        suite.monitor.GetReference(
            rpc.GetReferenceRequest(name=f"{version}/reference"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_training_statistics_are_the_default_reference(suite: Suite) -> None:
    rng = np.random.default_rng(106)
    sample = rng.normal(size=(300, 4))
    statistics = registry_pb.ReferenceStatistics(
        row_count=300,
        features=[
            registry_pb.FeatureStatistics(
                name=f"x{j}", type=registry_pb.FEATURE_TYPE_NUMERICAL, count=300
            )
            for j in range(4)
        ],
        sample=registry_pb.ReferenceSample(column_count=4, values=sample.ravel().tolist()),
    )
    version = await suite.register("trained", reference_statistics=statistics)

    reply = await suite.monitor.GetReference(
        rpc.GetReferenceRequest(name="models/trained@production/reference"), timeout=10
    )
    await suite.configure("models/trained", ["window"], window=pb.WindowSpec(row_count=200))
    current = rng.normal(size=(200, 4))
    await suite.log(records(version, current))
    report = await drift(suite, version, 0)

    reference = reply.reference
    assert reference.source == pb.REFERENCE_SOURCE_TRAINING_STATISTICS
    assert [f.name for f in reference.features] == ["x0", "x1", "x2", "x3"]
    assert reference.row_count == 300
    assert reference.feature_summaries[1].mean == pytest.approx(sample[:, 1].mean())
    assert not report.HasField("prediction")  # training statistics carry no output rows
    assert report.features[0].statistic == pytest.approx(
        stats.ks_2samp(sample[:, 0], current[:, 0]).statistic
    )


async def test_bad_references_are_refused_and_keep_the_old_one(suite: Suite) -> None:
    version, _ = await monitored(suite)
    good_rows = reference_rows(np.random.default_rng(107).normal(size=(200, 4)))

    async def only_rows():  # type: ignore[no-untyped-def]
        yield rpc.SetReferenceRequest(rows=rpc.ReferenceRows(rows=good_rows))

    cases = [
        (only_rows(), "reference"),
        (
            reference_stream(
                f"{version}/reference", a_schema(3), reference_rows(np.zeros((200, 3)))
            ),
            "reference.features",
        ),
        (reference_stream(f"{version}/reference", a_schema(4), good_rows[:50]), "rows"),
        (
            reference_stream(f"{version}/reference", a_schema(4), good_rows, output_type=0),
            "reference.output_type",
        ),
        (reference_stream("models/fraud/reference", a_schema(4), good_rows), "reference.name"),
        (
            reference_stream(
                f"{version}/reference",
                [pb.FeatureSpec(name="x", type=pb.FEATURE_TYPE_NUMERICAL)] * 4,
                good_rows,
            ),
            "reference.features[1].name",
        ),
    ]
    for stream, field in cases:
        error = await refused(
            suite.monitor.SetReference(stream, timeout=30), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert isinstance(error, InvalidArgumentError)
        assert field in [v.field for v in error.violations], error.violations
    nan_rows = reference_rows(np.random.default_rng(108).normal(size=(200, 4)))
    nan_rows[7].features.numerical[1] = float("nan")
    error = await refused(
        suite.monitor.SetReference(
            reference_stream(f"{version}/reference", a_schema(4), nan_rows), timeout=30
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert isinstance(error, InvalidArgumentError)
    assert "rows[7].features.numerical[1]" in [v.field for v in error.violations]

    kept = await suite.monitor.GetReference(
        rpc.GetReferenceRequest(name=f"{version}/reference"), timeout=10
    )
    assert kept.reference.row_count == 800
    assert kept.reference.source == pb.REFERENCE_SOURCE_DATASET


async def test_the_config_has_every_default_and_checks_each_field(suite: Suite) -> None:
    await suite.register("credit")

    reply = await suite.monitor.GetMonitoringConfig(
        rpc.GetMonitoringConfigRequest(name="models/credit/monitoringConfig"), timeout=10
    )
    config = reply.monitoring_config
    assert config.window.row_count == 1000
    assert config.window.min_rows == 100
    assert config.drift.correction == pb.MULTIPLE_TESTING_CORRECTION_BENJAMINI_HOCHBERG
    assert config.drift.dataset_drift_share == 0.5
    assert config.drift.psi_bins == 10
    assert config.performance.max_degradation == 0.02
    assert config.outliers.method == pb.OUTLIER_METHOD_MAHALANOBIS
    assert config.privacy.retention.ToTimedelta().days == 30
    assert (config.canary.canary_alias, config.canary.baseline_alias) == ("canary", "production")

    updated = await suite.configure(
        "models/credit",
        ["drift.numerical_test", "window"],
        drift=pb.DriftConfig(
            numerical_test=pb.DriftTestSpec(test=pb.DRIFT_TEST_POPULATION_STABILITY_INDEX)
        ),
        window=pb.WindowSpec(row_count=500),
    )
    assert updated.drift.numerical_test.test == pb.DRIFT_TEST_POPULATION_STABILITY_INDEX
    assert updated.drift.numerical_test.threshold == 0.1
    assert updated.window.row_count == 500
    assert updated.HasField("update_time")

    for mask, config, field in [
        (
            ["window"],
            pb.MonitoringConfig(window=pb.WindowSpec(row_count=5)),
            "monitoring_config.window.row_count",
        ),
        (["colour"], pb.MonitoringConfig(), "update_mask.paths[0]"),
        ([], pb.MonitoringConfig(), "update_mask"),
        (
            ["drift"],
            pb.MonitoringConfig(drift=pb.DriftConfig(psi_bins=1000)),
            "monitoring_config.drift",
        ),
        (
            ["privacy"],
            pb.MonitoringConfig(privacy=pb.PrivacyConfig(retention={"seconds": 60})),
            "monitoring_config.privacy.retention",
        ),
    ]:
        config.name = "models/credit/monitoringConfig"
        error = await refused(
            suite.monitor.UpdateMonitoringConfig(
                rpc.UpdateMonitoringConfigRequest(
                    monitoring_config=config, update_mask={"paths": mask}
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert isinstance(error, InvalidArgumentError)
        assert field in [v.field for v in error.violations], error.violations
    await expect_error(
        suite.monitor.GetMonitoringConfig(
            rpc.GetMonitoringConfigRequest(name="models/ghost/monitoringConfig"), timeout=10
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        suite.monitor.GetMonitoringConfig(
            rpc.GetMonitoringConfigRequest(name="models/credit"), timeout=10
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_time_windows_close_on_prediction_time(suite: Suite) -> None:
    version, _ = await monitored(suite)
    await suite.configure(
        "models/fraud", ["window"], window=pb.WindowSpec(duration={"seconds": 60}, min_rows=10)
    )
    start = time.time() - 600
    rng = np.random.default_rng(109)
    for minute in range(3):
        await suite.log(
            records(
                version,
                rng.normal(size=(20, 4)),
                prefix=f"m{minute}-",
                time_s=start + 60 * minute + 1,
            )
        )

    # Each minute is a window; the tick may already have closed the last one,
    # whose end is long past, so each is looked at by its index.
    for index in range(3):
        reply = await suite.monitor.GetOperationsReport(
            rpc.GetOperationsReportRequest(
                model_version=version, window=pb.WindowSelector(index=index)
            ),
            timeout=10,
        )
        window = reply.operations_report.window
        assert (window.index, window.row_count) == (index, 20)
        assert window.closed or index == 2
    assert window.start_time.ToSeconds() == int(start + 120 + 1)


async def test_retention_purges_rows_but_keeps_windows(tmp_path: Path, suite: Suite) -> None:
    version, _ = await monitored(suite)
    await suite.configure(
        "models/fraud", ["privacy"], privacy=pb.PrivacyConfig(retention={"seconds": 3600})
    )
    old = time.time() - 7200
    await suite.log(
        records(version, np.random.default_rng(110).normal(size=(WINDOW, 4)), time_s=old)
    )

    purged = await suite.parts.evaluator.purge(int(time.time() * 1e6))

    assert purged == WINDOW
    # The drift report stored when the window closed outlives its rows (it
    # holds statistics, no row); anything that needs the rows is refused.
    kept = await suite.monitor.GetDriftReport(
        rpc.GetDriftReportRequest(model_version=version, window=pb.WindowSelector(index=0)),
        timeout=10,
    )
    assert kept.drift_report.window.row_count == WINDOW
    assert len(kept.drift_report.features) == 4
    for call in (
        suite.monitor.GetDriftReport(
            rpc.GetDriftReportRequest(
                model_version=version,
                window=pb.WindowSelector(index=0),
                include_distributions=True,
            ),
            timeout=10,
        ),
        suite.monitor.GetOperationsReport(
            rpc.GetOperationsReportRequest(
                model_version=version, window=pb.WindowSelector(index=0)
            ),
            timeout=10,
        ),
    ):
        error = await refused(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == "WINDOW_PURGED"


async def test_closed_windows_are_exported_to_prometheus(suite: Suite) -> None:
    version, _ = await monitored(suite)
    shifted = np.random.default_rng(111).normal(size=(WINDOW, 4))
    shifted[:, 1] += 1.0
    await suite.log(records(version, shifted))

    port = suite.parts.metrics_port
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    )
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(f"conveyor_monitor_{name}", tuple(sorted(labels.items())))]

    version_labels = {"model": "fraud", "version": "1"}
    ks = {"test": "kolmogorov_smirnov", **version_labels}
    assert value("feature_drifted", feature="x1", **ks) == 1.0
    assert value("feature_drifted", feature="x0", **ks) == 0.0
    assert value("window_predictions", **version_labels) == WINDOW
    assert value("predictions_accepted_total", **version_labels) == WINDOW
    assert value("window_last_closed_index", **version_labels) == 0
