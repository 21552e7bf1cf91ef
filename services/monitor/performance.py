"""Performance decay: how well a version classifies the window's labelled
predictions, against the test metrics registered with it.

Labels arrive late, so the monitor measures each window on the predictions
labelled so far and compares accuracy, F1, ROC-AUC and the expected calibration
error with the registry's ``accuracy``, ``f1``, ``roc_auc`` and ``ece``. This
module turns logged outputs into class probabilities, computes the metrics and
the reliability diagram, and gives the verdicts, free of gRPC and storage so
that every number can be checked against scikit-learn. The contract is
``conveyor.monitor.v1`` (``OutputType``, ``PerformanceMetric``,
``PerformanceConfig``, ``MetricComparison``, ``CalibrationBin``,
``PerformanceReport``); its enums are mirrored here by value, so the service maps
them with ``PerformanceMetric(message.metric)``. Configs hold resolved values:
the proto's "0 or unset means the default" is the service's to translate.

Where the contract leaves room, this module chooses:

- Probabilities: every value in [0, 1] and, with several columns, every row
  summing to 1, both within 1e-3, which lets float16 outputs of quantised models
  through but not logits or a lost column; accepted rows are clipped and
  rescaled to sum to exactly 1.
- The predicted class is the arg-max, ties to the lower class: a binary 0.5
  predicts class 0.
- F1 of class 1 is 1 when the window neither holds nor predicts class 1
  (scikit-learn's ``zero_division=1.0``): nothing was missed or misflagged, and
  a rare-event model should not raise a false alarm on a quiet window. Macro F1
  averages the classes the window holds or predicts (scikit-learn's default).
- One-vs-rest ROC-AUC averages the classes the window holds; the others have no
  positive to rank. It is left out when the window holds a single class.
- An empty calibration bin reports 0 for its mean confidence and accuracy; its
  count of 0 says it is empty (NaN would break sums and JSON clients).
- An empty window (no labelled prediction) has no metric, empty bins, and
  insufficient data.
- A registered value that is not finite (a NaN ROC-AUC from a one-class test
  split) counts as unset; keys other than the four are ignored.
- ``degraded`` ignores excesses of up to 1e-12, so 0.90 against 0.88 at the
  default 0.02 is within tolerance despite binary rounding.

Cost, for n rows and k classes: O(n k) for the probabilities, metrics and bins
(``np.bincount``), plus one O(n log n) ranking per ROC-AUC column
(``scipy.stats.rankdata``). Nothing loops over rows in Python.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import stats

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class OutputType(enum.Enum):
    """What a model's logged outputs are (``OutputType``)."""

    PROBABILITIES = 1
    LOGITS = 2


class PerformanceMetric(enum.Enum):
    """A classification quality metric (``PerformanceMetric``)."""

    ACCURACY = 1
    F1 = 2
    ROC_AUC = 3
    EXPECTED_CALIBRATION_ERROR = 4


REGISTRY_KEYS: Final[Mapping[PerformanceMetric, str]] = {
    PerformanceMetric.ACCURACY: "accuracy",
    PerformanceMetric.F1: "f1",
    PerformanceMetric.ROC_AUC: "roc_auc",
    PerformanceMetric.EXPECTED_CALIBRATION_ERROR: "ece",
}
LOWER_IS_BETTER: Final = frozenset({PerformanceMetric.EXPECTED_CALIBRATION_ERROR})
PROBABILITY_TOLERANCE: Final = 1e-3
MIN_CALIBRATION_BINS: Final = 2
MAX_CALIBRATION_BINS: Final = 100
_ROUNDING_SLACK: Final = 1e-12


@dataclass(frozen=True)
class PerformanceConfig:
    """Decay tolerance and calibration bins (``PerformanceConfig``)."""

    max_degradation: float = 0.02
    """A metric is degraded when worse than registered by more than this, in its
    own units, at least 0."""
    min_labelled_rows: int = 100
    """Windows with fewer labelled predictions get metrics but no verdict, at least 1."""
    calibration_bins: int = 10
    """Equal-width confidence bins for calibration, 2 to 100."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_degradation) and self.max_degradation >= 0):
            raise ValueError(
                f"max_degradation must be a number of at least 0, not {self.max_degradation}"
            )
        if self.min_labelled_rows < 1:
            raise ValueError(f"min_labelled_rows must be at least 1, not {self.min_labelled_rows}")
        if not MIN_CALIBRATION_BINS <= self.calibration_bins <= MAX_CALIBRATION_BINS:
            raise ValueError(
                f"calibration_bins must be {MIN_CALIBRATION_BINS} to {MAX_CALIBRATION_BINS}, "
                f"not {self.calibration_bins}"
            )


DEFAULT_CONFIG: Final = PerformanceConfig()


@dataclass(frozen=True)
class MetricComparison:
    """One metric over the window against its registered value (``MetricComparison``)."""

    metric: PerformanceMetric
    value: float
    registered_value: float | None
    """None when the registry has no (finite) value."""
    degradation: float | None
    """How much worse ``value`` is than ``registered_value``, negative when better;
    None without a registered value."""
    max_degradation: float
    degraded: bool
    """False whenever the window has insufficient data or no registered value."""


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the reliability diagram (``CalibrationBin``): top-class
    confidences in [lower, upper), the last bin including 1."""

    lower: float
    upper: float
    count: int
    mean_confidence: float
    """0 when the bin is empty."""
    accuracy: float
    """0 when the bin is empty."""


