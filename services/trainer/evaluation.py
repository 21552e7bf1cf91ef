"""Test metrics, the confusion matrix, and reference statistics for the monitor.

Metrics follow scikit-learn's definitions (the tests compare them): binary
tasks report precision, recall and F1 of class 1 and ROC-AUC; multiclass tasks
report macro averages over the classes present in the labels or predictions.
A ratio with a zero denominator is 0. ``roc_auc`` is left out when the labels
hold a single class (it is undefined).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer.splits import Split
from conveyor.trainer.v1 import resources_pb2 as pb

DECILES = tuple(round(0.1 * i, 1) for i in range(1, 10))
"""The quantile levels of reference statistics (the monitor's PSI bins)."""
HISTOGRAM_BINS = 10
MAX_SAMPLE_ROWS = 1000
MAX_SAMPLE_BYTES = 1 << 20
MAX_PER_ELEMENT_FEATURES = 4096
"""Inputs with more elements than this get per-channel statistics (images)."""

Probabilities = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Metrics of a model on one split."""

    metrics: dict[str, float]
    confusion_matrix: pb.ConfusionMatrix
    probabilities: Probabilities


def evaluate(
    model: nn.Module,
    split: Split,
    class_names: Sequence[str],
    *,
    device: torch.device | None = None,
    batch_size: int = 1024,
) -> Evaluation:
    """``model``'s (logits) metrics and confusion matrix on ``split``."""
    probabilities = predict_probabilities(
        model, split.features, device=device, batch_size=batch_size
    )
    labels = np.asarray(split.labels)
    return Evaluation(
        metrics=classification_metrics(labels, probabilities),
        confusion_matrix=confusion_matrix(labels, probabilities.argmax(axis=1), class_names),
        probabilities=probabilities,
    )


def predict_probabilities(
    model: nn.Module,
    features: npt.NDArray[np.float32],
    *,
    device: torch.device | None = None,
    batch_size: int = 1024,
) -> Probabilities:
    """Softmax of ``model``'s logits on ``features``, in eval mode, as float64."""
    target = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            # A copy: torch refuses to share the dataset's read-only arrays.
            batch = torch.from_numpy(np.array(features[start : start + batch_size]))
            logits = model(batch.to(target)).float()
            outputs.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(outputs).astype(np.float64)


def classification_metrics(
    labels: npt.NDArray[np.int64], probabilities: Probabilities
) -> dict[str, float]:
    """accuracy, precision, recall, f1, log_loss, and roc_auc for two classes."""
    num_classes = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    metrics = {"accuracy": float(np.mean(predictions == labels))}
    if num_classes == 2:
        metrics.update(_binary_scores(labels == 1, predictions == 1))
    else:
        present = np.union1d(labels, predictions)
        per_class = [_binary_scores(labels == k, predictions == k) for k in present]
        for key in ("precision", "recall", "f1"):
            metrics[key] = float(np.mean([scores[key] for scores in per_class]))
    eps = np.finfo(np.float64).eps
    chosen = np.clip(probabilities[np.arange(len(labels)), labels], eps, 1.0)
    metrics["log_loss"] = float(-np.mean(np.log(chosen)))
    if num_classes == 2:
        auc = roc_auc(labels == 1, probabilities[:, 1])
        if auc is not None:
            metrics["roc_auc"] = auc
    return metrics


def roc_auc(positive: npt.NDArray[np.bool_], scores: npt.NDArray[np.float64]) -> float | None:
    """The area under the ROC curve (the Mann-Whitney U statistic, ties halved)."""
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u / (n_positive * n_negative))


def confusion_matrix(
    labels: npt.NDArray[np.int64], predictions: npt.NDArray[np.int64], class_names: Sequence[str]
) -> pb.ConfusionMatrix:
    """Counts by (true class, predicted class), row-major."""
    size = len(class_names)
    counts = np.bincount(labels * size + predictions, minlength=size * size)
    return pb.ConfusionMatrix(class_names=list(class_names), counts=counts.tolist())


