"""The training loop: seeded, checkpointed every epoch, resumable, cancellable.

:func:`train` validates a ``TrainingJobSpec`` against a dataset, splits the
data, builds the model and trains it in this process:

- **Determinism.** The seed drives weight initialisation and dropout (torch's
  global generator), shuffling and augmentation (two generators of the loop's
  own). On the CPU deterministic algorithms are enforced, so the same seed,
  data and spec give bit-identical weights. torch's global random state and
  the deterministic-algorithms switch are process-wide: run one training per
  process at a time.
- **Checkpoints.** After every epoch the model, optimiser, gradient scaler,
  every random state, the epoch, the early-stopping state, the best weights
  and the history are saved atomically; :func:`train` given an existing
  checkpoint resumes from it and ends with the same weights as a run that was
  never interrupted.
- **Cancellation.** ``should_cancel`` is asked before every step (and before
  validation); when it says so, :class:`TrainingCancelled` is raised, so at
  most the step already running completes.
- **Devices.** CUDA with automatic mixed precision (float16 with a gradient
  scaler) when the spec resolves to CUDA, the CPU otherwise.
- **Early stopping** on a validation metric keeps the best epoch's weights.
- **Distributed data parallel.** A spec with ``world_size`` W > 1 trains in W
  processes started by the launcher (:mod:`.distributed`), each calling
  :func:`train` after joining the process group; see "Distributed training"
  below.

Distributed training
--------------------
The model is wrapped in ``DistributedDataParallel`` (Gloo on the CPU, NCCL on
CUDA), and the run is built to give, up to floating-point summation order,
the weights one process would give for the same spec:

- **Global batches.** ``batch_size`` is the global batch: every rank draws
  the same seeded permutation (the shuffle generator has the same seed and
  state on every rank), cuts it into the same global batches as one process
  would, and takes its shard of each, the batch's examples ``rank``,
  ``rank + W``, ... (as ``DistributedSampler`` interleaves). Validation
  requires W to divide ``batch_size``, so a full batch gives every rank
  ``batch_size / W`` examples. Augmentation is drawn for the whole global
  batch on every rank before sharding, so it is the single-process draw and
  the generator stays identical on every rank.
- **Exact gradients, no padding.** Each rank's loss is its shard's summed
  cross-entropy times ``W / n`` for a global batch of ``n`` examples, so the
  gradient DDP averages over the ranks is the gradient of the global batch's
  mean loss, even for a trailing batch that does not divide evenly (shards
  then differ by at most one example). Nothing is padded (padding would count
  some examples twice) and nothing more is dropped than one process drops,
  except that a trailing global batch too small to give every rank an
  example (two examples with batch normalisation, which cannot train on one)
  is dropped on every rank alike; for W = 2 without batch normalisation
  that is exactly the single-process rule (a trailing batch of one is
  dropped). Every rank runs the same number of steps, so the collectives
  stay in step.
- **What still differs.** Batch normalisation (ResNet-18) normalises each
  shard by its own statistics (running statistics are rank 0's, broadcast
  by DDP before every forward pass); dropout masks are drawn per rank (the
  global generator is reseeded from the seed, the rank and the epoch at
  every epoch's start, so resume stays exact); with neither, only the order
  of floating-point sums differs from one process.
- **Metrics.** Every step's loss sum, correct count and example count are
  summed over the ranks, so progress, the epoch's train metrics and the
  divergence check (NaN loss) are global and identical on every rank.
  Validation runs on rank 0, which broadcasts the metrics and its
  early-stopping decision: every rank stops after the same epoch.
- **Checkpoints.** Only rank 0 writes them (the other ranks' ``checkpoint_path``
  is not written) and only rank 0 should be given an ``observer``. On resume
  rank 0 reads its checkpoint and broadcasts the bytes, so every rank loads
  the same state even where the others cannot see rank 0's file.
- **Cancellation.** Before every step (and before validation) the ranks
  agree whether any of them was asked to stop (one small all-reduce): a
  cancel seen by any rank stops every rank before the next step, each
  raising :class:`TrainingCancelled` with the same ``global_step``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel

from conveyor.services.trainer import distributed
from conveyor.services.trainer.architectures import Classifier, build_model
from conveyor.services.trainer.augmentation import augment_batch
from conveyor.services.trainer.checkpoints import load_checkpoint, save_checkpoint
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.services.trainer.evaluation import (
    Evaluation,
    classification_metrics,
    predict_probabilities,
)
from conveyor.services.trainer.specs import ResolvedSpec, validate_training_spec
from conveyor.services.trainer.splits import DatasetSplits, split_dataset
from conveyor.shared.errors import FailedPreconditionError
from conveyor.trainer.v1 import resources_pb2 as pb

THROUGHPUT_WINDOW = 20
"""Steps over which ``samples_per_second`` and the ETA are measured."""


class TrainingObserver:
    """Receives progress; override the methods you need (each does nothing here).

    Called on the training thread: keep them quick, and never raise.
    """

    def on_resume(self, history: Sequence[pb.EpochSummary]) -> None:
        """Once, when training goes on from a checkpoint: the epochs it holds."""

    def on_step(self, progress: pb.TrainingProgress) -> None:
        """After every optimisation step."""

    def on_epoch(self, summary: pb.EpochSummary, progress: pb.TrainingProgress) -> None:
        """After every epoch's validation, before its checkpoint."""

    def on_checkpoint(self, checkpoint: pb.CheckpointInfo) -> None:
        """After a checkpoint was saved."""


