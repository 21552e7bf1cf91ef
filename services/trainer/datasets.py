"""The trainer's dataset catalog: built-in data that needs no download.

Built-in datasets (``Dataset.source``):

- ``datasets/breast-cancer``: scikit-learn's bundled Wisconsin breast-cancer
  set, 569 rows of 30 numeric features, binary (``malignant``, ``benign``).
- ``datasets/digits``: scikit-learn's bundled 8x8 handwritten digits, 1,797
  images as ``1x8x8`` float tensors of pixel values 0-16, 10 classes.
- ``datasets/synthetic``: a seeded generator of tabular classification data of
  any size, with a drift knob (``shift``, ``scale``) for drift scenarios; the
  same arguments always give the same data (:mod:`.synthetic`).

Every dataset, built-in or uploaded (:mod:`.uploads`), is a
:class:`LoadedDataset` (:mod:`.loaded`, re-exported here) with a content digest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from conveyor.services.trainer import arguments
from conveyor.services.trainer.loaded import (
    DIGEST_FORMAT,
    DatasetSchema,
    Features,
    Labels,
    LoadedDataset,
    concatenate,
    dataset_digest,
)
from conveyor.services.trainer.synthetic import (
    MAX_SYNTHETIC_VALUES,
    SYNTHETIC,
    SYNTHETIC_DEFAULTS,
    generate,
    generate_synthetic,
    synthetic_arguments,
)
from conveyor.shared.errors import FieldViolation, InvalidArgumentError, NotFoundError
from conveyor.trainer.v1 import resources_pb2 as pb

__all__ = [
    "BREAST_CANCER",
    "BUILTIN_NAMES",
    "DIGEST_FORMAT",
    "DIGITS",
    "MAX_SYNTHETIC_VALUES",
    "SYNTHETIC",
    "SYNTHETIC_DEFAULTS",
    "DatasetSchema",
    "Features",
    "Labels",
    "LoadedDataset",
    "builtin_datasets",
    "builtin_schema",
    "concatenate",
    "dataset_digest",
    "generate_synthetic",
    "is_builtin",
    "load_builtin",
    "load_training_data",
]

BREAST_CANCER = "datasets/breast-cancer"
DIGITS = "datasets/digits"
BUILTIN_NAMES = (BREAST_CANCER, DIGITS, SYNTHETIC)
"""The names of the built-in catalog, reserved for it."""


def is_builtin(name: str) -> bool:
    """Whether ``name`` belongs to the built-in catalog (built-in or generator)."""
    return name in BUILTIN_NAMES


def builtin_datasets() -> list[pb.Dataset]:
    """The catalog's ``Dataset`` resources, in name order (``create_time`` unset)."""
    described = [_describe_builtin(name) for name in sorted(BUILTIN_NAMES)]
    return described


def load_builtin(
    name: str,
    generator_args: struct_pb2.Struct | Mapping[str, Any] | None = None,
    *,
    field: str = "spec.data",
) -> LoadedDataset:
    """Load a built-in dataset, or generate ``datasets/synthetic`` from its arguments.

    Raises NotFoundError for a name outside the catalog and InvalidArgumentError
    for arguments given to a non-generator or bad generator arguments (the
    violations name ``{field}.generator_args.{arg}``).
    """
    args = arguments.to_mapping(generator_args)
    if name == SYNTHETIC:
        return generate(**synthetic_arguments(args, f"{field}.generator_args"))
    if name not in BUILTIN_NAMES:
        raise NotFoundError(f"dataset {name!r} is not built in", reason="DATASET_NOT_FOUND")
    if args:
        raise InvalidArgumentError(
            f"{name} is not a generator",
            violations=[FieldViolation(f"{field}.generator_args", "only for datasets/synthetic")],
        )
    return _load_bundled(name)


def builtin_schema(
    name: str,
    generator_args: struct_pb2.Struct | Mapping[str, Any] | None = None,
    *,
    field: str = "spec.data",
) -> DatasetSchema:
    """The schema :func:`load_builtin` would give, without generating data."""
    args = arguments.to_mapping(generator_args)
    if name != SYNTHETIC:
        return load_builtin(name, args, field=field).schema
    kwargs = synthetic_arguments(args, f"{field}.generator_args")
    return DatasetSchema(
        example_shape=(kwargs["num_features"],),
        num_classes=kwargs["num_classes"],
        modality=pb.DATA_MODALITY_TABULAR,
        num_examples=kwargs["num_samples"],
    )


def load_training_data(
    spec: pb.DatasetSpec,
    *,
    load_uploaded: Callable[[str], LoadedDataset] | None = None,
    field: str = "spec.data",
) -> LoadedDataset:
    """The exact data a job trains on: ``spec.dataset`` (built-in, generated with
    ``spec.generator_args``, or uploaded) with ``spec.additional_datasets``
    appended. ``load_uploaded`` resolves names outside the built-in catalog;
    without it, or when it raises NotFoundError, such a name is NOT_FOUND.
    """

    def load(name: str, args: struct_pb2.Struct | None) -> LoadedDataset:
        if is_builtin(name):
            return load_builtin(name, args, field=field)
        if load_uploaded is None:
            raise NotFoundError(f"dataset {name!r} does not exist", reason="DATASET_NOT_FOUND")
        return load_uploaded(name)

    primary = load(spec.dataset, spec.generator_args)
    extras = [load(name, None) for name in spec.additional_datasets]
    return concatenate(primary, extras, field=f"{field}.additional_datasets")


@functools.cache
def _load_bundled(name: str) -> LoadedDataset:
    # scikit-learn reads these from files inside its own package: no download.
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == BREAST_CANCER:
        bunch = load_breast_cancer()
        return LoadedDataset.create(
            name=name,
            features=bunch.data,
            labels=bunch.target,
            feature_names=[str(n) for n in bunch.feature_names],
            class_names=[str(n) for n in bunch.target_names],
            modality=pb.DATA_MODALITY_TABULAR,
            source=pb.DATASET_SOURCE_BUILTIN,
        )
    bunch = load_digits()
    images = np.asarray(bunch.images)
    return LoadedDataset.create(
        name=name,
        features=images.reshape(len(images), 1, *images.shape[1:]),
        labels=bunch.target,
        feature_names=[],
        class_names=[str(n) for n in bunch.target_names],
        modality=pb.DATA_MODALITY_IMAGE,
        source=pb.DATASET_SOURCE_BUILTIN,
    )


_DESCRIPTIONS = {
    BREAST_CANCER: (
        "Breast cancer (Wisconsin)",
        "scikit-learn's bundled Wisconsin diagnostic breast-cancer set: 569 rows of "
        "30 numeric features computed from images of cell nuclei; binary.",
    ),
    DIGITS: (
        "Handwritten digits (8x8)",
        "scikit-learn's bundled optical-recognition digits: 1,797 8x8 grey images "
        "with pixel values 0-16, as 1x8x8 tensors; 10 classes.",
    ),
    SYNTHETIC: (
        "Synthetic tabular generator",
        "Seeded Gaussian-cluster classification data of any size. Arguments: "
        "num_samples, num_features, num_informative, num_classes, class_sep, noise "
        "(label noise fraction), seed, shift (mean shift in standard deviations, one "
        "number or one per feature) and scale (spread factor) for drift scenarios.",
    ),
}


def _describe_builtin(name: str) -> pb.Dataset:
    described = load_builtin(name).describe()
    display_name, description = _DESCRIPTIONS[name]
    described.display_name = display_name
    described.description = description
    if name == SYNTHETIC:
        described.generator_args.CopyFrom(arguments.to_struct(SYNTHETIC_DEFAULTS))
    return described