def reference_statistics(
    features: npt.NDArray[np.float32],
    *,
    feature_names: Sequence[str] = (),
    dataset_digest: str = "",
    probabilities: Probabilities | None = None,
    class_names: Sequence[str] = (),
    sample_rows: int = MAX_SAMPLE_ROWS,
    seed: int = 0,
) -> registry_pb.ReferenceStatistics:
    """Reference statistics of the training features (and the model's outputs).

    One ``FeatureStatistics`` per input feature, all numerical: count and
    missing count, mean, population standard deviation, min, max, the deciles
    and a 10-bin histogram. Image inputs of up to 4,096 elements get one entry
    per pixel, named ``pixel_{c}_{h}_{w}`` (they have no feature names);
    larger images one per channel, named ``channel_{c}``, over the channel's
    mean per image. ``probabilities`` adds one entry per class output, named
    by the class. The sample holds up to ``sample_rows`` rows drawn with
    ``seed`` (less when 1 MiB would be exceeded; none for per-channel images).
    """
    matrix, names = _feature_matrix(features, feature_names)
    statistics = registry_pb.ReferenceStatistics(
        row_count=len(features),
        dataset_digest=dataset_digest,
        features=[_feature_statistics(name, matrix[:, j]) for j, name in enumerate(names)],
    )
    if probabilities is not None:
        statistics.predictions.extend(
            _feature_statistics(name, probabilities[:, k]) for k, name in enumerate(class_names)
        )
    per_element = matrix.shape[1] == int(np.prod(features.shape[1:]))
    budget_rows = (MAX_SAMPLE_BYTES - 64) // (8 * matrix.shape[1])
    rows = min(sample_rows, len(matrix), budget_rows)
    if per_element and rows > 0:
        chosen = np.sort(np.random.default_rng(seed).choice(len(matrix), rows, replace=False))
        statistics.sample.column_count = matrix.shape[1]
        statistics.sample.values.extend(matrix[chosen].astype(np.float64).ravel().tolist())
    return statistics


def _feature_matrix(
    features: npt.NDArray[np.float32], feature_names: Sequence[str]
) -> tuple[npt.NDArray[np.float64], list[str]]:
    values = features.astype(np.float64)
    if values.ndim == 2:
        names = list(feature_names) or [f"feature_{j}" for j in range(values.shape[1])]
        return values, names
    channels, height, width = values.shape[1:]
    if channels * height * width <= MAX_PER_ELEMENT_FEATURES:
        names = [
            f"pixel_{c}_{h}_{w}"
            for c in range(channels)
            for h in range(height)
            for w in range(width)
        ]
        return values.reshape(len(values), -1), names
    return values.mean(axis=(2, 3)), [f"channel_{c}" for c in range(channels)]


def _feature_statistics(
    name: str, column: npt.NDArray[np.float64]
) -> registry_pb.FeatureStatistics:
    finite = column[np.isfinite(column)]
    statistics = registry_pb.FeatureStatistics(
        name=name,
        type=registry_pb.FEATURE_TYPE_NUMERICAL,
        count=len(finite),
        missing_count=len(column) - len(finite),
    )
    if len(finite) == 0:
        return statistics
    statistics.mean = float(finite.mean())
    statistics.std_dev = float(finite.std())
    statistics.min = float(finite.min())
    statistics.max = float(finite.max())
    levels = np.asarray(DECILES)
    statistics.quantiles.extend(
        registry_pb.Quantile(level=float(level), value=float(value))
        for level, value in zip(levels, np.quantile(finite, levels), strict=True)
    )
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS)
    statistics.histogram.bin_edges.extend(edges.tolist())
    statistics.histogram.counts.extend(counts.tolist())
    return statistics


def _binary_scores(
    actual: npt.NDArray[np.bool_], predicted: npt.NDArray[np.bool_]
) -> dict[str, float]:
    true_positive = int(np.sum(actual & predicted))
    false_positive = int(np.sum(~actual & predicted))
    false_negative = int(np.sum(actual & ~predicted))
    return {
        "precision": _ratio(true_positive, true_positive + false_positive),
        "recall": _ratio(true_positive, true_positive + false_negative),
        "f1": _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative),
    }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Each run of equal values shares the mean of the ranks it spans (1-based).
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    run_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks
