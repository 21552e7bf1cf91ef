"""Test metrics against scikit-learn, and reference statistics for the monitor."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as sk

from conveyor.services.trainer import datasets
from conveyor.services.trainer.evaluation import (
    DECILES,
    MAX_SAMPLE_BYTES,
    classification_metrics,
    confusion_matrix,
    reference_statistics,
)


def _case(
    num_classes: int, rows: int, seed: int, *, ties: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, rows)
    logits = rng.normal(size=(rows, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    if ties:
        logits = np.round(logits)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probabilities


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, True), (2, False)])
def test_binary_metrics_equal_scikit_learns(seed: int, ties: bool) -> None:
    labels, probabilities = _case(2, 300, seed, ties=ties)
    predictions = probabilities.argmax(axis=1)
    ours = classification_metrics(labels, probabilities)
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions))
    assert ours["precision"] == pytest.approx(
        sk.precision_score(labels, predictions, zero_division=0)
    )
    assert ours["recall"] == pytest.approx(sk.recall_score(labels, predictions))
    assert ours["f1"] == pytest.approx(sk.f1_score(labels, predictions))
    assert ours["roc_auc"] == pytest.approx(sk.roc_auc_score(labels, probabilities[:, 1]))
    assert ours["log_loss"] == pytest.approx(
        sk.log_loss(labels, probabilities, labels=[0, 1]), rel=1e-9
    )


@pytest.mark.parametrize("seed", [3, 4])
def test_multiclass_metrics_equal_scikit_learns_macro_averages(seed: int) -> None:
    labels, probabilities = _case(5, 400, seed)
    predictions = probabilities.argmax(axis=1)
    ours = classification_metrics(labels, probabilities)
    assert set(ours) == {"accuracy", "precision", "recall", "f1", "log_loss"}
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions))
    for name, scorer in (
        ("precision", sk.precision_score),
        ("recall", sk.recall_score),
        ("f1", sk.f1_score),
    ):
        assert ours[name] == pytest.approx(
            scorer(labels, predictions, average="macro", zero_division=0)
        )
    assert ours["log_loss"] == pytest.approx(
        sk.log_loss(labels, probabilities, labels=list(range(5))), rel=1e-9
    )


def test_metrics_with_an_absent_class_and_no_positive_predictions() -> None:
    labels = np.array([0, 0, 2, 2, 2])
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]]
    )
    predictions = probabilities.argmax(axis=1)
    ours = classification_metrics(labels, probabilities)
    assert ours["precision"] == pytest.approx(
        sk.precision_score(labels, predictions, average="macro", zero_division=0)
    )
    assert ours["f1"] == pytest.approx(
        sk.f1_score(labels, predictions, average="macro", zero_division=0)
    )
    only_negatives = classification_metrics(
        np.zeros(4, dtype=np.int64), np.tile([0.9, 0.1], (4, 1))
    )
    assert only_negatives["precision"] == 0.0
    assert "roc_auc" not in only_negatives  # undefined with a single class


def test_confusion_matrix_equals_scikit_learns() -> None:
    labels, probabilities = _case(4, 200, 5)
    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, ["a", "b", "c", "d"])
    assert list(matrix.class_names) == ["a", "b", "c", "d"]
    expected = sk.confusion_matrix(labels, predictions, labels=[0, 1, 2, 3])
    assert list(matrix.counts) == expected.ravel().tolist()


def test_reference_statistics_of_tabular_features() -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    probabilities = np.tile([0.25, 0.75], (data.num_examples, 1))
    stats = reference_statistics(
        data.features,
        feature_names=data.feature_names,
        dataset_digest=data.digest,
        probabilities=probabilities,
        class_names=data.class_names,
        seed=1,
    )
    assert stats.row_count == 569
    assert stats.dataset_digest == data.digest
    assert [f.name for f in stats.features] == list(data.feature_names)
    radius = stats.features[0]
    column = data.features[:, 0].astype(np.float64)
    assert radius.count == 569
    assert radius.missing_count == 0
    assert radius.mean == pytest.approx(column.mean())
    assert radius.std_dev == pytest.approx(column.std())
    assert (radius.min, radius.max) == (column.min(), column.max())
    assert [q.level for q in radius.quantiles] == list(DECILES)
    assert [q.value for q in radius.quantiles] == pytest.approx(np.quantile(column, DECILES))
    assert len(radius.histogram.bin_edges) == len(radius.histogram.counts) + 1
    assert sum(radius.histogram.counts) == 569
    assert [p.name for p in stats.predictions] == ["malignant", "benign"]
    assert stats.predictions[1].mean == pytest.approx(0.75)
    assert stats.sample.column_count == 30
    assert len(stats.sample.values) == 569 * 30  # all rows fit under 1,000


def test_reference_sample_is_bounded_by_rows_and_bytes() -> None:
    wide = np.random.default_rng(0).random((2000, 300)).astype(np.float32)
    stats = reference_statistics(wide)
    rows = len(stats.sample.values) // stats.sample.column_count
    assert rows < 1000
    assert stats.sample.ByteSize() <= MAX_SAMPLE_BYTES
    narrow = reference_statistics(np.zeros((5000, 2), dtype=np.float32))
    assert len(narrow.sample.values) == 1000 * 2


def test_reference_statistics_of_images() -> None:
    digits = datasets.load_builtin(datasets.DIGITS)
    stats = reference_statistics(digits.features[:100])
    assert len(stats.features) == 64
    assert stats.features[0].name == "pixel_0_0_0"
    assert stats.features[63].name == "pixel_0_7_7"
    large = np.random.default_rng(0).random((20, 3, 64, 64)).astype(np.float32)
    per_channel = reference_statistics(large)
    assert [f.name for f in per_channel.features] == ["channel_0", "channel_1", "channel_2"]
    assert not per_channel.sample.values
