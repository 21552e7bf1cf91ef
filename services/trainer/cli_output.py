"""What ``conveyor train`` and ``conveyor jobs`` print: progress, results and
jobs.

Kept apart from :mod:`conveyor.services.trainer.cli` so that the commands read
as calls to the trainer. Progress goes to stderr (:class:`ProgressView`);
results, tables and field lists to stdout, through the registry commands'
helpers (:mod:`conveyor.services.registry.cli_output`), so every command
prints alike. What the sweep commands print is
:mod:`conveyor.services.trainer.sweep_output`, which shares the spec texts
here (:func:`hyperparameters_text` and the like).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final, TextIO

import grpc
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from conveyor.services.registry import cli_output as out
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc

TERMINAL: Final = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
HISTORY_ROWS: Final = 10
"""``jobs show`` prints the last this many epochs of the learning curve."""
MAX_MATRIX_CLASSES: Final = 12
"""Confusion matrices up to this many classes are printed as a table."""
LIVE_INTERVAL: Final = timedelta(milliseconds=100)
"""How often a terminal's progress bar asks for step progress."""
LOG_INTERVAL: Final = timedelta(minutes=10)
"""Off a terminal only epochs are printed: step progress is asked for rarely."""


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``3 epochs``, ``0 trials``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def job_id(name: str) -> str:
    """``abc`` from ``trainingJobs/abc``."""
    return name.removeprefix("trainingJobs/")


def sweep_id(name: str) -> str:
    """``abc`` from ``sweepJobs/abc``."""
    return name.removeprefix("sweepJobs/")


class ProgressView:
    """A job's progress on stderr.

    On a terminal, one line is redrawn with the latest step (at most ten times
    a second), and state changes and epochs are printed above it. Elsewhere
    (logs, CI, pipes) there is no redrawn line: only state changes and one
    plain line per epoch.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        columns: Callable[[], int] | None = None,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._columns = columns or (lambda: shutil.get_terminal_size((100, 24)).columns)
        self._live = ""
        self._state: int = pb.JOB_STATE_UNSPECIFIED
        self._metric = ""
        self._progress = pb.TrainingProgress()

    @property
    def interval(self) -> timedelta:
        """How often to ask the trainer for step progress."""
        return LIVE_INTERVAL if self._tty else LOG_INTERVAL

    def show(self, event: rpc.WatchTrainingJobResponse) -> None:
        kind = event.type
        if event.HasField("training_job"):
            self._on_job(event.training_job, snapshot=kind == pb.TRAINING_JOB_EVENT_TYPE_SNAPSHOT)
        if kind == pb.TRAINING_JOB_EVENT_TYPE_EPOCH_COMPLETED:
            self._progress = event.progress
            self._print(epoch_line(event.epoch, event.progress.total_epochs, self._metric))
        elif kind == pb.TRAINING_JOB_EVENT_TYPE_PROGRESS:
            self._progress = event.progress
            self._draw()

    def close(self) -> None:
        """Ends the redrawn line, if there is one."""
        if self._live:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._live = ""

    def _on_job(self, job: pb.TrainingJob, *, snapshot: bool) -> None:
        if not self._metric:
            self._metric = _watched_metric(job)
        if job.HasField("progress"):
            self._progress = job.progress
        if job.state != self._state:
            self._state = job.state
            if job.state not in TERMINAL or not snapshot:
                self._print(state_line(job))
        if snapshot and job.history and job.state not in TERMINAL:
            self._print(epoch_line(job.history[-1], job.spec.hyperparameters.epochs, self._metric))
        self._draw()

    def _print(self, line: str) -> None:
        if self._tty and self._live:
            self._stream.write("\r\x1b[K")
        self._stream.write(line + "\n")
        if self._tty and self._live:
            self._stream.write(self._live)
        self._stream.flush()

    def _draw(self) -> None:
        if not self._tty or self._state != pb.JOB_STATE_RUNNING or not self._progress.epoch:
            return
        line = progress_line(self._progress, self._metric, width=self._columns() - 1)
        if line != self._live:
            self._live = line
            self._stream.write("\r\x1b[K" + line)
            self._stream.flush()


def _watched_metric(job: pb.TrainingJob) -> str:
    """The validation metric the progress shows: early stopping's, else accuracy."""
    return job.spec.hyperparameters.early_stopping.metric or "accuracy"


