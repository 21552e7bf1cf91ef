"""Trainer benchmark: training throughput through the service beside a plain PyTorch loop.

For each workload (the breast-cancer MLP and the digits small CNN) the same
model — the architecture from ``services/trainer/architectures.py``, the same
train split, batch size, epochs, optimiser and seed — is trained these ways,
one after the other in every run, each adding to the one before:

* **plain**: a minimal PyTorch loop in this process (shuffle, forward,
  cross-entropy, backward, step; no validation, checkpoints or progress);
* **train() in-process**: :func:`conveyor.services.trainer.training.train`
  without a checkpoint: per-step progress bookkeeping (loss and accuracy read
  back, a ``TrainingProgress`` per step), CPU determinism, and validation
  after every epoch. Its whole call (wall clock and CPU time), and its
  epochs' own samples/s (steps only) measured with this thread's CPU time as
  its clock, beside the plain loop's CPU time;
* **worker in-process**: :func:`conveyor.services.trainer.worker.run_job` on a
  job directory: adds a fsynced checkpoint after every epoch, progress lines,
  test evaluation, reference statistics and the weights and result files;
* **worker process**: ``python -m conveyor.services.trainer.worker JOB_DIR``,
  as the trainer starts it but without the trainer: adds the process (Python,
  PyTorch and scikit-learn imports, torch's lazy imports, interpreter exit);
* **service**: a job created over gRPC on ``conveyor serve trainer`` (a child
  process, authentication off, no registration), timed from RUNNING to
  SUCCEEDED with the job's own ``start_time``/``end_time``, plus the
  throughput the job reports (its epochs' ``samples_per_second``, training
  steps only) and its first-step-to-last-checkpoint span (from the watch
  stream's event times); with the CPU the worker, the trainer process and
  this client spent (from /proc). One untimed job warms the trainer up first.

Throughput is samples trained (epochs x the examples in the epoch's batches)
per second. PyTorch runs with ``--threads`` CPU threads everywhere (default
1: with one thread per core, any other process on the machine stalls
PyTorch's thread pool, which made every number here several times slower
and erratic; ``--threads 0`` keeps PyTorch's default to see it). Every
measurement is repeated ``--runs`` times; the table gives the median, the
minimum, the maximum and the spread. Run from the repository root::

    .venv/bin/python bench/trainer/bench_trainer.py --json bench/trainer/results.json

Not a test: ``make test`` never runs it and nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from torch.nn import functional

from conveyor.services.trainer import datasets, protocol
from conveyor.services.trainer.architectures import build_model
from conveyor.services.trainer.datasets import LoadedDataset
from conveyor.services.trainer.launcher import worker_command
from conveyor.services.trainer.specs import ResolvedSpec, validate_training_spec
from conveyor.services.trainer.splits import split_dataset
from conveyor.services.trainer.training import TrainingObserver, train
from conveyor.services.trainer.worker import run_job
from conveyor.shared.health import ServerExitedError, wait_until_serving
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from conveyor.trainer.v1 import trainer_service_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # bench/ lives at the repository root
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import Metric, free_port, machine_info  # noqa: E402

TARGET_OVERHEAD_PERCENT = 5.0
"""The issue's target: the service within 5% of a plain loop's throughput."""
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 1800.0

Stub = trainer_service_pb2_grpc.TrainerServiceStub
"""Typed as ``TrainerServiceAsyncStub`` (the .pyi name) when built on an aio channel."""


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    dataset: str
    architecture: str
    args: dict[str, Any]
    dropout: float


WORKLOADS = {
    "cancer-mlp": Workload(
        "cancer-mlp", "breast-cancer MLP [32, 16]", datasets.BREAST_CANCER, "mlp",
        {"hidden_sizes": [32, 16]}, 0.1,
    ),
    "digits-cnn": Workload(
        "digits-cnn", "digits small CNN [32, 64]", datasets.DIGITS, "small_cnn", {}, 0.0,
    ),
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    unknown = set(keys) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(sorted(unknown))}")
    epochs = {"cancer-mlp": args.cancer_epochs, "digits-cnn": args.digits_epochs}
    if args.threads > 0:
        # Here, and in the trainer process, whose workers inherit its environment.
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-trainer-", dir=args.work_dir))
    report: dict[str, Any] = {
        "machine": torch_machine_info(),
        "settings": {
            "runs": args.runs,
            "workloads": {k: {"epochs": epochs[k]} for k in keys},
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "work_dir": str(root),
        },
        "results": {},
    }
    results: dict[str, Metric] = {}
    breakdowns: dict[str, dict[str, Metric]] = {}
    try:
        with trainer_process(root / "service") as trainer:
            # One untimed job first: the trainer's lazy start (dataset catalog, imports).
            warm_up = job_spec(WORKLOADS[keys[0]], 1, args)
            run_service_job(trainer, warm_up, f"warm-up-{uuid.uuid4().hex[:6]}")
            for key in keys:
                spec = job_spec(WORKLOADS[key], epochs[key], args)
                metrics, breakdown = bench_workload(
                    WORKLOADS[key], spec, trainer, root / key, args.runs
                )
                results.update(metrics)
                breakdowns[key] = breakdown
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["results"] = {key: metric.as_json() for key, metric in results.items()}
    report["breakdown"] = {
        key: {part: metric.as_json() for part, metric in parts.items()}
        for key, parts in breakdowns.items()
    }
    report["target"] = target_verdict(results, keys)
    print_table(report, results, breakdowns)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each measurement")
    parser.add_argument(
        "--workloads",
        default="cancer-mlp,digits-cnn",
        help="comma-separated: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--cancer-epochs", type=int, default=200, help="breast-cancer MLP epochs")
    parser.add_argument("--digits-epochs", type=int, default=20, help="digits CNN epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads here and in the trainer's workers (default 1; 0: torch's own "
        "default, one per core)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--work-dir", type=Path, help="where job directories go (default: system temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def job_spec(workload: Workload, epochs: int, args: argparse.Namespace) -> pb.TrainingJobSpec:
    spec = pb.TrainingJobSpec()
    spec.data.dataset = workload.dataset
    spec.data.split_seed = 7
    spec.data.stratify = True
    spec.architecture.name = workload.architecture
    spec.architecture.args.update(workload.args)
    hp = spec.hyperparameters
    hp.epochs = epochs
    hp.batch_size = args.batch_size
    hp.optimizer = pb.OPTIMIZER_ALGORITHM_ADAM
    hp.learning_rate = args.learning_rate
    hp.dropout = workload.dropout
    hp.seed = 1
    spec.compute.device = pb.DEVICE_CUDA if args.device == "cuda" else pb.DEVICE_CPU
    return spec


# -- measurements -------------------------------------------------------------


VARIANTS = (
    # key, label, the baseline its overhead is measured against
    ("plain", "plain PyTorch loop (steps)", ""),
    ("library", "train() in-process: whole call", "plain"),
    ("worker_training", "worker in-process: first step to last checkpoint", "plain"),
    ("worker", "worker in-process: whole job", "plain"),
    ("worker_process", "worker process: spawn to exit", "plain"),
    ("service_reported", "service: the job's samples/s (steps)", "plain"),
    ("service_training", "service: first step to last checkpoint", "plain"),
    ("service_wall", "service: RUNNING to SUCCEEDED", "plain"),
    ("plain_cpu", "plain PyTorch loop, CPU time", ""),
    ("library_steps_cpu", "train() steps, CPU time", "plain_cpu"),
    ("library_cpu", "train() whole call, CPU time", "plain_cpu"),
)
"""Each way of training, in the order of what it adds to the one before; wall
clock, then CPU time of this process's thread (which other processes on the
machine cannot inflate) for the in-process ones."""

PARTS = (
    ("plain_s", "plain loop"),
    ("library_s", "train(): whole call (+ bookkeeping, validation, split, model)"),
    ("plain_cpu_s", "plain loop, CPU time"),
    ("library_steps_cpu_s", "train(): training steps, CPU time"),
    ("library_cpu_s", "train(): whole call, CPU time"),
    ("checkpoint_s", "worker in-process: checkpoints, all epochs"),
    ("worker_s", "worker in-process: whole job (+ checkpoints, lines, test)"),
    ("process_started_s", "worker process: spawn to data loaded (imports)"),
    ("process_first_step_s", "worker process: data loaded to first step"),
    ("process_finish_s", "worker process: last checkpoint to result line"),
    ("process_exit_s", "worker process: result line to exit"),
    ("process_s", "worker process: spawn to exit"),
    ("service_start_s", "service: RUNNING to the first step"),
    ("service_steps_s", "service: training steps (the job's samples/s)"),
    ("service_train_s", "service: first step to last checkpoint"),
    ("service_finish_s", "service: last checkpoint to SUCCEEDED"),
    ("service_s", "service: RUNNING to SUCCEEDED"),
    ("service_create_s", "service: CreateTrainingJob to SUCCEEDED seen"),
    ("service_worker_cpu_s", "service: CPU of the job's worker process"),
    ("service_server_cpu_s", "service: CPU of the trainer process during the job"),
    ("service_client_cpu_s", "service: CPU of this client (create, watch)"),
)
"""Where the time goes, in seconds (the breakdown table)."""


def bench_workload(
    workload: Workload, spec: pb.TrainingJobSpec, trainer: Trainer, directory: Path, runs: int
) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """Every way of training ``spec``, ``runs`` times, interleaved."""
    directory.mkdir(parents=True)
    dataset = datasets.load_training_data(spec.data)
    resolved = validate_training_spec(
        spec, dataset.schema, cuda_available=torch.cuda.is_available()
    )
    samples = samples_trained(dataset, spec, resolved)
    key, name = workload.key, workload.label
    rates = {variant: Metric(f"{name}: {label}", "samples/s") for variant, label, _ in VARIANTS}
    parts = {part: Metric(label, "s") for part, label in PARTS}
    # One untimed round first: the OS page cache and torch's lazy initialisation.
    plain_loop(dataset, spec, resolved)
    for run in range(runs):
        plain_s, plain_cpu_s = plain_loop(dataset, spec, resolved)
        library = library_in_process(spec, dataset, samples)
        worker = worker_in_process(spec, directory / f"worker-{run}")
        process = worker_process(spec, directory / f"process-{run}")
        service = run_service_job(trainer, spec, f"{key}-{run}-{uuid.uuid4().hex[:6]}")
        seconds = {
            "plain": plain_s,
            "library": library.total_s,
            "worker_training": worker.train_s,
            "worker": worker.total_s,
            "worker_process": process.total_s,
            "service_reported": samples / service.reported_rate,
            "service_training": service.train_s,
            "service_wall": service.running_s,
            "plain_cpu": plain_cpu_s,
            "library_steps_cpu": library.steps_cpu_s,
            "library_cpu": library.total_cpu_s,
        }
        for variant, value in seconds.items():
            rates[variant].values.append(samples / value)
        for part, value in (
            ("plain_s", plain_s),
            ("library_s", library.total_s),
            ("plain_cpu_s", plain_cpu_s),
            ("library_steps_cpu_s", library.steps_cpu_s),
            ("library_cpu_s", library.total_cpu_s),
            ("checkpoint_s", worker.checkpoint_s),
            ("worker_s", worker.total_s),
            ("process_started_s", process.started_s),
            ("process_first_step_s", process.first_step_s),
            ("process_finish_s", process.finish_s),
            ("process_exit_s", process.exit_s),
            ("process_s", process.total_s),
            ("service_start_s", service.start_s),
            ("service_steps_s", samples / service.reported_rate),
            ("service_train_s", service.train_s),
            ("service_finish_s", service.finish_s),
            ("service_s", service.running_s),
            ("service_create_s", service.create_s),
            ("service_worker_cpu_s", service.worker_cpu_s),
            ("service_server_cpu_s", service.server_cpu_s),
            ("service_client_cpu_s", service.client_cpu_s),
        ):
            parts[part].values.append(value)
        print(
            f"  {key} run {run + 1}/{runs}: "
            + ", ".join(f"{variant} {samples / s:,.0f}" for variant, s in seconds.items())
            + " samples/s",
            file=sys.stderr,
        )
    metrics: dict[str, Metric] = {f"{key}_{variant}": rates[variant] for variant, _, _ in VARIANTS}
    for variant, label, baseline in VARIANTS:
        if baseline:
            base = rates[baseline].values
            metrics[f"{key}_{variant}_overhead"] = Metric(
                f"{name}: overhead, {label}",
                "%",
                [100 * (1 - v / b) for v, b in zip(rates[variant].values, base, strict=True)],
            )
    return metrics, parts


def samples_trained(
    dataset: LoadedDataset, spec: pb.TrainingJobSpec, resolved: ResolvedSpec
) -> int:
    """Examples in the batches of every epoch (a trailing batch of one is dropped)."""
    count = len(split_dataset(dataset, spec.data).train)
    return resolved.epochs * sum(
        end - start for start, end in batch_bounds(count, resolved.batch_size)
    )


def batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches in order; a trailing batch of one example is dropped when there are others."""
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        bounds.pop()
    return bounds


