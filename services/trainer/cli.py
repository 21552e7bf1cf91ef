"""``conveyor train``, ``conveyor jobs …`` and ``conveyor sweeps …``: the trainer
for people.

``conveyor train DATASET --arch mlp --epochs 20 …`` builds a
``TrainingJobSpec`` from its flags, creates the job through the trainer's
gRPC API (``--trainer``, else ``CONVEYOR_TRAINER_ADDR``, else loopback) and
follows it: a live progress bar on stderr (epoch and step, loss, the
validation metric, samples/s, ETA; on a terminal one line is redrawn, in logs
each epoch is one plain line), then the result on stdout (test and validation
metrics, confusion matrix, the registered version). ``conveyor jobs
list|show|watch|cancel`` read and steer jobs.

``conveyor train DATASET … --sweep PATH=DOMAIN [--sweep …]`` makes that spec
the base of a hyperparameter sweep instead (``CreateSweepJob``). Each
``--sweep`` varies one field of ``TrainingJobSpec``, named by its path
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
metric, else accuracy), and ``--objective-goal``; ``--sweep-id``. With
``--register-model`` the best trial is registered. The command follows the
sweep: a line on stderr whenever a trial is queued, starts or ends, then on
stdout the table of trials (the best marked ``*``), the best trial and the
registered version. ``conveyor sweeps list|show|watch|cancel`` read and steer
sweeps.

Ctrl-C while following a job or a sweep stops following it: it keeps running,
and the command says how to follow it again or cancel it (``conveyor jobs
cancel JOB``, ``conveyor sweeps cancel SWEEP``); it exits 130. Exit codes: 0
when the call worked (and a followed job or sweep SUCCEEDED); 1 when a call
failed (``conveyor: <CODE>: <message>``, the field violations, a hint — the
format of every command) or a followed job or sweep FAILED or was CANCELLED;
2 for usage errors. ``--json`` prints the API's own messages
(proto3 JSON, proto field names) on stdout; progress stays on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import grpc
import pydantic
from google.protobuf import json_format

from conveyor.services.registry import cli_output as out
from conveyor.services.trainer import cli_output as job_out
from conveyor.services.trainer.cli_output import (
    TERMINAL,
    ProgressView,
    SweepView,
    job_id,
    sweep_id,
)
from conveyor.shared.channel import create_channel
from conveyor.shared.errors import ConveyorError, InvalidArgumentError, from_rpc_error
from conveyor.shared.settings import ClientSettings
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from conveyor.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc

if TYPE_CHECKING:
    Trainer = trainer_service_pb2_grpc.TrainerServiceAsyncStub

TRAINER_SERVICE: Final = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"]
STATES: Final = ("queued", "running", "succeeded", "failed", "cancelled")
OPTIMIZERS: Final = {
    "adam": pb.OPTIMIZER_ALGORITHM_ADAM,
    "adamw": pb.OPTIMIZER_ALGORITHM_ADAMW,
    "sgd": pb.OPTIMIZER_ALGORITHM_SGD,
}
DEVICES: Final = {"auto": pb.DEVICE_AUTO, "cpu": pb.DEVICE_CPU, "cuda": pb.DEVICE_CUDA}
BACKENDS: Final = {"gloo": pb.DISTRIBUTED_BACKEND_GLOO, "nccl": pb.DISTRIBUTED_BACKEND_NCCL}
GOALS: Final = {"maximize": pb.METRIC_GOAL_MAXIMIZE, "minimize": pb.METRIC_GOAL_MINIMIZE}
SEARCHES: Final = {"grid": pb.SEARCH_ALGORITHM_GRID, "random": pb.SEARCH_ALGORITHM_RANDOM}
DEFAULT_GRID_POINTS: Final = 3
DEFAULT_RANDOM_TRIALS: Final = 10
DEFAULT_OBJECTIVE: Final = "accuracy"
MAX_INT32: Final = 2**31 - 1
MAX_INT64: Final = 2**63 - 1
MAX_UINT64: Final = 2**64 - 1
LIST_PAGE_SIZE: Final = 100
EXIT_INTERRUPTED: Final = 130

_FLAGS: Final = (
    # The flag behind each spec field the trainer may refuse, most specific first.
    ("training_job_id", "--job-id"),
    ("training_job.display_name", "--display-name"),
    ("training_job.labels", "--label"),
    ("training_job.spec.data.generator_args", "--data-arg"),
    ("training_job.spec.data.additional_datasets", "--also"),
    ("training_job.spec.data.split_seed", "--split-seed"),
    ("training_job.spec.data.stratify", "--no-stratify"),
    ("training_job.spec.data.", "--split"),
    ("training_job.spec.data", "DATASET"),
    ("training_job.spec.architecture.args", "--arch-arg"),
    ("training_job.spec.architecture", "--arch"),
    ("training_job.spec.hyperparameters.batch_size", "--batch-size"),
    ("training_job.spec.hyperparameters.learning_rate", "--learning-rate"),
    ("training_job.spec.hyperparameters.weight_decay", "--weight-decay"),
    ("training_job.spec.hyperparameters.early_stopping.metric", "--early-stopping-metric"),
    ("training_job.spec.hyperparameters.early_stopping.patience", "--patience"),
    ("training_job.spec.hyperparameters.early_stopping.min_delta", "--min-delta"),
    ("training_job.spec.hyperparameters.early_stopping.goal", "--goal"),
    ("training_job.spec.hyperparameters.augmentation", "--augment"),
    ("training_job.spec.hyperparameters.", "--{last}"),
    ("training_job.spec.compute.mixed_precision", "--mixed-precision"),
    ("training_job.spec.compute.distributed.backend", "--backend"),
    ("training_job.spec.compute.distributed", "--world-size"),
    ("training_job.spec.compute", "--device"),
    ("training_job.spec.registration", "--register-model"),
)
_SWEEP_FLAGS: Final = (
    # The same for a sweep; list indexes are dropped before matching.
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
        for field, flag in _FLAGS
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


class UsageError(Exception):
    """Flags that cannot make a job: printed like argparse's errors, exit 2."""


