"""What ``conveyor optimize`` and ``conveyor optimizations`` print: progress,
before/after reports and jobs.

Kept apart from :mod:`conveyor.services.optimizer.cli` so that the commands
read as calls to the optimizer. Progress goes to stderr
(:class:`OptimizationView`); reports, tables and field lists to stdout,
through the registry commands' helpers
(:mod:`conveyor.services.registry.cli_output`), so every command prints
alike. A report is a table of rows (accuracy, latency, throughput, size,
parity, provider) and columns baseline | candidate | change, then the gate's
checks and the outcome.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Final, TextIO

from google.protobuf.duration_pb2 import Duration

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import gate
from conveyor.services.registry import cli_output as out
from conveyor.services.trainer.cli_output import code_name, duration_text, plural

TERMINAL: Final = frozenset(
    {
        pb.OPTIMIZATION_JOB_STATE_SUCCEEDED,
        pb.OPTIMIZATION_JOB_STATE_FAILED,
        pb.OPTIMIZATION_JOB_STATE_CANCELLED,
    }
)
FINAL_RESULTS: Final = frozenset(
    {
        pb.TECHNIQUE_STATE_SUCCEEDED,
        pb.TECHNIQUE_STATE_GATE_REFUSED,
        pb.TECHNIQUE_STATE_FAILED,
        pb.TECHNIQUE_STATE_CANCELLED,
    }
)
OPTIONS: Final = {
    # The technique each ``TechniqueSpec.options`` field selects, for people.
    "onnx_export": "ONNX export",
    "graph_optimization": "graph optimisation",
    "dynamic_int8": "dynamic int8",
    "static_int8": "static int8",
    "fp16": "fp16",
    "pruning": "pruning",
}
PHASES: Final = {
    pb.OPTIMIZATION_PHASE_QUEUED: "queued",
    pb.OPTIMIZATION_PHASE_PREPARING: "preparing",
    pb.OPTIMIZATION_PHASE_PRUNING: "pruning",
    pb.OPTIMIZATION_PHASE_FINE_TUNING: "fine-tuning",
    pb.OPTIMIZATION_PHASE_EXPORTING: "exporting",
    pb.OPTIMIZATION_PHASE_OPTIMIZING_GRAPH: "optimising the graph",
    pb.OPTIMIZATION_PHASE_CALIBRATING: "calibrating",
    pb.OPTIMIZATION_PHASE_QUANTIZING: "quantising",
    pb.OPTIMIZATION_PHASE_CHECKING_PARITY: "checking parity",
    pb.OPTIMIZATION_PHASE_EVALUATING: "evaluating",
    pb.OPTIMIZATION_PHASE_BENCHMARKING: "benchmarking",
    pb.OPTIMIZATION_PHASE_REGISTERING: "registering",
}
PROVIDERS: Final = {pb.EXECUTION_PROVIDER_CPU: "CPU", pb.EXECUTION_PROVIDER_CUDA: "CUDA"}
RUNTIMES: Final = {pb.RUNTIME_PYTORCH: "PyTorch", pb.RUNTIME_ONNXRUNTIME: "ONNX Runtime"}
PASSED: Final = "✓"
FAILED: Final = "✗"


def job_name(text: str) -> str:
    """``optimizationJobs/abc`` from ``abc`` or ``optimizationJobs/abc``."""
    return text if text.startswith("optimizationJobs/") else f"optimizationJobs/{text}"


def job_id(name: str) -> str:
    """``abc`` from ``optimizationJobs/abc``."""
    return name.removeprefix("optimizationJobs/")


def short_version(name: str) -> str:
    """``fraud@3`` from ``models/fraud/versions/3``, ``fraud@production`` from
    ``models/fraud@production``: what the command takes."""
    model, sep, version = name.removeprefix("models/").partition("/versions/")
    return f"{model}@{version}" if sep else model


def state_label(state: int) -> str:
    """``running`` for ``OPTIMIZATION_JOB_STATE_RUNNING``."""
    return out.enum_label(pb.OptimizationJobState, state, "OPTIMIZATION_JOB_STATE_")


class OptimizationView:
    """A job's progress on stderr, fed the whole job at each change.

    On a terminal one line (technique i/n, its result id, phase, message) is
    redrawn, and state changes and each technique's outcome are printed above
    it. Elsewhere (logs, CI, pipes) there is no redrawn line: a plain line
    when the phase or the technique changes, state changes and outcomes.
    The watch of a job that has already ended shows nothing: the command
    prints its results.
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
        self._first = True
        self._state: int = pb.OPTIMIZATION_JOB_STATE_UNSPECIFIED
        self._step: tuple[str, int] = ("", pb.OPTIMIZATION_PHASE_UNSPECIFIED)
        self._outcomes: dict[str, int] = {}

    def show(self, job: pb.OptimizationJob) -> None:
        first, self._first = self._first, False
        if first and job.state in TERMINAL:
            self._state = job.state
            return
        for index, result in enumerate(job.results):
            if result.state in FINAL_RESULTS and self._outcomes.get(result.result_id) != (
                result.state
            ):
                self._outcomes[result.result_id] = result.state
                self._print(f"{position(job, index)} {result.result_id}: {outcome_text(result)}")
        if job.state != self._state:
            self._state = job.state
            if job.state in TERMINAL:
                self.close()
            self._print(state_line(job))
        if job.state not in (
            pb.OPTIMIZATION_JOB_STATE_RUNNING,
            pb.OPTIMIZATION_JOB_STATE_CANCELLING,
        ):
            return
        step = (job.progress.result_id, job.progress.phase)
        line = progress_line(job) if job.progress.phase != pb.OPTIMIZATION_PHASE_QUEUED else ""
        if self._tty:
            self._draw(line[: max(self._columns() - 1, 0)])
        elif step != self._step and line:
            self._print(line)
        self._step = step

    def close(self) -> None:
        """Ends the redrawn line, if there is one."""
        if self._live:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._live = ""

    def _print(self, line: str) -> None:
        if self._tty and self._live:
            self._stream.write("\r\x1b[K")
        self._stream.write(line + "\n")
        if self._tty and self._live:
            self._stream.write(self._live)
        self._stream.flush()

    def _draw(self, line: str) -> None:
        if line and line != self._live:
            self._live = line
            self._stream.write("\r\x1b[K" + line)
            self._stream.flush()