@dataclass(frozen=True)
class PerformanceReport:
    """The quality of one window's labelled predictions (``PerformanceReport``)."""

    labelled_rows: int
    label_coverage: float
    """``labelled_rows`` over the window's successful predictions; 0 without any."""
    metrics: tuple[MetricComparison, ...]
    """In ``PerformanceMetric`` order; ROC-AUC left out when the window holds a
    single class, all left out when it holds no labelled prediction."""
    calibration_bins: tuple[CalibrationBin, ...]
    insufficient_data: bool

    def metric(self, metric: PerformanceMetric) -> MetricComparison | None:
        """The comparison of ``metric``, or None when the report leaves it out."""
        return next((m for m in self.metrics if m.metric is metric), None)


def performance_report(
    outputs: npt.ArrayLike,
    labels: npt.ArrayLike,
    output_type: OutputType,
    *,
    successful_predictions: int,
    registered_metrics: Mapping[str, float] | None = None,
    config: PerformanceConfig = DEFAULT_CONFIG,
) -> PerformanceReport:
    """Measure the window's labelled predictions, ``outputs`` (rows x columns, see
    :func:`class_probabilities`) with their ``labels`` (class indices), against
    ``registered_metrics`` (registry keys ``accuracy``, ``f1``, ``roc_auc``,
    ``ece``; any subset). ``successful_predictions`` counts the window's
    successful predictions, labelled or not, for the label coverage.

    Raises ValueError naming the argument for outputs that are not finite or not
    probabilities, labels that are not class indices of the outputs or not one
    per row, and a ``successful_predictions`` below the labelled rows."""
    probabilities = class_probabilities(outputs, output_type)
    rows, classes = probabilities.shape
    label_array = _labels(labels, rows, classes)
    if successful_predictions < rows:
        raise ValueError(
            f"successful_predictions ({successful_predictions}) is below the {rows} labelled "
            "rows; labelled predictions are among the successful ones"
        )
    predicted = np.argmax(probabilities, axis=1)
    confidence = probabilities[np.arange(rows), predicted]
    correct = predicted == label_array
    expected_calibration_error, bins = _calibration(confidence, correct, config.calibration_bins)

    values: dict[PerformanceMetric, float] = {}
    if rows:
        values[PerformanceMetric.ACCURACY] = float(np.mean(correct))
        values[PerformanceMetric.F1] = _f1(label_array, predicted, classes)
        roc_auc = _roc_auc(probabilities, label_array)
        if roc_auc is not None:
            values[PerformanceMetric.ROC_AUC] = roc_auc
        values[PerformanceMetric.EXPECTED_CALIBRATION_ERROR] = expected_calibration_error

    insufficient = rows < config.min_labelled_rows
    registered = registered_metrics or {}
    comparisons = tuple(
        _compare(metric, value, registered.get(REGISTRY_KEYS[metric]), config, insufficient)
        for metric, value in values.items()
    )
    return PerformanceReport(
        labelled_rows=rows,
        label_coverage=rows / successful_predictions if successful_predictions else 0.0,
        metrics=comparisons,
        calibration_bins=bins,
        insufficient_data=insufficient,
    )


def class_probabilities(outputs: npt.ArrayLike, output_type: OutputType) -> FloatArray:
    """Class probabilities (rows x classes, each row summing to 1) from logged
    outputs (rows x columns): probabilities as they are, logits through a
    numerically stable softmax. A single column is a binary model's class 1:
    its probability, or its logit (sigmoid). Raises ValueError naming
    ``outputs`` for other shapes, values that are not finite, or probabilities
    outside [0, 1] or not summing to 1 (within 1e-3)."""
    array = np.asarray(outputs)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"outputs: values are numbers, not {array.dtype}")
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"outputs must be rows x columns (two-dimensional), not {array.shape}")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("outputs hold values that are not finite (NaN or infinite)")
    if output_type is OutputType.LOGITS:
        if values.shape[1] == 1:
            values = np.hstack((np.zeros_like(values), values))  # sigmoid(z) = softmax(0, z)[1]
        # Shifted so the largest is e^0: no overflow, and the ratios are unchanged.
        exponentials = np.exp(values - values.max(axis=1, keepdims=True))
        softmax: FloatArray = exponentials / exponentials.sum(axis=1, keepdims=True)
        return softmax
    outside = (values < -PROBABILITY_TOLERANCE) | (values > 1 + PROBABILITY_TOLERANCE)
    if outside.any():
        row, column = np.argwhere(outside)[0]
        raise ValueError(
            f"outputs: probabilities are in [0, 1]; row {row} column {column} "
            f"is {values[row, column]} (are they logits?)"
        )
    values = np.clip(values, 0.0, 1.0)
    if values.shape[1] == 1:
        return np.hstack((1.0 - values, values))
    sums = values.sum(axis=1)
    wrong = np.abs(sums - 1.0) > PROBABILITY_TOLERANCE
    if wrong.any():
        row = int(np.argmax(wrong))
        raise ValueError(
            f"outputs: each row of probabilities sums to 1 (within {PROBABILITY_TOLERANCE}); "
            f"row {row} sums to {sums[row]}"
        )
    rescaled: FloatArray = values / sums[:, np.newaxis]
    return rescaled