class TrainingCancelled(Exception):  # noqa: N818 - an outcome, not a failure
    """``should_cancel`` asked the loop to stop; nothing after ``global_step`` ran."""

    def __init__(self, epoch: int, global_step: int) -> None:
        super().__init__(f"training cancelled in epoch {epoch} after step {global_step}")
        self.epoch = epoch
        self.global_step = global_step


class NonFiniteLossError(FailedPreconditionError):
    """The training loss became NaN or infinite (diverged)."""

    default_reason = "NAN_LOSS"


@dataclass(frozen=True, eq=False)
class TrainingOutcome:
    """What a finished training run produced."""

    model: Classifier
    """The kept weights (the best epoch's with early stopping), in eval mode."""
    spec: ResolvedSpec
    splits: DatasetSplits
    history: tuple[pb.EpochSummary, ...]
    best_epoch: int
    stopped_early: bool
    validation_metrics: dict[str, float]
    """The kept epoch's validation metrics."""
    global_step: int
    resumed_from_epoch: int
    """The checkpoint's epoch this run started from; 0 for a fresh run."""
    environment: pb.ExecutionEnvironment
    device: torch.device


def select_device(device: pb.Device.ValueType = pb.DEVICE_AUTO) -> torch.device:
    """``cuda:{current}`` for CUDA (and AUTO with a GPU present), else the CPU.

    FAILED_PRECONDITION (reason ``NO_GPU``) when CUDA is asked for and absent.
    """
    if device == pb.DEVICE_CPU:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device == pb.DEVICE_CUDA:
        raise FailedPreconditionError("CUDA was asked for and no GPU is present", reason="NO_GPU")
    return torch.device("cpu")


def train(
    spec: pb.TrainingJobSpec,
    dataset: LoadedDataset,
    *,
    checkpoint_path: Path | None = None,
    observer: TrainingObserver | None = None,
    should_cancel: Callable[[], bool] | None = None,
    code_revision: str = "",
    clock: Callable[[], float] = time.perf_counter,
) -> TrainingOutcome:
    """Train ``spec`` on ``dataset`` (already combined with any additional data).

    With ``checkpoint_path``, a checkpoint is written there after every epoch,
    and an existing one is resumed (FAILED_PRECONDITION, reason
    ``CHECKPOINT_MISMATCH``, when it belongs to another spec or data).
    Raises InvalidArgumentError for a bad spec before any work,
    :class:`TrainingCancelled` when cancelled, :class:`NonFiniteLossError`
    when the loss diverges.

    A spec with ``world_size`` W > 1 needs this process to be one of W ranks
    of an initialised process group of the spec's backend
    (:func:`.distributed.init_from_environment`); every rank calls
    :func:`train` with the same spec and data, and rank 0's
    ``checkpoint_path`` and ``observer`` are the ones used (module docstring).
    FAILED_PRECONDITION with reason ``DISTRIBUTED_LAUNCH_REQUIRED`` when there
    is no group, ``WORLD_SIZE_MISMATCH`` or ``BACKEND_MISMATCH`` when the
    group is not the spec's.
    """
    resolved = validate_training_spec(
        spec, dataset.schema, cuda_available=torch.cuda.is_available()
    )
    group = _process_group(resolved)
    splits = split_dataset(dataset, spec.data)
    device = select_device(resolved.device)
    with _deterministic(device):
        run = _Run(
            resolved,
            splits,
            device,
            group=group,
            checkpoint_path=checkpoint_path,
            observer=observer or TrainingObserver(),
            should_cancel=should_cancel or (lambda: False),
            clock=clock,
        )
        return run.execute(code_revision or _package_version())