def position(job: pb.OptimizationJob, index: int) -> str:
    """``[2/3]``: which technique of the job."""
    return f"[{index + 1}/{len(job.results)}]"


def progress_line(job: pb.OptimizationJob) -> str:
    """``[2/3] static-int8: calibrating (256/512 samples)`` and the like."""
    progress = job.progress
    phase = PHASES.get(progress.phase, "")
    message = progress.message.removeprefix(f"{progress.result_id}: ")
    if not message or message == phase:
        text = phase
    elif message.startswith(phase):
        text = message
    else:
        text = f"{phase} ({message})" if phase else message
    ids = [result.result_id for result in job.results]
    if progress.result_id in ids:
        return f"{position(job, ids.index(progress.result_id))} {progress.result_id}: {text}"
    return text


def state_line(job: pb.OptimizationJob) -> str:
    """``optimizationJobs/x: running`` and the like."""
    line = f"{job.name}: {state_label(job.state)}"
    if job.state == pb.OPTIMIZATION_JOB_STATE_CANCELLING:
        line += " (it stops at its next step)"
    elif job.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED:
        line += f" ({outcome_counts(job)})"
    return line


def outcome_counts(job: pb.OptimizationJob) -> str:
    """``2 registered, 1 refused by the gate``."""
    counts = {
        "registered": pb.TECHNIQUE_STATE_SUCCEEDED,
        "refused by the gate": pb.TECHNIQUE_STATE_GATE_REFUSED,
        "failed": pb.TECHNIQUE_STATE_FAILED,
        "cancelled": pb.TECHNIQUE_STATE_CANCELLED,
    }
    parts = [
        f"{sum(r.state == state for r in job.results)} {words}"
        for words, state in counts.items()
        if any(r.state == state for r in job.results)
    ]
    return ", ".join(parts) or "no techniques"


