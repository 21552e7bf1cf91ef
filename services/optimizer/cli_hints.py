"""What ``conveyor optimize`` and ``conveyor optimizations`` suggest after a
failed call: the flags behind the fields an INVALID_ARGUMENT names, and the
next step for each FAILED_PRECONDITION reason."""

from __future__ import annotations

import argparse
from typing import Final

import grpc

from conveyor.services.optimizer.cli_output import job_id, job_name
from conveyor.services.trainer.cli import named_flags
from conveyor.shared.errors import ConveyorError

FLAGS: Final = (
    # The flag behind each job field the optimizer may refuse, most specific first.
    ("optimization_job_id", "--job-id"),
    ("optimization_job.source_model_version", "MODEL@VERSION_OR_ALIAS"),
    ("optimization_job.dataset", "--dataset"),
    ("optimization_job.techniques.onnx_export.opset", "--opset"),
    ("optimization_job.techniques.graph_optimization.level", "--graph-level"),
    ("optimization_job.techniques.static_int8.calibration_samples", "--calibration-samples"),
    ("optimization_job.techniques.static_int8.calibration_method", "--calibration-method"),
    ("optimization_job.techniques.pruning.method", "--prune"),
    ("optimization_job.techniques.pruning.amount", "--prune-amount"),
    ("optimization_job.techniques.pruning.fine_tune_epochs", "--fine-tune-epochs"),
    ("optimization_job.techniques.pruning.fine_tune_learning_rate", "--fine-tune-lr"),
    ("optimization_job.techniques", "the technique flags"),
    ("optimization_job.gate.max_accuracy_drop_points", "--max-accuracy-drop"),
    ("optimization_job.gate.accuracy_metric", "--gate-metric"),
    ("optimization_job.gate.latency_tolerance", "--latency-tolerance"),
    ("optimization_job.gate.parity_tolerance", "--parity-tolerance"),
    ("optimization_job.measurement.batch_sizes", "--batch-sizes"),
    ("optimization_job.measurement.warmup_runs", "--warmup-runs"),
    ("optimization_job.measurement.timed_runs", "--timed-runs"),
    ("optimization_job.measurement.intra_op_threads", "--threads"),
    ("optimization_job.measurement.execution_provider", "--device"),
)
PRECONDITIONS: Final = {
    # What to do about each FAILED_PRECONDITION reason of ``conveyor optimize``.
    "DATASET_SHAPE_MISMATCH": (
        "the dataset's examples do not fit the model's input: name the dataset it was "
        "trained on with --dataset, or leave --dataset out to use the one in its lineage"
    ),
    "DATASET_REQUIRED": (
        "the source names no dataset in its lineage: name the one it was trained on with --dataset"
    ),
    "DATASET_NOT_SUPPORTED": (
        "the optimizer evaluates on the built-in datasets: --dataset breast-cancer, "
        "digits or synthetic"
    ),
    "NO_GPU": "the optimizer has no GPU: use --device cpu (or auto)",
    "SOURCE_ARCHIVED": "the source version is archived: optimise another one",
    "UNSUPPORTED_FORMAT": (
        "the optimizer works on PyTorch state dicts and ONNX models: optimise a version "
        "in one of those formats"
    ),
}


def hint(error: ConveyorError, args: argparse.Namespace, *, target: str, job: str) -> str:
    """What to do next after a failed call; ``job`` is the job being followed."""
    code = error.code
    creating = args.command == "optimize" and not job
    short = job_id(job or job_name(getattr(args, "job", "") or "JOB"))
    if code == grpc.StatusCode.UNAVAILABLE:
        if error.reason == "REGISTRY_UNAVAILABLE":
            where = "the optimizer cannot reach its registry: is one running? (`conveyor up`)"
        else:
            where = (
                f"is an optimizer running at {target}? start one with `conveyor serve "
                "optimizer` (or `conveyor up`), or point at it with --optimizer HOST:PORT "
                "or CONVEYOR_OPTIMIZER_ADDR"
            )
        if job:
            where += f"; the job keeps running: `conveyor optimizations watch {short}` follows it"
        return where
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        flags = named_flags(error, FLAGS)
        if creating and flags:
            return f"fix {', '.join(flags)} and run the command again"
        return "fix the fields named above and run the command again"
    if code == grpc.StatusCode.NOT_FOUND:
        if creating:
            model = args.source.removeprefix("models/").split("/")[0].split("@")[0]
            return (
                "check the source: `conveyor models list` shows the models, `conveyor "
                f"models versions {model}` its versions and aliases; and --dataset, if given"
            )
        if error.reason == "REPORT_NOT_FOUND":
            return (
                f"`conveyor optimizations show {args.report.split('/')[1]}` lists the job's "
                "results; a result has a report once it has been measured"
            )
        return "check the name: `conveyor optimizations list` shows the jobs"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _precondition_hint(error, creating, short)
    hints = {
        grpc.StatusCode.ALREADY_EXISTS: (
            "the job id is taken: choose another --job-id, or see `conveyor optimizations show ID`"
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (
            "the optimizer's queue is full: wait for jobs to finish or cancel some "
            "(`conveyor optimizations list --state queued`)"
        ),
        grpc.StatusCode.DEADLINE_EXCEEDED: (
            f"no answer in time: raise --timeout, or check `conveyor health {target}`"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            "no valid credentials: set CONVEYOR_TOKEN_FILE to a token file "
            "(`conveyor up` writes development ones under <data-dir>/credentials)"
        ),
        grpc.StatusCode.PERMISSION_DENIED: (
            "your role does not allow this: optimising and cancelling are for ML "
            "engineers, registering results for the model's owner team"
        ),
    }
    return hints.get(code, "this looks like an optimizer bug: report it with the message above")


def _precondition_hint(error: ConveyorError, creating: bool, short: str) -> str:
    if error.reason == "OPTIMIZATION_JOB_ENDED":
        return f"the job has already ended: `conveyor optimizations show {short}` says how"
    if error.reason == "TECHNIQUE_NOT_APPLICABLE":
        if error.metadata.get("technique") in ("onnx_export", "pruning"):
            return (
                "--onnx and --prune work on PyTorch models only, and the source is already "
                "ONNX: optimise the PyTorch version it was made from (its lineage's parent, "
                "see `conveyor models versions`), or drop those flags"
            )
        return (
            "--graph, --int8-* and --fp16 need an fp32 source: optimise the PyTorch or fp32 "
            "ONNX version this one was made from"
        )
    if error.reason in PRECONDITIONS:
        return PRECONDITIONS[error.reason]
    if creating:
        return "the source or its data cannot be optimised as asked: see the message above"
    return f"see `conveyor optimizations show {short}`"
