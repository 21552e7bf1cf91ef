"""Performance decay: metrics checked against scikit-learn, softmax and sigmoid
against SciPy, calibration against a hand computation, and the verdicts,
label coverage, small and empty windows, and bad input."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import special
from sklearn import metrics

from conveyor.monitor.v1 import resources_pb2
from conveyor.services.monitor.performance import (
    CalibrationBin,
    OutputType,
    PerformanceConfig,
    PerformanceMetric,
    PerformanceReport,
    class_probabilities,
    performance_report,
)

PROBABILITIES = OutputType.PROBABILITIES
LOGITS = OutputType.LOGITS
ACCURACY = PerformanceMetric.ACCURACY
F1 = PerformanceMetric.F1
ROC_AUC = PerformanceMetric.ROC_AUC
ECE = PerformanceMetric.EXPECTED_CALIBRATION_ERROR
TOLERANCE = 1e-9
Array = npt.NDArray[Any]


def labelled_window(
    rng: np.random.Generator, rows: int, classes: int, columns: int
) -> tuple[Array, Array]:
    """Labels and logits (rows x columns) that favour the label, so every metric
    lands somewhere informative; one column holds binary logits of class 1."""
    labels = rng.integers(0, classes, size=rows)
    if columns == 1:
        return labels, (rng.normal(size=rows) + 1.5 * (2 * labels - 1))[:, np.newaxis]
    return labels, rng.normal(size=(rows, columns)) + 1.5 * np.eye(columns)[labels]


def value(report: PerformanceReport, metric: PerformanceMetric) -> float:
    comparison = report.metric(metric)
    assert comparison is not None
    return comparison.value


def ece_by_hand(probabilities: Array, labels: Array, bins: int) -> tuple[float, Array]:
    """The expected calibration error and per-bin counts, bins from np.digitize
    on all the edges, a confidence of exactly 1 moved into the last bin."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.minimum(np.digitize(confidence, np.linspace(0, 1, bins + 1)) - 1, bins - 1)
    error, counts = 0.0, np.zeros(bins, dtype=int)
    for b in range(bins):
        in_bin = index == b
        counts[b] = in_bin.sum()
        if counts[b]:
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            error += counts[b] / labels.size * gap
    return error, counts


def test_enums_mirror_the_proto_by_value() -> None:
    for metric in PerformanceMetric:
        name = f"PERFORMANCE_METRIC_{metric.name}"
        assert resources_pb2.PerformanceMetric.Value(name) == metric.value
    for output_type in OutputType:
        assert (
            resources_pb2.OutputType.Value(f"OUTPUT_TYPE_{output_type.name}") == output_type.value
        )


