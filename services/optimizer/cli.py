"""``conveyor optimize`` and ``conveyor optimizations …``: the optimizer for people.

``conveyor optimize fraud@3 --onnx --int8-static …`` builds an
``OptimizationJob`` from its flags (each technique flag adds one technique, in
the order given), creates it through the optimizer's gRPC API
(``--optimizer``, else ``CONVEYOR_OPTIMIZER_ADDR``, else loopback) and follows
it: a progress line on stderr (technique i/n, its result id, phase, message;
on a terminal one line is redrawn, in logs a plain line at each change), then
on stdout each technique's before/after report (accuracy, latency at each
batch size, throughput, file size, parity, provider), the gate's checks and
the outcome: registered as a new version, or refused. ``conveyor
optimizations list|show|watch|cancel|report`` read and steer jobs. What is
printed is :mod:`conveyor.services.optimizer.cli_output`.

The commands run as the trainer's do (:mod:`conveyor.services.trainer.cli`):
Ctrl-C while following a job stops following it: it keeps running, and the
command says how to follow it again or cancel it; it exits 130. Exit codes: 0
when the call worked (and a followed job SUCCEEDED, even when the gate
refused some of its results); 1 when a call failed (``conveyor: <CODE>:
<message>``, the field violations, a hint) or a followed job FAILED or was
CANCELLED; 2 for usage errors. ``--json`` prints the API's own messages
(proto3 JSON, proto field names) on stdout; progress stays on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from conveyor.optimizer.v1 import optimizer_messages_pb2 as rpc
from conveyor.optimizer.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc
from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import cli_output as opt_out
from conveyor.services.optimizer.cli_hints import hint
from conveyor.services.optimizer.cli_output import TERMINAL, OptimizationView, job_id, job_name
from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import EXIT_INTERRUPTED, pages_up_to, reported
from conveyor.services.trainer.cli import (
    LIST_PAGE_SIZE,
    MAX_INT32,
    MIN_INT32,
    UsageError,
    whole_number,
)
from conveyor.services.trainer.cli_output import code_name
from conveyor.shared import names
from conveyor.shared.errors import ConveyorError
from conveyor.shared.settings import ClientSettings

if TYPE_CHECKING:
    Optimizer = optimizer_service_pb2_grpc.OptimizerServiceAsyncStub

OPTIMIZER_SERVICE: Final = optimizer_service_pb2.DESCRIPTOR.services_by_name["OptimizerService"]
STATES: Final = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
DEVICES: Final = {
    "auto": pb.EXECUTION_PROVIDER_UNSPECIFIED,
    "cpu": pb.EXECUTION_PROVIDER_CPU,
    "cuda": pb.EXECUTION_PROVIDER_CUDA,
}
LEVELS: Final = {
    "basic": pb.GRAPH_OPTIMIZATION_LEVEL_BASIC,
    "extended": pb.GRAPH_OPTIMIZATION_LEVEL_EXTENDED,
    "all": pb.GRAPH_OPTIMIZATION_LEVEL_ALL,
}
CALIBRATIONS: Final = {
    "minmax": pb.CALIBRATION_METHOD_MINMAX,
    "entropy": pb.CALIBRATION_METHOD_ENTROPY,
    "percentile": pb.CALIBRATION_METHOD_PERCENTILE,
}
PRUNINGS: Final = {
    "unstructured": pb.PRUNING_METHOD_UNSTRUCTURED,
    "structured": pb.PRUNING_METHOD_STRUCTURED,
}
DEFAULT_PRUNE_AMOUNT: Final = 0.5
TECHNIQUE_FLAGS: Final = "--onnx, --graph, --int8-dynamic, --int8-static, --fp16 or --prune"
OPTION_FLAGS: Final = (
    # An option flag, the techniques it shapes, and the flag that adds one.
    ("opset", ("onnx_export",), "--opset", "--onnx"),
    ("graph_level", ("graph_optimization",), "--graph-level", "--graph"),
    (
        "per_channel",
        ("dynamic_int8", "static_int8"),
        "--per-channel",
        "--int8-dynamic or --int8-static",
    ),
    ("calibration_samples", ("static_int8",), "--calibration-samples", "--int8-static"),
    ("calibration_method", ("static_int8",), "--calibration-method", "--int8-static"),
    ("fp16_io", ("fp16",), "--fp16-io", "--fp16"),
    ("prune_amount", ("pruning",), "--prune-amount", "--prune"),
    ("fine_tune_epochs", ("pruning",), "--fine-tune-epochs", "--prune"),
    ("fine_tune_lr", ("pruning",), "--fine-tune-lr", "--prune"),
)


@dataclasses.dataclass
class Following:
    """The job a command is following, so that Ctrl-C and hints can say which."""

    job: str = ""
    """``optimizationJobs/{id}``, once known."""
    creating: bool = False


@dataclasses.dataclass(frozen=True)
class Session:
    """What a command needs to call the optimizer."""

    optimizer: Optimizer
    target: str
    timeout: float
    """Deadline of each unary call, in seconds."""
    following: Following


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


# -- arguments -------------------------------------------------------------------


class _AddTechnique(argparse.Action):
    """Appends ``(options field, value)`` to ``techniques``, in the order given."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        chosen = [*(getattr(namespace, self.dest, None) or []), (self.const, values)]
        setattr(namespace, self.dest, chosen)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags every optimizer command takes."""
    parser.add_argument(
        "--optimizer",
        metavar="HOST:PORT",
        help="optimizer address (default: $CONVEYOR_OPTIMIZER_ADDR, else 127.0.0.1:50053)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="deadline of each call (default: 30; following a job has none)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the API's messages)")


def add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``conveyor optimize``: the source, the techniques, the gate,
    the measurement and the job. Integers are bounded by their ``int32`` field;
    whether a value makes sense is the optimizer's to say."""
    int32 = whole_number(MIN_INT32, MAX_INT32, int_flag=True)
    parser.add_argument(
        "source",
        type=source_name,
        metavar="MODEL@VERSION_OR_ALIAS",
        help="the version to optimise: fraud@3, fraud@production, models/fraud/versions/3",
    )
    parser.set_defaults(techniques=[])
    techniques = parser.add_argument_group("techniques (each adds one result, in order)")

    def technique(flag: str, field: str, help: str, **more: Any) -> None:
        more.setdefault("nargs", 0)
        techniques.add_argument(
            flag, dest="techniques", action=_AddTechnique, const=field, help=help, **more
        )

    technique("--onnx", "onnx_export", "export a PyTorch model to ONNX (fp32)")
    techniques.add_argument("--opset", type=int32, help="the ONNX opset (default: 18)")
    technique("--graph", "graph_optimization", "ONNX Runtime's offline graph optimisation")
    techniques.add_argument("--graph-level", choices=sorted(LEVELS), help="default: extended")
    technique("--int8-dynamic", "dynamic_int8", "dynamic int8 quantisation")
    technique("--int8-static", "static_int8", "static int8 quantisation, calibrated")
    techniques.add_argument(
        "--per-channel", action="store_true", default=None, help="int8 weights per channel"
    )
    techniques.add_argument("--calibration-samples", type=int32, metavar="N", help="default: 512")
    techniques.add_argument(
        "--calibration-method", choices=sorted(CALIBRATIONS), help="default: minmax"
    )
    technique("--fp16", "fp16", "float16 weights and arithmetic (for GPUs)")
    techniques.add_argument(
        "--fp16-io", action="store_true", default=None, help="float16 inputs and outputs too"
    )
    technique(
        "--prune",
        "pruning",
        "magnitude pruning of a PyTorch model, then ONNX export",
        nargs=None,
        choices=sorted(PRUNINGS),
    )
    techniques.add_argument(
        "--prune-amount",
        type=float,
        metavar="F",
        help=f"the fraction of weights or channels to remove (default: {DEFAULT_PRUNE_AMOUNT})",
    )
    techniques.add_argument("--fine-tune-epochs", type=int32, metavar="N", help="default: 0")
    techniques.add_argument(
        "--fine-tune-lr", type=float, metavar="F", help="default: a tenth of the training's"
    )
    gate = parser.add_argument_group("gate (when a result is registered)")
    gate.add_argument(
        "--max-accuracy-drop", type=float, metavar="POINTS", help="in percentage points (1)"
    )
    gate.add_argument("--gate-metric", metavar="METRIC", help="accuracy (default), f1, roc_auc, …")
    gate.add_argument(
        "--latency-tolerance", type=float, metavar="FRACTION", help="slower p50 allowed (0.05)"
    )
    gate.add_argument(
        "--parity-tolerance", type=float, metavar="F", help="fp32 max abs error (1e-4)"
    )
    measure = parser.add_argument_group("measurement")
    measure.add_argument(
        "--batch-sizes", type=batch_sizes, metavar="N,N", help="batch sizes to time (1,32)"
    )
    measure.add_argument("--warmup-runs", type=int32, metavar="N", help="default: 10")
    measure.add_argument("--timed-runs", type=int32, metavar="N", help="default: 200")
    measure.add_argument("--threads", type=int32, metavar="N", help="intra-op threads")
    measure.add_argument("--device", choices=sorted(DEVICES), default="auto")
    job = parser.add_argument_group("job")
    job.add_argument(
        "--dataset", help="the dataset to calibrate and evaluate on (default: the lineage's)"
    )
    job.add_argument("--job-id", help="the job's id (default: generated)")
    job.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="print the job's name and return once it is queued",
    )


