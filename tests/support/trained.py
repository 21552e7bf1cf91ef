"""Trained models as the registry would hold them: the breast-cancer MLP and
the digits small CNN, trained here on the CPU by the trainer's own library,
with the registry version its worker would register. Each is trained once
per test session, whichever tests ask first."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from conveyor.services.optimizer.source import SourceModel
from conveyor.services.trainer import datasets
from conveyor.services.trainer.evaluation import evaluate
from conveyor.services.trainer.training import train, training_result
from conveyor.services.trainer.weights import export_weights
from conveyor.services.trainer.worker import model_version
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import make_spec


@dataclass(frozen=True)
class Trained:
    """A trained model: its registry version (with artifact) and test accuracy."""

    source: SourceModel
    test_accuracy: float


def trained(spec: pb.TrainingJobSpec, version_id: int) -> Trained:
    spec.compute.device = pb.DEVICE_CPU
    dataset = datasets.load_training_data(spec.data)
    outcome = train(spec, dataset)
    test = evaluate(outcome.model, outcome.splits.test, dataset.class_names)
    result = training_result(outcome, test)
    job = pb.TrainingJob(name=f"trainingJobs/t{version_id}", spec=spec, created_by="user:alice")
    version = model_version(job, dataset, outcome, result)
    model = spec.architecture.name.replace("_", "-")
    version.name = f"models/{model}/versions/{version_id}"
    return Trained(SourceModel(version, export_weights(outcome.model)), test.metrics["accuracy"])


@functools.cache
def breast_cancer_mlp() -> Trained:
    """The breast-cancer MLP (about 97% test accuracy)."""
    spec = make_spec(
        "datasets/breast-cancer",
        "mlp",
        {"hidden_sizes": [32, 16]},
        epochs=30,
        learning_rate=1e-3,
        seed=1,
        split_seed=7,
    )
    return trained(spec, 1)


@functools.cache
def digits_cnn() -> Trained:
    """The digits small CNN (about 97% test accuracy)."""
    spec = make_spec(
        "datasets/digits", "small_cnn", {"channels": [16, 32]}, epochs=8, seed=2, split_seed=3
    )
    return trained(spec, 2)