def state_line(job: pb.TrainingJob) -> str:
    """``trainingJobs/x: running on cpu`` and the like."""
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    line = f"{job.name}: {state}"
    if job.state == pb.JOB_STATE_QUEUED:
        ahead = job.queue_position
        line += " (next)" if ahead == 0 else f" ({ahead} ahead)"
    elif job.state == pb.JOB_STATE_RUNNING:
        where = environment_text(job.environment)
        line += f" {where}" if where else ""
        if job.cancel_requested:
            line += ", cancel requested"
        if job.resume_count:
            line += f", resumed from epoch {job.checkpoint.epoch}"
    return line


def environment_text(env: pb.ExecutionEnvironment) -> str:
    """``on cuda:0 (NVIDIA H100, mixed precision), 2 processes``."""
    if not env.device:
        return ""
    details = [env.accelerator] if env.accelerator else []
    if env.mixed_precision:
        details.append("mixed precision")
    text = f"on {env.device}" + (f" ({', '.join(details)})" if details else "")
    if env.world_size > 1:
        backend = pb.DistributedBackend.Name(env.backend).removeprefix("DISTRIBUTED_BACKEND_")
        text += f", {env.world_size} processes ({backend.lower()})"
    return text


def progress_line(progress: pb.TrainingProgress, metric: str, *, width: int = 100) -> str:
    """The redrawn line: ``epoch 3/20 [=====>     ] 41% step 10/13 loss 0.2345 …``."""
    steps = max(progress.steps_per_epoch, 1)
    total = max(progress.total_epochs, 1) * steps
    done = (progress.epoch - 1) * steps + min(progress.step, steps)
    share = min(max(done / total, 0.0), 1.0)
    bar_width = 20
    filled = int(share * bar_width)
    bar = "=" * filled + (">" if filled < bar_width else "") + " " * (bar_width - filled - 1)
    parts = [
        f"epoch {progress.epoch}/{progress.total_epochs} [{bar}] {share * 100:3.0f}%",
        f"step {progress.step}/{progress.steps_per_epoch}",
        f"loss {progress.loss:.4f}",
    ]
    if metric in progress.validation_metrics:
        parts.append(f"val {metric} {progress.validation_metrics[metric]:.4f}")
    if progress.samples_per_second > 0:
        parts.append(f"{progress.samples_per_second:,.0f} samples/s")
    if progress.HasField("eta"):
        parts.append(f"ETA {duration_text(progress.eta)}")
    line = "  ".join(parts)
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def epoch_line(summary: pb.EpochSummary, total_epochs: int, metric: str) -> str:
    """A finished epoch: ``epoch 3/20  loss 0.2345  val loss 0.1234  val accuracy …``."""
    parts = [f"epoch {summary.epoch}/{total_epochs}", f"loss {summary.train_loss:.4f}"]
    validation = summary.validation_metrics
    for name in dict.fromkeys(("loss", metric)):
        if name in validation:
            parts.append(f"val {name} {validation[name]:.4f}")
    if summary.samples_per_second > 0:
        parts.append(f"{summary.samples_per_second:,.0f} samples/s")
    parts.append(duration_text(summary.duration))
    return "  ".join(parts)


def duration_text(value: Duration) -> str:
    """``0.42 s`` under a minute, ``1:02:03`` or ``2:03`` above."""
    seconds = value.ToTimedelta().total_seconds()
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# -- results ------------------------------------------------------------------------


def print_result(job: pb.TrainingJob) -> None:
    """A succeeded job's outcome on stdout: metrics, confusion matrix, version."""
    result = job.result
    took = ""
    if job.HasField("start_time") and job.HasField("end_time"):
        span = Duration()
        span.FromTimedelta(job.end_time.ToDatetime() - job.start_time.ToDatetime())
        took = f" in {duration_text(span)}"
    epochs = plural(len(job.history), "epoch")
    detail = f"kept epoch {result.best_epoch}"
    if result.stopped_early:
        detail += ", stopped early"
    where = environment_text(job.environment)
    print(f"{job.name} succeeded: {epochs}{took}{' ' + where if where else ''} ({detail})")
    out.print_table(*metrics_table(result.test_metrics, result.validation_metrics))
    lines = matrix_lines(result.confusion_matrix)
    if lines:
        print("\nconfusion matrix on the test split (rows: true class, columns: predicted):")
        print("\n".join(lines))
    if result.model_version:
        print(f"\nregistered: {result.model_version}")
    else:
        print("\nnot registered (train with --register-model MODEL to register it)")