def optimization_job(args: argparse.Namespace) -> pb.OptimizationJob:
    """The job the flags describe; UsageError for flags that cannot go together.

    Values are not range-checked here: the optimizer validates the whole job
    and names every bad field, which the hint maps back to its flag.
    """
    chosen = [field for field, _ in args.techniques]
    if not chosen:
        raise UsageError(f"name at least one technique: {TECHNIQUE_FLAGS}")
    for attribute, fields, flag, adds in OPTION_FLAGS:
        if getattr(args, attribute) is not None and not set(fields) & set(chosen):
            raise UsageError(f"{flag} needs {adds}")
    job = pb.OptimizationJob(source_model_version=args.source)
    for field, value in args.techniques:
        job.techniques.append(_technique(field, value, args))
    if args.max_accuracy_drop is not None:
        job.gate.max_accuracy_drop_points = args.max_accuracy_drop
    if args.gate_metric:
        job.gate.accuracy_metric = args.gate_metric
    if args.latency_tolerance is not None:
        job.gate.latency_tolerance = args.latency_tolerance
    if args.parity_tolerance is not None:
        job.gate.parity_tolerance = args.parity_tolerance
    config = job.measurement
    config.batch_sizes.extend(args.batch_sizes or [])
    config.warmup_runs = args.warmup_runs or 0
    config.timed_runs = args.timed_runs or 0
    config.intra_op_threads = args.threads or 0
    config.execution_provider = DEVICES[args.device]
    if args.dataset:
        job.dataset = (
            args.dataset if args.dataset.startswith("datasets/") else (f"datasets/{args.dataset}")
        )
    return job