def outcome_text(result: pb.TechniqueResult) -> str:
    """``registered as models/x/versions/4``, ``refused: …``, ``failed: …``."""
    if result.state == pb.TECHNIQUE_STATE_SUCCEEDED:
        return f"registered as {result.model_version}"
    if result.state == pb.TECHNIQUE_STATE_GATE_REFUSED:
        return f"refused by the gate: {result.error.message.removeprefix(result.result_id + ': ')}"
    if result.state == pb.TECHNIQUE_STATE_FAILED:
        error = result.error
        if not error.code:
            return "failed (the job failed before it finished)"
        reason = f" [{error.reason}]" if error.reason else ""
        return f"failed: {code_name(error.code)}: {error.message}{reason}"
    return out.enum_label(pb.TechniqueState, result.state, "TECHNIQUE_STATE_")


def technique_text(spec: pb.TechniqueSpec) -> str:
    """``static int8 (512 samples, minmax, per channel)``: a technique and the
    options set on it."""
    kind = spec.WhichOneof("options")
    parts: list[str] = []
    if kind == "onnx_export" and spec.onnx_export.opset:
        parts.append(f"opset {spec.onnx_export.opset}")
    elif kind == "graph_optimization" and spec.graph_optimization.level:
        level = spec.graph_optimization.level
        parts.append(out.enum_label(pb.GraphOptimizationLevel, level, "GRAPH_OPTIMIZATION_LEVEL_"))
    elif kind == "dynamic_int8" and spec.dynamic_int8.per_channel:
        parts.append("per channel")
    elif kind == "static_int8":
        options = spec.static_int8
        if options.calibration_samples:
            parts.append(f"{options.calibration_samples} samples")
        if options.calibration_method:
            method = options.calibration_method
            parts.append(out.enum_label(pb.CalibrationMethod, method, "CALIBRATION_METHOD_"))
        if options.per_channel:
            parts.append("per channel")
    elif kind == "fp16" and spec.fp16.fp16_io:
        parts.append("fp16 inputs and outputs")
    elif kind == "pruning":
        pruning = spec.pruning
        pruned = out.enum_label(pb.PruningMethod, pruning.method, "PRUNING_METHOD_")
        parts.append(f"{pruned} {pruning.amount:.0%}")
        if pruning.fine_tune_epochs:
            parts.append(f"fine-tune {plural(pruning.fine_tune_epochs, 'epoch')}")
        if pruning.fine_tune_learning_rate:
            parts.append(f"lr {pruning.fine_tune_learning_rate:g}")
    name = OPTIONS.get(kind or "", "an unknown technique")
    return f"{name} ({', '.join(parts)})" if parts else name


# -- reports -------------------------------------------------------------------------


def report_table(
    report: pb.OptimizationReport, metric: str = gate.DEFAULT_METRIC
) -> tuple[list[str], list[list[str]]]:
    """The before/after table: rows of measure, baseline, candidate, change."""
    before, after = report.baseline, report.candidate
    rows = []
    for name in dict.fromkeys(("accuracy", metric)):
        if name in before.metrics or name in after.metrics:
            old, new = before.metrics.get(name), after.metrics.get(name)
            rows.append([name, _metric(old), _metric(new), _metric_change(name, old, new)])
    latencies = {m.batch_size: m for m in before.latencies}
    for measured in after.latencies:
        size = measured.batch_size
        reference = latencies.get(size, pb.LatencyMeasurement())
        for label, was, now in (
            ("p50", reference.p50, measured.p50),
            ("p99", reference.p99, measured.p99),
        ):
            old_s, new_s = _seconds(was), _seconds(now)
            rows.append(
                [f"{label} latency @{size}", _latency(old_s), _latency(new_s), _ratio(old_s, new_s)]
            )
        rows.append(
            [
                f"throughput @{size}",
                _throughput(reference.throughput),
                _throughput(measured.throughput),
                _ratio(reference.throughput, measured.throughput),
            ]
        )
    rows.append(
        [
            "file size",
            out.human_size(before.file_size_bytes),
            out.human_size(after.file_size_bytes),
            _ratio(before.file_size_bytes, after.file_size_bytes),
        ]
    )
    if report.technique == pb.TECHNIQUE_PRUNING:
        rows.append(["sparsity", f"{before.sparsity:.1%}", f"{after.sparsity:.1%}", ""])
    parity = report.parity
    rows.append(["parity max abs error", "-", f"{parity.max_abs_error:.3g}", ""])
    rows.append(["prediction agreement", "-", f"{parity.prediction_agreement:.2%}", ""])
    rows.append(["provider", _provider(before), _provider(after), ""])
    return ["", "baseline", "candidate", "change"], rows


