"""Specs and small datasets shared by the trainer's tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from conveyor.services.trainer import datasets
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.shared.errors import ConveyorError, InvalidArgumentError
from conveyor.trainer.v1 import resources_pb2 as pb


def make_spec(
    dataset: str = datasets.SYNTHETIC,
    architecture: str = "mlp",
    args: Mapping[str, Any] | None = None,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    split_seed: int = 0,
    stratify: bool = True,
    **hyperparameters: Any,
) -> pb.TrainingJobSpec:
    """A valid spec; ``hyperparameters`` sets further ``Hyperparameters`` fields."""
    spec = pb.TrainingJobSpec()
    spec.data.dataset = dataset
    spec.data.split_seed = split_seed
    spec.data.stratify = stratify
    spec.architecture.name = architecture
    spec.architecture.args.update(dict(args or {}))
    hp = spec.hyperparameters
    hp.epochs = epochs
    hp.batch_size = batch_size
    hp.learning_rate = learning_rate
    hp.seed = seed
    for key, value in hyperparameters.items():
        if isinstance(value, pb.EarlyStoppingSpec | pb.AugmentationSpec):
            getattr(hp, key).CopyFrom(value)
        else:
            setattr(hp, key, value)
    return spec


def violation_fields(error: ConveyorError) -> set[str]:
    """The field paths an INVALID_ARGUMENT names."""
    assert isinstance(error, InvalidArgumentError)
    return {v.field for v in error.violations}


@pytest.fixture(scope="session")
def small_digits() -> LoadedDataset:
    """The first 450 digits: an image dataset quick enough to train repeatedly."""
    digits = datasets.load_builtin(datasets.DIGITS)
    return LoadedDataset.create(
        name="datasets/small-digits",
        features=digits.features[:450],
        labels=digits.labels[:450],
        feature_names=[],
        class_names=digits.class_names,
        modality=pb.DATA_MODALITY_IMAGE,
        source=pb.DATASET_SOURCE_UPLOADED,
    )


@pytest.fixture(scope="session")
def small_tabular() -> LoadedDataset:
    """300 generated rows of 8 features, 3 classes."""
    return datasets.generate_synthetic(
        num_samples=300, num_features=8, num_informative=4, num_classes=3, seed=5
    )
