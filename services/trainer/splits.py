"""Deterministic train/validation/test splits (``DatasetSpec``).

The split depends only on the data's row count (and labels, when stratified),
the fractions and ``split_seed``: the same inputs give the same rows in every
run. A stratified split cuts every class by the same fractions, so class
proportions match across the three parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from conveyor.services.trainer.datasets import Features, Labels, LoadedDataset
from conveyor.shared.errors import FieldViolation, raise_if_any
from conveyor.trainer.v1 import resources_pb2 as pb

DEFAULT_TRAIN_FRACTION = 0.7
DEFAULT_VALIDATION_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
FRACTION_SUM_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Fractions:
    """The resolved split fractions (defaults applied); they sum to 1."""

    train: float
    validation: float
    test: float


@dataclass(frozen=True, eq=False)
class Split:
    """One part of a split: the rows (ascending dataset indices) and their data."""

    indices: npt.NDArray[np.int64]
    features: Features
    labels: Labels

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset cut into training, validation and test parts."""

    dataset: LoadedDataset
    train: Split
    validation: Split
    test: Split


def fraction_violations(spec: pb.DatasetSpec, *, field: str = "spec.data") -> list[FieldViolation]:
    """What is wrong with ``spec``'s fractions on their own (range and sum)."""
    violations: list[FieldViolation] = []
    named = _named_fractions(spec)
    for key, value in named.items():
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            violations.append(FieldViolation(f"{field}.{key}", "a fraction in [0, 1]"))
    if violations:
        return violations
    resolved = resolve_fractions(spec)
    total = resolved.train + resolved.validation + resolved.test
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        description = (
            f"the fractions sum to {total:g}, not 1 (an unset fraction takes its "
            f"default: train {DEFAULT_TRAIN_FRACTION}, validation "
            f"{DEFAULT_VALIDATION_FRACTION}, test {DEFAULT_TEST_FRACTION})"
        )
        set_keys = [key for key, value in named.items() if value != 0.0] or list(named)
        violations.extend(FieldViolation(f"{field}.{key}", description) for key in set_keys)
    return violations


def resolve_fractions(spec: pb.DatasetSpec) -> Fractions:
    """``spec``'s fractions with 0 replaced by the defaults (not checked)."""
    return Fractions(
        train=spec.train_fraction or DEFAULT_TRAIN_FRACTION,
        validation=spec.validation_fraction or DEFAULT_VALIDATION_FRACTION,
        test=spec.test_fraction or DEFAULT_TEST_FRACTION,
    )


def split_sizes_violations(
    spec: pb.DatasetSpec, num_examples: int, *, field: str = "spec.data"
) -> list[FieldViolation]:
    """Violations when some part of an unstratified split would be empty.

    A stratified split is checked on the labels by :func:`split_dataset`.
    """
    if fraction_violations(spec, field=field):
        return []
    counts = _cut_counts(num_examples, resolve_fractions(spec))
    return [
        FieldViolation(f"{field}.{key}", f"gives no examples of the {num_examples}")
        for key, count in zip(_named_fractions(spec), counts, strict=True)
        if count == 0
    ]


def split_dataset(
    dataset: LoadedDataset, spec: pb.DatasetSpec, *, field: str = "spec.data"
) -> DatasetSplits:
    """Cut ``dataset`` by ``spec``; INVALID_ARGUMENT for bad fractions or an empty part."""
    violations = fraction_violations(spec, field=field)
    raise_if_any(violations, "invalid split")
    fractions = resolve_fractions(spec)
    rng = np.random.default_rng(spec.split_seed)
    if spec.stratify:
        groups = [np.flatnonzero(dataset.labels == k) for k in range(dataset.num_classes)]
    else:
        groups = [np.arange(dataset.num_examples)]
    parts: list[list[npt.NDArray[np.int64]]] = [[], [], []]
    for group in groups:
        shuffled = group[rng.permutation(len(group))]
        train_count, validation_count, _ = _cut_counts(len(group), fractions)
        cuts = np.split(shuffled, [train_count, train_count + validation_count])
        for part, piece in zip(parts, cuts, strict=True):
            part.append(piece)
    indices = [np.sort(np.concatenate(part)).astype(np.int64) for part in parts]
    empty = [
        FieldViolation(f"{field}.{key}", f"gives no examples of the {dataset.num_examples}")
        for key, chosen in zip(_named_fractions(spec), indices, strict=True)
        if len(chosen) == 0
    ]
    raise_if_any(empty, "invalid split")
    train, validation, test = (_take(dataset, chosen) for chosen in indices)
    return DatasetSplits(dataset=dataset, train=train, validation=validation, test=test)


def _named_fractions(spec: pb.DatasetSpec) -> dict[str, float]:
    return {
        "train_fraction": spec.train_fraction,
        "validation_fraction": spec.validation_fraction,
        "test_fraction": spec.test_fraction,
    }


def _cut_counts(count: int, fractions: Fractions) -> tuple[int, int, int]:
    train_end = round(count * fractions.train)
    validation_end = round(count * (fractions.train + fractions.validation))
    validation_end = max(train_end, min(count, validation_end))
    return train_end, validation_end - train_end, count - validation_end


def _take(dataset: LoadedDataset, indices: npt.NDArray[np.int64]) -> Split:
    features = dataset.features[indices]
    labels = dataset.labels[indices]
    features.setflags(write=False)
    labels.setflags(write=False)
    return Split(indices=indices, features=features, labels=labels)