def _labels(labels: npt.ArrayLike, rows: int, classes: int) -> IntArray:
    """The labels as class indices; ValueError unless one per row, in 0..classes-1."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != rows:
        raise ValueError(f"labels must be one per output row ({rows}), not shape {array.shape}")
    if rows and array.dtype.kind not in "iu":
        raise ValueError(f"labels: class indices are integers, not {array.dtype}")
    indices = array.astype(np.int64)
    out_of_range = (indices < 0) | (indices >= classes)
    if out_of_range.any():
        raise ValueError(
            f"labels are class indices 0 to {classes - 1}; "
            f"row {int(np.argmax(out_of_range))} is {indices[out_of_range][0]}"
        )
    return indices


def _f1(labels: IntArray, predicted: IntArray, classes: int) -> float:
    """F1 of class 1 for binary models, macro over the classes held or predicted
    otherwise; 2 TP / (labelled + predicted) per class."""
    true_positives = np.bincount(labels[labels == predicted], minlength=classes)
    labelled_and_predicted = np.bincount(labels, minlength=classes) + np.bincount(
        predicted, minlength=classes
    )
    if classes == 2:
        if labelled_and_predicted[1] == 0:
            return 1.0  # class 1 neither held nor predicted: nothing to get wrong
        return float(2 * true_positives[1] / labelled_and_predicted[1])
    seen = labelled_and_predicted > 0
    return float(np.mean(2 * true_positives[seen] / labelled_and_predicted[seen]))


def _roc_auc(probabilities: FloatArray, labels: IntArray) -> float | None:
    """ROC-AUC as the Mann-Whitney statistic (ties count half): of class 1 for
    binary models, one-vs-rest macro over the held classes otherwise; None for
    a window holding a single class."""
    rows, classes = probabilities.shape
    held = np.flatnonzero(np.bincount(labels, minlength=classes))
    if held.size < 2:
        return None
    evaluated = np.array([1]) if classes == 2 else held
    is_positive = labels[:, np.newaxis] == evaluated  # rows x evaluated classes
    ranks = stats.rankdata(probabilities[:, evaluated], axis=0)  # average ranks per column
    positives = is_positive.sum(axis=0)
    rank_sums = np.where(is_positive, ranks, 0.0).sum(axis=0)
    auc = (rank_sums - positives * (positives + 1) / 2) / (positives * (rows - positives))
    return float(np.mean(auc))


def _calibration(
    confidence: FloatArray, correct: npt.NDArray[np.bool_], bins: int
) -> tuple[float, tuple[CalibrationBin, ...]]:
    """The expected calibration error, sum of |accuracy - mean confidence| weighted
    by each bin's share of rows, and the bins; 0 for no rows."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Against the inner edges: lower bounds inclusive, and a confidence of 1 in the last bin.
    index = np.digitize(confidence, edges[1:-1])
    counts = np.bincount(index, minlength=bins)
    confidence_sums = np.bincount(index, weights=confidence, minlength=bins)
    correct_sums = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    filled = np.maximum(counts, 1)  # an empty bin's sums are 0, and so are its means
    mean_confidence, accuracy = confidence_sums / filled, correct_sums / filled
    rows = max(int(confidence.size), 1)
    error = float(np.sum(counts / rows * np.abs(accuracy - mean_confidence)))
    columns = (edges[:-1], edges[1:], counts, mean_confidence, accuracy)
    rows_of_bins = zip(*(column.tolist() for column in columns), strict=True)
    return error, tuple(CalibrationBin(*bin_values) for bin_values in rows_of_bins)


def _compare(
    metric: PerformanceMetric,
    value: float,
    registered: float | None,
    config: PerformanceConfig,
    insufficient: bool,
) -> MetricComparison:
    if registered is None or not math.isfinite(registered):
        return MetricComparison(metric, value, None, None, config.max_degradation, False)
    registered = float(registered)
    degradation = value - registered if metric in LOWER_IS_BETTER else registered - value
    degraded = not insufficient and degradation > config.max_degradation + _ROUNDING_SLACK
    return MetricComparison(
        metric, value, registered, degradation, config.max_degradation, degraded
    )
