"""The model an optimisation starts from, and the data it is judged on.

A source is a registry version: a PyTorch state dict (rebuilt from its
architecture spec and signature, never unpickled) or an ONNX file. Its data is
the dataset named in its lineage, split again exactly as the trainer split it
(the split seed, fractions and stratification recorded in its
hyperparameters), and checked against the digest in its lineage, so that the
test split the optimiser evaluates on is the one the trainer held out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer.architectures import Classifier
from conveyor.services.trainer.datasets import load_training_data
from conveyor.services.trainer.loaded import LoadedDataset
from conveyor.services.trainer.splits import DatasetSplits, split_dataset
from conveyor.services.trainer.weights import load_model
from conveyor.shared.errors import FailedPreconditionError
from conveyor.trainer.v1 import resources_pb2 as trainer_pb

ONNX_FORMATS = frozenset(
    {
        registry_pb.MODEL_FORMAT_ONNX_FP32,
        registry_pb.MODEL_FORMAT_ONNX_FP16,
        registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC,
        registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC,
    }
)


@dataclass(frozen=True)
class SourceModel:
    """A registered version and its artifact's bytes."""

    version: registry_pb.ModelVersion
    artifact: bytes

    @property
    def is_pytorch(self) -> bool:
        return self.version.format == registry_pb.MODEL_FORMAT_TORCH_STATE_DICT

    @property
    def is_onnx(self) -> bool:
        return self.version.format in ONNX_FORMATS

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, without the batch dimension."""
        inputs = self.version.signature.inputs
        if not inputs:
            raise FailedPreconditionError(
                f"{self.version.name} has no input signature", reason="SIGNATURE_MISSING"
            )
        return tuple(int(d) for d in inputs[0].shape[1:])

    @property
    def num_classes(self) -> int:
        outputs = self.version.signature.outputs
        if not outputs or not outputs[0].shape:
            raise FailedPreconditionError(
                f"{self.version.name} has no output signature", reason="SIGNATURE_MISSING"
            )
        return int(outputs[0].shape[-1])

    def pytorch_model(self) -> Classifier:
        """The PyTorch classifier (logits), rebuilt and loaded, in eval mode."""
        if not self.is_pytorch:
            raise FailedPreconditionError(
                f"{self.version.name} is {_format_name(self.version.format)}, not a PyTorch "
                "state dict: this step works on PyTorch models only",
                reason="PYTORCH_SOURCE_REQUIRED",
                metadata={"model_version": self.version.name},
            )
        model = load_model(
            self.artifact, self.version.architecture, self.input_shape, self.num_classes
        )
        assert isinstance(model, Classifier)  # without probabilities=True
        return model


def data_spec(version: registry_pb.ModelVersion, dataset: str = "") -> trainer_pb.DatasetSpec:
    """How the trainer drew the version's data: its lineage's dataset (or
    ``dataset``) with the split recorded in its hyperparameters."""
    recorded: dict[str, Any] = json_format.MessageToDict(version.hyperparameters)
    name = dataset or version.lineage.dataset
    if not name:
        raise FailedPreconditionError(
            f"{version.name} names no dataset in its lineage; name one in the job's `dataset`",
            reason="DATASET_REQUIRED",
            metadata={"model_version": version.name},
        )
    spec = trainer_pb.DatasetSpec(
        dataset=name,
        split_seed=int(recorded.get("split_seed", 0)),
        train_fraction=float(recorded.get("train_fraction", 0.0)),
        validation_fraction=float(recorded.get("validation_fraction", 0.0)),
        test_fraction=float(recorded.get("test_fraction", 0.0)),
        stratify=bool(recorded.get("stratify", False)),
        additional_datasets=list(recorded.get("additional_datasets", [])),
    )
    generator_args = recorded.get("generator_args")
    if isinstance(generator_args, dict) and not dataset:
        spec.generator_args.CopyFrom(_struct(generator_args))
    return spec


def load_splits(
    version: registry_pb.ModelVersion,
    *,
    dataset: str = "",
    load_uploaded: Callable[[str], LoadedDataset] | None = None,
) -> DatasetSplits:
    """The version's train/validation/test splits. FAILED_PRECONDITION
    (``DATASET_CHANGED``) when the data is not the data it was trained on."""
    spec = data_spec(version, dataset)
    loaded = load_training_data(spec, load_uploaded=load_uploaded, field="dataset")
    expected = version.lineage.dataset_digest
    if expected and not dataset and loaded.digest != expected:
        raise FailedPreconditionError(
            f"{spec.dataset} is not the data {version.name} was trained on (digest "
            f"{loaded.digest} vs {expected} in its lineage)",
            reason="DATASET_CHANGED",
            metadata={"dataset": spec.dataset, "model_version": version.name},
        )
    return split_dataset(loaded, spec, field="dataset")


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _format_name(model_format: registry_pb.ModelFormat.ValueType) -> str:
    return registry_pb.ModelFormat.Name(model_format).removeprefix("MODEL_FORMAT_")
