"""Prometheus metrics of the monitor service, served over HTTP at ``/metrics``.

The monitor's reports become gauges Prometheus can graph and alert on, next
to the inference service's own series. :class:`MonitorMetrics` owns its
registry; :func:`conveyor.shared.metrics_http.start_metrics_server` serves it
(``start_metrics_server(listen, metrics.registry)``, port 9105 by default, see
:mod:`conveyor.shared.ports`). Every name starts with ``conveyor_monitor_``;
``model`` labels hold the model id and ``version`` labels the version number,
parsed from ``models/{model}/versions/{version}``.

- **Ingest** counters: predictions accepted and duplicates ignored, by version;
  records refused by reason (a batch is stored or refused whole, so refusals
  carry no version); feedback labels accepted and the predictions they were
  joined to (a feedback batch spans models, so these carry no labels).
- **Windows** (:meth:`MonitorMetrics.observe_operations`): the latest window's
  predictions, error rate, latency quantiles in seconds, throughput and outlier
  rate, and the index of the last closed window.
- **Drift** (:meth:`MonitorMetrics.observe_drift`): per feature, the statistic
  or distance, the corrected p-value (p-value tests only) and the verdict as
  0/1, labelled ``feature`` and ``test`` (``kolmogorov_smirnov``, ``chi_squared``,
  ...); the dataset's drifted share and verdict; the same three for the
  prediction distribution, labelled ``test``.
- **Performance** (:meth:`MonitorMetrics.observe_performance`): each metric's
  value, registered value and degradation (when there is one) and verdict,
  labelled ``metric`` with the registry key (``accuracy``, ``f1``, ``roc_auc``,
  ``ece``); the label coverage.
- **SLOs** (:meth:`MonitorMetrics.observe_slo`): SLI, goal, error budget
  remaining and whether the SLO is met, labelled ``slo`` (its id), ``model`` and
  ``version`` (empty when the SLO covers every version).
- **Alerts** (:meth:`MonitorMetrics.set_open_alerts`): open alerts (firing or
  acknowledged) by model and severity (``info``, ``warning``, ``critical``).

A report replaces its version's previous values: a feature or metric the new
report no longer has loses its series. :meth:`~MonitorMetrics.forget_version`,
:meth:`~MonitorMetrics.forget_model` and :meth:`~MonitorMetrics.forget_slo`
remove series, so the exposition does not grow with every version ever
monitored. Unlike the inference service, the monitor runs as one process, so
there is no multiprocess mode to support.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.gc_collector import GCCollector

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.performance import REGISTRY_KEYS, PerformanceMetric
from conveyor.shared.names import ID_PATTERN

PREFIX: Final = "conveyor_monitor_"
LATENCY_QUANTILES: Final = (
    ("0.5", "latency_p50"),
    ("0.9", "latency_p90"),
    ("0.95", "latency_p95"),
    ("0.99", "latency_p99"),
)
"""The ``quantile`` label of each ``OperationsReport`` latency field."""

Labels = tuple[str, ...]

_VERSIONED: Final = ("model", "version")
_FEATURE: Final = (*_VERSIONED, "feature", "test")
_PREDICTION: Final = (*_VERSIONED, "test")
_METRIC: Final = (*_VERSIONED, "metric")
_SLO: Final = ("slo", *_VERSIONED)

_C, _G = Counter, Gauge  # short, so that each series fits on one line
SERIES: Final[Mapping[str, tuple[type[Counter] | type[Gauge], Labels, str]]] = {
    # Ingest. Batches are stored whole or refused whole, so refusals have no version.
    "predictions_accepted": (_C, _VERSIONED, "Prediction records stored."),
    "predictions_duplicate": (_C, _VERSIONED, "Prediction records ignored as duplicates."),
    "predictions_rejected": (_C, ("reason",), "Prediction records refused, by reason."),
    "feedback_accepted": (_C, (), "Feedback labels stored."),
    "feedback_matched_predictions": (_C, (), "Predictions a feedback label was joined to."),
    # Windows: the version's latest window.
    "window_predictions": (_G, _VERSIONED, "Predictions in the window."),
    "window_error_rate": (_G, _VERSIONED, "Share of the window's predictions that failed."),
    "window_latency_seconds": (_G, (*_VERSIONED, "quantile"), "Successful predictions' latency."),
    "window_predictions_per_second": (_G, _VERSIONED, "Throughput over the window's span."),
    "window_outlier_rate": (_G, _VERSIONED, "Share of successful predictions that are outliers."),
    "window_last_closed_index": (_G, _VERSIONED, "Index of the latest closed window."),
    # Drift: the version's latest window against its reference.
    "feature_drift_statistic": (_G, _FEATURE, "A feature's drift statistic or distance."),
    "feature_drift_p_value": (_G, _FEATURE, "A feature's corrected p-value (p-value tests)."),
    "feature_drifted": (_G, _FEATURE, "1 when the feature drifted."),
    "dataset_drifted_share": (_G, _VERSIONED, "Share of the tested features that drifted."),
    "dataset_drifted": (_G, _VERSIONED, "1 when the window shows dataset drift."),
    "prediction_drift_statistic": (_G, _PREDICTION, "Predicted classes' drift statistic."),
    "prediction_drift_p_value": (_G, _PREDICTION, "Predicted classes' corrected p-value."),
    "prediction_drifted": (_G, _PREDICTION, "1 when the predicted classes drifted."),
    # Performance: the version's latest window's labelled predictions.
    "performance_value": (_G, _METRIC, "A quality metric's value."),
    "performance_registered_value": (_G, _METRIC, "The metric's registered (test) value."),
    "performance_degradation": (_G, _METRIC, "How much worse than registered (< 0: better)."),
    "performance_degraded": (_G, _METRIC, "1 when the metric degraded beyond tolerance."),
    "performance_label_coverage": (_G, _VERSIONED, "Share of predictions with a label."),
    # Service level objectives and alerts.
    "slo_sli": (_G, _SLO, "Fraction of good predictions over the rolling period."),
    "slo_goal": (_G, _SLO, "Target fraction of good predictions."),
    "slo_error_budget_remaining": (_G, _SLO, "Unspent share of the error budget (< 0: spent)."),
    "slo_met": (_G, _SLO, "1 when the SLI reaches the goal."),
    "open_alerts": (_G, ("model", "severity"), "Alerts firing or acknowledged."),
}
"""Every series but the process's own: name (after ``conveyor_monitor_``; counters
add ``_total``), kind, labels and help."""

_VERSION: Final = re.compile(
    rf"^models/(?P<model>{ID_PATTERN})/versions/(?P<version>[1-9][0-9]*)\Z"
)
_MODEL: Final = re.compile(rf"^models/(?P<model>{ID_PATTERN})\Z")
_SLO_SERIES: Final = ("slo_sli", "slo_goal", "slo_error_budget_remaining", "slo_met")
_DRIFT_SERIES: Final = tuple(
    f"{kind}_{suffix}"
    for kind in ("feature", "prediction")
    for suffix in ("drift_statistic", "drift_p_value", "drifted")
)
_PERFORMANCE_SERIES: Final = tuple(
    f"performance_{suffix}" for suffix in ("value", "registered_value", "degradation", "degraded")
)


class MonitorMetrics:
    """The monitor's metrics and the registry they are exposed from.

    Methods take resource names as the contract writes them
    (``models/{model}/versions/{version}``, ``models/{model}``) and raise
    ValueError for a malformed one. Every method is thread-safe.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        """What ``/metrics`` exposes."""
        self._lock = threading.Lock()
        self._series = {
            name: _Family(kind(f"{PREFIX}{name}", text, labels, registry=self.registry), labels)
            for name, (kind, labels, text) in SERIES.items()
        }
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # -- ingest ---------------------------------------------------------------------

    def count_ingest(self, model_version: str, *, accepted: int = 0, duplicates: int = 0) -> None:
        """Counts prediction records of ``model_version`` stored and ignored as
        duplicates of a stored (version, request id)."""
        labels = _version_labels(model_version)
        self._count(
            {
                ("predictions_accepted", labels): accepted,
                ("predictions_duplicate", labels): duplicates,
            }
        )

    def count_rejected(self, reason: str, count: int = 1) -> None:
        """Counts prediction records refused with their whole batch; ``reason`` is
        a short lower-case word such as ``invalid`` or ``queue_full``."""
        self._count({("predictions_rejected", (reason,)): count})

    def count_feedback(self, *, accepted: int = 0, matched: int = 0) -> None:
        """Counts feedback labels stored and the predictions they were joined to
        (served and shadow ones)."""
        self._count(
            {("feedback_accepted", ()): accepted, ("feedback_matched_predictions", ()): matched}
        )

    # -- reports --------------------------------------------------------------------

    def observe_operations(self, report: pb.OperationsReport) -> None:
        """Sets the window gauges of the report's version; a closed window with an
        index also becomes the version's last closed window."""
        labels = _version_labels(report.model_version)
        values = {
            "window_predictions": report.prediction_count,
            "window_error_rate": report.error_rate,
            "window_predictions_per_second": report.throughput,
            "window_outlier_rate": report.outlier_rate,
        }
        if report.window.closed and report.window.HasField("index"):
            values["window_last_closed_index"] = report.window.index
        with self._lock:
            for name, value in values.items():
                self._series[name].set(labels, value)
            for quantile, field in LATENCY_QUANTILES:
                duration = getattr(report, field)
                seconds = duration.seconds + duration.nanos / 1e9
                self._series["window_latency_seconds"].set((*labels, quantile), seconds)

    def observe_drift(self, report: pb.DriftReport) -> None:
        """Sets the drift gauges of the report's version, replacing the previous
        report's: features (or a prediction test) it no longer has lose their series."""
        labels = _version_labels(report.model_version)
        values: dict[str, dict[Labels, float]] = {name: {} for name in _DRIFT_SERIES}
        drifts: list[tuple[pb.FeatureDrift, str, Labels]] = [
            (drift, "feature", (drift.feature,)) for drift in report.features
        ]
        if report.HasField("prediction"):
            drifts.append((report.prediction, "prediction", ()))
        for drift, kind, feature in drifts:
            test = pb.DriftTest.Name(drift.test).removeprefix("DRIFT_TEST_").lower()
            key = (*labels, *feature, test)
            values[f"{kind}_drift_statistic"][key] = drift.statistic
            values[f"{kind}_drifted"][key] = float(drift.drifted)
            if drift.HasField("adjusted_p_value"):
                values[f"{kind}_drift_p_value"][key] = drift.adjusted_p_value
        with self._lock:
            self._replace(_version_scope(labels), values)
            self._series["dataset_drifted_share"].set(labels, report.dataset.drifted_share)
            self._series["dataset_drifted"].set(labels, float(report.dataset.drifted))

    def observe_performance(self, report: pb.PerformanceReport) -> None:
        """Sets the performance gauges of the report's version, replacing the
        previous report's (a metric left out, such as ROC-AUC on a one-class
        window, or a registered value now unset, loses its series)."""
        labels = _version_labels(report.model_version)
        values: dict[str, dict[Labels, float]] = {name: {} for name in _PERFORMANCE_SERIES}
        for comparison in report.metrics:
            key = (*labels, REGISTRY_KEYS[PerformanceMetric(comparison.metric)])
            values["performance_value"][key] = comparison.value
            values["performance_degraded"][key] = float(comparison.degraded)
            if comparison.HasField("registered_value"):
                values["performance_registered_value"][key] = comparison.registered_value
            if comparison.HasField("degradation"):
                values["performance_degradation"][key] = comparison.degradation
        with self._lock:
            self._replace(_version_scope(labels), values)
            self._series["performance_label_coverage"].set(labels, report.label_coverage)

    def observe_slo(self, slo: pb.ServiceLevelObjective) -> None:
        """Sets the SLO's gauges from its ``status`` (ValueError without one),
        replacing its previous series (an update may change its version)."""
        if not slo.HasField("status"):
            raise ValueError(f"{slo.name} has no status to export")
        slo_id = _slo_id(slo.name)
        version = _version_labels(slo.model_version)[1] if slo.model_version else ""
        labels = (slo_id, _model_id(slo.model), version)
        values = {
            "slo_sli": slo.status.sli,
            "slo_goal": slo.goal,
            "slo_error_budget_remaining": slo.status.error_budget_remaining,
            "slo_met": float(slo.status.met),
        }
        with self._lock:
            self._replace({"slo": slo_id}, {k: {labels: v} for k, v in values.items()})

    def set_open_alerts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replaces every open-alert count: ``(model, severity) -> alerts``, the
        model as ``models/{model}``, the severity an ``AlertSeverity`` name with or
        without its prefix (``ALERT_SEVERITY_CRITICAL``, ``critical``; UNSPECIFIED
        counts as warning). Pairs left out lose their series."""
        values: dict[Labels, float] = {}
        for (model, severity), count in counts.items():
            key = (_model_id(model), _severity_label(severity))
            values[key] = values.get(key, 0.0) + count
        with self._lock:
            self._replace({}, {"open_alerts": values})

    # -- forgetting -----------------------------------------------------------------

    def forget_version(self, model_version: str) -> None:
        """Removes every series of the version (ingest, windows, drift, performance);
        SLOs keep theirs until :meth:`forget_slo`."""
        scope = _version_scope(_version_labels(model_version))
        names = [name for name, (_, labels, _) in SERIES.items() if labels[:2] == _VERSIONED]
        with self._lock:
            self._replace(scope, {name: {} for name in names})

    def forget_model(self, model: str) -> None:
        """Removes every series of the model: its versions', its SLOs' and its
        open alerts'."""
        with self._lock:
            self._replace({"model": _model_id(model)}, {name: {} for name in SERIES})

    def forget_slo(self, name: str) -> None:
        """Removes the series of the SLO ``serviceLevelObjectives/{slo}``."""
        with self._lock:
            self._replace({"slo": _slo_id(name)}, {series: {} for series in _SLO_SERIES})

    # -- helpers --------------------------------------------------------------------

    def _count(self, counts: Mapping[tuple[str, Labels], int]) -> None:
        with self._lock:
            for (name, labels), count in counts.items():
                if count:
                    self._series[name].inc(labels, count)

    def _replace(
        self, scope: Mapping[str, str], values: Mapping[str, Mapping[Labels, float]]
    ) -> None:
        """For each named series, :meth:`_Family.replace`; the caller holds the lock."""
        for name, series_values in values.items():
            self._series[name].replace(scope, series_values)


