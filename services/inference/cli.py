"""``conveyor deploy``, ``conveyor deployments status`` and ``conveyor predict``:
serving, for people.

``conveyor deploy cancer`` asks inference (``--inference``, else
``CONVEYOR_INFERENCE_ADDR``, else loopback) to serve ``cancer@production``;
a deployment made before the alias exists starts serving when it appears, and
follows every later move of it (hot swap). ``conveyor deployments status
cancer`` prints what is loaded, with which provider and device, and the last
swap; ``--until-serving N`` waits until version N takes all of the traffic
(scripts use it after ``conveyor promote``).

``conveyor predict cancer --values 1.2,3.4,…`` sends one row through the Open
Inference Protocol's ``ModelInfer``; ``--csv FILE`` sends every row of a CSV
file (a header row of column names, then numbers), in batches of the
deployment's max batch size. The input's name and datatype come from
``ModelMetadata``. It prints, per row, the version that answered and the
output (the class with the highest score for a classifier's probabilities),
or with ``--json`` one JSON object per row; with ``--csv`` and no ``--show``,
only a summary: rows, versions that answered, class counts, time.

Failures print ``conveyor: <CODE>: <message>``, the field violations and a
hint, and exit 1, as every command does (:mod:`conveyor.services.monitor.cli`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
import numpy as np
import numpy.typing as npt

from conveyor.inference.v1 import inference_messages_pb2 as rpc
from conveyor.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.services.explainer.cli import row_values
from conveyor.services.optimizer.cli import seconds
from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import CommandError, reported
from conveyor.services.trainer.cli import positive
from conveyor.shared.errors import ConveyorError
from conveyor.shared.settings import ClientSettings

if TYPE_CHECKING:
    Management = inference_service_pb2_grpc.InferenceManagementServiceAsyncStub
    Inference = grpc_service_pb2_grpc.GRPCInferenceServiceAsyncStub

MANAGEMENT_SERVICE: Final = inference_service_pb2.DESCRIPTOR.services_by_name[
    "InferenceManagementService"
]
INFERENCE_SERVICE: Final = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
POLL_INTERVAL_S: Final = 0.25
NUMPY_TYPES: Final = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
"""The input datatypes ``predict`` can fill from numbers."""


@dataclasses.dataclass(frozen=True)
class Session:
    """What a command needs to call inference."""

    management: Management
    inference: Inference
    target: str
    timeout: float
    """Deadline of each call, in seconds."""


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


# -- arguments ---------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags every inference command takes."""
    parser.add_argument(
        "--inference",
        metavar="HOST:PORT",
        help="inference address (default: $CONVEYOR_INFERENCE_ADDR, else 127.0.0.1:50054)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="deadline of each call (default: 30)",
    )


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    """Declares ``deploy``, ``deployments status`` and ``predict``."""
    deploy = commands.add_parser(
        "deploy",
        parents=parents,
        help="serve a model's production alias (and follow it) in inference",
        description="Create a deployment that serves MODEL@ALIAS and hot-swaps whenever "
        "the alias moves. Made before the alias exists, it starts serving when it appears.",
    )
    deploy.add_argument("model", help="model id or models/{model}")
    deploy.add_argument("--alias", default="production", help="default: production")
    deploy.add_argument(
        "--max-batch-size", type=positive, metavar="N", help="dynamic batching (default: 32)"
    )
    deploy.add_argument(
        "--sample-rate",
        type=float,
        metavar="F",
        help="share of predictions logged to the monitor (default: the server's, 1.0)",
    )
    deploy.add_argument("--json", action="store_true", help="print the API's message")
    deploy.set_defaults(handler=lambda args: run(deploy_model, args))
    deployments = commands.add_parser("deployments", help="what inference serves")
    sub = deployments.add_subparsers(metavar="COMMAND")
    deployments.set_defaults(handler=lambda args: _usage(deployments))
    status = sub.add_parser(
        "status",
        parents=parents,
        help="a deployment's loaded versions, traffic and last swap",
        description="a deployment's loaded versions, traffic and last swap",
    )
    status.add_argument("model", help="model id or models/{model}")
    status.add_argument(
        "--until-serving",
        type=positive,
        metavar="N",
        help="wait until version N takes all the traffic (bounded by --wait)",
    )
    status.add_argument("--wait", type=seconds, default=60.0, metavar="SECONDS", help="default: 60")
    status.add_argument("--json", action="store_true", help="print the API's message")
    status.set_defaults(handler=lambda args: run(deployment_status, args))
    predict = commands.add_parser(
        "predict",
        parents=parents,
        help="send rows through the Open Inference Protocol and print the answers",
        description="Send one row (--values) or every row of a CSV file (--csv) to "
        "MODEL through ModelInfer and print the answers.",
    )
    predict.add_argument("model", help="model id (its deployment's split decides the version)")
    predict.add_argument("--version", type=positive, metavar="N", help="ask version N itself")
    rows = predict.add_mutually_exclusive_group(required=True)
    rows.add_argument(
        "--values", type=row_values, metavar="X,Y,…", help="one row (--values=-1,2 for a minus)"
    )
    rows.add_argument("--csv", type=Path, metavar="FILE", help="a header row, then numbers")
    predict.add_argument(
        "--id",
        default="",
        help="request id of every call (sticky canary routing; default: a new one per call, "
        "as the monitor counts a repeated id once)",
    )
    predict.add_argument("--show", action="store_true", help="with --csv: print every row")
    predict.add_argument("--json", action="store_true", help="one JSON object per row")
    predict.set_defaults(handler=lambda args: run(predict_rows, args))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# -- running a command ---------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs ``command`` against inference; every expected failure exits 1."""
    target = getattr(args, "inference", None) or "inference"

    def call() -> int:
        nonlocal target
        settings = ClientSettings()
        target = args.inference or settings.inference_addr
        return asyncio.run(_with_session(command, args, settings, target))

    return reported(call, lambda failure: hint(failure, args, target=target))


