"""A model's ``MonitoringConfig``: its checks, its defaults, and the resolved
settings the statistics modules take.

The contract says "unset or 0 means the default" field by field; this module
is the one place that translates, so reports, alerts and ``/metrics`` never
disagree on a default. :func:`check_config` names every bad field at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor import drift, performance
from conveyor.services.monitor.canary import check_canary_config
from conveyor.services.monitor.drift import DriftTestSpec
from conveyor.services.monitor.outliers import OutlierMethod
from conveyor.services.monitor.statistics import MultipleTestingCorrection
from conveyor.shared.errors import FieldViolation

DEFAULT_WINDOW_ROWS: Final = 1_000
MIN_WINDOW_ROWS: Final = 10
MAX_WINDOW_ROWS: Final = 10_000_000
MIN_WINDOW_DURATION: Final = timedelta(minutes=1)
MAX_WINDOW_DURATION: Final = timedelta(days=7)
DEFAULT_MIN_ROWS: Final = 100
DEFAULT_RETENTION: Final = timedelta(days=30)
MIN_RETENTION: Final = timedelta(hours=1)
MAX_RETENTION: Final = timedelta(days=3650)
UPDATABLE: Final = frozenset({"window", "drift", "performance", "outliers", "privacy", "canary"})


@dataclass(frozen=True)
class WindowSize:
    """Windows close after ``rows`` predictions, or after ``duration`` of
    prediction time (exactly one is set)."""

    rows: int | None
    duration: timedelta | None
    min_rows: int


@dataclass(frozen=True)
class Privacy:
    """Personal features by name and how long rows are kept."""

    hashed: frozenset[str]
    dropped: frozenset[str]
    retention: timedelta


@dataclass(frozen=True)
class ResolvedConfig:
    """Every setting of a model's config with its default applied."""

    window: WindowSize
    drift: drift.DriftConfig
    prediction_test: DriftTestSpec
    performance: performance.PerformanceConfig
    outlier_method: OutlierMethod
    outlier_threshold: float | None
    privacy: Privacy
    canary: pb.CanaryConfig


def config_name(model: str) -> str:
    return f"{model}/monitoringConfig"


def default_config(model: str) -> pb.MonitoringConfig:
    """The config every model has until it is updated: every field unset."""
    return pb.MonitoringConfig(name=config_name(model))


def check_config(config: pb.MonitoringConfig, *, prefix: str) -> list[FieldViolation]:
    """Every violation in ``config``, named under ``prefix`` (e.g.
    ``monitoring_config``); the schema-dependent checks (feature names in
    overrides and privacy) are :func:`check_against_schema`'s."""
    violations: list[FieldViolation] = []
    window = config.window
    if window.WhichOneof("size") == "row_count" and not (
        MIN_WINDOW_ROWS <= window.row_count <= MAX_WINDOW_ROWS
    ):
        violations.append(
            FieldViolation(
                f"{prefix}.window.row_count",
                f"must be {MIN_WINDOW_ROWS:,} to {MAX_WINDOW_ROWS:,}, not {window.row_count}",
            )
        )
    if window.WhichOneof("size") == "duration":
        duration = window.duration.ToTimedelta()
        if not MIN_WINDOW_DURATION <= duration <= MAX_WINDOW_DURATION:
            violations.append(
                FieldViolation(f"{prefix}.window.duration", "must be 1 minute to 7 days")
            )
    if window.min_rows < 0:
        violations.append(FieldViolation(f"{prefix}.window.min_rows", "must be at least 0"))
    try:
        _drift_config(config)
    except ValueError as error:
        violations.append(FieldViolation(f"{prefix}.drift", str(error)))
    try:
        _prediction_test(config.drift)
    except ValueError as error:
        violations.append(FieldViolation(f"{prefix}.drift.prediction_test", str(error)))
    try:
        _performance_config(config.performance)
    except ValueError as error:
        violations.append(FieldViolation(f"{prefix}.performance", str(error)))
    if config.outliers.HasField("threshold") and not math.isfinite(config.outliers.threshold):
        violations.append(FieldViolation(f"{prefix}.outliers.threshold", "must be finite"))
    if config.outliers.method not in pb.OutlierMethod.values():
        violations.append(FieldViolation(f"{prefix}.outliers.method", "unknown method"))
    for name, action in config.privacy.personal_features.items():
        if action not in (pb.PERSONAL_DATA_ACTION_HASH, pb.PERSONAL_DATA_ACTION_DROP):
            violations.append(
                FieldViolation(
                    f"{prefix}.privacy.personal_features[{name!r}]", "must be HASH or DROP"
                )
            )
    if config.privacy.HasField("retention"):
        retention = config.privacy.retention.ToTimedelta()
        if not MIN_RETENTION <= retention <= MAX_RETENTION:
            violations.append(
                FieldViolation(f"{prefix}.privacy.retention", "must be 1 hour to 3,650 days")
            )
    violations.extend(check_canary_config(config.canary, field_prefix=f"{prefix}.canary"))
    return violations


def check_against_schema(
    config: pb.MonitoringConfig, features: Mapping[str, int], *, prefix: str
) -> list[FieldViolation]:
    """Violations of the overrides and personal features against a version's
    feature schema (name to ``FeatureType`` value)."""
    violations: list[FieldViolation] = []
    schema = [drift.FeatureSpec(name, drift.FeatureType(kind)) for name, kind in features.items()]
    try:
        _drift_config(config).check_schema(schema)
    except ValueError as error:
        violations.append(FieldViolation(f"{prefix}.drift.feature_tests", str(error)))
    for name, action in config.privacy.personal_features.items():
        field = f"{prefix}.privacy.personal_features[{name!r}]"
        if name not in features:
            violations.append(FieldViolation(field, f"the schema has no feature {name!r}"))
        elif (
            action == pb.PERSONAL_DATA_ACTION_HASH and features[name] != pb.FEATURE_TYPE_CATEGORICAL
        ):
            violations.append(FieldViolation(field, "HASH applies to categorical features only"))
    return violations