class _Family:
    """A labelled counter or gauge that remembers the label values it exposes,
    so that a scope's series (a version's, an SLO's) can be replaced or removed.
    Callers hold :class:`MonitorMetrics`' lock."""

    def __init__(self, metric: Counter | Gauge, labels: Labels) -> None:
        self._metric = metric
        self._labels = labels
        self._exposed: set[Labels] = set()

    def inc(self, labels: Labels, amount: float) -> None:
        metric = self._metric
        assert isinstance(metric, Counter)
        (metric.labels(*labels) if labels else metric).inc(amount)
        self._exposed.add(labels)

    def set(self, labels: Labels, value: float) -> None:
        metric = self._metric
        assert isinstance(metric, Gauge)
        (metric.labels(*labels) if labels else metric).set(value)
        self._exposed.add(labels)

    def replace(self, scope: Mapping[str, str], values: Mapping[Labels, float]) -> None:
        """Sets ``values`` and removes the other series whose labels match ``scope``
        (a scope naming a label the family lacks matches nothing). New values are
        set before stale series go, so a scrape never sees the scope empty."""
        positions = [(self._labels.index(k), v) for k, v in scope.items() if k in self._labels]
        if len(positions) < len(scope):
            return
        for labels, value in values.items():
            self.set(labels, value)
        stale = [
            labels
            for labels in self._exposed
            if labels not in values and all(labels[i] == v for i, v in positions)
        ]
        for labels in stale:
            self._metric.remove(*labels)
            self._exposed.discard(labels)


def _version_scope(labels: tuple[str, str]) -> dict[str, str]:
    return dict(zip(_VERSIONED, labels, strict=True))


def _version_labels(model_version: str) -> tuple[str, str]:
    match = _VERSION.match(model_version)
    if match is None:
        raise ValueError(f"{model_version!r} is not models/{{model}}/versions/{{version}}")
    return match["model"], match["version"]


def _model_id(model: str) -> str:
    match = _MODEL.match(model)
    if match is None:
        raise ValueError(f"{model!r} is not models/{{model}}")
    return match["model"]


def _slo_id(name: str) -> str:
    prefix = "serviceLevelObjectives/"
    if not name.startswith(prefix) or not name[len(prefix) :]:
        raise ValueError(f"{name!r} is not serviceLevelObjectives/{{slo}}")
    return name[len(prefix) :]


def _severity_label(severity: str) -> str:
    short = severity.upper().removeprefix("ALERT_SEVERITY_")
    if short == "UNSPECIFIED":
        return "warning"
    try:
        pb.AlertSeverity.Value(f"ALERT_SEVERITY_{short}")
    except ValueError:
        raise ValueError(f"{severity!r} is not an AlertSeverity") from None
    return short.lower()