async def _with_session(
    command: Command, args: argparse.Namespace, settings: ClientSettings, target: str
) -> int:
    timeout = args.timeout or settings.default_timeout.total_seconds()
    channel = settings.channel(
        target, [MANAGEMENT_SERVICE, INFERENCE_SERVICE], timeout=timedelta(seconds=timeout)
    )
    async with channel:
        session = Session(
            management=inference_service_pb2_grpc.InferenceManagementServiceStub(channel),
            inference=grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel),
            target=target,
            timeout=timeout,
        )
        return await command(session, args)


def hint(error: ConveyorError, args: argparse.Namespace, *, target: str) -> str:
    """What to do next after a failed call."""
    model = out.model_id(args.model)
    hints = {
        grpc.StatusCode.UNAVAILABLE: (
            f"is inference running at {target}? start it with `conveyor up` (or `conveyor "
            "serve inference`), or point at it with --inference HOST:PORT or "
            "CONVEYOR_INFERENCE_ADDR; a deployment with no version ready answers this too: "
            f"`conveyor deployments status {model}`"
        ),
        grpc.StatusCode.NOT_FOUND: (
            f"is {model} deployed? `conveyor deploy {model}` serves its production alias; "
            f"`conveyor models versions {model}` shows its versions"
        ),
        grpc.StatusCode.ALREADY_EXISTS: (
            f"it is deployed already: `conveyor deployments status {model}`"
        ),
        grpc.StatusCode.INVALID_ARGUMENT: "fix the fields named above and run the command again",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "inference's queue is full: send fewer rows at once",
        grpc.StatusCode.DEADLINE_EXCEEDED: "no answer in time: raise --timeout (or --wait)",
        grpc.StatusCode.UNAUTHENTICATED: (
            "no valid credentials: set CONVEYOR_TOKEN_FILE to a token file "
            "(`conveyor up` writes development ones under <data-dir>/credentials)"
        ),
        grpc.StatusCode.PERMISSION_DENIED: (
            "deploying takes an ML engineer of the model's owner team; predicting, a "
            "modelling role or a service identity"
        ),
    }
    return hints.get(error.code, "this looks like an inference bug: report it with the message")


# -- deployments -----------------------------------------------------------------------


