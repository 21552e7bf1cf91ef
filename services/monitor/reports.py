"""Drift, performance and operations reports of one window, as messages.

The statistics come from :mod:`.drift` and :mod:`.performance`; this module
feeds them a window's stored columns and the version's reference and turns
their results into the contract's messages. CPU-bound: callers run it on a
worker thread.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Final

import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import drift, performance
from conveyor.services.monitor.ingest import VersionProfile
from conveyor.services.monitor.packed_windows import FeatureRows
from conveyor.services.monitor.references import ReferenceData, predicted_class_names
from conveyor.services.monitor.statistics import DistributionComparison, MultipleTestingCorrection
from conveyor.services.monitor.window_rows import WindowRows

_PERCENTILES: Final = (50.0, 90.0, 95.0, 99.0)


def drift_report(
    profile: VersionProfile,
    reference: pb.Reference,
    data: ReferenceData,
    window: pb.Window,
    rows: FeatureRows,
    *,
    distributions: bool,
) -> pb.DriftReport:
    """Every feature's drift (those dropped as personal data left out) and the
    prediction drift when the reference carries outputs."""
    schema = profile.schema
    config = profile.config.drift
    dropped = profile.config.privacy.dropped
    if dropped:
        overrides = dict(config.feature_tests)
        overrides.update({name: drift.DriftTestSpec(drift.DriftTest.NONE) for name in dropped})
        config = replace(config, feature_tests=overrides)
    drift_schema = schema.drift_schema()
    # One transpose into contiguous columns (none for sorted packed columns,
    # already column-major): sorting and scanning strided views costs more.
    current = [*np.ascontiguousarray(rows.numerical.T), *rows.categorical.T]
    result = drift.drift_report(
        drift_schema,
        data.prepared(drift_schema),
        current,
        config,
        distributions=distributions,
        current_sorted=rows.sorted_columns,
    )
    by_name = {feature.feature: feature for feature in result.features}
    report = pb.DriftReport(
        model_version=profile.model_version,
        window=window,
        reference=reference.name,
        reference_rows=reference.row_count,
        features=[_feature(by_name[f.name]) for f in schema.features if f.name in by_name],
        dataset=pb.DatasetDrift(
            drifted_features=result.dataset.drifted_features,
            tested_features=result.dataset.tested_features,
            drifted_share=result.dataset.drifted_share,
            share_threshold=result.dataset.share_threshold,
            drifted=result.dataset.drifted,
        ),
        correction=result.correction.value,  # type: ignore[arg-type]
        insufficient_data=result.insufficient_data,
    )
    if data.outputs.shape[1] and rows.outputs.shape[0]:
        report.prediction.CopyFrom(
            _prediction_drift(profile, data, rows, distributions=distributions)
        )
    report.compute_time.GetCurrentTime()
    return report


def _prediction_drift(
    profile: VersionProfile, data: ReferenceData, rows: FeatureRows, *, distributions: bool
) -> pb.FeatureDrift:
    config = drift.DriftConfig(
        categorical_test=profile.config.prediction_test,
        correction=MultipleTestingCorrection.NONE,
        large_reference_rows=profile.config.drift.large_reference_rows,
        min_rows=profile.config.drift.min_rows,
    )
    reference = data.prepared_predictions()
    result = drift.drift_report(
        reference.schema,
        reference,
        [predicted_class_names(rows.outputs)],
        config,
        distributions=distributions,
    )
    return _feature(result.features[0])


def _feature(result: drift.FeatureDrift) -> pb.FeatureDrift:
    message = pb.FeatureDrift(
        feature=result.feature,
        type=result.type.value,  # type: ignore[arg-type]
        test=result.test.value,  # type: ignore[arg-type]
        statistic=result.statistic,
        threshold=result.threshold,
        drifted=result.drifted,
        current_count=result.current_count,
        missing_count=result.missing_count,
    )
    if result.p_value is not None:
        message.p_value = result.p_value
    if result.adjusted_p_value is not None:
        message.adjusted_p_value = result.adjusted_p_value
    if result.distribution is not None:
        message.distribution.CopyFrom(_distribution(result.distribution))
    return message


def _distribution(comparison: DistributionComparison) -> pb.DistributionComparison:
    return pb.DistributionComparison(
        bin_edges=[float(e) for e in comparison.bin_edges],
        categories=list(comparison.categories),
        reference_counts=[int(c) for c in comparison.reference_counts],
        current_counts=[int(c) for c in comparison.current_counts],
    )


def performance_report(
    profile: VersionProfile, output_type: int, window: pb.Window, rows: WindowRows
) -> pb.PerformanceReport:
    """The window's labelled predictions against the registered test metrics."""
    labelled = rows.labels >= 0
    result = performance.performance_report(
        rows.outputs[labelled],
        rows.labels[labelled],
        performance.OutputType(output_type),
        successful_predictions=int(rows.outputs.shape[0]),
        registered_metrics=profile.registered_metrics,
        config=profile.config.performance,
    )
    report = pb.PerformanceReport(
        model_version=profile.model_version,
        window=window,
        labelled_rows=result.labelled_rows,
        label_coverage=result.label_coverage,
        insufficient_data=result.insufficient_data,
    )
    for metric in result.metrics:
        comparison = report.metrics.add(
            metric=metric.metric.value,
            value=metric.value,
            max_degradation=metric.max_degradation,
            degraded=metric.degraded,
        )
        if metric.registered_value is not None:
            comparison.registered_value = metric.registered_value
        if metric.degradation is not None:
            comparison.degradation = metric.degradation
    for calibration in result.calibration_bins:
        report.calibration_bins.add(
            lower=calibration.lower,
            upper=calibration.upper,
            count=calibration.count,
            mean_confidence=calibration.mean_confidence,
            accuracy=calibration.accuracy,
        )
    report.compute_time.GetCurrentTime()
    return report


def operations_report(
    model_version: str, window: pb.Window, rows: WindowRows
) -> pb.OperationsReport:
    """Counts, error rate, throughput, latency percentiles (successful
    predictions) and the outlier rate."""
    total = int(rows.status_codes.size)
    errors = int(np.count_nonzero(rows.status_codes))
    successful = total - errors
    outliers = int(np.count_nonzero(rows.outliers))
    report = pb.OperationsReport(
        model_version=model_version,
        window=window,
        prediction_count=total,
        error_count=errors,
        error_rate=errors / total if total else 0.0,
        throughput=_throughput(rows.times_us),
        outlier_count=outliers,
        outlier_rate=outliers / successful if successful else 0.0,
    )
    ok_latencies = rows.latencies_s[rows.status_codes == 0]
    if ok_latencies.size:
        p50, p90, p95, p99 = np.percentile(ok_latencies, _PERCENTILES).tolist()
        report.latency_p50.FromMicroseconds(round(p50 * 1e6))
        report.latency_p90.FromMicroseconds(round(p90 * 1e6))
        report.latency_p95.FromMicroseconds(round(p95 * 1e6))
        report.latency_p99.FromMicroseconds(round(p99 * 1e6))
    report.compute_time.GetCurrentTime()
    return report


def _throughput(times_us: npt.NDArray[np.int64]) -> float:
    """Predictions per second over the span from the first to the last."""
    if times_us.size < 2:
        return 0.0
    span = float(times_us.max() - times_us.min()) / 1e6
    return times_us.size / span if span > 0 and math.isfinite(span) else 0.0
