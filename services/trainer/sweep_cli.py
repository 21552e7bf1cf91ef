"""``conveyor train … --sweep PATH=DOMAIN`` and ``conveyor sweeps …``:
hyperparameter sweeps for people.

``conveyor train DATASET … --sweep PATH=DOMAIN [--sweep …]`` makes the spec
the ``conveyor train`` flags describe (:mod:`conveyor.services.trainer.cli`)
the base of a hyperparameter sweep (``CreateSweepJob``). Each ``--sweep``
varies one field of ``TrainingJobSpec``, named by its path
(``hyperparameters.learning_rate``, ``hyperparameters.optimizer``,
``architecture.args.hidden_sizes``, …), over a DOMAIN:

- ``1e-4..1e-1``: a real range; ``log:1e-4..1e-1`` on a log scale. Grid
  search tries ``--grid-points`` evenly spaced points of it (default 3).
- ``16..64:16``: the integers from 16 to 64 in steps of 16; ``1..5`` (whole
  bounds, no step) the integers 1 to 5.
- ``sgd,adam`` or ``0.1,0.2``: a list of values, each read as JSON where it
  parses (numbers, ``true``, ``[32,16]``) and as text otherwise. A DOMAIN that
  starts with ``[`` is one JSON list of values, for values that are lists
  themselves: ``[[32,16],[64]]``.

``--search grid`` (every combination, the default) or ``random`` (seeded by
``--sweep-seed``); ``--trials`` (default: the whole grid, at most 1,000; 10
for random search); ``--parallel`` trials at once (default 1); ``--objective``,
the validation metric that ranks the trials (default: the early-stopping
metric, else accuracy), and ``--objective-goal``; ``--sweep-id``. These flags
without ``--sweep`` are a usage error. With ``--register-model`` the best
trial is registered. The command follows the sweep: a line on stderr whenever
a trial is queued, starts or ends, then on stdout the table of trials (the
best marked ``*``), the best trial and the registered version. ``conveyor
sweeps list|show|watch|cancel`` read and steer sweeps.

The commands run as the job commands do (:func:`conveyor.services.trainer.cli.run`),
with hints that name the sweep commands. Ctrl-C while following a sweep stops
following it: it keeps running, and the command says how to follow it again or
cancel it (``conveyor sweeps cancel SWEEP``); it exits 130. Exit codes: 0 when
the call worked (and a followed sweep SUCCEEDED); 1 when a call failed or a
followed sweep FAILED or was CANCELLED; 2 for usage errors. ``--json`` prints
the API's own messages on stdout; progress stays on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import uuid
from typing import Any, Final

import grpc
from google.protobuf import json_format

from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import pages_up_to
from conveyor.services.trainer import cli, cli_output
from conveyor.services.trainer import sweep_output as sweep_out
from conveyor.services.trainer.cli import (
    CREATE_FAILED_PRECONDITION,
    CREATE_NOT_FOUND,
    FLAGS,
    GOALS,
    LIST_PAGE_SIZE,
    MAX_INT32,
    MAX_UINT64,
    Command,
    Following,
    Session,
    UsageError,
    common_hint,
    named_flags,
    training_spec,
    unavailable_hint,
    whole_number,
)
from conveyor.services.trainer.cli_output import TERMINAL, sweep_id
from conveyor.services.trainer.sweep_output import SweepView
from conveyor.shared.errors import ConveyorError
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc

SEARCHES: Final = {"grid": pb.SEARCH_ALGORITHM_GRID, "random": pb.SEARCH_ALGORITHM_RANDOM}
DEFAULT_GRID_POINTS: Final = 3
DEFAULT_RANDOM_TRIALS: Final = 10
DEFAULT_OBJECTIVE: Final = "accuracy"
MAX_INT64: Final = 2**63 - 1

_SWEEP_FLAGS: Final = (
    # cli.FLAGS for a sweep; list indexes are dropped before matching.
    ("sweep_job_id", "--sweep-id"),
    ("sweep_job.display_name", "--display-name"),
    ("sweep_job.labels", "--label"),
    ("sweep_job.spec.parameters.double_range.grid_points", "--grid-points"),
    ("sweep_job.spec.parameters", "--sweep"),
    ("sweep_job.spec.algorithm", "--search"),
    ("sweep_job.spec.max_trials", "--trials"),
    ("sweep_job.spec.max_parallel_trials", "--parallel"),
    ("sweep_job.spec.objective_metric", "--objective"),
    ("sweep_job.spec.objective_goal", "--objective-goal"),
    *(
        ("sweep_job.spec.base_spec" + field.removeprefix("training_job.spec"), flag)
        for field, flag in FLAGS
        if field.startswith("training_job.spec")
    ),
)
_SWEEP_ONLY: Final = (
    # The flags that shape a sweep: meaningless without --sweep.
    ("search", "--search"),
    ("trials", "--trials"),
    ("parallel", "--parallel"),
    ("objective", "--objective"),
    ("objective_goal", "--objective-goal"),
    ("grid_points", "--grid-points"),
    ("sweep_seed", "--sweep-seed"),
    ("sweep_id", "--sweep-id"),
)


# -- arguments -------------------------------------------------------------------


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep flags of ``conveyor train``, after its own
    (:func:`conveyor.services.trainer.cli.add_train_arguments`)."""
    sweep = parser.add_argument_group(
        "sweep",
        "With --sweep the flags above are the base spec of a hyperparameter sweep: its "
        "trials are training jobs that each vary the --sweep fields, ranked by a "
        "validation metric; --register-model registers the best trial.",
    )
    sweep.add_argument(
        "--sweep",
        dest="parameters",
        type=sweep_parameter,
        action="append",
        default=[],
        metavar="PATH=DOMAIN",
        help="vary the spec field PATH (hyperparameters.learning_rate, "
        "architecture.args.hidden_sizes, …) over DOMAIN: a real range 1e-4..1e-1, "
        "log:1e-4..1e-1 on a log scale; integers 16..64:16 (1..5: step 1); a list "
        "sgd,adam or 0.1,0.2 (JSON values where they parse, else text); a JSON list "
        "[[32,16],[64]] for values that are lists (repeatable)",
    )
    sweep.add_argument(
        "--search",
        choices=sorted(SEARCHES),
        help="grid: every combination (default); random: draws from the domains",
    )
    sweep.add_argument(
        "--trials",
        type=whole_number(1, sweep_out.MAX_TRIALS),
        metavar="N",
        help="how many trials (default: the whole grid, at most 1000; random: 10)",
    )
    sweep.add_argument(
        "--parallel",
        type=whole_number(1, MAX_INT32),
        metavar="N",
        help="trials at once (default: 1)",
    )
    sweep.add_argument(
        "--objective",
        metavar="METRIC",
        help="the validation metric that ranks trials (default: --early-stopping-metric, "
        "else accuracy)",
    )
    sweep.add_argument(
        "--objective-goal", choices=sorted(GOALS), help="default: minimize for losses"
    )
    sweep.add_argument(
        "--grid-points",
        type=whole_number(1, MAX_INT32),
        metavar="N",
        help=f"points of each real range in a grid search (default: {DEFAULT_GRID_POINTS})",
    )
    sweep.add_argument(
        "--sweep-seed",
        type=whole_number(0, MAX_UINT64),
        metavar="N",
        help="seed of random search (default: 0)",
    )
    sweep.add_argument("--sweep-id", metavar="ID", help="the sweep's id (default: generated)")


