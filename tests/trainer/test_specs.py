"""Spec validation: every bad value is INVALID_ARGUMENT naming its field path."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from conveyor.services.trainer import datasets
from conveyor.services.trainer.datasets import DatasetSchema
from conveyor.services.trainer.specs import spec_fingerprint, validate_training_spec
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import make_spec, violation_fields

TABULAR = DatasetSchema(
    example_shape=(30,), num_classes=2, modality=pb.DATA_MODALITY_TABULAR, num_examples=569
)
IMAGES = DatasetSchema(
    example_shape=(1, 8, 8), num_classes=10, modality=pb.DATA_MODALITY_IMAGE, num_examples=1797
)


def _invalid(spec: pb.TrainingJobSpec, schema: DatasetSchema = TABULAR) -> set[str]:
    with pytest.raises(InvalidArgumentError) as caught:
        validate_training_spec(spec, schema, cuda_available=False)
    return violation_fields(caught.value)


def test_a_valid_spec_resolves_its_defaults() -> None:
    resolved = validate_training_spec(
        make_spec(datasets.BREAST_CANCER), TABULAR, cuda_available=False
    )
    assert resolved.optimizer == pb.OPTIMIZER_ALGORITHM_ADAM
    assert resolved.device == pb.DEVICE_CPU
    assert resolved.mixed_precision is False
    assert resolved.world_size == 1
    assert resolved.backend == pb.DISTRIBUTED_BACKEND_GLOO
    assert resolved.augmentation is None
    assert resolved.early_stopping is None
    assert resolved.architecture.args["in_features"] == 30
    on_gpu = validate_training_spec(make_spec(datasets.BREAST_CANCER), TABULAR, cuda_available=True)
    assert on_gpu.device == pb.DEVICE_CUDA
    assert on_gpu.mixed_precision is True
    assert on_gpu.backend == pb.DISTRIBUTED_BACKEND_NCCL


def test_every_bad_hyperparameter_is_reported_at_once() -> None:
    spec = make_spec(
        datasets.BREAST_CANCER,
        epochs=0,
        batch_size=100_000,
        learning_rate=-1.0,
        momentum=0.5,
        weight_decay=float("inf"),
        dropout=1.0,
        optimizer=7,
    )
    assert _invalid(spec) == {
        "spec.hyperparameters.epochs",
        "spec.hyperparameters.batch_size",
        "spec.hyperparameters.learning_rate",
        "spec.hyperparameters.momentum",
        "spec.hyperparameters.weight_decay",
        "spec.hyperparameters.dropout",
        "spec.hyperparameters.optimizer",
    }


def test_momentum_is_for_sgd_and_dropout_for_layers_that_have_it() -> None:
    assert _invalid(make_spec(datasets.BREAST_CANCER, momentum=0.9)) == {
        "spec.hyperparameters.momentum"
    }
    validate_training_spec(
        make_spec(datasets.BREAST_CANCER, momentum=0.9, optimizer=pb.OPTIMIZER_ALGORITHM_SGD),
        TABULAR,
        cuda_available=False,
    )
    assert _invalid(make_spec(datasets.BREAST_CANCER, "logistic", dropout=0.2)) == {
        "spec.hyperparameters.dropout"
    }
    assert _invalid(make_spec(datasets.BREAST_CANCER, learning_rate=11.0)) == {
        "spec.hyperparameters.learning_rate"
    }


def test_required_parts() -> None:
    assert _invalid(pb.TrainingJobSpec()) == {
        "spec.data.dataset",
        "spec.architecture.name",
        "spec.hyperparameters",
        "spec.hyperparameters.epochs",
        "spec.hyperparameters.batch_size",
        "spec.hyperparameters.learning_rate",
    }


def test_data_spec_paths() -> None:
    spec = make_spec("breast-cancer")
    spec.data.additional_datasets.append("datasets/Bad_Name")
    spec.data.validation_fraction = 0.5
    spec.data.generator_args.update({"seed": 1})
    assert _invalid(spec) == {
        "spec.data.dataset",
        "spec.data.generator_args",
        "spec.data.additional_datasets[0]",
        "spec.data.validation_fraction",
    }


def test_architecture_paths_are_nested_under_spec() -> None:
    spec = make_spec(datasets.BREAST_CANCER, "mlp", {"hidden_sizes": [], "width": 3})
    assert _invalid(spec) == {
        "spec.architecture.args.hidden_sizes",
        "spec.architecture.args.width",
    }
    assert _invalid(make_spec(datasets.BREAST_CANCER, "resnet18")) == {"spec.architecture.name"}


def test_early_stopping_rules() -> None:
    rule = pb.EarlyStoppingSpec(metric="roc_auc", patience=0, min_delta=-1.0, goal=9)
    assert _invalid(make_spec(datasets.DIGITS, "small_cnn", early_stopping=rule), IMAGES) == {
        "spec.hyperparameters.early_stopping.metric",
        "spec.hyperparameters.early_stopping.patience",
        "spec.hyperparameters.early_stopping.min_delta",
        "spec.hyperparameters.early_stopping.goal",
    }
    loss = validate_training_spec(
        make_spec(
            datasets.BREAST_CANCER,
            early_stopping=pb.EarlyStoppingSpec(metric="log_loss", patience=2),
        ),
        TABULAR,
        cuda_available=False,
    ).early_stopping
    assert loss is not None
    assert loss.maximize is False
    auc = validate_training_spec(
        make_spec(
            datasets.BREAST_CANCER,
            early_stopping=pb.EarlyStoppingSpec(metric="roc_auc", patience=2),
        ),
        TABULAR,
        cuda_available=False,
    ).early_stopping
    assert auc is not None
    assert auc.maximize is True


def test_augmentation_is_for_images_and_bounded() -> None:
    tabular = make_spec(
        datasets.BREAST_CANCER, augmentation=pb.AugmentationSpec(horizontal_flip=True)
    )
    assert _invalid(tabular) == {"spec.hyperparameters.augmentation"}
    bad = pb.AugmentationSpec(
        random_crop_padding=20, rotation_degrees=200.0, gaussian_noise_std=-1.0
    )
    assert _invalid(make_spec(datasets.DIGITS, "small_cnn", augmentation=bad), IMAGES) == {
        "spec.hyperparameters.augmentation.random_crop_padding",
        "spec.hyperparameters.augmentation.rotation_degrees",
        "spec.hyperparameters.augmentation.gaussian_noise_std",
    }


def test_compute_rules() -> None:
    spec = make_spec(datasets.BREAST_CANCER, batch_size=30)
    spec.compute.mixed_precision = True
    spec.compute.distributed.world_size = 4
    spec.compute.distributed.backend = pb.DISTRIBUTED_BACKEND_NCCL
    assert _invalid(spec) == {
        "spec.compute.mixed_precision",
        "spec.compute.distributed.world_size",
        "spec.compute.distributed.backend",
    }
    spec = make_spec(datasets.BREAST_CANCER)
    spec.compute.distributed.world_size = 65
    spec.max_run_duration.CopyFrom(duration_pb2.Duration(seconds=-1))
    spec.registration.model = "fraud"
    assert _invalid(spec) == {
        "spec.compute.distributed.world_size",
        "spec.max_run_duration",
        "spec.registration.model",
    }


def test_cuda_without_a_gpu_is_a_failed_precondition() -> None:
    spec = make_spec(datasets.BREAST_CANCER)
    spec.compute.device = pb.DEVICE_CUDA
    with pytest.raises(FailedPreconditionError) as caught:
        validate_training_spec(spec, TABULAR, cuda_available=False)
    assert caught.value.reason == "NO_GPU"
    resolved = validate_training_spec(spec, TABULAR, cuda_available=True)
    assert resolved.device == pb.DEVICE_CUDA


def test_fingerprint_follows_what_shapes_the_weights() -> None:
    spec = make_spec(datasets.BREAST_CANCER)
    same = make_spec(datasets.BREAST_CANCER)
    same.registration.model = "models/fraud"
    same.max_run_duration.seconds = 60
    other_seed = make_spec(datasets.BREAST_CANCER, seed=1)
    assert spec_fingerprint(spec) == spec_fingerprint(same)
    assert spec_fingerprint(spec) != spec_fingerprint(other_seed)