def resolve(config: pb.MonitoringConfig) -> ResolvedConfig:
    """The config with every default applied; the config must have passed
    :func:`check_config`."""
    window = config.window
    duration = window.duration.ToTimedelta() if window.WhichOneof("size") == "duration" else None
    rows = None if duration else (window.row_count or DEFAULT_WINDOW_ROWS)
    personal = config.privacy.personal_features
    return ResolvedConfig(
        window=WindowSize(
            rows=rows, duration=duration, min_rows=window.min_rows or DEFAULT_MIN_ROWS
        ),
        drift=_drift_config(config),
        prediction_test=_prediction_test(config.drift),
        performance=_performance_config(config.performance),
        outlier_method=OutlierMethod(config.outliers.method or pb.OUTLIER_METHOD_MAHALANOBIS),
        outlier_threshold=(
            config.outliers.threshold if config.outliers.HasField("threshold") else None
        ),
        privacy=Privacy(
            hashed=frozenset(n for n, a in personal.items() if a == pb.PERSONAL_DATA_ACTION_HASH),
            dropped=frozenset(n for n, a in personal.items() if a == pb.PERSONAL_DATA_ACTION_DROP),
            retention=(
                config.privacy.retention.ToTimedelta()
                if config.privacy.HasField("retention")
                else DEFAULT_RETENTION
            ),
        ),
        canary=config.canary,
    )


def _test_spec(spec: pb.DriftTestSpec) -> drift.DriftTestSpec:
    return drift.DriftTestSpec(
        test=drift.DriftTest(spec.test),
        threshold=spec.threshold if spec.HasField("threshold") else None,
    )


def _drift_config(config: pb.MonitoringConfig) -> drift.DriftConfig:
    given = config.drift
    if given.correction not in pb.MultipleTestingCorrection.values():
        raise ValueError("correction: unknown correction")
    for spec in (given.numerical_test, given.categorical_test, given.prediction_test):
        if spec.test not in pb.DriftTest.values():
            raise ValueError("unknown drift test")
    return drift.DriftConfig(
        numerical_test=_test_spec(given.numerical_test),
        categorical_test=_test_spec(given.categorical_test),
        feature_tests={name: _test_spec(spec) for name, spec in given.feature_tests.items()},
        correction=MultipleTestingCorrection(
            given.correction or pb.MULTIPLE_TESTING_CORRECTION_BENJAMINI_HOCHBERG
        ),
        dataset_drift_share=(
            given.dataset_drift_share if given.HasField("dataset_drift_share") else 0.5
        ),
        large_reference_rows=given.large_reference_rows or 1_000,
        psi_bins=given.psi_bins or 10,
        min_rows=config.window.min_rows or DEFAULT_MIN_ROWS,
    )


def _prediction_test(given: pb.DriftConfig) -> drift.DriftTestSpec:
    """The predicted class is tested as a categorical feature."""
    spec = _test_spec(given.prediction_test)
    drift.DriftConfig(categorical_test=spec)  # raises ValueError for a test that does not suit
    return spec


def _performance_config(given: pb.PerformanceConfig) -> performance.PerformanceConfig:
    return performance.PerformanceConfig(
        max_degradation=given.max_degradation if given.HasField("max_degradation") else 0.02,
        min_labelled_rows=given.min_labelled_rows or 100,
        calibration_bins=given.calibration_bins or 10,
    )


def filled(config: pb.MonitoringConfig) -> pb.MonitoringConfig:
    """The config as ``GetMonitoringConfig`` returns it: every default written in."""
    resolved = resolve(config)
    result = pb.MonitoringConfig()
    result.CopyFrom(config)
    if resolved.window.rows is not None:
        result.window.row_count = resolved.window.rows
    result.window.min_rows = resolved.window.min_rows
    given = result.drift
    for spec in (given.numerical_test, given.categorical_test, given.prediction_test):
        if spec.test == pb.DRIFT_TEST_UNSPECIFIED and not spec.HasField("threshold"):
            continue  # the automatic choice: its test and threshold depend on the data
        if not spec.HasField("threshold"):
            spec.threshold = (
                drift.DEFAULT_SIGNIFICANCE
                if drift.DriftTest(spec.test) in drift.P_VALUE_TESTS
                else drift.DEFAULT_DISTANCE_THRESHOLD
            )
    given.correction = resolved.drift.correction.value  # type: ignore[assignment]
    given.dataset_drift_share = resolved.drift.dataset_drift_share
    given.large_reference_rows = resolved.drift.large_reference_rows
    given.psi_bins = resolved.drift.psi_bins
    result.performance.max_degradation = resolved.performance.max_degradation
    result.performance.min_labelled_rows = resolved.performance.min_labelled_rows
    result.performance.calibration_bins = resolved.performance.calibration_bins
    result.outliers.method = resolved.outlier_method.value  # type: ignore[assignment]
    result.privacy.retention.FromTimedelta(resolved.privacy.retention)
    canary = result.canary
    canary.canary_alias = canary.canary_alias or "canary"
    canary.baseline_alias = canary.baseline_alias or "production"
    canary.min_predictions = canary.min_predictions or 500
    if not canary.HasField("max_error_rate_increase"):
        canary.max_error_rate_increase = 0.01
    if not canary.HasField("max_latency_increase"):
        canary.max_latency_increase = 0.1
    return result