def sweep_spec(args: argparse.Namespace) -> pb.SweepJobSpec:
    """The sweep the flags describe, around ``training_spec(args)``; UsageError
    for flags that cannot go together. As there, the values are the trainer's
    to check."""
    if not args.parameters:
        raise UsageError("a sweep needs at least one --sweep PATH=DOMAIN")
    if args.job_id:
        raise UsageError(
            "--job-id names one training job; a sweep names its trials after itself: use --sweep-id"
        )
    algorithm = SEARCHES[args.search or "grid"]
    random = algorithm == pb.SEARCH_ALGORITHM_RANDOM
    if random and args.grid_points is not None:
        raise UsageError("--grid-points spaces a grid; random search draws from the whole range")
    if not random and args.sweep_seed is not None:
        raise UsageError("--sweep-seed seeds random search: add --search random")
    spec = pb.SweepJobSpec(
        base_spec=training_spec(args),
        algorithm=algorithm,
        max_parallel_trials=args.parallel or 1,
        objective_metric=args.objective or args.early_stopping_metric or DEFAULT_OBJECTIVE,
        seed=args.sweep_seed or 0,
    )
    if args.objective_goal:
        spec.objective_goal = GOALS[args.objective_goal]
    for given in args.parameters:
        parameter = spec.parameters.add()
        parameter.CopyFrom(given)
        if parameter.HasField("double_range") and not random:
            parameter.double_range.grid_points = (
                DEFAULT_GRID_POINTS if args.grid_points is None else args.grid_points
            )
    if args.trials:
        spec.max_trials = args.trials
    elif random:
        spec.max_trials = DEFAULT_RANDOM_TRIALS
    else:
        # At least 1, so that an empty grid is named by its parameter, not by max_trials.
        spec.max_trials = min(max(sweep_out.grid_size(spec.parameters), 1), sweep_out.MAX_TRIALS)
    return spec


