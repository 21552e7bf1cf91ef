"""``conveyor train`` and ``conveyor jobs …``: the trainer for people.

``conveyor train DATASET --arch mlp --epochs 20 …`` builds a
``TrainingJobSpec`` from its flags, creates the job through the trainer's
gRPC API (``--trainer``, else ``CONVEYOR_TRAINER_ADDR``, else loopback) and
follows it: a live progress bar on stderr (epoch and step, loss, the
validation metric, samples/s, ETA; on a terminal one line is redrawn, in logs
each epoch is one plain line), then the result on stdout (test and validation
metrics, confusion matrix, the registered version). ``conveyor jobs
list|show|watch|cancel`` read and steer jobs.

With ``--sweep PATH=DOMAIN`` the same flags are the base spec of a
hyperparameter sweep instead; that command and ``conveyor sweeps …`` are
:mod:`conveyor.services.trainer.sweep_cli`, built on this module's session,
flags, spec and error reporting (:func:`run`, :func:`training_spec`).

Ctrl-C while following a job stops following it: it keeps running, and the
command says how to follow it again or cancel it (``conveyor jobs cancel
JOB``); it exits 130. Exit codes: 0 when the call worked (and a followed job
SUCCEEDED); 1 when a call failed (``conveyor: <CODE>: <message>``, the field
violations, a hint — the format of every command) or a followed job FAILED or
was CANCELLED; 2 for usage errors. ``--json`` prints the API's own messages
(proto3 JSON, proto field names) on stdout; progress stays on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc

from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import EXIT_INTERRUPTED, pages_up_to, reported
from conveyor.services.trainer import cli_output as job_out
from conveyor.services.trainer.cli_output import TERMINAL, ProgressView, job_id, sweep_id
from conveyor.shared.errors import ConveyorError, InvalidArgumentError
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
MIN_INT32: Final = -(2**31)
MAX_INT32: Final = 2**31 - 1
MAX_UINT64: Final = 2**64 - 1
LIST_PAGE_SIZE: Final = 100

FLAGS: Final = (
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


class UsageError(Exception):
    """Flags that cannot make a job or sweep: printed like argparse's errors, exit 2."""


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


class Hint(Protocol):
    """What to do next after a failed call: :func:`hint` for the job commands,
    :func:`conveyor.services.trainer.sweep_cli.hint` for the sweep commands."""

    def __call__(
        self, error: ConveyorError, args: argparse.Namespace, *, target: str, following: Following
    ) -> str: ...


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
    """The flags of ``conveyor train``: the spec, the job, and what to do after.

    Integers are bounded by the API field they set (``int32``, ``uint64``):
    whether a value makes sense is the trainer's to say, but one the field
    cannot hold is a usage error here.
    """
    int32 = whole_number(MIN_INT32, MAX_INT32, int_flag=True)
    uint64 = whole_number(0, MAX_UINT64, int_flag=True)
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
    data.add_argument("--split-seed", type=uint64, default=0, help="seed of the split (default: 0)")
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
    hp.add_argument("--epochs", type=int32, default=20, help="default: 20")
    hp.add_argument("--batch-size", type=int32, default=32, help="default: 32")
    hp.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    hp.add_argument("--learning-rate", "--lr", type=float, default=1e-3, help="default: 0.001")
    hp.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    hp.add_argument("--weight-decay", type=float, default=0.0)
    hp.add_argument("--dropout", type=float, default=0.0)
    hp.add_argument("--seed", type=uint64, default=0, help="seed of initialisation and shuffling")
    hp.add_argument(
        "--early-stopping-metric",
        metavar="METRIC",
        help="stop when this validation metric stops improving (loss, accuracy, f1, …)",
    )
    hp.add_argument("--patience", type=int32, help="epochs without improvement (default: 3)")
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
        "--world-size", type=int32, default=1, help="data-parallel processes (default: 1)"
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


def whole_number(low: int, high: int, *, int_flag: bool = False) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (what the API's
    field holds), so that a value the field cannot hold is a usage error naming
    the flag, not a traceback when the spec is built.

    Text that is no whole number is refused with the range too; with
    ``int_flag`` it raises ValueError instead, which argparse words as for
    ``type=int`` (``invalid int value: 'many'``, what the flags that were typed
    ``int`` always said) and :func:`_augmentation` as its own message.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            if int_flag:
                raise
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low:,} to {high:,}, got {text!r}"
            )
        return value

    # argparse names a type by its __name__ when the type raises ValueError.
    parse.__name__ = "int" if int_flag else "whole_number"
    return parse


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
        "crop": ("random_crop_padding", whole_number(MIN_INT32, MAX_INT32, int_flag=True)),
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
    except argparse.ArgumentTypeError as error:  # out of the field's range
        raise argparse.ArgumentTypeError(f"{name}: {error}") from None


def _dataset_name(text: str) -> str:
    return text if text.startswith("datasets/") else f"datasets/{text}"


def _model_name(text: str) -> str:
    return text if text.startswith("models/") else f"models/{text}"


def job_name(text: str) -> str:
    """``trainingJobs/abc`` from ``abc`` or ``trainingJobs/abc``."""
    return text if text.startswith("trainingJobs/") else f"trainingJobs/{text}"


# -- running a command --------------------------------------------------------------