def _technique(field: str, value: str | None, args: argparse.Namespace) -> pb.TechniqueSpec:
    spec = pb.TechniqueSpec()
    if field == "onnx_export":
        spec.onnx_export.opset = args.opset or 0
    elif field == "graph_optimization":
        if args.graph_level:
            spec.graph_optimization.level = LEVELS[args.graph_level]
    elif field == "dynamic_int8":
        spec.dynamic_int8.per_channel = bool(args.per_channel)
    elif field == "static_int8":
        spec.static_int8.calibration_samples = args.calibration_samples or 0
        if args.calibration_method:
            spec.static_int8.calibration_method = CALIBRATIONS[args.calibration_method]
        spec.static_int8.per_channel = bool(args.per_channel)
    elif field == "fp16":
        spec.fp16.fp16_io = bool(args.fp16_io)
    else:
        pruning = spec.pruning
        pruning.method = PRUNINGS[str(value)]
        amount = args.prune_amount
        pruning.amount = DEFAULT_PRUNE_AMOUNT if amount is None else amount
        pruning.fine_tune_epochs = args.fine_tune_epochs or 0
        pruning.fine_tune_learning_rate = args.fine_tune_lr or 0.0
    return spec


def source_name(text: str) -> str:
    """``models/fraud/versions/3`` from ``fraud@3``, ``models/fraud@production``
    from ``fraud@production``; the full names as they are."""
    name = text if text.startswith("models/") else f"models/{text}"
    model, at, reference = name.partition("@")
    if at and reference.isdigit():
        name = f"{model}/versions/{reference.lstrip('0') or '0'}"
    try:
        names.parse_model_version_ref(name)
    except ConveyorError:
        raise argparse.ArgumentTypeError(
            "expected MODEL@VERSION or MODEL@ALIAS (fraud@3, fraud@production) or "
            f"models/MODEL/versions/N, got {text!r}"
        ) from None
    return name