@dataclasses.dataclass
class Following:
    """The job or sweep a command is following, so that Ctrl-C can say which."""

    job: str = ""
    """``trainingJobs/{id}`` or ``sweepJobs/{id}``, once known."""
    creating: bool = False
    sweep: bool = False
    """The command is about a sweep (its hints name the sweep commands)."""


@dataclasses.dataclass(frozen=True)
class Session:
    """What a command needs to call the trainer."""

    trainer: Trainer
    target: str
    timeout: float
    """Deadline of each unary call, in seconds."""
    following: Following


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


# -- arguments -------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags every trainer command takes."""
    parser.add_argument(
        "--trainer",
        metavar="HOST:PORT",
        help="trainer address (default: $CONVEYOR_TRAINER_ADDR, else 127.0.0.1:50052)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="deadline of each call (default: 30; following a job has none)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the API's messages)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``conveyor train``: the spec, the job, and what to do after."""
    parser.add_argument(
        "dataset", help="breast-cancer, digits, synthetic or an uploaded dataset's id"
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-arg",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a generator argument (synthetic), e.g. num_samples=5000 (repeatable)",
    )
    data.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="DATASET",
        help="another dataset with the same schema, appended before the split (repeatable)",
    )
    data.add_argument(
        "--split",
        type=_fractions,
        metavar="TRAIN,VALIDATION,TEST",
        help="split fractions (default: 0.7,0.15,0.15)",
    )
    data.add_argument("--split-seed", type=int, default=0, help="seed of the split (default: 0)")
    data.add_argument(
        "--no-stratify",
        dest="stratify",
        action="store_false",
        help="do not keep class proportions equal across splits",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--arch",
        default="mlp",
        metavar="NAME",
        help="mlp (default), logistic, small_cnn or resnet18",
    )
    model.add_argument(
        "--arch-arg",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an architecture argument, JSON values, e.g. hidden_sizes=[64,32] (repeatable)",
    )
    hp = parser.add_argument_group("hyperparameters")
    hp.add_argument("--epochs", type=int, default=20, help="default: 20")
    hp.add_argument("--batch-size", type=int, default=32, help="default: 32")
    hp.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    hp.add_argument("--learning-rate", "--lr", type=float, default=1e-3, help="default: 0.001")
    hp.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    hp.add_argument("--weight-decay", type=float, default=0.0)
    hp.add_argument("--dropout", type=float, default=0.0)
    hp.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    hp.add_argument(
        "--early-stopping-metric",
        metavar="METRIC",
        help="stop when this validation metric stops improving (loss, accuracy, f1, …)",
    )
    hp.add_argument("--patience", type=int, help="epochs without improvement (default: 3)")
    hp.add_argument("--min-delta", type=float, default=0.0, help="the least improvement")
    hp.add_argument("--goal", choices=sorted(GOALS), help="default: minimize for losses")
    hp.add_argument(
        "--augment",
        type=_augmentation,
        nargs="+",
        action="extend",
        default=[],
        metavar="AUG",
        help="image augmentation: crop=PIXELS, flip, rotate=DEGREES, noise=STD",
    )
    compute = parser.add_argument_group("compute")
    compute.add_argument("--device", choices=sorted(DEVICES), default="auto")
    compute.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="automatic mixed precision (default: on for CUDA)",
    )
    compute.add_argument(
        "--world-size", type=int, default=1, help="data-parallel processes (default: 1)"
    )
    compute.add_argument("--backend", choices=sorted(BACKENDS), help="default: nccl on CUDA")
    job = parser.add_argument_group("job")
    job.add_argument(
        "--register-model",
        metavar="MODEL",
        help="register the trained model as a new version of this registry model",
    )
    job.add_argument("--description", help="the registered version's description")
    job.add_argument("--job-id", help="the job's id (default: generated)")
    job.add_argument("--display-name")
    job.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of the job (repeatable)",
    )
    job.add_argument(
        "--validate-only",
        action="store_true",
        help="check the job with the trainer and create nothing",
    )
    job.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="print the job's name and return once it is queued",
    )
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
        type=_whole_number(1, job_out.MAX_TRIALS),
        metavar="N",
        help="how many trials (default: the whole grid, at most 1000; random: 10)",
    )
    sweep.add_argument(
        "--parallel",
        type=_whole_number(1, MAX_INT32),
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
        type=_whole_number(1, MAX_INT32),
        metavar="N",
        help=f"points of each real range in a grid search (default: {DEFAULT_GRID_POINTS})",
    )
    sweep.add_argument(
        "--sweep-seed",
        type=_whole_number(0, MAX_UINT64),
        metavar="N",
        help="seed of random search (default: 0)",
    )
    sweep.add_argument("--sweep-id", metavar="ID", help="the sweep's id (default: generated)")