def plain_loop(
    dataset: LoadedDataset, spec: pb.TrainingJobSpec, resolved: ResolvedSpec
) -> tuple[float, float]:
    """Seconds a minimal loop takes to train the same model on the same train
    split: wall clock, and CPU time of this thread."""
    splits = split_dataset(dataset, spec.data)
    device = torch.device("cuda" if resolved.device == pb.DEVICE_CUDA else "cpu")
    torch.manual_seed(resolved.seed)
    model = build_model(resolved.architecture, dropout=resolved.dropout)
    features = torch.from_numpy(np.array(splits.train.features))
    model.fit_normalization(features)
    model.to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=resolved.learning_rate, weight_decay=resolved.weight_decay
    )
    amp = resolved.mixed_precision and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x = features.to(device)
    y = torch.from_numpy(np.array(splits.train.labels)).to(device)
    shuffle = torch.Generator().manual_seed(resolved.seed)
    bounds = batch_bounds(len(y), resolved.batch_size)
    model.train()
    start, cpu_start = time.perf_counter(), time.thread_time()
    for _ in range(resolved.epochs):
        permutation = torch.randperm(len(y), generator=shuffle).to(device)
        for low, high in bounds:
            chosen = permutation[low:high]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
                loss = functional.cross_entropy(model(x[chosen]).float(), y[chosen])
            if scaler is not None:
                torch.autograd.backward(scaler.scale(loss))
                scaler.step(optimizer)
                scaler.update()
            else:
                torch.autograd.backward(loss)
                optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.thread_time() - cpu_start