def _process_group(spec: ResolvedSpec) -> distributed.ProcessRank | None:
    """The group to train in: None for one process; checked against the spec."""
    group = distributed.current_group()
    size = group.world_size if group is not None else 1
    if spec.world_size == 1 and size == 1:
        return None
    if group is None:
        raise FailedPreconditionError(
            "world_size > 1 trains in processes started by the distributed launcher",
            reason=distributed.LAUNCH_REQUIRED,
        )
    if size != spec.world_size:
        raise FailedPreconditionError(
            f"the spec's world_size is {spec.world_size} and the process group has "
            f"{size} processes",
            reason="WORLD_SIZE_MISMATCH",
        )
    expected = distributed.BACKEND_NAMES[spec.backend]
    if distributed.group_backend() != expected:
        raise FailedPreconditionError(
            f"the spec's backend is {expected} and the process group's is "
            f"{distributed.group_backend()}",
            reason="BACKEND_MISMATCH",
        )
    return group


def training_result(
    outcome: TrainingOutcome, test: Evaluation, *, model_version: str = ""
) -> pb.TrainingResult:
    """The ``TrainingResult`` of a run and its test-split evaluation."""
    result = pb.TrainingResult(
        model_version=model_version,
        confusion_matrix=test.confusion_matrix,
        best_epoch=outcome.best_epoch,
        stopped_early=outcome.stopped_early,
    )
    result.test_metrics.update(test.metrics)
    result.validation_metrics.update(outcome.validation_metrics)
    return result


@dataclass
class _EarlyStoppingState:
    best_value: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped: bool = False
    best_model: dict[str, torch.Tensor] = field(default_factory=dict)