def run(command: Command, args: argparse.Namespace, *, sweep_hint: Hint | None = None) -> int:
    """Runs ``command`` against the trainer; every expected failure exits 1.

    The sweep commands pass their ``sweep_hint``
    (:func:`conveyor.services.trainer.sweep_cli.run`): their failures and Ctrl-C
    then name the sweep commands.
    """
    following = Following(sweep=sweep_hint is not None)
    target = getattr(args, "trainer", None) or "the trainer"

    def call() -> int:
        nonlocal target
        settings = ClientSettings()
        target = args.trainer or settings.trainer_addr
        try:
            return asyncio.run(_with_session(command, args, settings, target, following))
        except UsageError as error:
            print(f"conveyor {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            _interrupted(following)
            return EXIT_INTERRUPTED

    advise = sweep_hint or hint
    return reported(call, lambda failure: advise(failure, args, target=target, following=following))


async def _with_session(
    command: Command,
    args: argparse.Namespace,
    settings: ClientSettings,
    target: str,
    following: Following,
) -> int:
    timeout = args.timeout or settings.default_timeout.total_seconds()
    channel = settings.channel(target, [TRAINER_SERVICE], timeout=timedelta(seconds=timeout))
    async with channel:
        stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
        return await command(Session(stub, target, timeout, following), args)


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
    """What to do next after a failed call about a job."""
    code = error.code
    command = args.command
    job = job_id(following.job or job_name(getattr(args, "job", "") or "JOB"))
    if code == grpc.StatusCode.UNAVAILABLE:
        where = unavailable_hint(target)
        if following.job:
            where += f"; the job keeps running: `conveyor jobs watch {job}` follows it again"
        return where
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        flags = named_flags(error, FLAGS)
        if command == "train" and flags:
            return f"fix {', '.join(flags)} and run the command again"
        return "fix the fields named above and run the command again"
    if code == grpc.StatusCode.NOT_FOUND:
        if command == "train":
            return CREATE_NOT_FOUND
        return "check the name: `conveyor jobs list` shows the jobs"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if command == "train":
            return CREATE_FAILED_PRECONDITION
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
    return hints.get(code) or common_hint(code, target)


CREATE_NOT_FOUND: Final = (
    "check the dataset (built-in: breast-cancer, digits, synthetic; or an uploaded "
    "one) and --register-model (`conveyor models list` shows the models)"
)
CREATE_FAILED_PRECONDITION: Final = (
    "a GPU was asked for where there is none (use --device auto or cpu), or the "
    "model to register in is archived"
)


def unavailable_hint(target: str) -> str:
    """Where the trainer should be, when it cannot be reached."""
    return (
        f"is a trainer running at {target}? start one with `conveyor serve trainer` "
        "(or `conveyor up`), or point at it with --trainer HOST:PORT or "
        "CONVEYOR_TRAINER_ADDR"
    )


def common_hint(code: grpc.StatusCode, target: str) -> str:
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


def named_flags(error: ConveyorError, table: tuple[tuple[str, str], ...]) -> list[str]:
    """The flags behind the spec fields an INVALID_ARGUMENT names, in order
    (``table``: :data:`FLAGS`, or the sweep commands' own)."""
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
    """``conveyor train DATASET …``: create a job, then follow it to its end.

    ``conveyor`` runs :func:`conveyor.services.trainer.sweep_cli.train_job`,
    which refuses the flags that only shape a sweep and then calls this; with
    ``--sweep`` it runs :func:`conveyor.services.trainer.sweep_cli.sweep`.
    """
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


async def jobs_watch(session: Session, args: argparse.Namespace) -> int:
    """``conveyor jobs watch JOB``: follow a job to its end (exit 0 if it succeeded)."""
    final = await follow(session, job_name(args.job))
    return finish(final, as_json=args.json)


async def jobs_list(session: Session, args: argparse.Namespace) -> int:
    """``conveyor jobs list``: jobs newest first, filtered by state or any filter."""
    restrictions = [f"state={args.state.upper()}"] if args.state else []
    if args.filter:
        restrictions.append(args.filter)

    async def page(token: str, size: int) -> tuple[list[pb.TrainingJob], str]:
        request = rpc.ListTrainingJobsRequest(
            page_size=size, page_token=token, filter=" AND ".join(restrictions)
        )
        reply = await session.trainer.ListTrainingJobs(request, timeout=session.timeout)
        return list(reply.training_jobs), reply.next_page_token

    jobs, more = await pages_up_to(page, args.limit, LIST_PAGE_SIZE)
    if args.json:
        out.print_json({"training_jobs": [out.message_dict(job) for job in jobs]})
    elif jobs:
        out.print_table(
            ("job", "state", "dataset", "arch", "epoch", "metrics", "created"),
            [job_out.job_row(job) for job in jobs],
        )
        if more:
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
        epochs = job_out.plural(job.spec.hyperparameters.epochs, "epoch")
        print(
            f"conveyor: {job.name} was cancelled after {len(job.history)} of {epochs}; "
            "nothing was registered",
            file=sys.stderr,
        )
        return 1
    error = job.error
    code = job_out.code_name(error.code)
    reason = f" [{error.reason}]" if error.reason and error.reason != code else ""
    print(f"conveyor: {job.name} failed: {code}: {error.message}{reason}", file=sys.stderr)
    print(f"hint: `conveyor jobs show {short}` shows the job's spec and progress", file=sys.stderr)
    return 1