def timed(work: Any) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@dataclass
class LibraryTimes:
    total_s: float
    total_cpu_s: float
    steps_cpu_s: float
    """CPU seconds of training steps, from the epochs' own samples/s."""


class _Epochs(TrainingObserver):
    def __init__(self) -> None:
        self.summaries: list[pb.EpochSummary] = []

    def on_epoch(self, summary: pb.EpochSummary, progress: pb.TrainingProgress) -> None:
        self.summaries.append(summary)


def library_in_process(
    spec: pb.TrainingJobSpec, dataset: LoadedDataset, samples: int
) -> LibraryTimes:
    """:func:`train` here, without checkpoints: its whole time (wall and CPU) and
    its steps' CPU time (its own samples/s, with this thread's CPU time as its clock)."""
    epochs = _Epochs()
    start, cpu_start = time.perf_counter(), time.thread_time()
    train(spec, dataset, observer=epochs, clock=time.thread_time)
    total, total_cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    rate = statistics.harmonic_mean([s.samples_per_second for s in epochs.summaries])
    return LibraryTimes(total_s=total, total_cpu_s=total_cpu, steps_cpu_s=samples / rate)


@dataclass
class WorkerTimes:
    total_s: float
    load_s: float
    train_s: float
    finish_s: float
    checkpoint_s: float