def batch_sizes(text: str) -> list[int]:
    """``1,32``: whole numbers an ``int32`` holds, comma-separated."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(MIN_INT32 <= value <= MAX_INT32 for value in values):
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas (e.g. 1,32), got {text!r}"
        )
    return values


def seconds(text: str) -> float:
    """A positive number of seconds (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def report_name(text: str) -> str:
    """``optimizationJobs/x/reports/int8`` from ``x/int8`` or the full name."""
    job, sep, result = text.removeprefix("optimizationJobs/").partition("/")
    result = result.removeprefix("reports/")
    if not sep or not job or not result:
        raise argparse.ArgumentTypeError(
            f"expected JOB/RESULT_ID (e.g. abc/static-int8), got {text!r}"
        )
    return f"optimizationJobs/{job}/reports/{result}"


# -- running a command --------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs ``command`` against the optimizer; every expected failure exits 1."""
    following = Following()
    target = getattr(args, "optimizer", None) or "the optimizer"

    def call() -> int:
        nonlocal target
        settings = ClientSettings()
        target = args.optimizer or settings.optimizer_addr
        try:
            return asyncio.run(_with_session(command, args, settings, target, following))
        except UsageError as error:
            print(f"conveyor {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _interrupted(following)
            return EXIT_INTERRUPTED

    return reported(call, lambda failure: hint(failure, args, target=target, job=following.job))


async def _with_session(
    command: Command,
    args: argparse.Namespace,
    settings: ClientSettings,
    target: str,
    following: Following,
) -> int:
    timeout = args.timeout or settings.default_timeout.total_seconds()
    channel = settings.channel(target, [OPTIMIZER_SERVICE], timeout=timedelta(seconds=timeout))
    async with channel:
        stub = optimizer_service_pb2_grpc.OptimizerServiceStub(channel)
        return await command(Session(stub, target, timeout, following), args)


def _interrupted(following: Following) -> None:
    if following.creating:
        print(
            "\nconveyor: interrupted before the optimizer answered; `conveyor optimizations "
            "list` shows whether the job was created",
            file=sys.stderr,
        )
        return
    if not following.job:
        print("\nconveyor: interrupted", file=sys.stderr)
        return
    short = job_id(following.job)
    print(
        f"\nstopped watching {following.job}; it keeps running.\n"
        f"  follow it again: conveyor optimizations watch {short}\n"
        f"  cancel it:       conveyor optimizations cancel {short}",
        file=sys.stderr,
    )


# -- commands ---------------------------------------------------------------------


async def optimize(session: Session, args: argparse.Namespace) -> int:
    """``conveyor optimize MODEL@VERSION …``: create a job, then follow it."""
    request = rpc.CreateOptimizationJobRequest(
        optimization_job=optimization_job(args),
        optimization_job_id=args.job_id or "",
        # One id per invocation: a retried call creates the job once.
        request_id=str(uuid.uuid4()),
    )
    session.following.creating = True
    reply = await session.optimizer.CreateOptimizationJob(request, timeout=session.timeout)
    session.following.creating = False
    job = reply.optimization_job
    if not args.watch:
        if args.json:
            out.print_json({"optimization_job": out.message_dict(job)})
        else:
            print(job.name)
            print(
                f"follow it with `conveyor optimizations watch {job_id(job.name)}`",
                file=sys.stderr,
            )
        return 0
    return finish(await follow(session, job.name), as_json=args.json)


async def optimizations_watch(session: Session, args: argparse.Namespace) -> int:
    """``conveyor optimizations watch JOB``: follow a job to its end."""
    return finish(await follow(session, job_name(args.job)), as_json=args.json)


async def optimizations_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor optimizations list``: jobs newest first, by state if asked."""
    restriction = f"state = {args.state.upper()}" if args.state else ""

    async def page(token: str, size: int) -> tuple[list[pb.OptimizationJob], str]:
        request = rpc.ListOptimizationJobsRequest(
            page_size=size, page_token=token, filter=restriction
        )
        reply = await session.optimizer.ListOptimizationJobs(request, timeout=session.timeout)
        return list(reply.optimization_jobs), reply.next_page_token

    jobs, more = await pages_up_to(page, args.limit, LIST_PAGE_SIZE)
    if args.json:
        out.print_json({"optimization_jobs": [out.message_dict(job) for job in jobs]})
    elif jobs:
        out.print_table(
            ("job", "state", "source", "techniques", "created"),
            [opt_out.job_row(job) for job in jobs],
        )
        if more:
            print(f"(more: raise --limit above {args.limit})", file=sys.stderr)
    else:
        print("no optimisation jobs" + (" match" if restriction else ""), file=sys.stderr)
    return 0


async def optimizations_show(session: Session, args: argparse.Namespace) -> int:
    """``conveyor optimizations show JOB``: the job's fields and each result."""
    reply = await session.optimizer.GetOptimizationJob(
        rpc.GetOptimizationJobRequest(name=job_name(args.job)), timeout=session.timeout
    )
    job = reply.optimization_job
    if args.json:
        out.print_json({"optimization_job": out.message_dict(job)})
        return 0
    out.print_fields(opt_out.job_fields(job))
    opt_out.print_results(job)
    return 0


async def optimizations_cancel(session: Session, args: argparse.Namespace) -> int:
    """``conveyor optimizations cancel JOB``: a queued job ends now, a running
    one at its next step; versions it registered stay registered."""
    reply = await session.optimizer.CancelOptimizationJob(
        rpc.CancelOptimizationJobRequest(name=job_name(args.job)), timeout=session.timeout
    )
    job = reply.optimization_job
    if args.json:
        out.print_json({"optimization_job": out.message_dict(job)})
    elif job.state == pb.OPTIMIZATION_JOB_STATE_CANCELLED:
        print(f"{job.name}: cancelled")
    else:
        print(
            f"{job.name}: cancel requested; it stops at its next step "
            f"(`conveyor optimizations watch {job_id(job.name)}` shows when)"
        )
    return 0


async def optimizations_report(session: Session, args: argparse.Namespace) -> int:
    """``conveyor optimizations report JOB/RESULT_ID``: one result's report."""
    reply = await session.optimizer.GetOptimizationReport(
        rpc.GetOptimizationReportRequest(name=args.report), timeout=session.timeout
    )
    report = reply.report
    if args.json:
        out.print_json({"report": out.message_dict(report)})
        return 0
    print(f"{report.name}: {opt_out.technique_text(report.spec)} of {report.source_model_version}")
    facts = [("dataset", report.dataset), ("device", report.device)]
    facts.append(("measured", opt_out.measurement_text(report.measurement)))
    out.print_fields([(label, value) for label, value in facts if value])
    print()
    opt_out.print_report(report, opt_out.gated_metric(report))
    registered = report.model_version
    print(f"outcome: {f'registered as {registered}' if registered else 'not registered'}")
    return 0


# -- following a job ----------------------------------------------------------------


async def follow(
    session: Session, name: str, *, view: OptimizationView | None = None
) -> pb.OptimizationJob:
    """Watches ``name`` until it ends, showing progress; the final job. A
    stream that ends early (the optimizer restarting) is resumed."""
    view = view or OptimizationView(sys.stderr)
    session.following.job = name
    request = rpc.WatchOptimizationJobRequest(name=name)
    try:
        while True:
            async for update in session.optimizer.WatchOptimizationJob(request, timeout=None):
                job = update.optimization_job
                view.show(job)
                if job.state in TERMINAL:
                    return job
            reply = await session.optimizer.GetOptimizationJob(
                rpc.GetOptimizationJobRequest(name=name), timeout=session.timeout
            )
            if reply.optimization_job.state in TERMINAL:
                view.show(reply.optimization_job)
                return reply.optimization_job
            await asyncio.sleep(1.0)
    finally:
        view.close()


def finish(job: pb.OptimizationJob, *, as_json: bool) -> int:
    """Prints how a followed job ended; 0 when it SUCCEEDED, else 1."""
    if as_json:
        out.print_json({"optimization_job": out.message_dict(job)})
    else:
        opt_out.print_outcome(job)
    if job.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED:
        return 0
    short = job_id(job.name)
    if job.state == pb.OPTIMIZATION_JOB_STATE_CANCELLED:
        print(
            f"conveyor: {job.name} was cancelled ({opt_out.outcome_counts(job)}); versions "
            "it registered stay registered",
            file=sys.stderr,
        )
        return 1
    error = job.error
    if not job.HasField("error"):
        failed = [r for r in job.results if r.state == pb.TECHNIQUE_STATE_FAILED and r.error.code]
        error = failed[0].error if failed else pb.OptimizationError()
    code = code_name(error.code)
    reason = f" [{error.reason}]" if error.reason and error.reason != code else ""
    why = f": {code}: {error.message}{reason}" if error.code else ""
    print(f"conveyor: {job.name} failed{why}", file=sys.stderr)
    print(
        f"hint: `conveyor optimizations show {short}` shows every technique's outcome",
        file=sys.stderr,
    )
    return 1