class _Run:
    """One training run's mutable state; :meth:`execute` drives it."""

    def __init__(
        self,
        spec: ResolvedSpec,
        splits: DatasetSplits,
        device: torch.device,
        *,
        group: distributed.ProcessRank | None = None,
        checkpoint_path: Path | None,
        observer: TrainingObserver,
        should_cancel: Callable[[], bool],
        clock: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.splits = splits
        self.device = device
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world_size = group.world_size if group is not None else 1
        self.checkpoint_path = checkpoint_path
        self.observer = observer
        self.should_cancel = should_cancel
        self.clock = clock
        self.amp = spec.mixed_precision and device.type == "cuda"
        self.fingerprint = f"{spec.fingerprint}:{splits.dataset.digest}"
        torch.manual_seed(spec.seed)
        self.model = build_model(spec.architecture, dropout=spec.dropout)
        self.model.fit_normalization(torch.from_numpy(np.array(splits.train.features)))
        self.model.to(device)
        has_batch_norm = any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) for module in self.model.modules()
        )
        # What a training step runs: DDP's wrapper, whose backward pass averages
        # the gradients over the ranks; the same parameters as ``self.model``.
        # Only batch norm's running statistics change during training: DDP
        # broadcasts rank 0's before every forward pass then, and never otherwise.
        self.module: nn.Module = self.model
        if group is not None:
            self.module = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=has_batch_norm,
            )
        # One process drops a trailing batch of one example; with ranks, a trailing
        # batch that cannot give every rank an example (two with batch norm) too.
        self.smallest_batch = max(2, self.world_size * (2 if has_batch_norm else 1))
        self.optimizer = _optimizer(spec, self.model)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.shuffle = torch.Generator().manual_seed(_derived_seed(spec.seed, "shuffle"))
        self.augment = torch.Generator().manual_seed(_derived_seed(spec.seed, "augment"))
        self.train_x = torch.from_numpy(np.array(splits.train.features)).to(device)
        self.train_y = torch.from_numpy(np.array(splits.train.labels)).to(device)
        self.epoch = 0
        self.global_step = 0
        self.history: list[pb.EpochSummary] = []
        self.early = _EarlyStoppingState()
        self.elapsed_before = 0.0
        self.started = clock()
        self.window: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=THROUGHPUT_WINDOW + 1
        )
        self.samples_seen = 0

    def execute(self, code_revision: str) -> TrainingOutcome:
        resumed_from = 0
        checkpoint = self._read_checkpoint()
        if checkpoint is not None:
            self._restore(load_checkpoint(checkpoint))
            resumed_from = self.epoch
            self.observer.on_resume(tuple(self.history))
        while self.epoch < self.spec.epochs and not self.early.stopped:
            self._train_epoch(self.epoch + 1)
        if self.spec.early_stopping is not None and self.early.best_model:
            self.model.load_state_dict(self.early.best_model)
        self.model.eval()
        kept = self.early.best_epoch or self.epoch
        return TrainingOutcome(
            model=self.model,
            spec=self.spec,
            splits=self.splits,
            history=tuple(self.history),
            best_epoch=kept,
            stopped_early=self.early.stopped and self.epoch < self.spec.epochs,
            validation_metrics=dict(self.history[kept - 1].validation_metrics),
            global_step=self.global_step,
            resumed_from_epoch=resumed_from,
            environment=self._environment(code_revision),
            device=self.device,
        )

    def _read_checkpoint(self) -> Path | bytes | None:
        """Rank 0's checkpoint, if any: its path alone, its bytes with ranks."""
        path = self.checkpoint_path
        if self.group is None:
            return path if path is not None and path.exists() else None
        data = path.read_bytes() if self.rank == 0 and path is not None and path.exists() else None
        return distributed.broadcast_from_rank_zero(data)

    def _train_epoch(self, epoch: int) -> None:
        self.model.train()
        count = len(self.train_y)
        batches = _batch_bounds(count, self.spec.batch_size, self.smallest_batch)
        permutation = torch.randperm(count, generator=self.shuffle).to(self.device)
        if self.group is not None:
            # Dropout masks differ per rank, and depend only on the seed, the rank and
            # the epoch: a resumed run draws what the uninterrupted one drew.
            torch.manual_seed(_derived_seed(self.spec.seed, f"dropout:{self.rank}:{epoch}"))
        epoch_started = self.clock()
        # Throughput counts training steps only, not the validation between epochs.
        self.window.clear()
        self.window.append((epoch_started, self.samples_seen))
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (start, end) in enumerate(batches, start=1):
            self._check_cancel(epoch)
            chosen = permutation[start:end]
            loss, hits, examples = self._step(self.train_x[chosen], self.train_y[chosen])
            loss_sum += loss
            correct += hits
            seen += examples
            self.global_step += 1
            self.samples_seen += examples
            self.window.append((self.clock(), self.samples_seen))
            self.observer.on_step(self._progress(epoch, step, len(batches), loss_sum / seen))
        train_seconds = self.clock() - epoch_started
        self._check_cancel(epoch)
        validation = self._validation_metrics() if self.rank == 0 else {}
        if self.group is not None:
            validation = distributed.broadcast_from_rank_zero(validation)
        summary = pb.EpochSummary(
            epoch=epoch,
            train_loss=loss_sum / seen,
            learning_rate=self._learning_rate(),
            samples_per_second=seen / train_seconds if train_seconds > 0 else 0.0,
        )
        summary.train_metrics.update({"loss": loss_sum / seen, "accuracy": correct / seen})
        summary.validation_metrics.update(validation)
        summary.duration.FromTimedelta(timedelta(seconds=self.clock() - epoch_started))
        self.history.append(summary)
        self._decide_early_stopping(epoch, validation)
        self.epoch = epoch
        progress = self._progress(epoch, len(batches), len(batches), summary.train_loss)
        self.observer.on_epoch(summary, progress)
        if self.checkpoint_path is not None and self.rank == 0:
            info = save_checkpoint(
                self.checkpoint_path,
                self._checkpoint_payload(),
                epoch=epoch,
                global_step=self.global_step,
            )
            self.observer.on_checkpoint(info)

    def _step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        """One optimisation step on a global batch: its loss sum, hits and size."""
        if self.spec.augmentation is not None:
            # The whole global batch on every rank: the single-process draw.
            features = augment_batch(
                features, self.spec.augmentation, self.augment, self.model.input_std
            )
        batch = len(labels)
        if self.group is not None:
            features = features[self.rank :: self.world_size]
            labels = labels[self.rank :: self.world_size]
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        )
        with autocast:
            logits = self.module(features)
            if self.group is None:
                loss = functional.cross_entropy(logits.float(), labels)
            else:
                # DDP divides the summed gradients by W: scaled so, the gradient is
                # the global batch's mean loss's, however the batch was sharded.
                shard_sum = functional.cross_entropy(logits.float(), labels, reduction="sum")
                loss = shard_sum * (self.world_size / batch)
        hits = int((logits.argmax(dim=1) == labels).sum().item())
        if self.group is None:
            value = float(loss.item())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the training loss became {value} at step {self.global_step + 1}"
                )
            self._optimize(loss)
            return value * batch, hits, batch
        self._optimize(loss)
        loss_sum, total_hits, examples = distributed.all_reduce_sum(
            [float(shard_sum.item()), hits, len(labels)], self.device
        )
        # Identical on every rank, so every rank raises here or none does.
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"the training loss became {loss_sum / examples} at step {self.global_step + 1}"
            )
        return loss_sum, int(total_hits), int(examples)

    def _optimize(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            torch.autograd.backward(self.scaler.scale(loss))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            torch.autograd.backward(loss)
            self.optimizer.step()

    def _check_cancel(self, epoch: int) -> None:
        cancel = self.should_cancel()
        if self.group is not None:
            # Any rank's cancel stops every rank here, before the same step.
            cancel = distributed.any_rank(cancel, self.device)
        if cancel:
            raise TrainingCancelled(epoch, self.global_step)

    def _validation_metrics(self) -> dict[str, float]:
        validation = self.splits.validation
        probabilities = predict_probabilities(self.model, validation.features, device=self.device)
        metrics = classification_metrics(np.asarray(validation.labels), probabilities)
        # The validation loss is the mean cross-entropy: log-loss by another name.
        metrics["loss"] = metrics["log_loss"]
        return metrics

    def _decide_early_stopping(self, epoch: int, metrics: dict[str, float]) -> None:
        """Rank 0 decides; the other ranks take its decision (and their own copy
        of the weights, identical to rank 0's, when the epoch improved)."""
        if self.spec.early_stopping is None:
            return
        if self.rank == 0:
            self._update_early_stopping(epoch, metrics)
        if self.group is None:
            return
        decision = distributed.broadcast_from_rank_zero(
            (
                self.early.best_value,
                self.early.best_epoch,
                self.early.epochs_without_improvement,
                self.early.stopped,
            )
        )
        if self.rank != 0:
            best_value, best_epoch, without_improvement, stopped = decision
            if best_epoch == epoch:
                self.early.best_model = self._weights_copy()
            self.early.best_value = best_value
            self.early.best_epoch = best_epoch
            self.early.epochs_without_improvement = without_improvement
            self.early.stopped = stopped

    def _weights_copy(self) -> dict[str, torch.Tensor]:
        return {
            key: tensor.detach().to("cpu", copy=True)
            for key, tensor in self.model.state_dict().items()
        }

    def _update_early_stopping(self, epoch: int, metrics: dict[str, float]) -> None:
        rule = self.spec.early_stopping
        if rule is None:
            return
        value = metrics.get(rule.metric, math.nan)
        best = self.early.best_value
        improved = math.isfinite(value) and (
            best is None
            or (value > best + rule.min_delta if rule.maximize else value < best - rule.min_delta)
        )
        if improved:
            self.early.best_value = value
            self.early.best_epoch = epoch
            self.early.epochs_without_improvement = 0
            self.early.best_model = self._weights_copy()
        else:
            self.early.epochs_without_improvement += 1
            self.early.stopped = self.early.epochs_without_improvement >= rule.patience

    def _progress(
        self, epoch: int, step: int, steps: int, running_loss: float
    ) -> pb.TrainingProgress:
        progress = pb.TrainingProgress(
            epoch=epoch,
            total_epochs=self.spec.epochs,
            step=step,
            steps_per_epoch=steps,
            global_step=self.global_step,
            loss=running_loss,
            learning_rate=self._learning_rate(),
            best_epoch=self.early.best_epoch,
            epochs_without_improvement=self.early.epochs_without_improvement,
        )
        if self.history:
            progress.train_metrics.update(self.history[-1].train_metrics)
            progress.validation_metrics.update(self.history[-1].validation_metrics)
        elapsed = self.elapsed_before + (self.clock() - self.started)
        progress.elapsed.FromTimedelta(timedelta(seconds=elapsed))
        if len(self.window) >= 2:
            (first_time, first_samples), (last_time, last_samples) = self.window[0], self.window[-1]
            span = last_time - first_time
            if span > 0:
                progress.samples_per_second = (last_samples - first_samples) / span
                seconds_per_step = span / (len(self.window) - 1)
                remaining = (self.spec.epochs - epoch) * steps + (steps - step)
                progress.eta.FromTimedelta(timedelta(seconds=remaining * seconds_per_step))
        return progress

    def _learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _checkpoint_payload(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "elapsed_seconds": self.elapsed_before + (self.clock() - self.started),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "shuffle": self.shuffle.get_state(),
                "augment": self.augment.get_state(),
            },
            "early_stopping": {
                "best_value": self.early.best_value,
                "best_epoch": self.early.best_epoch,
                "epochs_without_improvement": self.early.epochs_without_improvement,
                "stopped": self.early.stopped,
            },
            "best_model": self.early.best_model,
            "history": [summary.SerializeToString() for summary in self.history],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise FailedPreconditionError(
                "the checkpoint belongs to another spec or dataset", reason="CHECKPOINT_MISMATCH"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.shuffle.set_state(rng["shuffle"])
        self.augment.set_state(rng["augment"])
        early = state["early_stopping"]
        self.early = _EarlyStoppingState(
            best_value=early["best_value"],
            best_epoch=early["best_epoch"],
            epochs_without_improvement=early["epochs_without_improvement"],
            stopped=early["stopped"],
            best_model=dict(state["best_model"]),
        )
        self.history = [pb.EpochSummary.FromString(data) for data in state["history"]]
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.elapsed_before = float(state["elapsed_seconds"])

    def _environment(self, code_revision: str) -> pb.ExecutionEnvironment:
        on_cuda = self.device.type == "cuda"
        return pb.ExecutionEnvironment(
            device=str(self.device),
            accelerator=torch.cuda.get_device_name(self.device) if on_cuda else "",
            mixed_precision=self.amp,
            world_size=self.spec.world_size,
            backend=(
                self.spec.backend
                if self.spec.world_size > 1
                else pb.DISTRIBUTED_BACKEND_UNSPECIFIED
            ),
            torch_version=str(torch.__version__),
            code_revision=code_revision,
        )


def _optimizer(spec: ResolvedSpec, model: Classifier) -> torch.optim.Optimizer:
    parameters = list(model.parameters())
    if spec.optimizer == pb.OPTIMIZER_ALGORITHM_SGD:
        return torch.optim.SGD(
            parameters,
            lr=spec.learning_rate,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
        )
    if spec.optimizer == pb.OPTIMIZER_ALGORITHM_ADAMW:
        return torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.Adam(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def _batch_bounds(count: int, batch_size: int, smallest: int = 2) -> list[tuple[int, int]]:
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    # A trailing batch smaller than ``smallest`` is dropped when there are others:
    # batch normalisation (ResNet-18) cannot train on a single example, and with
    # ranks every rank needs an example (two with batch normalisation).
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < smallest:
        bounds.pop()
    return bounds


def _derived_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _package_version() -> str:
    try:
        return f"conveyor=={importlib.metadata.version('conveyor')}"
    except importlib.metadata.PackageNotFoundError:
        return "conveyor (unpackaged)"