def training_spec(args: argparse.Namespace) -> pb.TrainingJobSpec:
    """The spec the flags describe; UsageError for flags that cannot go together.

    Values are not range-checked here: the trainer validates the whole spec
    and names every bad field, which the hint maps back to its flag.
    """
    if args.patience is not None and not args.early_stopping_metric:
        raise UsageError("--patience needs --early-stopping-metric")
    if args.goal and not args.early_stopping_metric:
        raise UsageError("--goal needs --early-stopping-metric")
    if args.description and not args.register_model:
        raise UsageError("--description describes the registered version: add --register-model")
    spec = pb.TrainingJobSpec()
    data = spec.data
    data.dataset = _dataset_name(args.dataset)
    data.generator_args.update(dict(args.data_arg))
    data.additional_datasets.extend(_dataset_name(name) for name in args.also)
    if args.split is not None:
        data.train_fraction, data.validation_fraction, data.test_fraction = args.split
    data.split_seed = args.split_seed
    data.stratify = args.stratify
    spec.architecture.name = args.arch
    spec.architecture.args.update(dict(args.arch_arg))
    hp = spec.hyperparameters
    hp.epochs = args.epochs
    hp.batch_size = args.batch_size
    hp.optimizer = OPTIMIZERS[args.optimizer]
    hp.learning_rate = args.learning_rate
    hp.momentum = args.momentum
    hp.weight_decay = args.weight_decay
    hp.dropout = args.dropout
    hp.seed = args.seed
    if args.early_stopping_metric:
        hp.early_stopping.metric = args.early_stopping_metric
        hp.early_stopping.patience = 3 if args.patience is None else args.patience
        hp.early_stopping.min_delta = args.min_delta
        if args.goal:
            hp.early_stopping.goal = GOALS[args.goal]
    for name, value in args.augment:
        setattr(hp.augmentation, name, value)
    spec.compute.device = DEVICES[args.device]
    if args.mixed_precision is not None:
        spec.compute.mixed_precision = args.mixed_precision
    if args.world_size != 1 or args.backend:
        spec.compute.distributed.world_size = args.world_size
        if args.backend:
            spec.compute.distributed.backend = BACKENDS[args.backend]
    if args.register_model:
        spec.registration.model = _model_name(args.register_model)
        spec.registration.description = args.description or ""
    return spec


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
        spec.max_trials = min(max(job_out.grid_size(spec.parameters), 1), job_out.MAX_TRIALS)
    return spec


