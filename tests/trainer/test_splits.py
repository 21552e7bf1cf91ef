"""Deterministic, stratified train/validation/test splits and their validation."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.services.trainer import datasets
from conveyor.services.trainer.splits import split_dataset
from conveyor.shared.errors import InvalidArgumentError
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import violation_fields


def _spec(**fields: object) -> pb.DatasetSpec:
    return pb.DatasetSpec(dataset=datasets.BREAST_CANCER, **fields)  # type: ignore[arg-type]


def test_default_split_is_70_15_15_disjoint_and_complete() -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    splits = split_dataset(data, _spec(split_seed=3))
    sizes = (len(splits.train), len(splits.validation), len(splits.test))
    assert sizes == (398, 86, 85)
    everything = np.concatenate(
        [splits.train.indices, splits.validation.indices, splits.test.indices]
    )
    assert sorted(everything.tolist()) == list(range(569))
    assert np.array_equal(splits.test.features, data.features[splits.test.indices])
    assert np.array_equal(splits.test.labels, data.labels[splits.test.indices])


def test_same_seed_same_split_other_seed_other_split() -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    first = split_dataset(data, _spec(split_seed=11, stratify=True))
    again = split_dataset(data, _spec(split_seed=11, stratify=True))
    other = split_dataset(data, _spec(split_seed=12, stratify=True))
    assert np.array_equal(first.test.indices, again.test.indices)
    assert np.array_equal(first.train.indices, again.train.indices)
    assert not np.array_equal(first.test.indices, other.test.indices)


def test_stratified_split_keeps_class_proportions() -> None:
    data = datasets.generate_synthetic(num_samples=1000, num_classes=4, seed=1, noise=0.0)
    imbalanced = datasets.LoadedDataset.create(
        name=data.name,
        features=data.features[:700],
        labels=np.where(np.arange(700) < 70, 1, 0),
        feature_names=data.feature_names,
        class_names=("common", "rare"),
        modality=data.modality,
        source=data.source,
    )
    splits = split_dataset(
        imbalanced,
        _spec(train_fraction=0.6, validation_fraction=0.2, test_fraction=0.2, stratify=True),
    )
    for part, expected in ((splits.train, 42), (splits.validation, 14), (splits.test, 14)):
        assert int(part.labels.sum()) == expected


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"train_fraction": 1.5}, {"spec.data.train_fraction"}),
        ({"validation_fraction": -0.1}, {"spec.data.validation_fraction"}),
        ({"test_fraction": float("nan")}, {"spec.data.test_fraction"}),
        (
            {"train_fraction": 0.8, "validation_fraction": 0.2},
            {"spec.data.train_fraction", "spec.data.validation_fraction"},
        ),
        (
            {"train_fraction": 0.5, "validation_fraction": 0.3, "test_fraction": 0.1},
            {
                "spec.data.train_fraction",
                "spec.data.validation_fraction",
                "spec.data.test_fraction",
            },
        ),
    ],
)
def test_bad_fractions_name_their_fields(fields: dict[str, float], bad: set[str]) -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    with pytest.raises(InvalidArgumentError) as caught:
        split_dataset(data, _spec(**fields))
    assert violation_fields(caught.value) == bad


def test_fractions_summing_to_one_within_tolerance_are_accepted() -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    splits = split_dataset(
        data, _spec(train_fraction=0.1 + 0.2, validation_fraction=0.3, test_fraction=0.4)
    )
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 569


def test_a_split_that_would_be_empty_is_refused() -> None:
    tiny = datasets.generate_synthetic(num_samples=4, num_features=2, seed=0)
    with pytest.raises(InvalidArgumentError) as caught:
        split_dataset(tiny, _spec(train_fraction=0.9, validation_fraction=0.05, test_fraction=0.05))
    assert violation_fields(caught.value) == {
        "spec.data.validation_fraction",
        "spec.data.test_fraction",
    }
