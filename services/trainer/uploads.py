"""Parsing uploaded datasets (NPZ, CSV, Parquet) into a :class:`LoadedDataset`.

The rules, for every format:

- Features are numeric (integers, floats or booleans) and finite: a missing
  value, a NaN, an infinity or a text column is refused.
- Labels are class labels: integers or text, never missing. When
  ``class_names`` is given, integer labels index it and text labels must be
  among it; otherwise the classes are the distinct labels in sorted order
  (named by their decimal or text form). At least two classes.
- ``modality`` and ``task`` are inferred when unset, and checked when set.

Violations name the ``CreateDatasetMetadata`` fields
(``metadata.dataset.label_column``) or, for bytes that do not parse, ``chunk``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.shared.errors import FieldViolation, InvalidArgumentError
from conveyor.trainer.v1 import resources_pb2 as pb

DEFAULT_MAX_ARRAY_BYTES = 4 << 30
"""The most bytes an NPZ array may expand to (its compressed size can be far less)."""

MAX_NAME_LENGTH = 256

_MALFORMED = "DATASET_MALFORMED"


def load_uploaded(
    data: bytes,
    metadata: pb.Dataset,
    *,
    name: str,
    field: str = "metadata.dataset",
    content_field: str = "chunk",
    max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
) -> LoadedDataset:
    """Parse ``data`` in ``metadata.format`` into a dataset called ``name``.

    ``metadata`` supplies ``format``, ``label_column`` (CSV, Parquet) and the
    optional ``feature_names``, ``class_names``, ``modality`` and ``task``.
    Raises InvalidArgumentError naming the bad metadata field, or
    ``content_field`` (reason ``DATASET_MALFORMED``) for bytes that do not parse.
    """
    if metadata.format == pb.DATASET_FORMAT_NPZ:
        if metadata.label_column:
            _invalid(f"{field}.label_column", "NPZ files hold labels in the array `y`")
        features, labels = _read_npz(data, content_field, max_array_bytes)
        feature_names: Sequence[str] = metadata.feature_names
    elif metadata.format in (pb.DATASET_FORMAT_CSV, pb.DATASET_FORMAT_PARQUET):
        if not metadata.label_column:
            _invalid(f"{field}.label_column", "required for CSV and Parquet")
        if metadata.feature_names:
            _invalid(f"{field}.feature_names", "CSV and Parquet name features by column")
        features, labels, feature_names = _read_table(
            data, metadata.format, metadata.label_column, field, content_field
        )
    else:
        _invalid(f"{field}.format", "NPZ, CSV or PARQUET is required")
    features, modality = _shape_features(features, metadata.modality, field, content_field)
    if modality == pb.DATA_MODALITY_TABULAR:
        feature_names = _feature_names(feature_names, features.shape[1], field)
    elif feature_names:
        _invalid(f"{field}.feature_names", "images have no feature names")
    indices, class_names = _classes(labels, tuple(metadata.class_names), field, content_field)
    _check_task(metadata.task, len(class_names), field)
    return LoadedDataset.create(
        name=name,
        features=features,
        labels=indices,
        feature_names=feature_names,
        class_names=class_names,
        modality=modality,
        source=pb.DATASET_SOURCE_UPLOADED,
    )


def _read_npz(
    data: bytes, content_field: str, max_array_bytes: int
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                _malformed(content_field, f"the NPZ file lacks arrays {sorted(missing)}")
            for key in ("x", "y"):
                # The uncompressed size, read before the array is inflated.
                if archive.zip.getinfo(f"{key}.npy").file_size > max_array_bytes:
                    _malformed(content_field, f"array {key} is over {max_array_bytes} bytes")
            features = archive["x"]
            labels = archive["y"]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
        _malformed(content_field, f"not a readable NPZ file ({type(error).__name__})")
    if features.dtype.kind not in "biuf":
        _malformed(content_field, f"x must be numeric, not {features.dtype}")
    if labels.ndim != 1 or labels.dtype.kind not in "biufUS":
        _malformed(content_field, "y must be a 1-D array of integer or text labels")
    if labels.dtype.kind == "S":
        labels = labels.astype(str)
    if len(features) != len(labels) or len(labels) == 0:
        _malformed(content_field, f"x has {len(features)} rows and y {len(labels)}; both > 0")
    return features, labels


def _read_table(
    data: bytes,
    file_format: pb.DatasetFormat.ValueType,
    label_column: str,
    field: str,
    content_field: str,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], list[str]]:
    import pandas as pd
    import pyarrow as pa

    try:
        if file_format == pb.DATASET_FORMAT_CSV:
            frame = pd.read_csv(io.BytesIO(data))
        else:
            frame = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
    except (ValueError, OSError, UnicodeDecodeError, pa.ArrowException) as error:
        kind = "CSV" if file_format == pb.DATASET_FORMAT_CSV else "Parquet"
        _malformed(content_field, f"not a readable {kind} file ({type(error).__name__})")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        _malformed(content_field, "column names must be distinct")
    if label_column not in columns:
        _invalid(f"{field}.label_column", f"no column {label_column!r} in the file")
    if len(frame) == 0 or len(columns) < 2:
        _malformed(content_field, "the file needs at least one row and one feature column")
    frame.columns = columns
    label_series = frame[label_column]
    if label_series.isna().any():
        _malformed(content_field, f"label column {label_column!r} has missing values")
    feature_frame = frame.drop(columns=[label_column])
    bad = [
        c
        for c in feature_frame.columns
        if not (
            pd.api.types.is_numeric_dtype(feature_frame[c])
            or pd.api.types.is_bool_dtype(feature_frame[c])
        )
    ]
    if bad:
        _malformed(content_field, f"non-numeric feature columns: {', '.join(bad[:5])}")
    features = np.asarray(feature_frame.to_numpy(dtype=np.float64, na_value=np.nan))
    labels = label_series.to_numpy()
    if labels.dtype.kind == "O":
        labels = labels.astype(str)
    return features, labels, list(feature_frame.columns)


def _shape_features(
    features: npt.NDArray[Any],
    modality: pb.DataModality.ValueType,
    field: str,
    content_field: str,
) -> tuple[npt.NDArray[np.float64], pb.DataModality.ValueType]:
    values = features.astype(np.float64)
    if not np.isfinite(values).all():
        _malformed(content_field, "features must be finite numbers (no missing values, NaN or inf)")
    inferred = pb.DATA_MODALITY_TABULAR if values.ndim == 2 else pb.DATA_MODALITY_IMAGE
    if values.ndim not in (2, 3, 4) or (values.ndim == 4 and not 1 <= values.shape[1] <= 4):
        _malformed(
            content_field, "features are N x F, N x H x W or N x C x H x W with 1-4 channels"
        )
    if modality not in (pb.DATA_MODALITY_UNSPECIFIED, inferred):
        _invalid(f"{field}.modality", f"the data is {pb.DataModality.Name(inferred)}")
    if values.ndim == 3:
        values = values[:, np.newaxis]
    if 0 in values.shape:
        _malformed(content_field, "features must not be empty")
    return values, inferred


def _feature_names(names: Sequence[str], count: int, field: str) -> list[str]:
    if not names:
        return [f"feature_{i}" for i in range(count)]
    if len(names) != count:
        _invalid(f"{field}.feature_names", f"{count} names are needed, one per column")
    if len(set(names)) != len(names) or any(not n or len(n) > MAX_NAME_LENGTH for n in names):
        _invalid(f"{field}.feature_names", f"distinct, 1-{MAX_NAME_LENGTH} characters each")
    return list(names)


def _classes(
    labels: npt.NDArray[Any], class_names: tuple[str, ...], field: str, content_field: str
) -> tuple[npt.NDArray[np.int64], tuple[str, ...]]:
    if any(not n or len(n) > MAX_NAME_LENGTH for n in class_names) or len(set(class_names)) != len(
        class_names
    ):
        _invalid(f"{field}.class_names", f"distinct, 1-{MAX_NAME_LENGTH} characters each")
    if labels.dtype.kind in "biuf":
        numbers = labels.astype(np.float64)
        if not np.isfinite(numbers).all() or not np.all(numbers == np.round(numbers)):
            _malformed(content_field, "labels must be integers or text (no NaN)")
        integers = numbers.astype(np.int64)
        if class_names:
            if integers.min() < 0 or integers.max() >= len(class_names):
                _invalid(
                    f"{field}.class_names",
                    f"integer labels must index the {len(class_names)} class names",
                )
            return integers, class_names
        distinct, indices = np.unique(integers, return_inverse=True)
        names = tuple(str(int(v)) for v in distinct)
    else:
        text = labels.astype(str)
        if class_names:
            lookup = {n: i for i, n in enumerate(class_names)}
            unknown = sorted(set(text.tolist()) - set(lookup))
            if unknown:
                _invalid(f"{field}.class_names", f"labels not among them: {unknown[:5]}")
            return np.array([lookup[t] for t in text.tolist()], dtype=np.int64), class_names
        distinct, indices = np.unique(text, return_inverse=True)
        names = tuple(str(v) for v in distinct)
    if len(names) < 2:
        _malformed(content_field, "the labels hold fewer than two classes")
    if any(len(n) > MAX_NAME_LENGTH for n in names):
        _malformed(content_field, f"labels are at most {MAX_NAME_LENGTH} characters")
    return indices.astype(np.int64), names


def _check_task(task: registry_pb.TaskType.ValueType, num_classes: int, field: str) -> None:
    if task == registry_pb.TASK_TYPE_UNSPECIFIED:
        return
    if task == registry_pb.TASK_TYPE_REGRESSION:
        _invalid(f"{field}.task", "the trainer trains classifiers")
    binary = task == registry_pb.TASK_TYPE_BINARY_CLASSIFICATION
    if binary != (num_classes == 2):
        _invalid(f"{field}.task", f"the labels hold {num_classes} classes")


def _invalid(field: str, description: str) -> NoReturn:
    raise InvalidArgumentError(
        f"invalid dataset: {field}: {description}",
        violations=[FieldViolation(field, description)],
    )


def _malformed(field: str, description: str) -> NoReturn:
    raise InvalidArgumentError(
        f"malformed dataset: {description}",
        violations=[FieldViolation(field, description)],
        reason=_MALFORMED,
    )
