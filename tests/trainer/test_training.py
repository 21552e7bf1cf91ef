"""The training loop: accuracy on the built-in sets, determinism, resume,
early stopping, cancellation, progress and checkpoints (all on the CPU)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from conveyor.services.trainer import datasets
from conveyor.services.trainer.checkpoints import load_checkpoint, remove_stale_temporaries
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.services.trainer.evaluation import evaluate, predict_probabilities
from conveyor.services.trainer.training import (
    TrainingCancelled,
    TrainingObserver,
    select_device,
    train,
    training_result,
)
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError
from conveyor.trainer.v1 import resources_pb2 as pb
from tests.trainer.conftest import make_spec

AUGMENT = pb.AugmentationSpec(
    random_crop_padding=1, horizontal_flip=True, rotation_degrees=10.0, gaussian_noise_std=0.1
)


class Recorder(TrainingObserver):
    """Keeps every event; cancels once ``cancel_at`` steps ran or an epoch ended."""

    def __init__(self, *, cancel_at_step: int = 0, cancel_after_epoch: int = 0) -> None:
        self.steps: list[pb.TrainingProgress] = []
        self.epochs: list[pb.EpochSummary] = []
        self.checkpoints: list[pb.CheckpointInfo] = []
        self.restored: list[list[pb.EpochSummary]] = []
        self.cancel_at_step = cancel_at_step
        self.cancel_after_epoch = cancel_after_epoch
        self.cancelled = False

    def on_resume(self, history: Sequence[pb.EpochSummary]) -> None:
        self.restored.append(list(history))

    def on_step(self, progress: pb.TrainingProgress) -> None:
        self.steps.append(progress)
        if progress.global_step == self.cancel_at_step:
            self.cancelled = True

    def on_epoch(self, summary: pb.EpochSummary, progress: pb.TrainingProgress) -> None:
        self.epochs.append(summary)
        if summary.epoch == self.cancel_after_epoch:
            self.cancelled = True

    def on_checkpoint(self, checkpoint: pb.CheckpointInfo) -> None:
        self.checkpoints.append(checkpoint)

    def should_cancel(self) -> bool:
        return self.cancelled


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_breast_cancer_mlp_reaches_95_percent() -> None:
    """30 epochs: seconds on this CPU (the time is a benchmark's business)."""
    data = datasets.load_builtin(datasets.BREAST_CANCER)
    spec = make_spec(
        datasets.BREAST_CANCER,
        "mlp",
        {"hidden_sizes": [32, 16]},
        epochs=30,
        batch_size=32,
        learning_rate=1e-3,
        dropout=0.1,
        seed=1,
        split_seed=7,
    )
    outcome = train(spec, data)
    test = evaluate(outcome.model, outcome.splits.test, data.class_names)
    assert test.metrics["accuracy"] >= 0.95
    assert test.metrics["roc_auc"] >= 0.98


def test_digits_cnn_reaches_95_percent() -> None:
    """12 epochs: seconds on this CPU (the time is a benchmark's business)."""
    data = datasets.load_builtin(datasets.DIGITS)
    spec = make_spec(
        datasets.DIGITS,
        "small_cnn",
        epochs=12,
        batch_size=64,
        learning_rate=2e-3,
        dropout=0.2,
        seed=1,
        split_seed=7,
    )
    outcome = train(spec, data)
    test = evaluate(outcome.model, outcome.splits.test, data.class_names)
    assert test.metrics["accuracy"] >= 0.95
    assert sum(test.confusion_matrix.counts) == len(outcome.splits.test)


def test_same_seed_gives_bit_identical_weights(small_digits: LoadedDataset) -> None:
    spec = make_spec(
        small_digits.name,
        "small_cnn",
        {"channels": [8, 16], "hidden_size": 32},
        epochs=2,
        dropout=0.3,
        seed=42,
        augmentation=AUGMENT,
    )
    first = train(spec, small_digits)
    second = train(spec, small_digits)
    assert _same_weights(first.model, second.model)
    assert [e.train_loss for e in first.history] == [e.train_loss for e in second.history]
    spec.hyperparameters.seed = 43
    assert not _same_weights(first.model, train(spec, small_digits).model)


@pytest.mark.parametrize(
    "optimizer",
    [pb.OPTIMIZER_ALGORITHM_SGD, pb.OPTIMIZER_ALGORITHM_ADAM, pb.OPTIMIZER_ALGORITHM_ADAMW],
)
def test_each_optimizer_learns(
    small_tabular: LoadedDataset, optimizer: pb.OptimizerAlgorithm.ValueType
) -> None:
    spec = make_spec(
        optimizer=optimizer,
        epochs=8,
        learning_rate=0.05 if optimizer == pb.OPTIMIZER_ALGORITHM_SGD else 5e-3,
        momentum=0.9 if optimizer == pb.OPTIMIZER_ALGORITHM_SGD else 0.0,
        weight_decay=1e-4,
    )
    outcome = train(spec, small_tabular)
    assert outcome.history[-1].train_loss < outcome.history[0].train_loss
    assert outcome.validation_metrics["accuracy"] > 0.8


def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    small_digits: LoadedDataset, tmp_path: Path
) -> None:
    spec = make_spec(
        small_digits.name,
        "small_cnn",
        {"channels": [8, 16], "hidden_size": 32},
        epochs=4,
        dropout=0.3,
        seed=5,
        augmentation=AUGMENT,
        early_stopping=pb.EarlyStoppingSpec(metric="accuracy", patience=10),
    )
    uninterrupted = train(spec, small_digits, checkpoint_path=tmp_path / "a" / "checkpoint.pt")
    # The interrupted run dies in epoch 3, after the epoch-2 checkpoint and a few steps.
    path = tmp_path / "b" / "checkpoint.pt"
    steps_per_epoch = uninterrupted.global_step // 4
    dying = Recorder(cancel_at_step=2 * steps_per_epoch + 2)
    with pytest.raises(TrainingCancelled):
        train(
            spec,
            small_digits,
            checkpoint_path=path,
            observer=dying,
            should_cancel=dying.should_cancel,
        )
    assert [c.epoch for c in dying.checkpoints] == [1, 2]
    assert dying.restored == []
    watching = Recorder()
    resumed = train(spec, small_digits, checkpoint_path=path, observer=watching)
    assert resumed.resumed_from_epoch == 2
    # The observer hears once of the epochs the checkpoint holds, then the rest.
    [restored] = watching.restored
    assert restored == dying.epochs[:2]
    assert [e.epoch for e in watching.epochs] == [3, 4]
    assert _same_weights(resumed.model, uninterrupted.model)
    assert resumed.global_step == uninterrupted.global_step
    assert [e.train_loss for e in resumed.history] == [e.train_loss for e in uninterrupted.history]
    assert resumed.best_epoch == uninterrupted.best_epoch
    # A finished run's checkpoint resumes to the same result with no more training.
    again = train(spec, small_digits, checkpoint_path=path)
    assert again.resumed_from_epoch == 4
    assert _same_weights(again.model, uninterrupted.model)