def test_logits_go_through_a_stable_softmax_and_one_column_through_a_sigmoid() -> None:
    rng = np.random.default_rng(1)
    logits = np.vstack((rng.normal(size=(50, 4)) * 5, [[1000.0, -1000.0, 0.0, 999.0]]))
    probabilities = class_probabilities(logits, LOGITS)
    np.testing.assert_allclose(probabilities, special.softmax(logits, axis=1), rtol=0, atol=1e-12)

    single = np.concatenate((rng.normal(size=50) * 5, [800.0, -800.0]))[:, np.newaxis]
    expected = special.expit(single[:, 0])
    probabilities = class_probabilities(single, LOGITS)
    np.testing.assert_allclose(probabilities[:, 1], expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(probabilities[:, 0], 1 - expected, rtol=0, atol=1e-12)


def test_probabilities_are_kept_and_one_column_is_class_one() -> None:
    assert class_probabilities([[0.2], [1.0], [0]], PROBABILITIES).tolist() == [
        [0.8, 0.2],
        [0.0, 1.0],
        [1.0, 0.0],
    ]
    rows = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    np.testing.assert_allclose(class_probabilities(rows, PROBABILITIES), rows, atol=1e-15)
    # float16-like rounding within 1e-3 is accepted, then rescaled to sum to 1.
    rounded = np.array([[0.3335, 0.3335, 0.3335]])
    np.testing.assert_allclose(class_probabilities(rounded, PROBABILITIES), np.full((1, 3), 1 / 3))


@pytest.mark.parametrize(
    ("classes", "columns", "output_type", "tied"),
    [
        (2, 1, PROBABILITIES, False),
        (2, 1, PROBABILITIES, True),  # probabilities to 2 decimals: ROC-AUC ranks ties
        (2, 1, LOGITS, False),
        (2, 2, PROBABILITIES, False),
        (2, 2, LOGITS, False),
        (10, 10, PROBABILITIES, False),
        (10, 10, LOGITS, False),
    ],
)
def test_metrics_are_scikit_learns(
    classes: int, columns: int, output_type: OutputType, tied: bool
) -> None:
    rng = np.random.default_rng(classes * 10 + columns)
    labels, logits = labelled_window(rng, 1500, classes, columns)
    if columns == 1:
        probabilities = np.column_stack((special.expit(-logits[:, 0]), special.expit(logits[:, 0])))
    else:
        probabilities = special.softmax(logits, axis=1)
    if tied:
        probabilities[:, 1] = np.round(probabilities[:, 1], 2)
        probabilities[:, 0] = 1 - probabilities[:, 1]
    outputs = logits
    if output_type is PROBABILITIES:
        outputs = probabilities[:, 1:] if columns == 1 else probabilities

    report = performance_report(outputs, labels, output_type, successful_predictions=1500)

    predicted = probabilities.argmax(axis=1)
    if classes == 2:
        f1 = metrics.f1_score(labels, predicted)
        roc_auc = metrics.roc_auc_score(labels, probabilities[:, 1])
    else:
        f1 = metrics.f1_score(labels, predicted, average="macro")
        roc_auc = metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    ece, _ = ece_by_hand(probabilities, labels, 10)
    assert [m.metric for m in report.metrics] == [ACCURACY, F1, ROC_AUC, ECE]
    assert value(report, ACCURACY) == pytest.approx(
        metrics.accuracy_score(labels, predicted), abs=TOLERANCE
    )
    assert value(report, F1) == pytest.approx(f1, abs=TOLERANCE)
    assert value(report, ROC_AUC) == pytest.approx(roc_auc, abs=TOLERANCE)
    assert value(report, ECE) == pytest.approx(ece, abs=TOLERANCE)
    assert 0.3 < value(report, ACCURACY) < 0.95  # informative data, not a degenerate case
    assert report.labelled_rows == 1500
    assert not report.insufficient_data


@pytest.mark.parametrize("bins", [2, 10, 37, 100])
def test_calibration_bins_match_a_hand_computation(bins: int) -> None:
    rng = np.random.default_rng(bins)
    labels, logits = labelled_window(rng, 800, 10, 10)
    logits[:5] = 0.0
    logits[np.arange(5), labels[:5]] = 1000.0  # a confidence of exactly 1
    probabilities = special.softmax(logits, axis=1)
    assert (probabilities.max(axis=1) == 1.0).sum() == 5

    config = PerformanceConfig(calibration_bins=bins)
    report = performance_report(logits, labels, LOGITS, successful_predictions=800, config=config)

    ece, counts = ece_by_hand(probabilities, labels, bins)
    assert value(report, ECE) == pytest.approx(ece, abs=TOLERANCE)
    assert [b.count for b in report.calibration_bins] == counts.tolist()
    assert sum(b.count for b in report.calibration_bins) == 800
    assert report.calibration_bins[-1].count >= 5
    edges = np.linspace(0, 1, bins + 1)
    assert [(b.lower, b.upper) for b in report.calibration_bins] == list(
        zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)
    )