class _TimedLines:
    """A binary stream that notes when each progress line of a given type arrives."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def write(self, data: bytes) -> int:
        for line in data.splitlines():
            if line.strip():
                self.times.append((json.loads(line)["type"], time.perf_counter()))
        return len(data)

    def flush(self) -> None:
        return None

    def first(self, kind: str) -> float:
        return next(t for k, t in self.times if k == kind)

    def last(self, kind: str) -> float:
        return [t for k, t in self.times if k == kind][-1]

    def checkpoint_seconds(self) -> float:
        """Sum over epochs of the gap between an epoch line and its checkpoint line:
        writing, fsyncing and renaming the checkpoint (and hashing it)."""
        total, epoch_at = 0.0, None
        for kind, at in self.times:
            if kind == "epoch":
                epoch_at = at
            elif kind == "checkpoint" and epoch_at is not None:
                total += at - epoch_at
                epoch_at = None
        return total


def worker_in_process(spec: pb.TrainingJobSpec, job_dir: Path) -> WorkerTimes:
    """The worker's whole job in this process: what a worker process does, minus its start."""
    job_dir.mkdir(parents=True)
    job = pb.TrainingJob(name=f"trainingJobs/{job_dir.name}", spec=spec)
    job.environment.code_revision = "bench"
    (job_dir / protocol.JOB_FILE).write_bytes(job.SerializeToString())
    lines = _TimedLines()
    start = time.perf_counter()
    code = run_job(job_dir, events=lines)  # type: ignore[arg-type]
    end = time.perf_counter()
    if code != protocol.EXIT_SUCCEEDED:
        raise RuntimeError(f"the in-process worker exited with {code}: {lines.times[-3:]}")
    first_step, last_checkpoint = lines.first("step"), lines.last("checkpoint")
    return WorkerTimes(
        total_s=end - start,
        load_s=first_step - start,
        train_s=last_checkpoint - first_step,
        finish_s=end - last_checkpoint,
        checkpoint_s=lines.checkpoint_seconds(),
    )