async def deploy_model(session: Session, args: argparse.Namespace) -> int:
    """``conveyor deploy MODEL``."""
    model = _model_name(args.model)
    deployment = pb.Deployment(model=model)
    if args.alias != "production":
        deployment.traffic.targets.add(model_version=f"{model}@{args.alias}", percent=100)
    if args.max_batch_size:
        deployment.batching.max_batch_size = args.max_batch_size
    if args.sample_rate is not None:
        deployment.prediction_log_sample_rate = args.sample_rate
    reply = await session.management.CreateDeployment(
        rpc.CreateDeploymentRequest(deployment=deployment), timeout=session.timeout
    )
    if args.json:
        out.print_json(out.message_dict(reply.deployment))
        return 0
    print(
        f"{reply.deployment.name}: serves {model}@{args.alias} and follows it; "
        f"`conveyor deployments status {out.model_id(model)}` shows it"
    )
    return 0


async def deployment_status(session: Session, args: argparse.Namespace) -> int:
    """``conveyor deployments status MODEL [--until-serving N]``."""
    name = f"deployments/{out.model_id(_model_name(args.model))}/status"
    deadline = time.monotonic() + args.wait
    while True:
        reply = await session.management.GetDeploymentStatus(
            rpc.GetDeploymentStatusRequest(name=name), timeout=session.timeout
        )
        status = reply.status
        if args.until_serving is None or serves_only(status, args.until_serving):
            break
        if time.monotonic() >= deadline:
            print_status(status)
            raise CommandError(
                "DEADLINE_EXCEEDED",
                f"version {args.until_serving} did not take all the traffic in {args.wait:g} s",
                hint="check the alias (`conveyor models alias list MODEL`) and the last "
                "swap above; a version that fails to load leaves the old one serving",
            )
        await asyncio.sleep(POLL_INTERVAL_S)
    if args.json:
        out.print_json(out.message_dict(status))
    else:
        print_status(status)
    return 0


def serves_only(status: pb.DeploymentStatus, number: int) -> bool:
    """Whether version ``number`` is ready and takes all of the traffic."""
    traffic = [v for v in status.versions if v.role == pb.VERSION_ROLE_TRAFFIC]
    return bool(traffic) and all(
        v.model_version.endswith(f"/versions/{number}")
        and v.state == pb.VERSION_STATE_READY
        and v.traffic_percent == 100
        for v in traffic
        if v.traffic_percent > 0
    )


def print_status(status: pb.DeploymentStatus) -> None:
    """A deployment's state, its versions as a table and its last swap."""
    state = _label(pb.DeploymentState, status.state, "DEPLOYMENT_STATE_")
    print(f"{status.name.removesuffix('/status')}: {state}")
    rows = [
        [
            version.model_version,
            version.target or "-",
            _label(pb.VersionRole, version.role, "VERSION_ROLE_"),
            _label(pb.VersionState, version.state, "VERSION_STATE_"),
            f"{version.traffic_percent}%",
            _label(pb.ExecutionProvider, version.execution_provider, "EXECUTION_PROVIDER_"),
            version.device or "-",
            str(version.max_batch_size),
        ]
        for version in status.versions
    ]
    if rows:
        headers = ("version", "target", "role", "state", "traffic", "provider", "device", "batch")
        out.print_table(headers, rows)
    swap = status.last_swap
    if swap.to_version:
        origin = swap.from_version or "nothing"
        outcome = _label(pb.SwapOutcome, swap.outcome, "SWAP_OUTCOME_")
        print(
            f"last swap: {origin} -> {swap.to_version} "
            f"({outcome}, alias revision {swap.alias_revision})"
            + (f": {swap.error_message}" if swap.error_message else "")
        )


# -- predictions ---------------------------------------------------------------------