def no_sweep_flags(args: argparse.Namespace) -> None:
    """UsageError for a flag that only shapes a sweep, given without ``--sweep``."""
    for dest, flag in _SWEEP_ONLY:
        if getattr(args, dest, None) is not None:
            raise UsageError(f"{flag} shapes a sweep: add --sweep PATH=DOMAIN")


def sweep_parameter(text: str) -> pb.ParameterSpec:
    """``PATH=DOMAIN`` (see the module docstring) as the parameter it varies; a
    real range's grid points come from ``--grid-points`` (:func:`sweep_spec`)."""
    path, sep, domain = (part.strip() for part in text.partition("="))
    if not sep or not path or not domain:
        raise argparse.ArgumentTypeError(
            f"expected PATH=DOMAIN (e.g. hyperparameters.learning_rate=log:1e-4..1e-1), "
            f"got {text!r}"
        )
    try:
        parameter = _domain(domain)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}, got {text!r}") from None
    parameter.path = path
    return parameter


def _domain(text: str) -> pb.ParameterSpec:
    """The DOMAIN of ``--sweep``; ValueError says what was expected."""
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if not isinstance(values, list) or not values:
            raise ValueError(
                "a DOMAIN starting with [ is a JSON list of values, e.g. [[32,16],[64]]"
            )
        return _categorical(values)
    log = text.startswith("log:")
    body = text.removeprefix("log:")
    if ".." in body:
        low_text, _, rest = body.partition("..")
        high_text, has_step, step_text = rest.partition(":")
        low, high = _whole(low_text), _whole(high_text)
        if has_step:
            step = _whole(step_text)
            if log or low is None or high is None or step is None:
                raise ValueError(
                    "a range with a step is whole numbers LOW..HIGH:STEP, e.g. 16..64:16"
                )
            if step < 1:
                raise ValueError("the STEP of LOW..HIGH:STEP must be at least 1")
            return pb.ParameterSpec(integer_range=pb.IntegerRange(min=low, max=high, step=step))
        if not log and low is not None and high is not None:
            return pb.ParameterSpec(integer_range=pb.IntegerRange(min=low, max=high, step=1))
        real_low, real_high = _real(low_text), _real(high_text)
        if real_low is None or real_high is None:
            raise ValueError("a range is two numbers LOW..HIGH, e.g. 1e-4..1e-1")
        return pb.ParameterSpec(
            double_range=pb.DoubleRange(min=real_low, max=real_high, log_scale=log)
        )
    if log:
        raise ValueError("log: takes a real range, e.g. log:1e-4..1e-1")
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError("a list of values is A,B,C with none empty")
    values = [_json_or_text(item) for item in items]
    if any(isinstance(value, str) and value.startswith(("[", "{")) for value in values):
        raise ValueError(
            "commas split A,B,C: write values that are lists as one JSON list, e.g. [[32,16],[64]]"
        )
    return _categorical(values)


def _categorical(values: list[Any]) -> pb.ParameterSpec:
    parameter = pb.ParameterSpec(categorical=pb.CategoricalValues())
    for value in values:
        json_format.ParseDict(value, parameter.categorical.values.add())
    return parameter


def _whole(text: str) -> int | None:
    """A whole number that fits the API's int64, written as one (``16``, ``-2``)."""
    text = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text) or abs(int(text)) > MAX_INT64:
        return None
    return int(text)