@dataclass
class ProcessTimes:
    total_s: float
    started_s: float
    first_step_s: float
    finish_s: float
    exit_s: float


def worker_process(spec: pb.TrainingJobSpec, job_dir: Path) -> ProcessTimes:
    """``python -m conveyor.services.trainer.worker JOB_DIR`` as the trainer starts it,
    without the trainer: the cost of a process per job, phase by phase."""
    job_dir.mkdir(parents=True)
    job = pb.TrainingJob(name=f"trainingJobs/{job_dir.name}", spec=spec)
    job.environment.code_revision = "bench"
    (job_dir / protocol.JOB_FILE).write_bytes(job.SerializeToString())
    lines = _TimedLines()
    start = time.perf_counter()
    with (job_dir / protocol.LOG_FILE).open("wb") as log:
        process = subprocess.Popen(
            worker_command(job_dir, 1), stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT
        )
        assert process.stdout is not None
        for line in process.stdout:
            lines.write(line)
        code = process.wait()
    end = time.perf_counter()
    if code != protocol.EXIT_SUCCEEDED:
        raise RuntimeError(f"the worker exited with {code}; see {job_dir / protocol.LOG_FILE}")
    started, first_step = lines.first("started"), lines.first("step")
    last_checkpoint, result = lines.last("checkpoint"), lines.first("result")
    return ProcessTimes(
        total_s=end - start,
        started_s=started - start,
        first_step_s=first_step - started,
        finish_s=result - last_checkpoint,
        exit_s=end - result,
    )


@dataclass
class ServiceTimes:
    running_s: float
    """From the job's start_time (RUNNING) to its end_time (SUCCEEDED)."""
    start_s: float
    train_s: float
    finish_s: float
    reported_rate: float
    create_s: float
    worker_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


def run_service_job(trainer: Trainer, spec: pb.TrainingJobSpec, job_id: str) -> ServiceTimes:
    """:func:`service_job`, with the CPU the trainer, its worker and this client spent."""
    own_before, children_before = trainer.cpu_seconds()
    client_before = time.process_time()
    times = asyncio.run(service_job(trainer.address, spec, job_id))
    times.client_cpu_s = time.process_time() - client_before
    # The worker has exited (the job ended after it did); the trainer has reaped it.
    own_after, children_after = trainer.cpu_seconds()
    times.server_cpu_s = own_after - own_before
    times.worker_cpu_s = children_after - children_before
    return times


