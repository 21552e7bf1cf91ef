"""Uploaded datasets: NPZ, CSV and Parquet, and what malformed files get."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pytest

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer.uploads import load_uploaded
from conveyor.shared.errors import InvalidArgumentError
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import violation_fields

NAME = "datasets/mine"


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, engine="pyarrow", index=False)
    return buffer.getvalue()


def _metadata(file_format: pb.DatasetFormat.ValueType, **fields: Any) -> pb.Dataset:
    return pb.Dataset(format=file_format, **fields)


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": [31, 45, 27, 60, 38, 52],
            "income": [3.5, 7.25, 2.0, 9.5, 4.0, 6.5],
            "owner": [True, False, False, True, True, False],
            "outcome": ["stay", "churn", "stay", "churn", "stay", "stay"],
        }
    )


def _expect_invalid(
    data: bytes, metadata: pb.Dataset, fields: set[str], reason: str | None = None
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        load_uploaded(data, metadata, name=NAME)
    assert violation_fields(caught.value) == fields
    if reason is not None:
        assert caught.value.reason == reason


def test_npz_tabular_with_integer_labels() -> None:
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    y = np.array([0, 1] * 5)
    data = load_uploaded(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, feature_names=["a", "b", "c", "d"]),
        name=NAME,
    )
    assert data.name == NAME
    assert data.source == pb.DATASET_SOURCE_UPLOADED
    assert data.modality == pb.DATA_MODALITY_TABULAR
    assert data.feature_names == ("a", "b", "c", "d")
    assert data.class_names == ("0", "1")
    assert np.array_equal(data.features, x.astype(np.float32))
    assert np.array_equal(data.labels, y)


def test_npz_images_get_a_channel_axis_and_sparse_labels_are_indexed() -> None:
    images = np.random.default_rng(0).random((12, 6, 6))
    labels = np.array([3, 7, 9] * 4)
    data = load_uploaded(_npz(x=images, y=labels), _metadata(pb.DATASET_FORMAT_NPZ), name=NAME)
    assert data.modality == pb.DATA_MODALITY_IMAGE
    assert data.example_shape == (1, 6, 6)
    assert data.class_names == ("3", "7", "9")
    assert data.labels.tolist() == [0, 1, 2] * 4
    assert data.feature_names == ()
    assert data.schema.task == registry_pb.TASK_TYPE_MULTICLASS_CLASSIFICATION


def test_npz_class_names_are_indexed_by_integer_labels() -> None:
    data = load_uploaded(
        _npz(x=np.zeros((4, 3, 5, 5)), y=np.array([0, 2, 1, 2])),
        _metadata(pb.DATASET_FORMAT_NPZ, class_names=["cat", "dog", "fox"]),
        name=NAME,
    )
    assert data.example_shape == (3, 5, 5)
    assert data.class_names == ("cat", "dog", "fox")
    assert data.labels.tolist() == [0, 2, 1, 2]


def test_csv_with_text_labels_and_named_columns() -> None:
    data = load_uploaded(
        _csv(_frame()),
        _metadata(pb.DATASET_FORMAT_CSV, label_column="outcome"),
        name=NAME,
    )
    assert data.feature_names == ("age", "income", "owner")
    assert data.class_names == ("churn", "stay")
    assert data.labels.tolist() == [1, 0, 1, 0, 1, 1]
    assert data.features[1].tolist() == [45.0, 7.25, 0.0]
    assert data.schema.task == registry_pb.TASK_TYPE_BINARY_CLASSIFICATION


def test_parquet_matches_csv() -> None:
    from_csv = load_uploaded(
        _csv(_frame()), _metadata(pb.DATASET_FORMAT_CSV, label_column="outcome"), name=NAME
    )
    from_parquet = load_uploaded(
        _parquet(_frame()),
        _metadata(pb.DATASET_FORMAT_PARQUET, label_column="outcome"),
        name=NAME,
    )
    assert from_parquet.digest == from_csv.digest


def test_declared_class_names_order_text_labels() -> None:
    data = load_uploaded(
        _parquet(_frame()),
        _metadata(pb.DATASET_FORMAT_PARQUET, label_column="outcome", class_names=["stay", "churn"]),
        name=NAME,
    )
    assert data.class_names == ("stay", "churn")
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "file_format", [pb.DATASET_FORMAT_NPZ, pb.DATASET_FORMAT_CSV, pb.DATASET_FORMAT_PARQUET]
)
def test_garbage_bytes_are_malformed(file_format: pb.DatasetFormat.ValueType) -> None:
    label_column = "" if file_format == pb.DATASET_FORMAT_NPZ else "y"
    _expect_invalid(
        b"\x00\x01PK\x03\x04 not a dataset \xff\xfe",
        _metadata(file_format, label_column=label_column),
        {"chunk"},
        "DATASET_MALFORMED",
    )


def test_npz_needs_x_and_y() -> None:
    _expect_invalid(
        _npz(features=np.zeros((3, 2)), y=np.array([0, 1, 0])),
        _metadata(pb.DATASET_FORMAT_NPZ),
        {"chunk"},
        "DATASET_MALFORMED",
    )


def test_npz_refuses_pickled_objects() -> None:
    objects = np.array([{"a": 1}, {"b": 2}], dtype=object)
    _expect_invalid(
        _npz(x=objects, y=np.array([0, 1])), _metadata(pb.DATASET_FORMAT_NPZ), {"chunk"}
    )


def test_npz_arrays_are_size_checked_before_inflating() -> None:
    data = _npz(x=np.zeros((1000, 100)), y=np.zeros(1000))
    assert len(data) < 100_000  # compresses well, expands to 800 kB
    with pytest.raises(InvalidArgumentError) as caught:
        load_uploaded(data, _metadata(pb.DATASET_FORMAT_NPZ), name=NAME, max_array_bytes=100_000)
    assert "over 100000 bytes" in caught.value.message


@pytest.mark.parametrize(
    ("x", "y", "fragment"),
    [
        (np.zeros((3, 2)), np.array([0, 1]), "rows"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), "finite"),
        (np.zeros((2, 2)), np.array([0.5, 1.0]), "integers"),
        (np.zeros((2, 2)), np.array([1, 1]), "two classes"),
        (np.zeros(4), np.array([0, 1, 0, 1]), "N x F"),
    ],
)
def test_npz_bad_arrays(x: Any, y: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        load_uploaded(_npz(x=x, y=y), _metadata(pb.DATASET_FORMAT_NPZ), name=NAME)
    assert violation_fields(caught.value) == {"chunk"}
    assert fragment in caught.value.message


def test_missing_label_column() -> None:
    _expect_invalid(
        _csv(_frame()),
        _metadata(pb.DATASET_FORMAT_CSV, label_column="target"),
        {"metadata.dataset.label_column"},
    )
    _expect_invalid(
        _csv(_frame()), _metadata(pb.DATASET_FORMAT_CSV), {"metadata.dataset.label_column"}
    )


def test_text_features_are_refused() -> None:
    frame = _frame().assign(city=["a", "b", "c", "d", "e", "f"])
    with pytest.raises(InvalidArgumentError) as caught:
        load_uploaded(
            _parquet(frame),
            _metadata(pb.DATASET_FORMAT_PARQUET, label_column="outcome"),
            name=NAME,
        )
    assert "city" in caught.value.message


def test_missing_labels_and_missing_features_are_refused() -> None:
    no_label = _frame().astype({"outcome": object})
    no_label.loc[2, "outcome"] = None
    _expect_invalid(
        _csv(no_label), _metadata(pb.DATASET_FORMAT_CSV, label_column="outcome"), {"chunk"}
    )
    no_feature = _frame().astype({"income": float})
    no_feature.loc[1, "income"] = np.nan
    _expect_invalid(
        _parquet(no_feature),
        _metadata(pb.DATASET_FORMAT_PARQUET, label_column="outcome"),
        {"chunk"},
    )


def test_metadata_mismatches_name_the_metadata_field() -> None:
    x, y = np.zeros((4, 3)), np.array([0, 1, 2, 1])
    _expect_invalid(_npz(x=x, y=y), pb.Dataset(), {"metadata.dataset.format"})
    _expect_invalid(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, task=registry_pb.TASK_TYPE_BINARY_CLASSIFICATION),
        {"metadata.dataset.task"},
    )
    _expect_invalid(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, task=registry_pb.TASK_TYPE_REGRESSION),
        {"metadata.dataset.task"},
    )
    _expect_invalid(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, modality=pb.DATA_MODALITY_IMAGE),
        {"metadata.dataset.modality"},
    )
    _expect_invalid(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, feature_names=["a", "b"]),
        {"metadata.dataset.feature_names"},
    )
    _expect_invalid(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, class_names=["a", "b"]),
        {"metadata.dataset.class_names"},
    )
    _expect_invalid(
        _npz(x=x, y=y),
        _metadata(pb.DATASET_FORMAT_NPZ, label_column="y"),
        {"metadata.dataset.label_column"},
    )
    _expect_invalid(
        _csv(_frame()),
        _metadata(pb.DATASET_FORMAT_CSV, label_column="outcome", class_names=["stay"]),
        {"metadata.dataset.class_names"},
    )