def _real(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def sweep_name(text: str) -> str:
    """``sweepJobs/abc`` from ``abc`` or ``sweepJobs/abc``."""
    return text if text.startswith("sweepJobs/") else f"sweepJobs/{text}"


# -- commands ---------------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs a sweep command as :func:`conveyor.services.trainer.cli.run` runs a
    job command, with the sweep hints."""
    return cli.run(command, args, sweep_hint=hint)


async def train_job(session: Session, args: argparse.Namespace) -> int:
    """``conveyor train DATASET …`` without ``--sweep``: refuses the flags that
    only shape a sweep, then creates and follows the job
    (:func:`conveyor.services.trainer.cli.train`)."""
    no_sweep_flags(args)
    return await cli.train(session, args)


async def sweep(session: Session, args: argparse.Namespace) -> int:
    """``conveyor train DATASET … --sweep PATH=DOMAIN``: create a sweep, then
    follow its trials to its end."""
    spec = sweep_spec(args)
    grid = sweep_out.grid_size(spec.parameters)
    searching_grid = spec.algorithm == pb.SEARCH_ALGORITHM_GRID
    if searching_grid and args.trials is None and grid > spec.max_trials:
        print(
            f"conveyor: the grid has {grid:,} combinations; the sweep runs the first "
            f"{spec.max_trials:,} (coarsen the grid, or use --search random)",
            file=sys.stderr,
        )
    request = rpc.CreateSweepJobRequest(
        sweep_job_id=args.sweep_id or "",
        sweep_job=pb.SweepJob(
            spec=spec, display_name=args.display_name or "", labels=dict(args.label)
        ),
        # One id per invocation: a retried call creates the sweep once.
        request_id=uuid.uuid4().hex,
        validate_only=args.validate_only,
    )
    session.following.creating = True
    reply = await session.trainer.CreateSweepJob(request, timeout=session.timeout)
    session.following.creating = False
    created = reply.sweep_job
    if args.validate_only:
        if args.json:
            out.print_json({"sweep_job": out.message_dict(created)})
        else:
            trials = cli_output.plural(sweep_out.planned_trials(created.spec), "trial")
            print(f"valid: {created.name} would run {trials}; nothing was created")
        return 0
    if not args.watch:
        if args.json:
            out.print_json({"sweep_job": out.message_dict(created)})
        else:
            print(created.name)
            print(
                f"follow it with `conveyor sweeps watch {sweep_id(created.name)}`",
                file=sys.stderr,
            )
        return 0
    final = await follow_sweep(session, created.name)
    return finish_sweep(final, as_json=args.json)


async def sweeps_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor sweeps list``: sweeps newest first, filtered by state or any filter."""
    restrictions = [f"state={args.state.upper()}"] if args.state else []
    if args.filter:
        restrictions.append(args.filter)

    async def page(token: str, size: int) -> tuple[list[pb.SweepJob], str]:
        request = rpc.ListSweepJobsRequest(
            page_size=size, page_token=token, filter=" AND ".join(restrictions)
        )
        reply = await session.trainer.ListSweepJobs(request, timeout=session.timeout)
        return list(reply.sweep_jobs), reply.next_page_token

    sweeps, more = await pages_up_to(page, args.limit, LIST_PAGE_SIZE)
    if args.json:
        out.print_json({"sweep_jobs": [out.message_dict(sweep) for sweep in sweeps]})
    elif sweeps:
        out.print_table(
            ("sweep", "state", "trials", "best", "best trial", "model version", "created"),
            [sweep_out.sweep_row(sweep) for sweep in sweeps],
        )
        if more:
            print(f"(more: raise --limit above {args.limit})", file=sys.stderr)
    else:
        print("no sweeps" + (" match" if restrictions else ""), file=sys.stderr)
    return 0


async def sweeps_show(session: Session, args: argparse.Namespace) -> int:
    """``conveyor sweeps show SWEEP``: its spec, state, trials and outcome."""
    reply = await session.trainer.GetSweepJob(
        rpc.GetSweepJobRequest(name=sweep_name(args.sweep)), timeout=session.timeout
    )
    found = reply.sweep_job
    if args.json:
        out.print_json({"sweep_job": out.message_dict(found)})
        return 0
    out.print_fields(sweep_out.sweep_fields(found))
    if found.trials:
        print()
        out.print_table(*sweep_out.trials_table(found))
    return 0


async def sweeps_watch(session: Session, args: argparse.Namespace) -> int:
    """``conveyor sweeps watch SWEEP``: follow a sweep to its end (exit 0 if it succeeded)."""
    final = await follow_sweep(session, sweep_name(args.sweep))
    return finish_sweep(final, as_json=args.json)


async def sweeps_cancel(session: Session, args: argparse.Namespace) -> int:
    """``conveyor sweeps cancel SWEEP``: its queued trials end now, running ones
    after their step; nothing is registered."""
    reply = await session.trainer.CancelSweepJob(
        rpc.CancelSweepJobRequest(name=sweep_name(args.sweep)), timeout=session.timeout
    )
    found = reply.sweep_job
    if args.json:
        out.print_json({"sweep_job": out.message_dict(found)})
    elif found.state == pb.JOB_STATE_CANCELLED:
        print(f"{found.name}: cancelled")
    else:
        print(
            f"{found.name}: cancel requested; it ends once its running trials stop after "
            f"their current step (`conveyor sweeps watch {sweep_id(found.name)}` shows when)"
        )
    return 0


# -- following a sweep ----------------------------------------------------------------


async def follow_sweep(
    session: Session, name: str, *, view: SweepView | None = None
) -> pb.SweepJob:
    """Watches sweep ``name`` until it reaches a terminal state, a line per trial
    change; the final sweep. A stream that ends early is resumed."""
    view = view or SweepView(sys.stderr)
    session.following.job = name
    request = rpc.WatchSweepJobRequest(name=name)
    while True:
        async for event in session.trainer.WatchSweepJob(request, timeout=None):
            view.show(event)
            found = event.sweep_job
            if event.HasField("sweep_job") and found.state in TERMINAL:
                return found
        reply = await session.trainer.GetSweepJob(
            rpc.GetSweepJobRequest(name=name), timeout=session.timeout
        )
        if reply.sweep_job.state in TERMINAL:
            return reply.sweep_job
        await asyncio.sleep(1.0)


def finish_sweep(found: pb.SweepJob, *, as_json: bool) -> int:
    """Prints how a followed sweep ended; 0 when it succeeded, else 1."""
    if as_json:
        out.print_json({"sweep_job": out.message_dict(found)})
    else:
        sweep_out.print_sweep_result(found)
    if found.state == pb.JOB_STATE_SUCCEEDED:
        return 0
    short = sweep_id(found.name)
    if found.state == pb.JOB_STATE_CANCELLED:
        ran = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
        ended = sum(trial.state in ran for trial in found.trials)
        planned = cli_output.plural(sweep_out.planned_trials(found.spec), "trial")
        print(
            f"conveyor: {found.name} was cancelled after {ended} of {planned}; "
            "nothing was registered",
            file=sys.stderr,
        )
        return 1
    error = found.error
    code = cli_output.code_name(error.code)
    reason = f" [{error.reason}]" if error.reason and error.reason != code else ""
    print(f"conveyor: {found.name} failed: {code}: {error.message}{reason}", file=sys.stderr)
    print(
        f"hint: `conveyor sweeps show {short}` lists its trials; `conveyor jobs show TRIAL` "
        "says why one failed",
        file=sys.stderr,
    )
    return 1


# -- hints ------------------------------------------------------------------------


def hint(
    error: ConveyorError, args: argparse.Namespace, *, target: str, following: Following
) -> str:
    """What to do next after a failed call about a sweep."""
    code = error.code
    creating = args.command == "train"
    sweep = sweep_id(following.job or sweep_name(getattr(args, "sweep", "") or "SWEEP"))
    if code == grpc.StatusCode.UNAVAILABLE:
        where = unavailable_hint(target)
        if following.job:
            where += f"; the sweep keeps running: `conveyor sweeps watch {sweep}` follows it again"
        return where
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        flags = named_flags(error, _SWEEP_FLAGS)
        if creating and flags:
            return f"fix {', '.join(flags)} and run the command again"
        return "fix the fields named above and run the command again"
    if code == grpc.StatusCode.NOT_FOUND:
        if creating:
            return CREATE_NOT_FOUND
        return "check the name: `conveyor sweeps list` shows the sweeps"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if creating:
            return CREATE_FAILED_PRECONDITION
        return f"the sweep has already ended: `conveyor sweeps show {sweep}` says how"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return "the sweep id is taken: choose another --sweep-id, or see `conveyor sweeps show ID`"
    return common_hint(code, target)
