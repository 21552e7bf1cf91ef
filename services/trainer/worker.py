"""A training job's own process: ``python -m conveyor.services.trainer.worker <job_dir>``.

The trainer server starts one per running job (``torchrun`` starts
``world_size`` of them for a distributed job, each joining the job's process
group: :mod:`.distributed`), so a crash in training never
takes the server down, cancelling is a signal, and every job runs the same
code path. :func:`run_job` reads ``job.binpb`` from the job directory, loads
the data, trains with a checkpoint after every epoch (resuming from an
existing one), evaluates on the test split and writes the results
(:mod:`.protocol` describes the files and the progress lines on stdout).

SIGTERM asks the job to stop: the flag is checked before every step, and the
process exits with :data:`~.protocol.EXIT_CANCELLED` once the current step
ends. On Linux the worker also dies with the process that started it (the
trainer), so a killed trainer leaves no orphan writing checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

import grpc
import numpy as np
import torch
from google.protobuf import struct_pb2

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import distributed, protocol
from conveyor.services.trainer.architectures import model_signature
from conveyor.services.trainer.datasets import LoadedDataset, load_training_data
from conveyor.services.trainer.distributed import WORKER_MODULE
from conveyor.services.trainer.evaluation import (
    Evaluation,
    evaluate,
    predict_probabilities,
    reference_statistics,
)
from conveyor.services.trainer.settings import WorkerEnvironment
from conveyor.services.trainer.specs import validate_training_spec
from conveyor.services.trainer.splits import resolve_fractions
from conveyor.services.trainer.training import (
    TrainingCancelled,
    TrainingObserver,
    TrainingOutcome,
    select_device,
    train,
    training_result,
)
from conveyor.services.trainer.uploads import load_uploaded
from conveyor.services.trainer.weights import export_weights
from conveyor.shared.errors import ConveyorError, DataLossError, NotFoundError
from conveyor.shared.telemetry import configure_logging
from conveyor.trainer.v1 import resources_pb2 as pb

logger = logging.getLogger(__name__)

CANCEL: Final = threading.Event()
"""Set by SIGTERM: the job should stop after the current step."""

_PR_SET_PDEATHSIG: Final = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m conveyor.services.trainer.worker JOB_DIR``, or
    ``... worker --standby`` to warm up first and then read the job directory
    from stdin (see :func:`wait_for_job`)."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: CANCEL.set())
    _die_with_parent()
    events = _take_stdout()
    args = list(sys.argv[1:] if argv is None else argv)
    standby = args == [protocol.STANDBY_FLAG]
    if standby:
        job_dir = wait_for_job(sys.stdin)
        if job_dir is None:
            return 0
        args = [str(job_dir)]
    if len(args) != 1:
        print(f"usage: python -m {WORKER_MODULE} JOB_DIR | --standby", file=sys.stderr)
        return 2
    placement = WorkerEnvironment()
    configure_logging("trainer-worker")
    if standby:
        logger.info("a standby worker took the job", extra={"pid": os.getpid()})
    return run_job(
        Path(args[0]), rank=placement.rank, world_size=placement.world_size, events=events
    )


def warm_up() -> None:
    """Import now what a job would import on its way to its first step: the
    built-in datasets' loader, and ``torch._dynamo``, which creating any
    optimizer imports (about 2 s in a fresh process)."""
    import sklearn.datasets  # noqa: F401
    import torch._dynamo  # noqa: F401


def wait_for_job(commands: TextIO) -> Path | None:
    """A standby worker's wait: warm up, then read the job directory, one line,
    from ``commands``; None when it closes first (the trainer no longer needs
    this worker). The job's log file becomes this process's stdout and
    stderr, as it would have been for a worker started for the job."""
    warm_up()
    line = commands.readline().strip()
    if not line:
        return None
    job_dir = Path(line)
    log = os.open(job_dir / protocol.LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return job_dir


def run_job(
    job_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    events: BinaryIO | None = None,
    should_cancel: Callable[[], bool] = CANCEL.is_set,
) -> int:
    """Train the job in ``job_dir`` as process ``rank`` of ``world_size``;
    returns the exit code. Only rank 0 writes progress lines (to ``events``,
    by default stdout) and result files."""
    emitter = _Emitter(events if events is not None else sys.stdout.buffer, enabled=rank == 0)
    job = pb.TrainingJob.FromString((job_dir / protocol.JOB_FILE).read_bytes())
    finished = job_dir / protocol.RESULT_FILE
    if finished.exists():  # trained before; the server only needs the result
        emitter.emit("result", pb.TrainingResult.FromString(finished.read_bytes()))
        return protocol.EXIT_SUCCEEDED
    try:
        dataset = load_training_data(job.spec.data, load_uploaded=partial(_load_uploaded, job_dir))
        emitter.emit(
            "started",
            {
                "environment": protocol.to_json(_environment(job, dataset, world_size)),
                "dataset_digest": dataset.digest,
            },
        )
        compute = job.spec.compute
        # Ranks of a distributed job join their process group (a single
        # process joins none); train() then runs data-parallel.
        with _process_group(compute, world_size):
            outcome = train(
                job.spec,
                dataset,
                checkpoint_path=job_dir / protocol.CHECKPOINT_FILE,
                observer=_Observer(emitter),
                should_cancel=should_cancel,
                code_revision=job.environment.code_revision,
            )
        if outcome.resumed_from_epoch:
            logger.info(
                "trained on from a checkpoint",
                extra={"resumed_from_epoch": outcome.resumed_from_epoch},
            )
        test = evaluate(outcome.model, outcome.splits.test, dataset.class_names)
        result = training_result(outcome, test)
        if rank == 0:
            _write_outputs(job_dir, job, dataset, outcome, test, result)
        emitter.emit("result", result)
        return protocol.EXIT_SUCCEEDED
    except TrainingCancelled as cancelled:
        logger.info("cancelled", extra={"global_step": cancelled.global_step})
        return protocol.EXIT_CANCELLED
    except ConveyorError as error:
        logger.info("failed", extra={"reason": error.reason})
        emitter.emit(
            "error",
            pb.JobError(code=error.code.value[0], reason=error.reason, message=error.message),
        )
        return protocol.EXIT_FAILED
    except torch.OutOfMemoryError:
        logger.exception("out of memory")
        emitter.emit(
            "error",
            pb.JobError(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                reason="OUT_OF_MEMORY",
                message="the device ran out of memory; try a smaller batch size or model",
            ),
        )
        return protocol.EXIT_FAILED
    except Exception as error:  # a bug: its text stays in the worker's log
        logger.exception("training failed")
        emitter.emit(
            "error",
            pb.JobError(
                code=grpc.StatusCode.INTERNAL.value[0],
                reason="WORKER_ERROR",
                message=f"training failed ({type(error).__name__}); the worker log has details",
            ),
        )
        return protocol.EXIT_FAILED


def _process_group(compute: pb.ComputeSpec, world_size: int) -> AbstractContextManager[object]:
    if world_size <= 1:
        return contextlib.nullcontext()
    return distributed.process_group(compute.distributed.backend, compute.device)


class _Emitter:
    """Writes progress lines; a closed pipe means the trainer is gone: stop."""

    def __init__(self, output: BinaryIO, *, enabled: bool) -> None:
        self._output = output
        self._enabled = enabled
        self._lock = threading.Lock()

    def emit(self, event_type: str, message: Any) -> None:
        if not self._enabled:
            return
        line = protocol.encode_event(event_type, message)
        with self._lock:
            try:
                self._output.write(line)
                self._output.flush()
            except (BrokenPipeError, ValueError):
                logger.warning("the trainer is gone; stopping")
                os._exit(protocol.EXIT_FAILED)


class _Observer(TrainingObserver):
    """Turns training progress into lines, steps at most every 50 ms."""

    def __init__(self, emitter: _Emitter) -> None:
        self._emitter = emitter
        self._last_step = -float("inf")

    def on_resume(self, history: Sequence[pb.EpochSummary]) -> None:
        self._emitter.emit("resumed", {"history": [protocol.to_json(s) for s in history]})

    def on_step(self, progress: pb.TrainingProgress) -> None:
        now = time.monotonic()
        if now - self._last_step >= protocol.STEP_EVENT_INTERVAL_S:
            self._last_step = now
            self._emitter.emit("step", progress)

    def on_epoch(self, summary: pb.EpochSummary, progress: pb.TrainingProgress) -> None:
        self._emitter.emit(
            "epoch", {"epoch": protocol.to_json(summary), "progress": protocol.to_json(progress)}
        )

    def on_checkpoint(self, checkpoint: pb.CheckpointInfo) -> None:
        self._emitter.emit("checkpoint", checkpoint)


def _load_uploaded(job_dir: Path, name: str) -> LoadedDataset:
    """An uploaded dataset the server placed in the job directory, checked
    against the digest it had at upload."""
    stem = job_dir / protocol.DATASETS_DIR / name.removeprefix("datasets/")
    try:
        metadata = pb.Dataset.FromString(stem.with_suffix(".binpb").read_bytes())
        data = stem.with_suffix(".data").read_bytes()
    except FileNotFoundError as missing:
        raise NotFoundError(f"dataset {name} was not provided to the job") from missing
    loaded = load_uploaded(data, metadata, name=name)
    if loaded.digest != metadata.digest:
        raise DataLossError(
            f"{name} no longer parses to the data it was uploaded as", reason="DATASET_CHANGED"
        )
    return loaded


def _environment(
    job: pb.TrainingJob, dataset: LoadedDataset, world_size: int
) -> pb.ExecutionEnvironment:
    resolved = validate_training_spec(
        job.spec, dataset.schema, cuda_available=torch.cuda.is_available()
    )
    device = select_device(resolved.device)
    on_cuda = device.type == "cuda"
    return pb.ExecutionEnvironment(
        device=str(device),
        accelerator=torch.cuda.get_device_name(device) if on_cuda else "",
        mixed_precision=resolved.mixed_precision and on_cuda,
        world_size=world_size,
        backend=resolved.backend if world_size > 1 else pb.DISTRIBUTED_BACKEND_UNSPECIFIED,
        torch_version=str(torch.__version__),
        code_revision=job.environment.code_revision,
    )


def _write_outputs(
    job_dir: Path,
    job: pb.TrainingJob,
    dataset: LoadedDataset,
    outcome: TrainingOutcome,
    test: Evaluation,
    result: pb.TrainingResult,
) -> None:
    """The files the server registers from; ``result.binpb`` last."""
    protocol.write_atomically(job_dir / protocol.WEIGHTS_FILE, export_weights(outcome.model))
    version = model_version(job, dataset, outcome, result)
    protocol.write_atomically(
        job_dir / protocol.MODEL_VERSION_FILE, version.SerializeToString(deterministic=True)
    )
    protocol.write_atomically(
        job_dir / protocol.EVALUATION_REPORT_FILE, evaluation_report(job, outcome, test, result)
    )
    protocol.write_atomically(
        job_dir / protocol.RESULT_FILE, result.SerializeToString(deterministic=True)
    )


def model_version(
    job: pb.TrainingJob,
    dataset: LoadedDataset,
    outcome: TrainingOutcome,
    result: pb.TrainingResult,
) -> registry_pb.ModelVersion:
    """The registry version of a trained model, everything but its artifact:
    the architecture it rebuilds from, the signature, test metrics (validation
    ones prefixed ``validation/``), hyperparameters, lineage, the model card
    and reference statistics of the training features and outputs."""
    spec = job.spec
    train_split = outcome.splits.train
    version = registry_pb.ModelVersion(
        description=spec.registration.description,
        format=registry_pb.MODEL_FORMAT_TORCH_STATE_DICT,
        task=dataset.schema.task,
        architecture=outcome.spec.architecture.to_proto(),
        signature=model_signature(
            dataset.example_shape, dataset.class_names, dataset.feature_names
        ),
        hyperparameters=_hyperparameters(job, outcome),
        lineage=registry_pb.Lineage(
            training_job=job.name,
            dataset=spec.data.dataset,
            dataset_digest=dataset.digest,
            code_revision=outcome.environment.code_revision,
        ),
        labels=spec.registration.labels,
        authors=[job.created_by] if job.created_by else [],
    )
    version.metrics.update(result.test_metrics)
    version.metrics.update({f"validation/{k}": v for k, v in result.validation_metrics.items()})
    version.model_card = spec.registration.model_card or model_card(job, dataset, outcome, result)
    probabilities = predict_probabilities(outcome.model, train_split.features)
    version.reference_statistics.CopyFrom(
        reference_statistics(
            np.asarray(train_split.features),
            feature_names=dataset.feature_names,
            dataset_digest=dataset.digest,
            probabilities=probabilities,
            class_names=dataset.class_names,
            seed=spec.hyperparameters.seed,
        )
    )
    return version


def _hyperparameters(job: pb.TrainingJob, outcome: TrainingOutcome) -> struct_pb2.Struct:
    """Every value that shaped the weights, defaults included (seeds as text:
    they are 64-bit)."""
    spec = job.spec
    fractions = resolve_fractions(spec.data)
    values: dict[str, Any] = protocol.to_json(spec.hyperparameters)
    values.update(
        {
            "epochs": outcome.spec.epochs,
            "batch_size": outcome.spec.batch_size,
            "optimizer": pb.OptimizerAlgorithm.Name(outcome.spec.optimizer).removeprefix(
                "OPTIMIZER_ALGORITHM_"
            ),
            "learning_rate": outcome.spec.learning_rate,
            "momentum": outcome.spec.momentum,
            "weight_decay": outcome.spec.weight_decay,
            "dropout": outcome.spec.dropout,
            "seed": str(outcome.spec.seed),
            "split_seed": str(spec.data.split_seed),
            "train_fraction": fractions.train,
            "validation_fraction": fractions.validation,
            "test_fraction": fractions.test,
            "stratify": spec.data.stratify,
            "device": outcome.environment.device,
            "mixed_precision": outcome.environment.mixed_precision,
            "world_size": outcome.environment.world_size,
            "epochs_trained": len(outcome.history),
            "best_epoch": outcome.best_epoch,
        }
    )
    if spec.data.generator_args.fields:
        values["generator_args"] = protocol.to_json(spec.data.generator_args)
    if spec.data.additional_datasets:
        values["additional_datasets"] = list(spec.data.additional_datasets)
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def model_card(
    job: pb.TrainingJob,
    dataset: LoadedDataset,
    outcome: TrainingOutcome,
    result: pb.TrainingResult,
) -> str:
    """A model card written from the spec, the data and the metrics."""
    spec = job.spec
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(result.test_metrics.items()))
    task = registry_pb.TaskType.Name(dataset.schema.task).removeprefix("TASK_TYPE_").lower()
    classes = ", ".join(dataset.class_names)
    return (
        f"# {spec.architecture.name} trained on {spec.data.dataset}\n\n"
        f"Trained by {job.name} ({job.created_by or 'unknown'}).\n\n"
        "## Intended use\n\n"
        f"A {task.replace('_', ' ')} model over the classes {classes}. Validate it on "
        "your own data before relying on it.\n\n"
        "## Data\n\n"
        f"{dataset.num_examples} examples of {spec.data.dataset} (digest "
        f"`{dataset.digest}`), split with seed {spec.data.split_seed}: "
        f"{len(outcome.splits.train)} for training, {len(outcome.splits.validation)} for "
        f"validation, {len(outcome.splits.test)} held out for the test below.\n\n"
        "## Training\n\n"
        f"{len(outcome.history)} epochs (kept: epoch {outcome.best_epoch}), batch size "
        f"{outcome.spec.batch_size}, learning rate {outcome.spec.learning_rate:g}, seed "
        f"{outcome.spec.seed}, on {outcome.environment.device}.\n\n"
        "## Test metrics\n\n| metric | value |\n|---|---|\n"
        f"{metrics}\n\n"
        "## Limitations\n\n"
        "The metrics hold for data like the test split; drift away from the training "
        "data's distribution (see the reference statistics) degrades them.\n"
    )


def evaluation_report(
    job: pb.TrainingJob, outcome: TrainingOutcome, test: Evaluation, result: pb.TrainingResult
) -> bytes:
    """The ``EVALUATION_REPORT`` attachment: test and validation metrics, the
    confusion matrix and the learning curve, as JSON."""
    report = {
        "training_job": job.name,
        "test_metrics": dict(sorted(result.test_metrics.items())),
        "validation_metrics": dict(sorted(result.validation_metrics.items())),
        "confusion_matrix": {
            "class_names": list(result.confusion_matrix.class_names),
            "counts": list(result.confusion_matrix.counts),
        },
        "test_examples": len(outcome.splits.test),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "history": [protocol.to_json(summary) for summary in outcome.history],
    }
    return json.dumps(report, indent=2, sort_keys=True).encode()


def _take_stdout() -> BinaryIO:
    """The progress stream: the original stdout, kept for progress lines only;
    anything else printing to stdout lands in the log (stderr) instead."""
    sys.stdout.flush()
    events = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = io.TextIOWrapper(
        os.fdopen(1, "wb", buffering=0, closefd=False), write_through=True
    )
    return events


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the trainer that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        logger.warning("cannot tie the worker's life to the trainer's")


def _exit(code: int) -> None:
    """End the process once its output is flushed, without the 1.5 s an
    interpreter takes to tear down PyTorch's thousands of modules: the job is
    done once its files and result line are written."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