def _no_sweep_flags(args: argparse.Namespace) -> None:
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive(text: str) -> int:
    """An integer of at least 1 (``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (what the API's
    field holds)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low:,} to {high:,}, got {text!r}"
            )
        return value

    return whole_number


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a JSON value (``[64,32]``, ``3``, ``true``), else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _fractions(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(
            f"expected three fractions TRAIN,VALIDATION,TEST (e.g. 0.7,0.15,0.15), got {text!r}"
        )
    return values[0], values[1], values[2]


def _augmentation(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    fields = {
        "crop": ("random_crop_padding", int),
        "flip": ("horizontal_flip", None),
        "rotate": ("rotation_degrees", float),
        "noise": ("gaussian_noise_std", float),
    }
    if name not in fields:
        raise argparse.ArgumentTypeError(
            f"unknown augmentation {name!r}; known: crop=PIXELS, flip, rotate=DEGREES, noise=STD"
        )
    field, convert = fields[name]
    if convert is None:
        if sep:
            raise argparse.ArgumentTypeError(f"{name} takes no value")
        return field, True
    try:
        return field, convert(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} needs a number: {name}=VALUE") from None


def _dataset_name(text: str) -> str:
    return text if text.startswith("datasets/") else f"datasets/{text}"


def _model_name(text: str) -> str:
    return text if text.startswith("models/") else f"models/{text}"


def job_name(text: str) -> str:
    """``trainingJobs/abc`` from ``abc`` or ``trainingJobs/abc``."""
    return text if text.startswith("trainingJobs/") else f"trainingJobs/{text}"


def sweep_name(text: str) -> str:
    """``sweepJobs/abc`` from ``abc`` or ``sweepJobs/abc``."""
    return text if text.startswith("sweepJobs/") else f"sweepJobs/{text}"


# -- running a command --------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs ``command`` against the trainer; every expected failure exits 1."""
    following = Following(sweep=_about_sweeps(args))
    target = getattr(args, "trainer", None) or "the trainer"
    try:
        settings = ClientSettings()
        target = args.trainer or settings.trainer_addr
        return asyncio.run(_with_session(command, args, settings, target, following))
    except UsageError as error:
        print(f"conveyor {args.command}: error: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        failure = from_rpc_error(error)
    except ConveyorError as error:
        failure = error
    except (OSError, pydantic.ValidationError) as error:
        print(f"conveyor: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _interrupted(following)
        return EXIT_INTERRUPTED
    return out.report(failure, hint(failure, args, target=target, following=following))


async def _with_session(
    command: Command,
    args: argparse.Namespace,
    settings: ClientSettings,
    target: str,
    following: Following,
) -> int:
    timeout = args.timeout or settings.default_timeout.total_seconds()
    channel = create_channel(
        target,
        services=[TRAINER_SERVICE],
        default_timeout=timedelta(seconds=timeout),
        tls=settings.tls(),
        bearer_token=settings.bearer_token(),
    )
    async with channel:
        stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
        return await command(Session(stub, target, timeout, following), args)


def _about_sweeps(args: argparse.Namespace) -> bool:
    """Whether the command creates or reads sweeps (``train --sweep``, ``sweeps …``)."""
    return args.command == "sweeps" or bool(getattr(args, "parameters", None))


def _interrupted(following: Following) -> None:
    group, what = ("sweeps", "sweep") if following.sweep else ("jobs", "job")
    if following.creating:
        print(
            f"\nconveyor: interrupted before the trainer answered; `conveyor {group} list` "
            f"shows whether the {what} was created",
            file=sys.stderr,
        )
        return
    if not following.job:
        print("\nconveyor: interrupted", file=sys.stderr)
        return
    short = sweep_id(job_id(following.job))
    print(
        f"\nstopped watching {following.job}; it keeps running.\n"
        f"  follow it again: conveyor {group} watch {short}\n"
        f"  cancel it:       conveyor {group} cancel {short}",
        file=sys.stderr,
    )


def hint(
    error: ConveyorError, args: argparse.Namespace, *, target: str, following: Following
) -> str:
    """What to do next after a failed call."""
    if following.sweep:
        return _sweep_hint(error, args, target=target, following=following)
    code = error.code
    command = args.command
    job = job_id(following.job or job_name(getattr(args, "job", "") or "JOB"))
    if code == grpc.StatusCode.UNAVAILABLE:
        where = _unavailable(target)
        if following.job:
            where += f"; the job keeps running: `conveyor jobs watch {job}` follows it again"
        return where
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        flags = _flags(error, _FLAGS)
        if command == "train" and flags:
            return f"fix {', '.join(flags)} and run the command again"
        return "fix the fields named above and run the command again"
    if code == grpc.StatusCode.NOT_FOUND:
        if command == "train":
            return _CREATE_NOT_FOUND
        return "check the name: `conveyor jobs list` shows the jobs"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if command == "train":
            return _CREATE_FAILED_PRECONDITION
        return f"the job has already ended: `conveyor jobs show {job}` says how"
    hints = {
        grpc.StatusCode.ALREADY_EXISTS: (
            "the job id is taken: choose another --job-id, or see `conveyor jobs show ID`"
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (
            "the trainer's queue is full: wait for jobs to finish or cancel some "
            "(`conveyor jobs list --state queued`)"
        ),
    }
    return hints.get(code) or _common_hint(code, target)


_CREATE_NOT_FOUND: Final = (
    "check the dataset (built-in: breast-cancer, digits, synthetic; or an uploaded "
    "one) and --register-model (`conveyor models list` shows the models)"
)
_CREATE_FAILED_PRECONDITION: Final = (
    "a GPU was asked for where there is none (use --device auto or cpu), or the "
    "model to register in is archived"
)


def _sweep_hint(
    error: ConveyorError, args: argparse.Namespace, *, target: str, following: Following
) -> str:
    """What to do next after a failed call about a sweep."""
    code = error.code
    creating = args.command == "train"
    sweep = sweep_id(following.job or sweep_name(getattr(args, "sweep", "") or "SWEEP"))
    if code == grpc.StatusCode.UNAVAILABLE:
        where = _unavailable(target)
        if following.job:
            where += f"; the sweep keeps running: `conveyor sweeps watch {sweep}` follows it again"
        return where
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        flags = _flags(error, _SWEEP_FLAGS)
        if creating and flags:
            return f"fix {', '.join(flags)} and run the command again"
        return "fix the fields named above and run the command again"
    if code == grpc.StatusCode.NOT_FOUND:
        if creating:
            return _CREATE_NOT_FOUND
        return "check the name: `conveyor sweeps list` shows the sweeps"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if creating:
            return _CREATE_FAILED_PRECONDITION
        return f"the sweep has already ended: `conveyor sweeps show {sweep}` says how"
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return "the sweep id is taken: choose another --sweep-id, or see `conveyor sweeps show ID`"
    return _common_hint(code, target)


def _unavailable(target: str) -> str:
    return (
        f"is a trainer running at {target}? start one with `conveyor serve trainer` "
        "(or `conveyor up`), or point at it with --trainer HOST:PORT or "
        "CONVEYOR_TRAINER_ADDR"
    )


def _common_hint(code: grpc.StatusCode, target: str) -> str:
    """The hints that do not depend on the command."""
    hints = {
        grpc.StatusCode.DEADLINE_EXCEEDED: (
            f"no answer in time: raise --timeout, or check `conveyor health {target}`"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            "no valid credentials: set CONVEYOR_TOKEN_FILE to a token file "
            "(`conveyor up` writes development ones under <data-dir>/credentials)"
        ),
        grpc.StatusCode.PERMISSION_DENIED: (
            "your role does not allow this: training and cancelling are for data "
            "scientists and ML engineers, registering for the model's owner team"
        ),
    }
    return hints.get(code, "this looks like a trainer bug: report it with the message above")


def _flags(error: ConveyorError, table: tuple[tuple[str, str], ...]) -> list[str]:
    """The flags behind the spec fields an INVALID_ARGUMENT names, in order."""
    if not isinstance(error, InvalidArgumentError):
        return []
    flags: list[str] = []
    for violation in error.violations:
        field = re.sub(r"\[[^]]*\]", "", violation.field)
        for prefix, flag in table:
            if field == prefix or field.startswith(prefix):
                rest = field.removeprefix(prefix).split(".")[0]
                named = flag.format(last=rest.replace("_", "-"))
                if named not in flags:
                    flags.append(named)
                break
    return flags


# -- commands ---------------------------------------------------------------------


async def train(session: Session, args: argparse.Namespace) -> int:
    """``conveyor train DATASET …``: create a job, then follow it to its end."""
    if args.parameters:
        return await sweep(session, args)
    _no_sweep_flags(args)
    request = rpc.CreateTrainingJobRequest(
        training_job_id=args.job_id or "",
        training_job=pb.TrainingJob(
            spec=training_spec(args),
            display_name=args.display_name or "",
            labels=dict(args.label),
        ),
        # One id per invocation: a retried call creates the job once.
        request_id=uuid.uuid4().hex,
        validate_only=args.validate_only,
    )
    session.following.creating = True
    reply = await session.trainer.CreateTrainingJob(request, timeout=session.timeout)
    session.following.creating = False
    job = reply.training_job
    if args.validate_only:
        if args.json:
            out.print_json({"training_job": out.message_dict(job)})
        else:
            print(f"valid: {job.name} would be queued; nothing was created")
        return 0
    if not args.watch:
        if args.json:
            out.print_json({"training_job": out.message_dict(job)})
        else:
            print(job.name)
            print(
                f"follow it with `conveyor jobs watch {job_id(job.name)}`",
                file=sys.stderr,
            )
        return 0
    final = await follow(session, job.name)
    return finish(final, as_json=args.json)


async def sweep(session: Session, args: argparse.Namespace) -> int:
    """``conveyor train DATASET … --sweep PATH=DOMAIN``: create a sweep, then
    follow its trials to its end."""
    spec = sweep_spec(args)
    grid = job_out.grid_size(spec.parameters)
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
            trials = job_out.planned_trials(created.spec)
            print(f"valid: {created.name} would run {trials} trials; nothing was created")
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


async def jobs_watch(session: Session, args: argparse.Namespace) -> int:
    """``conveyor jobs watch JOB``: follow a job to its end (exit 0 if it succeeded)."""
    final = await follow(session, job_name(args.job))
    return finish(final, as_json=args.json)


async def jobs_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor jobs list``: jobs newest first, filtered by state or any filter."""
    restrictions = [f"state={args.state.upper()}"] if args.state else []
    if args.filter:
        restrictions.append(args.filter)
    jobs: list[pb.TrainingJob] = []
    token = ""
    while len(jobs) < args.limit:
        request = rpc.ListTrainingJobsRequest(
            page_size=min(LIST_PAGE_SIZE, args.limit - len(jobs)),
            page_token=token,
            filter=" AND ".join(restrictions),
        )
        reply = await session.trainer.ListTrainingJobs(request, timeout=session.timeout)
        jobs.extend(reply.training_jobs)
        token = reply.next_page_token
        if not token:
            break
    if args.json:
        out.print_json({"training_jobs": [out.message_dict(job) for job in jobs]})
    elif jobs:
        out.print_table(
            ("job", "state", "dataset", "arch", "epoch", "metrics", "created"),
            [job_out.job_row(job) for job in jobs],
        )
        if token:
            print(f"(more: raise --limit above {args.limit})", file=sys.stderr)
    else:
        print("no training jobs" + (" match" if restrictions else ""), file=sys.stderr)
    return 0


async def jobs_show(session: Session, args: argparse.Namespace) -> int:
    """``conveyor jobs show JOB``: every field a person asks about."""
    reply = await session.trainer.GetTrainingJob(
        rpc.GetTrainingJobRequest(name=job_name(args.job)), timeout=session.timeout
    )
    job = reply.training_job
    if args.json:
        out.print_json({"training_job": out.message_dict(job)})
        return 0
    out.print_fields(job_out.job_fields(job))
    if job.history:
        print()
        shown = job.history[-job_out.HISTORY_ROWS :]
        if len(job.history) > len(shown):
            print(f"last {len(shown)} of {len(job.history)} epochs (--json has all):")
        out.print_table(*job_out.history_table(shown))
    if job.state == pb.JOB_STATE_SUCCEEDED:
        print()
        job_out.print_result(job)
    return 0


async def jobs_cancel(session: Session, args: argparse.Namespace) -> int:
    """``conveyor jobs cancel JOB``: a queued job ends now, a running one after its step."""
    reply = await session.trainer.CancelTrainingJob(
        rpc.CancelTrainingJobRequest(name=job_name(args.job)), timeout=session.timeout
    )
    job = reply.training_job
    if args.json:
        out.print_json({"training_job": out.message_dict(job)})
    elif job.state == pb.JOB_STATE_CANCELLED:
        print(f"{job.name}: cancelled")
    else:
        print(
            f"{job.name}: cancel requested; it stops after its current step "
            f"(`conveyor jobs watch {job_id(job.name)}` shows when)"
        )
    return 0


async def sweeps_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor sweeps list``: sweeps newest first, filtered by state or any filter."""
    restrictions = [f"state={args.state.upper()}"] if args.state else []
    if args.filter:
        restrictions.append(args.filter)
    sweeps: list[pb.SweepJob] = []
    token = ""
    while len(sweeps) < args.limit:
        request = rpc.ListSweepJobsRequest(
            page_size=min(LIST_PAGE_SIZE, args.limit - len(sweeps)),
            page_token=token,
            filter=" AND ".join(restrictions),
        )
        reply = await session.trainer.ListSweepJobs(request, timeout=session.timeout)
        sweeps.extend(reply.sweep_jobs)
        token = reply.next_page_token
        if not token:
            break
    if args.json:
        out.print_json({"sweep_jobs": [out.message_dict(sweep) for sweep in sweeps]})
    elif sweeps:
        out.print_table(
            ("sweep", "state", "trials", "best", "best trial", "model version", "created"),
            [job_out.sweep_row(sweep) for sweep in sweeps],
        )
        if token:
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
    out.print_fields(job_out.sweep_fields(found))
    if found.trials:
        print()
        out.print_table(*job_out.trials_table(found))
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


# -- following a job ----------------------------------------------------------------


async def follow(
    session: Session, name: str, *, view: ProgressView | None = None
) -> pb.TrainingJob:
    """Watches ``name`` until it reaches a terminal state, showing progress; the
    final job. A stream that ends early (the trainer restarting) is resumed."""
    view = view or ProgressView(sys.stderr)
    session.following.job = name
    request = rpc.WatchTrainingJobRequest(name=name)
    request.progress_interval.FromTimedelta(view.interval)
    try:
        while True:
            async for event in session.trainer.WatchTrainingJob(request, timeout=None):
                view.show(event)
                job = event.training_job
                if event.HasField("training_job") and job.state in TERMINAL:
                    return job
            reply = await session.trainer.GetTrainingJob(
                rpc.GetTrainingJobRequest(name=name), timeout=session.timeout
            )
            if reply.training_job.state in TERMINAL:
                return reply.training_job
            await asyncio.sleep(1.0)
    finally:
        view.close()


def finish(job: pb.TrainingJob, *, as_json: bool) -> int:
    """Prints how a followed job ended; 0 when it succeeded, else 1."""
    if as_json:
        out.print_json({"training_job": out.message_dict(job)})
    if job.state == pb.JOB_STATE_SUCCEEDED:
        if not as_json:
            job_out.print_result(job)
        return 0
    short = job_id(job.name)
    if job.state == pb.JOB_STATE_CANCELLED:
        print(
            f"conveyor: {job.name} was cancelled after {len(job.history)} of "
            f"{job.spec.hyperparameters.epochs} epochs; nothing was registered",
            file=sys.stderr,
        )
        return 1
    error = job.error
    code = job_out.code_name(error.code)
    reason = f" [{error.reason}]" if error.reason and error.reason != code else ""
    print(f"conveyor: {job.name} failed: {code}: {error.message}{reason}", file=sys.stderr)
    print(f"hint: `conveyor jobs show {short}` shows the job's spec and progress", file=sys.stderr)
    return 1


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
        job_out.print_sweep_result(found)
    if found.state == pb.JOB_STATE_SUCCEEDED:
        return 0
    short = sweep_id(found.name)
    if found.state == pb.JOB_STATE_CANCELLED:
        ran = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
        ended = sum(trial.state in ran for trial in found.trials)
        print(
            f"conveyor: {found.name} was cancelled after {ended} of "
            f"{job_out.planned_trials(found.spec)} trials; nothing was registered",
            file=sys.stderr,
        )
        return 1
    error = found.error
    code = job_out.code_name(error.code)
    reason = f" [{error.reason}]" if error.reason and error.reason != code else ""
    print(f"conveyor: {found.name} failed: {code}: {error.message}{reason}", file=sys.stderr)
    print(
        f"hint: `conveyor sweeps show {short}` lists its trials; `conveyor jobs show TRIAL` "
        "says why one failed",
        file=sys.stderr,
    )
    return 1