def test_calibration_bins_hold_lower_bounds_and_one() -> None:
    confidence_of_class_1 = np.array([[0.5], [0.6], [0.75], [1.0], [0.0], [0.95]])
    labels = np.array([1, 1, 1, 1, 0, 0])
    config = PerformanceConfig(calibration_bins=4)
    report = performance_report(
        confidence_of_class_1, labels, PROBABILITIES, successful_predictions=6, config=config
    )
    # 0.5 ties to class 0 (wrong) with confidence 0.5, the lower bound of [0.5, 0.75);
    # 0.75 opens the last bin, which also holds both confidences of exactly 1.
    assert report.calibration_bins == (
        CalibrationBin(0.0, 0.25, 0, 0.0, 0.0),
        CalibrationBin(0.25, 0.5, 0, 0.0, 0.0),
        CalibrationBin(0.5, 0.75, 2, pytest.approx(0.55), 0.5),
        CalibrationBin(0.75, 1.0, 4, pytest.approx(0.925), 0.75),
    )
    assert value(report, ECE) == pytest.approx(2 / 6 * 0.05 + 4 / 6 * 0.175, abs=TOLERANCE)


@pytest.mark.parametrize(("classes", "columns"), [(2, 1), (2, 2), (10, 10)])
def test_roc_auc_is_left_out_for_a_single_class_window(classes: int, columns: int) -> None:
    rng = np.random.default_rng(5)
    _, logits = labelled_window(rng, 200, classes, columns)
    report = performance_report(logits, np.ones(200, dtype=int), LOGITS, successful_predictions=200)
    assert [m.metric for m in report.metrics] == [ACCURACY, F1, ECE]
    assert report.metric(ROC_AUC) is None


def test_multi_class_averages_over_the_classes_in_the_window() -> None:
    rng = np.random.default_rng(8)
    labels, logits = labelled_window(rng, 900, 7, 10)  # classes 7 to 9 never labelled
    logits[:, 9] -= 50.0  # and class 9 never predicted either
    probabilities = special.softmax(logits, axis=1)
    report = performance_report(logits, labels, LOGITS, successful_predictions=900)

    held = np.unique(labels)
    per_class = [metrics.roc_auc_score(labels == c, probabilities[:, c]) for c in held]
    assert value(report, ROC_AUC) == pytest.approx(np.mean(per_class), abs=TOLERANCE)
    predicted = probabilities.argmax(axis=1)
    assert set(predicted) - set(held) == {7, 8}  # predicted though never labelled
    # scikit-learn's default macro averages the classes labelled or predicted.
    f1 = metrics.f1_score(labels, predicted, average="macro")
    assert value(report, F1) == pytest.approx(f1, abs=TOLERANCE)


def test_binary_f1_without_class_one_is_one() -> None:
    outputs, labels = np.full((150, 1), 0.2), np.zeros(150, dtype=int)
    report = performance_report(outputs, labels, PROBABILITIES, successful_predictions=150)
    expected = metrics.f1_score(labels, np.zeros(150, dtype=int), zero_division=1.0)
    assert value(report, F1) == expected == 1.0

    outputs[0] = 0.9  # one false positive: a defined 0
    report = performance_report(outputs, labels, PROBABILITIES, successful_predictions=150)
    assert value(report, F1) == 0.0


def accuracy_window(correct: int, rows: int = 100) -> tuple[Array, Array]:
    """A binary window whose accuracy is exactly correct / rows."""
    labels = np.arange(rows) % 2
    class_1 = np.where(labels == 1, 0.8, 0.3)
    class_1[: rows - correct] = 1 - class_1[: rows - correct]  # wrong side of 0.5
    return class_1[:, np.newaxis], labels