async def predict_rows(session: Session, args: argparse.Namespace) -> int:
    """``conveyor predict MODEL (--values … | --csv FILE)``."""
    model = out.model_id(_model_name(args.model))
    version = str(args.version or "")
    metadata = await session.inference.ModelMetadata(
        oip.ModelMetadataRequest(name=model, version=version), timeout=session.timeout
    )
    config = await session.inference.ModelConfig(
        oip.ModelConfigRequest(name=model, version=version), timeout=session.timeout
    )
    if len(metadata.inputs) != 1:
        raise CommandError(
            "FAILED_PRECONDITION",
            f"{model} takes {len(metadata.inputs)} inputs; predict sends one table of numbers",
            hint="call ModelInfer from a client (tritonclient, grpcurl) for several inputs",
        )
    tensor = metadata.inputs[0]
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise CommandError(
            "FAILED_PRECONDITION",
            f"{model}'s input {tensor.name} is {tensor.datatype}; predict sends "
            + ", ".join(NUMPY_TYPES),
        )
    rows = read_rows(args.csv) if args.csv else np.asarray([args.values], dtype=np.float64)
    width = list(tensor.shape)[1:]
    if len(width) != 1 or (width[0] != -1 and rows.shape[1] != width[0]):
        raise CommandError(
            "INVALID_ARGUMENT",
            f"{model}'s input {tensor.name} has shape {list(tensor.shape)}; the rows have "
            f"{rows.shape[1]} values",
        )
    batch = max(1, config.config.max_batch_size)
    started = time.perf_counter()
    answered: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch].astype(dtype)
        request = oip.ModelInferRequest(
            model_name=model, model_version=version, id=args.id or uuid.uuid4().hex
        )
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(chunk.shape))
        request.raw_input_contents.append(chunk.tobytes())
        reply = await session.inference.ModelInfer(request, timeout=session.timeout)
        outputs = decoded_outputs(reply)
        answered[reply.model_version] += len(chunk)
        for index in range(len(chunk)):
            row = {name: values[index] for name, values in outputs.items()}
            label, text = answer_text(row)
            predicted[label] += 1
            if args.json:
                values = {name: row[name].tolist() for name in row}
                line = {"row": start + index, "version": reply.model_version, "outputs": values}
                print(json.dumps(line))
            elif args.show or not args.csv:
                print(f"row {start + index}: version {reply.model_version}: {text}")
    elapsed = time.perf_counter() - started
    if args.csv and not args.json:
        versions = ", ".join(f"version {v}: {n:,}" for v, n in sorted(answered.items()))
        classes = ", ".join(f"{label}: {n:,}" for label, n in predicted.most_common(5))
        print(f"{len(rows):,} rows in {elapsed:.2f} s, answered by {versions}; {classes}")
    return 0


def read_rows(path: Path) -> npt.NDArray[np.float64]:
    """The numbers of a CSV file with a header row."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise CommandError("INVALID_ARGUMENT", f"{path} is empty", hint="a header row first")
        try:
            rows = [[float(cell) for cell in row] for row in reader if row]
        except ValueError as error:
            raise CommandError("INVALID_ARGUMENT", f"{path}: {error}") from None
    if not rows or any(len(row) != len(header) for row in rows):
        raise CommandError(
            "INVALID_ARGUMENT",
            f"{path}: expected rows of {len(header)} numbers under the header",
        )
    return np.asarray(rows, dtype=np.float64)


def decoded_outputs(reply: oip.ModelInferResponse) -> dict[str, npt.NDArray[np.float64]]:
    """Each output as rows of float64, from raw or typed contents."""
    decoded: dict[str, npt.NDArray[np.float64]] = {}
    for index, tensor in enumerate(reply.outputs):
        shape = [int(d) for d in tensor.shape]
        if index < len(reply.raw_output_contents):
            dtype = NUMPY_TYPES.get(tensor.datatype, np.float32)
            values = np.frombuffer(reply.raw_output_contents[index], dtype=dtype)
        else:
            contents = tensor.contents
            values = np.asarray(
                list(contents.fp32_contents)
                or list(contents.fp64_contents)
                or list(contents.int64_contents)
                or list(contents.int_contents)
            )
        decoded[tensor.name] = values.astype(np.float64).reshape(shape[0], -1)
    return decoded


def answer_text(row: dict[str, npt.NDArray[np.float64]]) -> tuple[str, str]:
    """What to count and what to print for one row's outputs: ``class 1`` and
    ``class 1 (0.98)`` for one output of class scores, else the values."""
    if len(row) == 1:
        values = next(iter(row.values()))
        if len(values) > 1:
            best = int(np.argmax(values))
            return f"class {best}", f"class {best} ({values[best]:.2f})"
    text = "; ".join(f"{name}={np.array2string(v, precision=4)}" for name, v in row.items())
    return "values", text


def _label(enum: object, value: int, prefix: str) -> str:
    """``on demand`` for ``VERSION_ROLE_ON_DEMAND``."""
    return out.enum_label(enum, value, prefix).replace("_", " ")


def _model_name(text: str) -> str:
    return text if text.startswith("models/") else f"models/{text}"
