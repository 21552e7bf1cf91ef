"""The built-in catalog, the synthetic generator and dataset digests."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import datasets
from conveyor.services.trainer.datasets import LoadedDataset, dataset_digest
from conveyor.shared.errors import InvalidArgumentError, NotFoundError
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import violation_fields


def _tiny(**overrides: object) -> LoadedDataset:
    fields: dict[str, object] = {
        "name": "datasets/tiny",
        "features": [[0.0, 1.5], [2.0, -3.25], [4.0, 5.0]],
        "labels": [0, 1, 1],
        "feature_names": ["a", "b"],
        "class_names": ["no", "yes"],
        "modality": pb.DATA_MODALITY_TABULAR,
        "source": pb.DATASET_SOURCE_UPLOADED,
    }
    fields.update(overrides)
    return LoadedDataset.create(**fields)  # type: ignore[arg-type]


def test_breast_cancer_is_tabular_binary_with_named_features() -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    assert data.features.shape == (569, 30)
    assert data.features.dtype == np.float32
    assert data.labels.dtype == np.int64
    assert data.class_names == ("malignant", "benign")
    assert data.feature_names[0] == "mean radius"
    assert data.modality == pb.DATA_MODALITY_TABULAR
    assert data.schema.task == registry_pb.TASK_TYPE_BINARY_CLASSIFICATION
    assert data.digest.startswith("sha256:")
    assert len(data.digest) == len("sha256:") + 64


def test_digits_are_one_channel_8x8_images_of_ten_classes() -> None:
    data = datasets.load_builtin(datasets.DIGITS)
    assert data.features.shape == (1797, 1, 8, 8)
    assert data.example_shape == (1, 8, 8)
    assert data.feature_names == ()
    assert data.class_names == tuple(str(d) for d in range(10))
    assert data.modality == pb.DATA_MODALITY_IMAGE
    assert float(data.features.max()) == 16.0
    assert data.schema.task == registry_pb.TASK_TYPE_MULTICLASS_CLASSIFICATION


def test_arrays_are_read_only() -> None:
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    with pytest.raises(ValueError, match="read-only"):
        data.features[0, 0] = 1.0


def test_catalog_describes_every_builtin() -> None:
    catalog = {d.name: d for d in datasets.builtin_datasets()}
    assert set(catalog) == set(datasets.BUILTIN_NAMES)
    cancer = catalog[datasets.BREAST_CANCER]
    assert cancer.source == pb.DATASET_SOURCE_BUILTIN
    assert list(cancer.example_shape) == [30]
    assert cancer.example_count == 569
    assert cancer.digest == datasets.load_builtin(datasets.BREAST_CANCER).digest
    assert list(catalog[datasets.DIGITS].example_shape) == [1, 8, 8]
    synthetic = catalog[datasets.SYNTHETIC]
    assert synthetic.source == pb.DATASET_SOURCE_GENERATOR
    assert set(synthetic.generator_args.fields) == set(datasets.SYNTHETIC_DEFAULTS)
    assert synthetic.example_count == datasets.SYNTHETIC_DEFAULTS["num_samples"]


def test_unknown_builtin_is_not_found_and_non_generators_take_no_arguments() -> None:
    with pytest.raises(NotFoundError):
        datasets.load_builtin("datasets/iris")
    with pytest.raises(InvalidArgumentError) as caught:
        datasets.load_builtin(datasets.DIGITS, {"seed": 1})
    assert violation_fields(caught.value) == {"spec.data.generator_args"}


def test_digest_follows_the_documented_serialization() -> None:
    header = (
        b'{"class_names":["no","yes"],"feature_names":["a","b"],'
        b'"features":{"dtype":"<f4","shape":[3,2]},"format":"conveyor.dataset/1",'
        b'"labels":{"dtype":"<i8","shape":[3]}}'
    )
    features = np.array([[0.0, 1.5], [2.0, -3.25], [4.0, 5.0]], dtype="<f4").tobytes()
    labels = np.array([0, 1, 1], dtype="<i8").tobytes()
    hashed = len(header).to_bytes(8, "little") + header + features + labels
    assert _tiny().digest == f"sha256:{hashlib.sha256(hashed).hexdigest()}"
    # Pinned: a change here changes every recorded lineage (bump DIGEST_FORMAT).
    assert _tiny().digest == (
        "sha256:7abf7555ad9e76db6b3512ff57428cd547c32c3f2e1d276865075088b47d4724"
    )


def test_digest_is_stable_across_processes() -> None:
    script = (
        "from conveyor.services.trainer import datasets as d;"
        "print(d.load_builtin(d.BREAST_CANCER).digest);"
        "print(d.generate_synthetic(num_samples=500, seed=3).digest)"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert output == [
        datasets.load_builtin(datasets.BREAST_CANCER).digest,
        datasets.generate_synthetic(num_samples=500, seed=3).digest,
    ]


@pytest.mark.parametrize(
    "change",
    [
        {"features": [[0.0, 1.5], [2.0, -3.25], [4.0, 5.5]]},
        {"labels": [0, 1, 0]},
        {"feature_names": ["a", "c"]},
        {"class_names": ["yes", "no"]},
        {
            "features": [[0.0, 1.5, 2.0], [-3.25, 4.0, 5.0]],
            "labels": [0, 1],
            "feature_names": ["a", "b", "c"],
        },
    ],
)
def test_digest_differs_for_different_data(change: dict[str, object]) -> None:
    assert _tiny(**change).digest != _tiny().digest


def test_negative_zero_hashes_like_zero() -> None:
    assert _tiny(features=[[-0.0, 1.5], [2.0, -3.25], [4.0, 5.0]]).digest == _tiny().digest


def test_digest_function_matches_dataset_digest() -> None:
    data = _tiny()
    assert dataset_digest(data.features, data.labels, ["a", "b"], ["no", "yes"]) == data.digest


def test_synthetic_is_seeded_and_sized_by_its_arguments() -> None:
    first = datasets.load_builtin(
        datasets.SYNTHETIC, {"num_samples": 600, "num_features": 12, "num_classes": 4, "seed": 9}
    )
    again = datasets.generate_synthetic(num_samples=600, num_features=12, num_classes=4, seed=9)
    other = datasets.generate_synthetic(num_samples=600, num_features=12, num_classes=4, seed=10)
    assert first.features.shape == (600, 12)
    assert first.num_classes == 4
    assert np.bincount(first.labels).tolist() == [150, 150, 150, 150]
    assert first.digest == again.digest
    assert np.array_equal(first.features, again.features)
    assert other.digest != first.digest
    assert first.source == pb.DATASET_SOURCE_GENERATOR


def test_synthetic_drift_moves_the_same_rows() -> None:
    base = datasets.generate_synthetic(num_samples=2000, num_features=5, seed=1)
    shifted = datasets.generate_synthetic(num_samples=2000, num_features=5, seed=1, shift=1.0)
    scaled = datasets.generate_synthetic(num_samples=2000, num_features=5, seed=1, scale=2.0)
    per_feature = datasets.generate_synthetic(
        num_samples=2000, num_features=5, seed=1, shift=[0.0, 0.0, 0.0, 0.0, -2.0]
    )
    std = base.features.std(axis=0)
    assert np.array_equal(shifted.labels, base.labels)
    np.testing.assert_allclose(
        shifted.features.mean(axis=0) - base.features.mean(axis=0), std, rtol=1e-4
    )
    np.testing.assert_allclose(scaled.features.std(axis=0), 2 * std, rtol=1e-4)
    moved = per_feature.features.mean(axis=0) - base.features.mean(axis=0)
    np.testing.assert_allclose(moved[:4], 0.0, atol=1e-4)
    assert moved[4] == pytest.approx(-2 * std[4], rel=1e-4)
    assert len({base.digest, shifted.digest, scaled.digest, per_feature.digest}) == 4


def test_label_noise_changes_labels_not_features() -> None:
    clean = datasets.generate_synthetic(num_samples=1000, seed=2)
    noisy = datasets.generate_synthetic(num_samples=1000, seed=2, noise=0.5)
    assert np.array_equal(clean.features, noisy.features)
    changed = float(np.mean(clean.labels != noisy.labels))
    assert 0.15 < changed < 0.35  # half relabelled, half of those to another class


def test_bad_generator_arguments_name_each_argument() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        datasets.load_builtin(
            datasets.SYNTHETIC,
            {
                "num_samples": 0,
                "num_features": 2.5,
                "num_classes": 1,
                "noise": 2.0,
                "scale": 0,
                "shift": ["x", 1.0],
                "colour": "blue",
            },
            field="spec.data",
        )
    assert violation_fields(caught.value) == {
        "spec.data.generator_args.num_samples",
        "spec.data.generator_args.num_features",
        "spec.data.generator_args.num_classes",
        "spec.data.generator_args.noise",
        "spec.data.generator_args.scale",
        "spec.data.generator_args.shift[0]",
        "spec.data.generator_args.shift",
        "spec.data.generator_args.colour",
    }


def test_generator_size_is_bounded() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        datasets.builtin_schema(
            datasets.SYNTHETIC, {"num_samples": 10_000_000, "num_features": 100}
        )
    assert violation_fields(caught.value) == {"spec.data.generator_args.num_samples"}


def test_schema_of_a_generator_needs_no_data() -> None:
    schema = datasets.builtin_schema(
        datasets.SYNTHETIC, {"num_samples": 5_000_000, "num_features": 10, "num_classes": 3}
    )
    assert schema.example_shape == (10,)
    assert schema.num_examples == 5_000_000
    assert schema.num_classes == 3


def test_concatenate_appends_rows_with_a_new_digest() -> None:
    first = datasets.generate_synthetic(num_samples=100, num_features=4, seed=1)
    second = datasets.generate_synthetic(num_samples=50, num_features=4, seed=2)
    combined = datasets.concatenate(first, [second])
    assert combined.num_examples == 150
    assert combined.name == first.name
    assert combined.digest not in (first.digest, second.digest)
    assert datasets.concatenate(first, []) is first


def test_concatenate_refuses_another_schema() -> None:
    first = datasets.generate_synthetic(num_samples=100, num_features=4, seed=1)
    wider = datasets.generate_synthetic(num_samples=100, num_features=5, seed=1)
    more_classes = datasets.generate_synthetic(num_samples=100, num_features=4, num_classes=3)
    with pytest.raises(InvalidArgumentError) as caught:
        datasets.concatenate(first, [first, wider, more_classes])
    assert violation_fields(caught.value) == {
        "spec.data.additional_datasets[1]",
        "spec.data.additional_datasets[2]",
    }


def test_training_data_joins_the_primary_and_additional_datasets() -> None:
    spec = pb.DatasetSpec(dataset=datasets.SYNTHETIC)
    spec.generator_args.update({"num_samples": 100, "num_features": 4, "seed": 1})
    spec.additional_datasets.append("datasets/recent")
    recent = datasets.generate_synthetic(num_samples=30, num_features=4, seed=8)
    loaded = datasets.load_training_data(
        spec, load_uploaded={"datasets/recent": recent}.__getitem__
    )
    assert loaded.num_examples == 130
    with pytest.raises(NotFoundError):
        datasets.load_training_data(spec)
    cancer = datasets.load_training_data(pb.DatasetSpec(dataset=datasets.BREAST_CANCER))
    assert cancer is datasets.load_builtin(datasets.BREAST_CANCER)