def test_degradation_is_worse_than_registered_in_each_metrics_direction() -> None:
    outputs, labels = accuracy_window(88)
    measured = performance_report(outputs, labels, PROBABILITIES, successful_predictions=100)
    assert value(measured, ACCURACY) == 0.88
    registered = {
        "accuracy": 0.93,  # higher is better: 0.05 worse
        "f1": value(measured, F1) - 0.1,  # better than registered
        "roc_auc": value(measured, ROC_AUC) + 0.01,  # worse, within the tolerance
        "ece": value(measured, ECE) - 0.05,  # lower is better: 0.05 worse
    }
    report = performance_report(
        outputs, labels, PROBABILITIES, successful_predictions=100, registered_metrics=registered
    )
    degradation = {m.metric: m.degradation for m in report.metrics}
    assert degradation == pytest.approx({ACCURACY: 0.05, F1: -0.1, ROC_AUC: 0.01, ECE: 0.05})
    assert {m.metric for m in report.metrics if m.degraded} == {ACCURACY, ECE}
    assert all(m.max_degradation == 0.02 for m in report.metrics)
    accuracy = report.metric(ACCURACY)
    assert accuracy is not None
    assert (accuracy.value, accuracy.registered_value) == (0.88, 0.93)

    better_ece = {"ece": value(measured, ECE) + 0.05}
    report = performance_report(
        outputs, labels, PROBABILITIES, successful_predictions=100, registered_metrics=better_ece
    )
    ece = report.metric(ECE)
    assert ece is not None
    assert ece.degradation == pytest.approx(-0.05)
    assert not ece.degraded


def test_a_degradation_at_the_tolerance_is_not_degraded() -> None:
    outputs, labels = accuracy_window(88)
    measured = performance_report(outputs, labels, PROBABILITIES, successful_predictions=100)
    registered = {"accuracy": 0.90, "ece": value(measured, ECE) - 0.02}
    report = performance_report(
        outputs, labels, PROBABILITIES, successful_predictions=100, registered_metrics=registered
    )
    assert [(m.degradation, m.degraded) for m in report.metrics if m.registered_value] == [
        (pytest.approx(0.02), False),
        (pytest.approx(0.02), False),
    ]
    strict = PerformanceConfig(max_degradation=0.0)
    report = performance_report(
        outputs,
        labels,
        PROBABILITIES,
        successful_predictions=100,
        registered_metrics={"accuracy": 0.881},
        config=strict,
    )
    assert [m.metric for m in report.metrics if m.degraded] == [ACCURACY]


def test_unset_registered_values_give_no_degradation() -> None:
    outputs, labels = accuracy_window(50)
    registered = {"accuracy": 0.99, "roc_auc": math.nan, "loss": 0.1}
    report = performance_report(
        outputs, labels, PROBABILITIES, successful_predictions=100, registered_metrics=registered
    )
    unset = [m for m in report.metrics if m.metric is not ACCURACY]
    assert [m.metric for m in unset] == [F1, ROC_AUC, ECE]
    assert all(
        (m.registered_value, m.degradation, m.degraded) == (None, None, False) for m in unset
    )
    assert [m.metric for m in report.metrics if m.degraded] == [ACCURACY]


def test_too_few_labelled_rows_report_metrics_but_no_verdict() -> None:
    outputs, labels = accuracy_window(60)
    registered = {"accuracy": 0.95, "f1": 0.95, "roc_auc": 0.99, "ece": 0.0}
    arguments: dict[str, Any] = {"successful_predictions": 100, "registered_metrics": registered}
    small = performance_report(
        outputs, labels, PROBABILITIES, config=PerformanceConfig(min_labelled_rows=101), **arguments
    )
    assert small.insufficient_data
    assert len(small.metrics) == 4
    assert all(m.degradation is not None and m.degradation > 0.02 for m in small.metrics)
    assert not any(m.degraded for m in small.metrics)

    enough = performance_report(outputs, labels, PROBABILITIES, **arguments)  # 100 is enough
    assert not enough.insufficient_data
    assert all(m.degraded for m in enough.metrics)


def test_label_coverage_is_labelled_over_successful_predictions() -> None:
    outputs, labels = accuracy_window(80)
    report = performance_report(outputs, labels, PROBABILITIES, successful_predictions=400)
    assert (report.labelled_rows, report.label_coverage) == (100, 0.25)
    report = performance_report(outputs, labels, PROBABILITIES, successful_predictions=100)
    assert report.label_coverage == 1.0


