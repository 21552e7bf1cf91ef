"""What ``conveyor train … --sweep`` and ``conveyor sweeps`` print: a sweep's
progress, its trials, its outcome and the sweep listings.

Kept apart from :mod:`conveyor.services.trainer.sweep_cli` as
:mod:`conveyor.services.trainer.cli_output` is from the job commands, whose
texts for a spec it shares. Progress goes to stderr (:class:`SweepView`: one
line each time a trial is queued, starts or ends); the trial table, results
and field lists to stdout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Final, TextIO

from google.protobuf import json_format, struct_pb2
from google.protobuf.duration_pb2 import Duration

from conveyor.services.registry import cli_output as out
from conveyor.services.trainer.cli_output import (
    TERMINAL,
    code_name,
    compute_text,
    data_text,
    duration_text,
    early_stopping_text,
    hyperparameters_text,
    job_id,
    plain_value,
    plural,
    struct_text,
    sweep_id,
)
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc

MAX_TRIALS: Final = 1_000
"""The most trials a sweep runs (the trainer's limit on ``max_trials``)."""


def grid_size(parameters: Sequence[pb.ParameterSpec]) -> int:
    """How many combinations the parameters' grids make, counted as the trainer
    counts them (a real range has its ``grid_points``, at least 2)."""
    return math.prod(_grid_points(parameter) for parameter in parameters)


def _grid_points(parameter: pb.ParameterSpec) -> int:
    kind = parameter.WhichOneof("domain")
    if kind == "double_range":
        return max(parameter.double_range.grid_points, 2)
    if kind == "integer_range":
        interval = parameter.integer_range
        return max((interval.max - interval.min) // (interval.step or 1) + 1, 0)
    if kind == "categorical":
        return len(parameter.categorical.values)
    return 0


def planned_trials(spec: pb.SweepJobSpec) -> int:
    """How many trials the sweep runs: ``max_trials``, and for a grid at most
    its size."""
    count = min(spec.max_trials, MAX_TRIALS)
    if spec.algorithm == pb.SEARCH_ALGORITHM_GRID:
        count = min(count, grid_size(spec.parameters))
    return count


def value_text(value: Any) -> str:
    """A parameter value as a person writes it: ``0.001``, ``16``, ``SGD``,
    ``true``, ``[32,16]``."""
    if isinstance(value, struct_pb2.Value):
        value = json_format.MessageToDict(value)
    plain = plain_value(value)
    if isinstance(plain, bool):
        return "true" if plain else "false"
    if isinstance(plain, float):
        return f"{plain:.6g}"
    if isinstance(plain, str):
        return plain
    return json.dumps(plain, separators=(",", ":"))


def domain_text(parameter: pb.ParameterSpec) -> str:
    """``hyperparameters.learning_rate in log 0.0001..0.1 (3 points)`` and the like."""
    kind = parameter.WhichOneof("domain")
    if kind == "double_range":
        real = parameter.double_range
        scale = "log " if real.log_scale else ""
        points = f" ({real.grid_points} points)" if real.grid_points else ""
        text = f"{scale}{real.min:g}..{real.max:g}{points}"
    elif kind == "integer_range":
        whole = parameter.integer_range
        step = f" step {whole.step}" if whole.step > 1 else ""
        text = f"{whole.min}..{whole.max}{step}"
    else:
        text = ", ".join(value_text(value) for value in parameter.categorical.values)
        text = f"{{{text}}}"
    return f"{parameter.path} in {text}"


def search_text(spec: pb.SweepJobSpec) -> str:
    """``grid search, 6 trials, 2 at a time`` or ``random search (seed 7), …``."""
    if spec.algorithm == pb.SEARCH_ALGORITHM_RANDOM:
        kind = f"random search (seed {spec.seed})"
    else:
        kind = "grid search"
    trials = plural(planned_trials(spec), "trial")
    return f"{kind}, {trials}, {max(spec.max_parallel_trials, 1)} at a time"


def objective_text(spec: pb.SweepJobSpec) -> str:
    """``validation accuracy (maximize)``; an unset goal is the trainer's default."""
    metric = spec.objective_metric
    goal = spec.objective_goal
    if goal == pb.METRIC_GOAL_UNSPECIFIED:
        minimized = metric == "loss" or metric.endswith("_loss")
        goal = pb.METRIC_GOAL_MINIMIZE if minimized else pb.METRIC_GOAL_MAXIMIZE
    return f"validation {metric} ({pb.MetricGoal.Name(goal).removeprefix('METRIC_GOAL_').lower()})"


def _state_text(state: pb.JobState.ValueType) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


def sweep_state_line(sweep: pb.SweepJob) -> str:
    """``sweepJobs/x: running (grid search, 4 trials, 1 at a time)`` and the like."""
    line = f"{sweep.name}: {_state_text(sweep.state).lower()}"
    if sweep.state not in TERMINAL:
        line += f" ({search_text(sweep.spec)})"
        if sweep.cancel_requested:
            line += ", cancel requested"
    return line


def parameter_texts(trial: pb.SweepTrial, spec: pb.SweepJobSpec) -> list[str]:
    """``path=value`` for each of the trial's parameters, in the spec's order."""
    paths = [parameter.path for parameter in spec.parameters]
    paths += sorted(set(trial.parameters.fields) - set(paths))
    return [
        f"{path}={value_text(trial.parameters[path])}"
        for path in paths
        if path in trial.parameters.fields
    ]


def trial_line(trial: pb.SweepTrial, index: int, spec: pb.SweepJobSpec) -> str:
    """``trial 3/12 SUCCEEDED  hyperparameters.learning_rate=0.001  val accuracy 0.9535``."""
    total = planned_trials(spec)
    number = f"{index}/{total}" if total else str(index)
    parts = [f"trial {number} {_state_text(trial.state)}", *parameter_texts(trial, spec)]
    if trial.HasField("objective_value"):
        parts.append(f"val {spec.objective_metric} {trial.objective_value:.4f}")
    elif trial.state == pb.JOB_STATE_FAILED:
        parts.append(f"(`conveyor jobs show {job_id(trial.training_job)}` says why)")
    return "  ".join(parts)


class SweepView:
    """A sweep's trials on stderr, one plain line each time a trial is queued,
    starts or ends, and one when the sweep's state changes. A resumed watch's
    snapshot repeats nothing already printed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._spec = pb.SweepJobSpec()
        self._state: tuple[int, bool] = (pb.JOB_STATE_UNSPECIFIED, False)
        self._indexes: dict[str, int] = {}
        self._shown: dict[str, tuple[int, float | None]] = {}

    def show(self, event: rpc.WatchSweepJobResponse) -> None:
        if event.HasField("sweep_job"):
            self._on_sweep(event.sweep_job, snapshot=event.type == pb.SWEEP_JOB_EVENT_TYPE_SNAPSHOT)
        if event.type == pb.SWEEP_JOB_EVENT_TYPE_TRIAL_UPDATED:
            self._on_trial(event.trial)

    def _on_sweep(self, sweep: pb.SweepJob, *, snapshot: bool) -> None:
        self._spec.CopyFrom(sweep.spec)
        for trial in sweep.trials:
            self._index(trial)
        state = (sweep.state, sweep.cancel_requested)
        if state != self._state:
            self._state = state
            if sweep.state not in TERMINAL or not snapshot:
                self._print(sweep_state_line(sweep))
        if snapshot and sweep.state not in TERMINAL:
            for trial in sweep.trials:
                self._on_trial(trial)

    def _index(self, trial: pb.SweepTrial) -> int:
        """The trial's number, from 1: trials are created, and reported, in order."""
        return self._indexes.setdefault(trial.training_job, len(self._indexes) + 1)

    def _on_trial(self, trial: pb.SweepTrial) -> None:
        index = self._index(trial)
        seen = (trial.state, trial.objective_value if trial.HasField("objective_value") else None)
        if self._shown.get(trial.training_job) == seen:
            return
        self._shown[trial.training_job] = seen
        self._print(trial_line(trial, index, self._spec))

    def _print(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


def _parameter_headers(paths: Sequence[str]) -> list[str]:
    """Each path's last part, or the whole path where two would share it."""
    last = [path.rsplit(".", 1)[-1] for path in paths]
    return [name if last.count(name) == 1 else path for name, path in zip(last, paths, strict=True)]


def trials_table(sweep: pb.SweepJob) -> tuple[list[str], list[list[str]]]:
    """One row per trial: its job, parameter values, state and objective; a
    first column marks the best ``*`` once there is one."""
    paths = [parameter.path for parameter in sweep.spec.parameters]
    headers = ["trial", *_parameter_headers(paths), "state", f"val {sweep.spec.objective_metric}"]
    rows = [
        [
            job_id(trial.training_job),
            *(
                value_text(trial.parameters[path]) if path in trial.parameters.fields else "-"
                for path in paths
            ),
            _state_text(trial.state).lower(),
            f"{trial.objective_value:.4f}" if trial.HasField("objective_value") else "-",
        ]
        for trial in sweep.trials
    ]
    if not sweep.best_trial:
        return headers, rows
    marks = ["*" if trial.training_job == sweep.best_trial else "" for trial in sweep.trials]
    return ["", *headers], [[mark, *row] for mark, row in zip(marks, rows, strict=True)]


def _best(sweep: pb.SweepJob) -> pb.SweepTrial | None:
    for trial in sweep.trials:
        if trial.training_job == sweep.best_trial:
            return trial
    return None


def best_text(sweep: pb.SweepJob) -> str:
    """``trainingJobs/x-trial-2 (val accuracy 0.9535; learning_rate=0.01)``, or empty."""
    best = _best(sweep)
    if best is None:
        return ""
    details = [f"val {sweep.spec.objective_metric} {best.objective_value:.4f}"]
    details += parameter_texts(best, sweep.spec)
    return f"{best.training_job} ({'; '.join(details)})"


def _ended(sweep: pb.SweepJob) -> int:
    return sum(trial.state in TERMINAL for trial in sweep.trials)


def print_sweep_result(sweep: pb.SweepJob) -> None:
    """An ended sweep on stdout: how it went, its trials, the best, the version."""
    succeeded = sum(trial.state == pb.JOB_STATE_SUCCEEDED for trial in sweep.trials)
    took = ""
    if sweep.HasField("start_time") and sweep.HasField("end_time"):
        span = Duration()
        span.FromTimedelta(sweep.end_time.ToDatetime() - sweep.start_time.ToDatetime())
        took = f" in {duration_text(span)}"
    print(
        f"{sweep.name} {_state_text(sweep.state).lower()}: {succeeded} of "
        f"{plural(len(sweep.trials), 'trial')} succeeded{took} ({search_text(sweep.spec)}; "
        f"objective: {objective_text(sweep.spec)})"
    )
    if sweep.trials:
        out.print_table(*trials_table(sweep))
    if sweep.state != pb.JOB_STATE_SUCCEEDED:
        return
    print(f"\nbest: {best_text(sweep)}")
    if sweep.model_version:
        print(f"registered: {sweep.model_version}")
    else:
        print("not registered (sweep with --register-model MODEL to register the best trial)")


def sweep_row(sweep: pb.SweepJob) -> list[str]:
    """A row of the ``sweeps list`` table."""
    state = _state_text(sweep.state).lower()
    if sweep.cancel_requested and sweep.state not in TERMINAL:
        state += " (cancelling)"
    best = _best(sweep)
    return [
        sweep_id(sweep.name),
        state,
        f"{_ended(sweep)}/{planned_trials(sweep.spec)}",
        f"{sweep.spec.objective_metric}={best.objective_value:.4f}" if best else "-",
        job_id(sweep.best_trial) or "-",
        sweep.model_version or "-",
        out.timestamp(sweep.create_time),
    ]


def sweep_fields(sweep: pb.SweepJob) -> list[tuple[str, str]]:
    """The ``sweeps show`` listing."""
    spec = sweep.spec
    base = spec.base_spec
    state = _state_text(sweep.state)
    if sweep.cancel_requested and sweep.state not in TERMINAL:
        state += " (cancel requested)"
    fields = [
        ("name", sweep.name),
        ("display name", sweep.display_name),
        ("state", state),
        ("search", search_text(spec)),
        ("objective", objective_text(spec)),
        ("parameters", "; ".join(domain_text(parameter) for parameter in spec.parameters)),
        ("trials", f"{_ended(sweep)} of {planned_trials(spec)} ended, {len(sweep.trials)} started"),
        ("dataset", data_text(base.data)),
        ("architecture", struct_text(base.architecture.name, base.architecture.args)),
        ("hyperparameters", hyperparameters_text(base.hyperparameters)),
        ("early stopping", early_stopping_text(base.hyperparameters) or "-"),
        ("compute", compute_text(base.compute)),
        ("register in", base.registration.model or "- (not registered)"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(sweep.labels.items()))),
        ("created", f"{out.timestamp(sweep.create_time)} by {sweep.created_by or '?'}"),
        ("started", out.timestamp(sweep.start_time)),
        ("ended", out.timestamp(sweep.end_time)),
        ("best trial", best_text(sweep) or "-"),
        ("registered", sweep.model_version),
    ]
    if sweep.state == pb.JOB_STATE_FAILED:
        code = code_name(sweep.error.code)
        fields.append(("error", f"{code}: {sweep.error.message} [{sweep.error.reason}]"))
    return [(label, value) for label, value in fields if value]
