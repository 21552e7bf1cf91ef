"""The in-memory form of every dataset, and its content digest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.shared.errors import FieldViolation, raise_if_any
from conveyor.trainer.v1 import resources_pb2 as pb

DIGEST_FORMAT = "conveyor.dataset/1"
"""The version of the canonical serialization :func:`dataset_digest` hashes."""

Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DatasetSchema:
    """What validation needs to know about a dataset without its data."""

    example_shape: tuple[int, ...]
    """One example's shape: ``(features,)`` for tabular, ``(C, H, W)`` for images."""
    num_classes: int
    modality: pb.DataModality.ValueType
    num_examples: int

    @property
    def task(self) -> registry_pb.TaskType.ValueType:
        """Binary for two classes, multiclass for more."""
        if self.num_classes == 2:
            return registry_pb.TASK_TYPE_BINARY_CLASSIFICATION
        return registry_pb.TASK_TYPE_MULTICLASS_CLASSIFICATION


@dataclass(frozen=True, eq=False)
class LoadedDataset:
    """A dataset in memory: read-only canonical arrays and what they mean.

    Build one with :meth:`create`, which canonicalises the arrays (float32
    features, int64 labels, C order) and computes the digest.
    """

    name: str
    """``datasets/{dataset}``."""
    features: Features
    """``N x F`` for tabular data, ``N x C x H x W`` for images."""
    labels: Labels
    """Class indices, ``0 <= label < len(class_names)``."""
    feature_names: tuple[str, ...]
    """One per feature for tabular data; empty for images."""
    class_names: tuple[str, ...]
    modality: pb.DataModality.ValueType
    source: pb.DatasetSource.ValueType
    digest: str
    """``sha256:{hex}`` of the canonical serialization (:func:`dataset_digest`)."""

    @classmethod
    def create(
        cls,
        *,
        name: str,
        features: npt.ArrayLike,
        labels: npt.ArrayLike,
        feature_names: Sequence[str],
        class_names: Sequence[str],
        modality: pb.DataModality.ValueType,
        source: pb.DatasetSource.ValueType,
    ) -> LoadedDataset:
        """Canonicalise the arrays, check their consistency, and digest them."""
        # Adding zero turns -0.0 into 0.0, so equal values always hash alike.
        x = np.ascontiguousarray(np.asarray(features, dtype=np.float32) + np.float32(0.0))
        y = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
        expected_rank = 2 if modality == pb.DATA_MODALITY_TABULAR else 4
        if x.ndim != expected_rank or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"inconsistent arrays: features {x.shape}, labels {y.shape}")
        if modality == pb.DATA_MODALITY_TABULAR and len(feature_names) != x.shape[1]:
            raise ValueError("one feature name per column is required")
        if y.min() < 0 or y.max() >= len(class_names):
            raise ValueError("labels must index class_names")
        x.setflags(write=False)
        y.setflags(write=False)
        digest = dataset_digest(x, y, feature_names, class_names)
        return cls(
            name=name,
            features=x,
            labels=y,
            feature_names=tuple(feature_names),
            class_names=tuple(class_names),
            modality=modality,
            source=source,
            digest=digest,
        )

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.features.shape[1:])

    @property
    def num_examples(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def schema(self) -> DatasetSchema:
        return DatasetSchema(
            example_shape=self.example_shape,
            num_classes=self.num_classes,
            modality=self.modality,
            num_examples=self.num_examples,
        )

    def describe(self) -> pb.Dataset:
        """The ``Dataset`` resource fields this data determines."""
        return pb.Dataset(
            name=self.name,
            source=self.source,
            modality=self.modality,
            task=self.schema.task,
            feature_names=self.feature_names,
            class_names=self.class_names,
            example_shape=self.example_shape,
            example_count=self.num_examples,
            digest=self.digest,
            size_bytes=int(self.features.nbytes + self.labels.nbytes),
        )


def dataset_digest(
    features: Features, labels: Labels, feature_names: Sequence[str], class_names: Sequence[str]
) -> str:
    """``sha256:{hex}`` over a canonical serialization of a dataset.

    The hashed bytes are: an 8-byte little-endian length, a JSON header
    (sorted keys, no spaces, UTF-8) naming :data:`DIGEST_FORMAT`, the arrays'
    dtypes and shapes, the feature names and the class names; then the
    features as little-endian float32 in C order; then the labels as
    little-endian int64. The same data gives the same digest in every run and
    on every machine; a changed value, shape, name or class gives another.
    """
    header = json.dumps(
        {
            "format": DIGEST_FORMAT,
            "features": {"dtype": "<f4", "shape": [int(d) for d in features.shape]},
            "labels": {"dtype": "<i8", "shape": [int(d) for d in labels.shape]},
            "feature_names": list(feature_names),
            "class_names": list(class_names),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    hasher = hashlib.sha256()
    hasher.update(len(header).to_bytes(8, "little"))
    hasher.update(header)
    hasher.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
    hasher.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return f"sha256:{hasher.hexdigest()}"


def concatenate(
    primary: LoadedDataset,
    others: Sequence[LoadedDataset],
    *,
    field: str = "spec.data.additional_datasets",
) -> LoadedDataset:
    """``primary`` with the rows of ``others`` appended (same schema required).

    The result keeps ``primary``'s name and gets the digest of the combined
    data. A schema mismatch is INVALID_ARGUMENT naming ``{field}[i]``.
    """
    if not others:
        return primary
    violations = []
    for index, other in enumerate(others):
        mismatch = _schema_mismatch(primary, other)
        if mismatch:
            violations.append(FieldViolation(f"{field}[{index}]", mismatch))
    raise_if_any(violations, "additional datasets do not match")
    return LoadedDataset.create(
        name=primary.name,
        features=np.concatenate([primary.features, *(o.features for o in others)]),
        labels=np.concatenate([primary.labels, *(o.labels for o in others)]),
        feature_names=primary.feature_names,
        class_names=primary.class_names,
        modality=primary.modality,
        source=primary.source,
    )


def _schema_mismatch(primary: LoadedDataset, other: LoadedDataset) -> str:
    if other.modality != primary.modality or other.example_shape != primary.example_shape:
        return f"example shape {list(other.example_shape)} != {list(primary.example_shape)}"
    if other.feature_names != primary.feature_names:
        return "different feature names"
    if other.class_names != primary.class_names:
        return "different class names"
    return ""