@pytest.mark.parametrize("successful_predictions", [0, 250])
def test_an_empty_window_has_no_metric(successful_predictions: int) -> None:
    report = performance_report(
        np.empty((0, 3)), [], LOGITS, successful_predictions=successful_predictions
    )
    assert (report.labelled_rows, report.label_coverage, report.metrics) == (0, 0.0, ())
    assert report.insufficient_data
    assert len(report.calibration_bins) == 10
    assert all(b.count == b.mean_confidence == b.accuracy == 0 for b in report.calibration_bins)


@pytest.mark.parametrize(
    ("outputs", "labels", "output_type", "message"),
    [
        ([[0.2, 0.8], [0.6, 0.4]], [0, 2], PROBABILITIES, "labels are class indices 0 to 1"),
        ([[0.2], [0.6]], [0, 2], PROBABILITIES, "labels are class indices 0 to 1; row 1 is 2"),
        ([[1.0, 2.0, 3.0]], [-1], LOGITS, "labels are class indices 0 to 2; row 0 is -1"),
        ([[0.2], [0.6]], [0.0, 1.0], PROBABILITIES, "labels: class indices are integers"),
        ([[0.2], [0.6]], [0, 1, 1], PROBABILITIES, r"labels must be one per output row \(2\)"),
        ([[0.2], [0.6]], [[0], [1]], PROBABILITIES, "labels must be one per output row"),
        ([[0.2], [math.nan]], [0, 1], PROBABILITIES, "outputs hold values that are not finite"),
        ([[1.0, math.inf]], [0], LOGITS, "outputs hold values that are not finite"),
        ([0.2, 0.6], [0, 1], PROBABILITIES, r"outputs must be rows x columns"),
        (np.empty((2, 0)), [0, 1], LOGITS, r"outputs must be rows x columns"),
        ([["a"], ["b"]], [0, 1], LOGITS, "outputs: values are numbers"),
        (
            [[0.2, 0.8], [0.5, 0.4]],
            [0, 1],
            PROBABILITIES,
            r"outputs: each row of probabilities sums to 1 \(within 0.001\); row 1 sums to 0.9",
        ),
        (
            [[0.2, 0.3, 0.5], [1.7, -0.2, -0.5]],
            [0, 1],
            PROBABILITIES,
            r"outputs: probabilities are in \[0, 1\]; row 1 column 0 is 1.7",
        ),
        ([[0.2], [2.3]], [0, 1], PROBABILITIES, r"outputs: probabilities are in \[0, 1\]"),
    ],
)
def test_bad_input_names_the_argument(
    outputs: npt.ArrayLike, labels: npt.ArrayLike, output_type: OutputType, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        performance_report(outputs, labels, output_type, successful_predictions=10)


def test_successful_predictions_cannot_be_fewer_than_the_labelled_ones() -> None:
    with pytest.raises(ValueError, match=r"successful_predictions \(1\) is below the 2 labelled"):
        performance_report([[0.2], [0.6]], [0, 1], PROBABILITIES, successful_predictions=1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_degradation": -0.01}, "max_degradation"),
        ({"max_degradation": math.nan}, "max_degradation"),
        ({"max_degradation": math.inf}, "max_degradation"),
        ({"min_labelled_rows": 0}, "min_labelled_rows"),
        ({"calibration_bins": 1}, "calibration_bins must be 2 to 100, not 1"),
        ({"calibration_bins": 101}, "calibration_bins"),
    ],
)
def test_a_bad_config_names_its_field(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerformanceConfig(**arguments)


def test_config_bounds_are_inclusive() -> None:
    config = PerformanceConfig(max_degradation=0.0, min_labelled_rows=1, calibration_bins=100)
    assert (config.max_degradation, config.min_labelled_rows, config.calibration_bins) == (
        0,
        1,
        100,
    )
    assert PerformanceConfig(calibration_bins=2).calibration_bins == 2