def gate_lines(report: pb.OptimizationReport) -> list[str]:
    """``gate: passed`` then one ``✓``/``✗`` line per check."""
    verdict = "passed" if report.gate.passed else "refused"
    lines = [f"gate: {verdict}"]
    lines += [f"  {PASSED if c.passed else FAILED} {c.message}" for c in report.gate.checks]
    return lines


def print_report(report: pb.OptimizationReport, metric: str = gate.DEFAULT_METRIC) -> None:
    """A report as a person reads it: what was compared, the table, the gate."""
    print(f"baseline:  {report.baseline.description}")
    print(f"candidate: {report.candidate.description}")
    out.print_table(*report_table(report, metric))
    print("\n".join(gate_lines(report)))


def print_results(job: pb.OptimizationJob) -> None:
    """Each technique's report and outcome, on stdout."""
    metric = job.gate.accuracy_metric or gate.DEFAULT_METRIC
    for index, result in enumerate(job.results):
        spec = job.techniques[index] if index < len(job.techniques) else pb.TechniqueSpec()
        print(f"\n{position(job, index)} {result.result_id}: {technique_text(spec)}")
        if result.HasField("report"):
            print_report(result.report, metric)
        print(f"outcome: {outcome_text(result)}")


def print_outcome(job: pb.OptimizationJob) -> None:
    """How a job ended, its results and what they mean, on stdout."""
    took = ""
    if job.HasField("start_time") and job.HasField("end_time"):
        span = Duration()
        span.FromTimedelta(job.end_time.ToDatetime() - job.start_time.ToDatetime())
        took = f" in {duration_text(span)}"
    techniques = plural(len(job.results), "technique")
    print(f"{job.name} {state_label(job.state)}: {techniques} on {source_text(job)}{took}")
    device = next((r.report.device for r in job.results if r.report.device), "")
    if device:
        print(f"measured on {device}")
    print_results(job)
    print(f"\n{outcome_counts(job)}")
    refused = any(r.state == pb.TECHNIQUE_STATE_GATE_REFUSED for r in job.results)
    if refused and job.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED:
        print(
            "the job succeeded; a refused result is kept with its report and registers "
            "nothing (--max-accuracy-drop, --latency-tolerance and --parity-tolerance "
            "set the gate)"
        )


def source_text(job: pb.OptimizationJob) -> str:
    """``models/mlp/versions/3`` or ``models/mlp@production (models/mlp/versions/3)``."""
    resolved = job.resolved_source_model_version
    given = job.source_model_version
    if not resolved or resolved == given:
        return given or resolved
    return f"{given} ({resolved})"


# -- jobs ---------------------------------------------------------------------------


def job_row(job: pb.OptimizationJob) -> list[str]:
    """A row of the ``optimizations list`` table."""
    state = state_label(job.state)
    techniques = " ".join(f"{r.result_id}:{_short_outcome(r)}" for r in job.results)
    source = short_version(job.resolved_source_model_version or job.source_model_version)
    return [job_id(job.name), state, source, techniques or "-", out.timestamp(job.create_time)]