async def service_job(address: str, spec: pb.TrainingJobSpec, job_id: str) -> ServiceTimes:
    """Create a job, watch it to the end; its own times and reported throughput."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: trainer_service_pb2_grpc.TrainerServiceAsyncStub = Stub(channel)
        created_at = time.time()
        reply = await stub.CreateTrainingJob(
            rpc.CreateTrainingJobRequest(
                training_job_id=job_id, training_job=pb.TrainingJob(spec=spec)
            ),
            timeout=60,
        )
        name = reply.training_job.name
        request = rpc.WatchTrainingJobRequest(name=name)
        # Few progress events: the first step's time is all this needs from them.
        request.progress_interval.FromTimedelta(timedelta(seconds=30))
        first_step = last_checkpoint = 0.0
        final: pb.TrainingJob | None = None
        async for event in stub.WatchTrainingJob(request, timeout=JOB_TIMEOUT_S):
            at = event.event_time.ToDatetime().timestamp()
            if event.type == pb.TRAINING_JOB_EVENT_TYPE_PROGRESS and not first_step:
                first_step = at
            elif event.type == pb.TRAINING_JOB_EVENT_TYPE_CHECKPOINT_SAVED:
                last_checkpoint = at
            elif event.HasField("training_job") and event.training_job.state in (
                pb.JOB_STATE_SUCCEEDED,
                pb.JOB_STATE_FAILED,
                pb.JOB_STATE_CANCELLED,
            ):
                final = event.training_job
        seen_at = time.time()
    if final is None or final.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{name} did not succeed: {final.error if final else 'no end'}")
    started = final.start_time.ToDatetime().timestamp()
    ended = final.end_time.ToDatetime().timestamp()
    # Every epoch trains the same examples: the job's rate is the harmonic mean.
    rates = [summary.samples_per_second for summary in final.history]
    return ServiceTimes(
        running_s=ended - started,
        start_s=(first_step or started) - started,
        train_s=(last_checkpoint or ended) - (first_step or started),
        finish_s=ended - (last_checkpoint or ended),
        reported_rate=statistics.harmonic_mean(rates),
        create_s=seen_at - created_at,
    )


# -- the trainer process ---------------------------------------------------------


@contextlib.contextmanager
def trainer_process(data_dir: Path) -> Iterator[Trainer]:
    """``conveyor serve trainer`` in a child process, SERVING on a free loopback port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "CONVEYOR_TRAINER_LOG_LEVEL": "WARNING",
        "CONVEYOR_TRAINER_SHUTDOWN_GRACE": "PT5S",
        # The trainer alone: no credentials to check, nothing to register.
        "CONVEYOR_AUTH_MODE": "off",
    }
    env.pop("CONVEYOR_TRAINER_DATABASE_URL", None)
    command = [sys.executable, "-m", "conveyor.services.cli", "serve", "trainer"]
    command += ["--listen", address, "--data-dir", str(data_dir)]
    log_path = data_dir / "trainer.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        try:
            wait_until_serving(address, process=process, timeout_s=START_TIMEOUT_S)
        except (ServerExitedError, TimeoutError) as error:
            raise RuntimeError(f"{error}:\n{log_path.read_text()}") from error
        yield Trainer(address, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Trainer:
    address: str
    pid: int

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds (user + system) of the trainer process itself, and of its
        children that have exited (its workers), from /proc."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        # utime, stime, cutime, cstime: fields 14-17 of stat(5), 12-15 after the name.
        own = (int(fields[11]) + int(fields[12])) / ticks
        children = (int(fields[13]) + int(fields[14])) / ticks
        return own, children


# -- report ----------------------------------------------------------------------


def target_verdict(results: dict[str, Metric], keys: list[str]) -> dict[str, Any]:
    """Whether the service's throughput is within the target of the plain loop's."""
    verdict: dict[str, Any] = {"max_overhead_percent": TARGET_OVERHEAD_PERCENT}
    for key in keys:
        for variant in ("service_reported", "service_training", "service_wall"):
            metric = results[f"{key}_{variant}_overhead"]
            verdict[f"{key}_{variant}"] = {
                "overhead_percent": metric.median,
                "met": metric.median < TARGET_OVERHEAD_PERCENT,
            }
    return verdict


def print_table(
    report: dict[str, Any], results: dict[str, Metric], breakdowns: dict[str, dict[str, Metric]]
) -> None:
    machine = report["machine"]
    settings = report["settings"]
    print(
        f"\n{machine['cpu']} ({machine['cpus_usable']} usable CPUs), torch {machine['torch']} "
        f"with {settings['threads']} thread(s), Python {machine['python']}, "
        f"device {settings['device']}"
    )
    every = [*results.values(), *(m for parts in breakdowns.values() for m in parts.values())]
    width = max(len(metric.label) for metric in every)
    header = f"{'metric':<{width}} {'unit':>9} {'median':>10} {'min':>10} {'max':>10} {'spread':>7}"
    print(header)
    print("-" * len(header))
    for metric in results.values():
        _row(metric, width)
    for key, parts in breakdowns.items():
        print(f"\n{key}: where the time goes")
        for metric in parts.values():
            _row(metric, width)
    print()
    for key, verdict in report["target"].items():
        if isinstance(verdict, dict):
            state = "met" if verdict["met"] else "NOT met"
            print(
                f"target {key}: overhead {verdict['overhead_percent']:.1f}% "
                f"< {TARGET_OVERHEAD_PERCENT:.0f}%: {state}"
            )


def _row(metric: Metric, width: int) -> None:
    low, high, median = min(metric.values), max(metric.values), metric.median
    spread = 100 * (high - low) / abs(median) if median else 0.0
    digits = 3 if metric.unit == "s" else 1
    print(
        f"{metric.label:<{width}} {metric.unit:>9} {median:>10,.{digits}f} "
        f"{low:>10,.{digits}f} {high:>10,.{digits}f} {spread:>6.0f}%"
    )


def torch_machine_info() -> dict[str, Any]:
    """What the numbers were measured on, PyTorch included."""
    return {
        **machine_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
    }


if __name__ == "__main__":
    raise SystemExit(main())