def test_a_checkpoint_of_another_spec_is_refused(
    small_tabular: LoadedDataset, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoint.pt"
    train(make_spec(epochs=1), small_tabular, checkpoint_path=path)
    with pytest.raises(FailedPreconditionError) as caught:
        train(make_spec(epochs=1, seed=9), small_tabular, checkpoint_path=path)
    assert caught.value.reason == "CHECKPOINT_MISMATCH"


def test_checkpoints_are_plain_data_written_atomically(
    small_tabular: LoadedDataset, tmp_path: Path
) -> None:
    path = tmp_path / "job" / "checkpoint.pt"
    recorder = Recorder()
    train(make_spec(epochs=2), small_tabular, checkpoint_path=path, observer=recorder)
    assert [c.epoch for c in recorder.checkpoints] == [1, 2]
    latest = recorder.checkpoints[-1]
    assert latest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert latest.size_bytes == path.stat().st_size
    assert latest.global_step == recorder.steps[-1].global_step
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
    state = load_checkpoint(path)  # weights_only=True inside
    assert state["epoch"] == 2
    assert set(state["rng"]) == {"torch", "cuda", "shuffle", "augment"}
    stale = path.parent / ".checkpoint.pt.999999999-abc.partial"
    stale.write_bytes(b"torn")
    assert remove_stale_temporaries(path.parent) == 1
    assert not stale.exists()


def test_early_stopping_stops_and_keeps_the_best_weights() -> None:
    noisy = datasets.generate_synthetic(
        num_samples=240, num_features=20, num_informative=2, class_sep=0.6, noise=0.3, seed=4
    )
    spec = make_spec(
        "mlp",
        "mlp",
        {"hidden_sizes": [256, 256]},
        epochs=80,
        batch_size=16,
        learning_rate=1e-2,
        seed=3,
        early_stopping=pb.EarlyStoppingSpec(metric="loss", patience=3),
    )
    spec.data.dataset = datasets.SYNTHETIC
    outcome = train(spec, noisy)
    losses = [e.validation_metrics["loss"] for e in outcome.history]
    assert outcome.stopped_early
    assert len(outcome.history) == outcome.best_epoch + 3 < 80
    assert losses[outcome.best_epoch - 1] == min(losses)
    assert outcome.validation_metrics == dict(
        outcome.history[outcome.best_epoch - 1].validation_metrics
    )
    kept = evaluate(outcome.model, outcome.splits.validation, noisy.class_names)
    assert kept.metrics["log_loss"] == pytest.approx(losses[outcome.best_epoch - 1], rel=1e-6)
    assert kept.metrics["log_loss"] < losses[-1]


def test_cancellation_stops_within_one_step(small_tabular: LoadedDataset) -> None:
    recorder = Recorder(cancel_at_step=3)
    with pytest.raises(TrainingCancelled) as caught:
        train(
            make_spec(epochs=5, batch_size=8),
            small_tabular,
            observer=recorder,
            should_cancel=recorder.should_cancel,
        )
    assert caught.value.global_step == 3
    assert [p.global_step for p in recorder.steps] == [1, 2, 3]
    assert recorder.epochs == []
    before_start = Recorder()
    before_start.cancelled = True
    with pytest.raises(TrainingCancelled) as caught:
        train(make_spec(), small_tabular, should_cancel=before_start.should_cancel)
    assert caught.value.global_step == 0


def test_progress_reports_steps_epochs_throughput_and_eta(small_tabular: LoadedDataset) -> None:
    recorder = Recorder()
    outcome = train(
        make_spec(epochs=2, batch_size=50, learning_rate=0.01), small_tabular, observer=recorder
    )
    steps_per_epoch = 5  # 210 training rows in batches of 50
    assert len(recorder.steps) == 2 * steps_per_epoch == outcome.global_step
    last = recorder.steps[-1]
    assert (last.epoch, last.total_epochs, last.step, last.steps_per_epoch) == (2, 2, 5, 5)
    assert last.global_step == 10
    assert last.loss > 0
    assert last.learning_rate == pytest.approx(0.01)
    assert last.samples_per_second > 0
    assert last.elapsed.ToTimedelta().total_seconds() > 0
    assert set(last.validation_metrics) >= {"loss", "accuracy", "f1"}  # from epoch 1
    assert recorder.steps[0].validation_metrics == {}
    assert all(p.samples_per_second > 0 for p in recorder.steps)
    assert all(p.eta.ToTimedelta().total_seconds() > 0 for p in recorder.steps[:-1])
    assert last.eta.ToTimedelta().total_seconds() == 0
    assert [e.epoch for e in recorder.epochs] == [1, 2]
    summary = recorder.epochs[0]
    assert set(summary.train_metrics) == {"loss", "accuracy"}
    assert set(summary.validation_metrics) == {
        "loss",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "log_loss",
    }
    assert summary.duration.ToTimedelta().total_seconds() > 0
    assert list(outcome.history) == recorder.epochs


def test_outcome_describes_environment_and_result(small_tabular: LoadedDataset) -> None:
    outcome = train(make_spec(epochs=1), small_tabular, code_revision="abc123")
    assert outcome.environment.device == "cpu"
    assert outcome.environment.world_size == 1
    assert not outcome.environment.mixed_precision
    assert outcome.environment.torch_version == torch.__version__
    assert outcome.environment.code_revision == "abc123"
    assert not outcome.model.training
    test = evaluate(outcome.model, outcome.splits.test, small_tabular.class_names)
    result = training_result(outcome, test, model_version="models/m/versions/1")
    assert result.model_version == "models/m/versions/1"
    assert dict(result.test_metrics) == test.metrics
    assert result.best_epoch == 1
    assert not result.stopped_early
    assert list(result.confusion_matrix.class_names) == list(small_tabular.class_names)
    probabilities = predict_probabilities(outcome.model, small_tabular.features[:4])
    assert probabilities.shape == (4, 3)


def test_bad_spec_fails_before_training(small_tabular: LoadedDataset) -> None:
    recorder = Recorder()
    with pytest.raises(InvalidArgumentError):
        train(make_spec(learning_rate=0.0), small_tabular, observer=recorder)
    assert recorder.steps == []
    spec = make_spec(batch_size=32)
    spec.compute.distributed.world_size = 2
    with pytest.raises(FailedPreconditionError) as caught:
        train(spec, small_tabular)
    assert caught.value.reason == "DISTRIBUTED_LAUNCH_REQUIRED"


def test_device_selection() -> None:
    assert select_device(pb.DEVICE_CPU) == torch.device("cpu")
    if torch.cuda.is_available():
        assert select_device(pb.DEVICE_AUTO).type == "cuda"
        return
    assert select_device(pb.DEVICE_AUTO) == torch.device("cpu")
    with pytest.raises(FailedPreconditionError):
        select_device(pb.DEVICE_CUDA)


def test_the_largest_seeds_are_accepted(small_tabular: LoadedDataset) -> None:
    spec = make_spec(epochs=1, seed=2**64 - 1, split_seed=2**64 - 1)
    first = train(spec, small_tabular)
    assert _same_weights(first.model, train(spec, small_tabular).model)