def job_fields(job: pb.OptimizationJob) -> list[tuple[str, str]]:
    """The ``optimizations show`` listing."""
    fields = [
        ("name", job.name),
        ("state", state_label(job.state).upper()),
        ("source", source_text(job)),
        ("dataset", job.dataset or "- (the source's lineage)"),
        ("techniques", "; ".join(technique_text(spec) for spec in job.techniques)),
        ("gate", gate_text(job.gate)),
        ("measurement", measurement_text(job.measurement)),
        ("created", out.timestamp(job.create_time)),
        ("started", out.timestamp(job.start_time)),
        ("ended", out.timestamp(job.end_time)),
    ]
    if job.state not in TERMINAL and job.HasField("progress"):
        fields.append(("progress", progress_line(job)))
    if job.HasField("error"):
        error = job.error
        fields.append(("error", f"{code_name(error.code)}: {error.message} [{error.reason}]"))
    return [(label, value) for label, value in fields if value]


def gate_text(given: pb.OptimizationGate) -> str:
    """``accuracy may drop 1 point, p50 latency +5%, parity 0.0001``; defaults
    filled in and marked."""

    drop, drop_default = _or_default(
        given.max_accuracy_drop_points if given.HasField("max_accuracy_drop_points") else None,
        gate.DEFAULT_MAX_ACCURACY_DROP_POINTS,
    )
    latency, latency_default = _or_default(
        given.latency_tolerance if given.HasField("latency_tolerance") else None,
        gate.DEFAULT_LATENCY_TOLERANCE,
    )
    parity, parity_default = _or_default(
        given.parity_tolerance if given.HasField("parity_tolerance") else None,
        gate.DEFAULT_PARITY_TOLERANCE,
    )
    metric = given.accuracy_metric or gate.DEFAULT_METRIC
    return (
        f"{metric} may drop {drop:g} point{'' if drop == 1 else 's'}{drop_default}, p50 "
        f"latency may rise "
        f"{latency:.0%}{latency_default}, parity within {parity:g}{parity_default}"
    )


def measurement_text(config: pb.MeasurementConfig) -> str:
    """``batch sizes 1, 32; 10 warm-up and 200 timed runs; device auto``."""
    sizes = ", ".join(str(size) for size in config.batch_sizes) or "1, 32 (default)"
    warmup = config.warmup_runs or 10
    timed = config.timed_runs or 200
    device = PROVIDERS.get(config.execution_provider, "auto").lower()
    threads = f"; {plural(config.intra_op_threads, 'thread')}" if config.intra_op_threads else ""
    return f"batch sizes {sizes}; {warmup} warm-up and {timed} timed runs; device {device}{threads}"


def _or_default(value: float | None, default: float) -> tuple[float, str]:
    return (default, " (default)") if value is None else (value, "")


def _short_outcome(result: pb.TechniqueResult) -> str:
    if result.state == pb.TECHNIQUE_STATE_SUCCEEDED:
        return "v" + out.version_number(result.model_version)
    if result.state == pb.TECHNIQUE_STATE_GATE_REFUSED:
        return "refused"
    return out.enum_label(pb.TechniqueState, result.state, "TECHNIQUE_STATE_")


# -- numbers -------------------------------------------------------------------------


def _seconds(value: Duration) -> float:
    return value.ToNanoseconds() / 1e9


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metric_change(name: str, old: float | None, new: float | None) -> str:
    if old is None or new is None:
        return ""
    if name in gate.LOWER_IS_BETTER:
        return f"{new - old:+.4f}"
    return f"{(new - old) * 100:+.2f} pts"


def _latency(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _throughput(per_second: float) -> str:
    return f"{per_second:,.0f}/s" if per_second > 0 else "-"


def _ratio(old: float, new: float) -> str:
    """``-42%``: the candidate's change against the baseline."""
    if old <= 0 or new <= 0:
        return ""
    return f"{(new / old - 1) * 100:+.0f}%"


def _provider(measured: pb.ModelMeasurement) -> str:
    provider = PROVIDERS.get(measured.execution_provider, "-")
    runtime = RUNTIMES.get(measured.runtime)
    return f"{provider} ({runtime})" if runtime else provider


def gated_metric(report: pb.OptimizationReport) -> str:
    """The metric the report's accuracy check judged (its message names it first)."""
    for check in report.gate.checks:
        if check.type == pb.GATE_CHECK_TYPE_ACCURACY_DROP:
            name = check.message.split(" ", 1)[0]
            if name in report.baseline.metrics:
                return name
    return gate.DEFAULT_METRIC