def matrix_lines(matrix: pb.ConfusionMatrix) -> list[str]:
    """The confusion matrix as right-aligned columns, one row per true class;
    none when it is malformed or has more than :data:`MAX_MATRIX_CLASSES` classes."""
    classes = list(matrix.class_names)
    size = len(classes)
    if not classes or size > MAX_MATRIX_CLASSES or len(matrix.counts) != size**2:
        return []
    label = max(len(name) for name in classes)
    rows = [list(matrix.counts[row * size : (row + 1) * size]) for row in range(size)]
    widths = [
        max(len(name), *(len(str(row[column])) for row in rows))
        for column, name in enumerate(classes)
    ]
    lines = [" " * label + "".join(f"  {n:>{w}}" for n, w in zip(classes, widths, strict=True))]
    for name, row in zip(classes, rows, strict=True):
        cells = "".join(f"  {count:>{w}}" for count, w in zip(row, widths, strict=True))
        lines.append(f"{name:<{label}}{cells}")
    return lines


def metrics_table(
    test: Mapping[str, float], validation: Mapping[str, float]
) -> tuple[list[str], list[list[str]]]:
    """Rows of metric, test value, validation value; the well-known metrics first
    (the validation ``loss`` is ``log_loss`` by another name: shown once)."""
    names = [k for k in out.KEY_METRICS if k in test or k in validation]
    names += sorted((set(test) | set(validation)) - set(names) - {"loss"})
    return ["metric", "test", "validation"], [
        [name, _number(test.get(name)), _number(validation.get(name))] for name in names
    ]


def history_table(history: Sequence[pb.EpochSummary]) -> tuple[list[str], list[list[str]]]:
    """The learning curve: one row per epoch."""
    metrics = sorted({k for summary in history for k in summary.validation_metrics} - {"loss"})
    shown = [m for m in out.KEY_METRICS if m in metrics][:2] or metrics[:2]
    headers = ["epoch", "loss", "val loss", *(f"val {m}" for m in shown), "samples/s", "time"]
    rows = [
        [
            str(s.epoch),
            f"{s.train_loss:.4f}",
            _number(s.validation_metrics.get("loss")),
            *(_number(s.validation_metrics.get(m)) for m in shown),
            f"{s.samples_per_second:,.0f}",
            duration_text(s.duration),
        ]
        for s in history
    ]
    return headers, rows


def job_fields(job: pb.TrainingJob) -> list[tuple[str, str]]:
    """The ``jobs show`` listing."""
    spec = job.spec
    hp = spec.hyperparameters
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_")
    if job.state == pb.JOB_STATE_QUEUED:
        state += f" (queue position {job.queue_position})"
    if job.cancel_requested and job.state not in TERMINAL:
        state += " (cancel requested)"
    fields = [
        ("name", job.name),
        ("display name", job.display_name),
        ("state", state),
        ("dataset", data_text(spec.data)),
        ("data digest", job.dataset_digest or "-"),
        ("architecture", struct_text(spec.architecture.name, spec.architecture.args)),
        ("hyperparameters", hyperparameters_text(hp)),
        ("early stopping", early_stopping_text(hp) or "-"),
        ("augmentation", _augmentation_text(hp.augmentation) or "-"),
        ("compute", compute_text(spec.compute)),
        ("register in", spec.registration.model or "- (not registered)"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items()))),
        ("created", f"{out.timestamp(job.create_time)} by {job.created_by or '?'}"),
        ("started", out.timestamp(job.start_time)),
        ("ended", out.timestamp(job.end_time)),
    ]
    if job.environment.device:
        torch_version = job.environment.torch_version or "?"
        fields.append(("ran", f"{environment_text(job.environment)}, torch {torch_version}"))
    if job.HasField("progress") and job.state not in TERMINAL:
        progress = job.progress
        fields.append(
            (
                "progress",
                f"epoch {progress.epoch}/{progress.total_epochs}, step "
                f"{progress.step}/{progress.steps_per_epoch}, loss {progress.loss:.4f}",
            )
        )
    if job.HasField("checkpoint"):
        ckpt = job.checkpoint
        fields.append(
            (
                "checkpoint",
                f"after epoch {ckpt.epoch} ({out.human_size(ckpt.size_bytes)}, "
                f"sha256 {ckpt.sha256[:12]}, {out.timestamp(ckpt.create_time)})",
            )
        )
    if job.resume_count:
        fields.append(("resumed", f"{job.resume_count} time(s) after a trainer restart"))
    if job.state == pb.JOB_STATE_FAILED:
        code = code_name(job.error.code)
        fields.append(("error", f"{code}: {job.error.message} [{job.error.reason}]"))
    return [(label, value) for label, value in fields if value]


def job_row(job: pb.TrainingJob) -> list[str]:
    """A row of the ``jobs list`` table."""
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    if job.cancel_requested and job.state not in TERMINAL:
        state += " (cancelling)"
    epochs = job.spec.hyperparameters.epochs
    done = len(job.history)
    if job.state == pb.JOB_STATE_SUCCEEDED:
        metrics = "test " + (out.key_metrics(job.result.test_metrics) or "-")
    elif job.history:
        metrics = "val " + (out.key_metrics(job.history[-1].validation_metrics) or "-")
    else:
        metrics = "-"
    return [
        job_id(job.name),
        state,
        job.spec.data.dataset.removeprefix("datasets/"),
        job.spec.architecture.name,
        f"{done}/{epochs}",
        metrics,
        out.timestamp(job.create_time),
    ]


def data_text(data: pb.DatasetSpec) -> str:
    """``datasets/digits; split 0.7/0.15/0.15 (seed 0, stratified)`` and the like."""
    text = struct_text(data.dataset, data.generator_args)
    if data.additional_datasets:
        text += " + " + ", ".join(data.additional_datasets)
    fractions = (
        data.train_fraction or 0.7,
        data.validation_fraction or 0.15,
        data.test_fraction or 0.15,
    )
    split = "/".join(f"{f:g}" for f in fractions)
    stratified = ", stratified" if data.stratify else ""
    return f"{text}; split {split} (seed {data.split_seed}{stratified})"


def struct_text(name: str, args: struct_pb2.Struct) -> str:
    """``mlp (hidden_sizes=[32, 16])``: a name and its arguments, if any."""
    if not args.fields:
        return name
    values = ", ".join(
        f"{key}={json.dumps(plain_value(value))}" for key, value in sorted(args.items())
    )
    return f"{name} ({values})"


def plain_value(value: Any) -> Any:
    """Struct values as JSON shows them: whole floats as integers."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, struct_pb2.ListValue):
        return [plain_value(item) for item in value]
    if isinstance(value, struct_pb2.Struct):
        return {key: plain_value(item) for key, item in value.items()}
    return value


def hyperparameters_text(hp: pb.Hyperparameters) -> str:
    """``20 epochs, batch 32, adam lr 0.001, seed 0`` and the like."""
    optimizer = pb.OptimizerAlgorithm.Name(hp.optimizer or pb.OPTIMIZER_ALGORITHM_ADAM)
    parts = [
        plural(hp.epochs, "epoch"),
        f"batch {hp.batch_size}",
        f"{optimizer.removeprefix('OPTIMIZER_ALGORITHM_').lower()} lr {hp.learning_rate:g}",
    ]
    if hp.momentum:
        parts.append(f"momentum {hp.momentum:g}")
    if hp.weight_decay:
        parts.append(f"weight decay {hp.weight_decay:g}")
    if hp.dropout:
        parts.append(f"dropout {hp.dropout:g}")
    parts.append(f"seed {hp.seed}")
    return ", ".join(parts)


def early_stopping_text(hp: pb.Hyperparameters) -> str:
    """``on validation loss, patience 3``; empty without early stopping."""
    if not hp.HasField("early_stopping"):
        return ""
    rule = hp.early_stopping
    text = f"on validation {rule.metric}, patience {rule.patience}"
    if rule.min_delta:
        text += f", min delta {rule.min_delta:g}"
    if rule.goal:
        text += f", {pb.MetricGoal.Name(rule.goal).removeprefix('METRIC_GOAL_').lower()}"
    return text


def _augmentation_text(aug: pb.AugmentationSpec) -> str:
    parts = []
    if aug.random_crop_padding:
        parts.append(f"crop={aug.random_crop_padding}")
    if aug.horizontal_flip:
        parts.append("flip")
    if aug.rotation_degrees:
        parts.append(f"rotate={aug.rotation_degrees:g}")
    if aug.gaussian_noise_std:
        parts.append(f"noise={aug.gaussian_noise_std:g}")
    return " ".join(parts)


def compute_text(compute: pb.ComputeSpec) -> str:
    """``device auto, mixed precision on, 2 processes`` and the like."""
    device = pb.Device.Name(compute.device or pb.DEVICE_AUTO).removeprefix("DEVICE_").lower()
    text = f"device {device}"
    if compute.HasField("mixed_precision"):
        text += f", mixed precision {'on' if compute.mixed_precision else 'off'}"
    if compute.distributed.world_size > 1:
        text += f", {compute.distributed.world_size} processes"
    return text


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def code_name(number: int) -> str:
    """``FAILED_PRECONDITION`` for 9."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return str(code.name)
    return f"code {number}"
