"""``conveyor explain MODEL --row N``: one prediction's explanation, for people.

``conveyor explain cancer --row 17`` reads the version ``cancer@production``
points at from the registry (``--registry``, else ``CONVEYOR_REGISTRY_ADDR``,
else loopback), takes row 17 of its reference sample (the rows the trainer
stored with its reference statistics), asks the explainer's gRPC API
(``--explainer``, else ``CONVEYOR_EXPLAINER_ADDR``, else loopback) to explain
the version's prediction for that row, prints the result on stdout and saves
the picture the explainer draws as ``explanation.png`` (``--picture PATH``
elsewhere, ``--no-picture`` not at all; written whole through ``PATH.part``,
then ``wrote PATH`` on stderr). ``--values 1.0,2.5,…`` gives the row itself
instead of a reference row (``--values=-1.5,2`` when it starts with a minus).

The version is read once and then explained by its resolved name
(``models/cancer/versions/3``), so an alias that moves in between cannot mix
one version's row with another version's explanation. A version whose single
input is an image (``[-1, H, W]``, ``[-1, C, H, W]`` or ``[-1, H, W, C]`` with
one or three channels) is sent an ``Image`` (``[H, W]`` for one channel) and
explained with LIME image (``--segmentation``, ``--segments``); any other
version is sent a ``TabularRow`` and explained with LIME tabular (``--method
lime``, the default) or Kernel SHAP (``--method shap``, ``--background``).
Without ``--seed`` the explainer draws one, which the output shows.

The output is the summary (version, instance, method, target, prediction,
base value, LIME's local prediction and fidelity R², features, seed, model
evaluations, ``ModelInfer`` calls, the attached report with ``--attach``),
then one row per contribution, largest absolute weight first: rank, feature,
value, condition (LIME tabular only) and weight. ``--json`` prints the API's
``ExplainResponse`` instead (the proto3 JSON mapping with the proto field
names), except that each picture's ``data`` (a PNG, base64 in JSON) is replaced
by its ``size_bytes``: the picture itself is the file.

The command runs as ``conveyor drift`` does
(:mod:`conveyor.services.monitor.cli`): channels with the client settings'
TLS, token and retries, a deadline on each call, and a failed call prints
``conveyor: <CODE>: <message>``, the field violations and a hint (the
registry's hints when the registry call failed), and exits 1; usage errors
(flags argparse refuses, or flags that do not go together) exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc

from conveyor.explainer.v1 import explainer_messages_pb2 as rpc
from conveyor.explainer.v1 import explainer_service_pb2, explainer_service_pb2_grpc
from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor.cli import version_name
from conveyor.services.optimizer.cli import seconds
from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import REGISTRY_SERVICE, CommandError, reported
from conveyor.services.trainer.cli import (
    MAX_INT32,
    UsageError,
    named_flags,
    whole_number,
)
from conveyor.services.trainer.cli_output import plural
from conveyor.shared.errors import ConveyorError, from_rpc_error
from conveyor.shared.settings import ClientSettings

if TYPE_CHECKING:
    Explainer = explainer_service_pb2_grpc.ExplainerServiceAsyncStub
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

EXPLAINER_SERVICE: Final = explainer_service_pb2.DESCRIPTOR.services_by_name["ExplainerService"]
DEFAULT_PICTURE: Final = Path("explanation.png")
MAX_SEED: Final = 2**32 - 1
METHODS: Final = {
    "lime": pb.EXPLANATION_METHOD_LIME_TABULAR,
    "shap": pb.EXPLANATION_METHOD_KERNEL_SHAP,
}
METHOD_LABELS: Final = {
    pb.EXPLANATION_METHOD_LIME_TABULAR: "LIME tabular",
    pb.EXPLANATION_METHOD_LIME_IMAGE: "LIME image",
    pb.EXPLANATION_METHOD_KERNEL_SHAP: "Kernel SHAP",
}
SEGMENTATIONS: Final = {
    "grid": pb.SEGMENTATION_ALGORITHM_GRID,
    "slic": pb.SEGMENTATION_ALGORITHM_SLIC,
    "quickshift": pb.SEGMENTATION_ALGORITHM_QUICKSHIFT,
    "felzenszwalb": pb.SEGMENTATION_ALGORITHM_FELZENSZWALB,
}
IMAGE_CHANNELS: Final = (1, 3)
"""Channel counts that make a three-dimensional input an image (as the explainer sees it)."""
COLUMNS: Final = ("rank", "feature", "value", "condition", "weight")
CONFIG_FLAGS: Final = (
    # The flag behind each request field the explainer may refuse, most specific first.
    ("config.num_samples", "--samples"),
    ("config.top_k", "--top-k"),
    ("config.target_index", "--target"),
    ("config.output_name", "--output"),
    ("config.background_size", "--background"),
    ("config.image_options.segmentation", "--segmentation"),
    ("config.image_options.num_segments", "--segments"),
    ("config.method", "--method"),
    ("config.seed", "--seed"),
)


@dataclasses.dataclass(frozen=True)
class Session:
    """What a command needs to call the explainer, and the registry for the row."""

    explainer: Explainer
    registry: Registry
    target: str
    """The explainer's address."""
    registry_target: str
    timeout: float
    """Deadline of each call, in seconds."""


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


class RegistryCallError(Exception):
    """A failed registry call: reported with the registry's hints, not the explainer's."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass(frozen=True)
class ImageShape:
    """How a row of an image model's input is sent as an ``Image``."""

    shape: list[int]
    """``[H, W]`` for one channel, else ``[C, H, W]`` or ``[H, W, C]``."""
    layout: pb.ImageLayout.ValueType

    def text(self) -> str:
        """``8x8``, ``3x32x32``."""
        return "x".join(str(d) for d in self.shape)


# -- arguments -------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags of ``conveyor explain``."""
    parser.add_argument(
        "--explainer",
        metavar="HOST:PORT",
        help="explainer address (default: $CONVEYOR_EXPLAINER_ADDR, else 127.0.0.1:50056)",
    )
    parser.add_argument(
        "--registry",
        metavar="HOST:PORT",
        help="registry address, to read the version and its reference rows "
        "(default: $CONVEYOR_REGISTRY_ADDR, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--timeout", type=seconds, metavar="SECONDS", help="deadline of each call (default: 30)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the API's messages)")


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``conveyor explain``: the version, the row, the method, the picture."""
    parser.add_argument(
        "model",
        type=version_name,
        metavar="MODEL[@ALIAS_OR_VERSION]",
        help="cancer (its production alias), cancer@staging, cancer@3, models/cancer/versions/3",
    )
    instance = parser.add_argument_group("the instance (one of them)")
    which = instance.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--row",
        type=whole_number(0, MAX_INT32),
        metavar="N",
        help="row N (from 0) of the version's reference sample, stored in the registry",
    )
    which.add_argument(
        "--values",
        type=row_values,
        metavar="V1,V2,…",
        help="the row itself, one value per feature in the signature's order (an image's "
        "pixels row-major); write --values=-1.5,2 when it starts with a minus",
    )
    method = parser.add_argument_group("the method")
    method.add_argument(
        "--method",
        choices=sorted(METHODS),
        help="tabular models: lime (LIME tabular, the default) or shap (Kernel SHAP); "
        "image models are explained with LIME image",
    )
    method.add_argument(
        "--samples",
        type=whole_number(10, 100_000),
        metavar="N",
        help="perturbed samples the model evaluates (default: LIME tabular 5,000, "
        "LIME image 1,000, Kernel SHAP 2 x features + 2,048)",
    )
    method.add_argument(
        "--seed",
        type=whole_number(0, MAX_SEED),
        metavar="N",
        help="seed of every random draw; the same seed gives the same explanation "
        "(default: the explainer draws one and the output shows it)",
    )
    method.add_argument(
        "--top-k",
        type=whole_number(1, MAX_INT32),
        metavar="K",
        help="contributions to show, largest first (default: 10)",
    )
    method.add_argument(
        "--target",
        type=whole_number(0, MAX_INT32),
        metavar="INDEX",
        help="the output element explained, e.g. a class index (default: the predicted class)",
    )
    method.add_argument(
        "--output", metavar="NAME", help="the output tensor explained, when there are several"
    )
    method.add_argument(
        "--background",
        type=whole_number(1, 1_000),
        metavar="N",
        help="--method shap: background rows summarised from the reference sample (default: 50)",
    )
    method.add_argument(
        "--segmentation",
        choices=list(SEGMENTATIONS),
        help="images: how superpixels are cut (default: quickshift; grid suits tiny images)",
    )
    method.add_argument(
        "--segments",
        type=whole_number(2, 1_000),
        metavar="N",
        help="images: superpixels aimed at by grid and slic (default: 16)",
    )
    parser.add_argument(
        "--attach",
        action="store_true",
        help="also attach the explanation to the version in the registry as its explanation "
        "report (the promotion gate looks for one)",
    )
    picture = parser.add_mutually_exclusive_group()
    picture.add_argument(
        "--picture",
        type=Path,
        default=DEFAULT_PICTURE,
        metavar="PATH",
        help=f"where to save the picture, a PNG (default: {DEFAULT_PICTURE})",
    )
    picture.add_argument("--no-picture", action="store_true", help="save no picture")


def row_values(text: str) -> list[float]:
    """``1.0,2.5,-3``: finite numbers, comma-separated."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"expected finite numbers separated by commas (1.0,2.5,-3), got {text!r}"
        )
    return values


# -- running a command --------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs ``command`` against the registry and the explainer; every expected
    failure exits 1, flags that do not go together 2."""
    target = getattr(args, "explainer", None) or "the explainer"

    def call() -> int:
        nonlocal target
        settings = ClientSettings()
        target = args.explainer or settings.explainer_addr
        registry = args.registry or settings.registry_addr
        try:
            return asyncio.run(_with_session(command, args, settings, target, registry))
        except UsageError as error:
            print(f"conveyor {args.command}: error: {error}", file=sys.stderr)
            return 2
        except RegistryCallError as error:
            failure = from_rpc_error(error.error)
            advice = out.hint(failure.code, model=_model(args), target=registry)
            return out.report(failure, advice)

    return reported(call, lambda failure: hint(failure, args, target=target))


async def _with_session(
    command: Command,
    args: argparse.Namespace,
    settings: ClientSettings,
    target: str,
    registry: str,
) -> int:
    timeout = args.timeout or settings.default_timeout.total_seconds()
    deadline = timedelta(seconds=timeout)
    explainer_channel = settings.channel(target, [EXPLAINER_SERVICE], timeout=deadline)
    registry_channel = settings.channel(registry, [REGISTRY_SERVICE], timeout=deadline)
    async with explainer_channel, registry_channel:
        session = Session(
            explainer=explainer_service_pb2_grpc.ExplainerServiceStub(explainer_channel),
            registry=registry_service_pb2_grpc.RegistryServiceStub(registry_channel),
            target=target,
            registry_target=registry,
            timeout=timeout,
        )
        return await command(session, args)


def hint(error: ConveyorError, args: argparse.Namespace, *, target: str) -> str:
    """What to do next after a failed call to the explainer."""
    code = error.code
    model = _model(args)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        instance = "--values" if getattr(args, "values", None) is not None else "--row"
        flags = named_flags(error, (*CONFIG_FLAGS, ("instance", instance)))
        if flags:
            return f"fix {', '.join(flags)} and run the command again"
        return "fix the fields named above and run the command again"
    hints = {
        grpc.StatusCode.UNAVAILABLE: (
            f"is an explainer running at {target}? start one with `conveyor serve explainer` "
            "(or `conveyor up`), or point at it with --explainer HOST:PORT or "
            "CONVEYOR_EXPLAINER_ADDR; the explainer also answers this while the registry or "
            "the inference service cannot be reached"
        ),
        grpc.StatusCode.NOT_FOUND: (
            f"check the name: `conveyor models versions {model}` shows its versions, "
            f"`conveyor models alias list {model}` its aliases"
        ),
        grpc.StatusCode.FAILED_PRECONDITION: (
            "the version must have one input and one output (--output NAME picks one of "
            "several), reference statistics for tabular methods, not be archived for --attach, "
            "and a deployment that lets inference serve it: "
            f"see `conveyor models versions {model}`"
        ),
        grpc.StatusCode.DEADLINE_EXCEEDED: (
            "no answer in time: raise --timeout or ask for fewer --samples, or check "
            f"`conveyor health {target}`"
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (
            "the explainer or the inference queue is full: run the command again in a moment"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            "no valid credentials: set CONVEYOR_TOKEN_FILE to a token file "
            "(`conveyor up` writes development ones under <data-dir>/credentials)"
        ),
        grpc.StatusCode.PERMISSION_DENIED: (
            "your role does not allow explaining this model: ask its owner team"
        ),
    }
    return hints.get(code, "this looks like an explainer bug: report it with the message above")


def _model(args: argparse.Namespace) -> str:
    """``cancer`` from ``models/cancer@production`` or ``models/cancer/versions/3``."""
    return out.model_id(getattr(args, "model", "") or "<model>").partition("@")[0].partition("/")[0]


# -- the command ------------------------------------------------------------------


async def explain(session: Session, args: argparse.Namespace) -> int:
    """``conveyor explain MODEL``: read the version (and the row), explain it,
    print the explanation and save its picture."""
    check_flags(args)
    picture = None if args.no_picture else args.picture
    if picture is not None:
        check_writable(picture)
    version = await read_version(session, args)
    request = explain_request(version, args, values=instance_values(version, args))
    request.include_pictures = picture is not None
    reply = await session.explainer.Explain(request, timeout=session.timeout)
    if args.json:
        out.print_json(response_dict(reply))
    else:
        print_explanation(reply, asked=args.model, instance=instance_text(args))
    if picture is not None:
        pictures = reply.explanation.pictures
        if not pictures:
            raise CommandError(
                "INTERNAL",
                "the explainer returned no picture",
                hint="this looks like an explainer bug: report it; --no-picture skips the picture",
            )
        await asyncio.to_thread(write_picture, picture, pictures[0].data)
        print(f"wrote {picture}", file=sys.stderr)
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """UsageError for flags that do not go together, before any call."""
    if args.background is not None and args.method != "shap":
        raise UsageError("--background is for --method shap (Kernel SHAP's background)")
    if args.method == "shap":
        for flag, value in (("--segmentation", args.segmentation), ("--segments", args.segments)):
            if value is not None:
                raise UsageError(
                    f"{flag} is for image models (LIME image); --method shap explains rows"
                )


def check_writable(path: Path) -> None:
    """CommandError, before any call, when the picture cannot be written there."""
    if path.is_dir():
        raise CommandError(
            "INVALID_ARGUMENT",
            f"cannot write the picture to {path}: it is a directory",
            hint="pass a file name with --picture PATH, or --no-picture",
        )
    if not path.parent.is_dir():
        raise CommandError(
            "INVALID_ARGUMENT",
            f"cannot write the picture to {path}: there is no directory {path.parent}",
            hint="create the directory, pass another --picture PATH, or --no-picture",
        )


async def read_version(session: Session, args: argparse.Namespace) -> registry_pb.ModelVersion:
    """The version ``args.model`` names, with its reference sample when ``--row`` needs it."""
    view = (
        registry_pb.MODEL_VERSION_VIEW_FULL
        if args.row is not None
        else registry_pb.MODEL_VERSION_VIEW_BASIC
    )
    try:
        reply = await session.registry.GetModelVersion(
            registry_rpc.GetModelVersionRequest(name=args.model, view=view),
            timeout=session.timeout,
        )
    except grpc.RpcError as error:
        raise RegistryCallError(error) from None
    return reply.model_version


def instance_values(version: registry_pb.ModelVersion, args: argparse.Namespace) -> list[float]:
    """``--values``, or row ``--row`` of the version's reference sample."""
    if args.values is not None:
        values: list[float] = args.values
        return values
    row: int = args.row
    sample = version.reference_statistics.sample
    columns = sample.column_count
    if columns <= 0 or not sample.values:
        raise CommandError(
            "FAILED_PRECONDITION",
            f"{version.name} has no reference sample to take row {row} from",
            hint="pass the row itself with --values V1,V2,… (one value per feature, in the "
            "signature's order)",
        )
    count = len(sample.values) // columns
    if row >= count:
        raise CommandError(
            "OUT_OF_RANGE",
            f"row {row} is out of range: the reference sample of {version.name} has "
            f"{plural(count, 'row')}",
            hint=f"--row takes 0 to {count - 1}, or pass the row itself with --values V1,V2,…",
        )
    return list(sample.values[row * columns : (row + 1) * columns])


def image_shape(version: registry_pb.ModelVersion) -> ImageShape | None:
    """How the version's single input takes an image, as the explainer reads
    it (``[-1, H, W]``, ``[-1, C, H, W]`` or ``[-1, H, W, C]``, C one or three);
    None for a row (or a signature the explainer will refuse)."""
    inputs = version.signature.inputs
    if len(inputs) != 1:
        return None
    dims = [int(d) for d in inputs[0].shape[1:]]
    if any(d <= 0 for d in dims):
        return None
    if len(dims) == 2:
        return ImageShape(dims, pb.IMAGE_LAYOUT_HW)
    if len(dims) == 3 and dims[0] in IMAGE_CHANNELS:
        if dims[0] == 1:
            return ImageShape(dims[1:], pb.IMAGE_LAYOUT_HW)
        return ImageShape(dims, pb.IMAGE_LAYOUT_CHW)
    if len(dims) == 3 and dims[2] in IMAGE_CHANNELS:
        if dims[2] == 1:
            return ImageShape(dims[:2], pb.IMAGE_LAYOUT_HW)
        return ImageShape(dims, pb.IMAGE_LAYOUT_HWC)
    return None


def explain_request(
    version: registry_pb.ModelVersion, args: argparse.Namespace, *, values: Sequence[float]
) -> rpc.ExplainRequest:
    """The request the flags describe, for the resolved ``version``."""
    config = pb.ExplanationConfig(
        num_samples=args.samples or 0,
        top_k=args.top_k or 0,
        output_name=args.output or "",
    )
    if args.seed is not None:
        config.seed = args.seed
    if args.target is not None:
        config.target_index = args.target
    image = image_shape(version)
    if image is None:
        for flag, value in (("--segmentation", args.segmentation), ("--segments", args.segments)):
            if value is not None:
                raise CommandError(
                    "INVALID_ARGUMENT",
                    f"{flag} is for image models; {version.name} takes rows",
                    hint=f"leave {flag} out",
                )
        config.method = METHODS[args.method or "lime"]
        if args.background is not None:
            config.background_size = args.background
        instance = pb.Instance(row=pb.TabularRow(values=values))
    else:
        if args.method == "shap":
            raise CommandError(
                "INVALID_ARGUMENT",
                f"Kernel SHAP explains rows; {version.name} takes {image.text()} images",
                hint="leave --method out: images are explained with LIME image",
            )
        config.method = pb.EXPLANATION_METHOD_LIME_IMAGE
        if args.segmentation is not None:
            config.image_options.segmentation = SEGMENTATIONS[args.segmentation]
        if args.segments is not None:
            config.image_options.num_segments = args.segments
        instance = pb.Instance(
            image=pb.Image(shape=image.shape, layout=image.layout, pixels=values)
        )
    return rpc.ExplainRequest(
        model=version.name, instance=instance, config=config, attach_report=args.attach
    )


def write_picture(path: Path, data: bytes) -> None:
    """Writes ``data`` whole: ``path`` is the old file or the new one, never a part."""
    partial = path.with_name(path.name + ".part")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


# -- what it prints ---------------------------------------------------------------


def response_dict(reply: rpc.ExplainResponse) -> dict[str, object]:
    """The response's JSON mapping, each picture's bytes replaced by their size."""
    payload = out.message_dict(reply)
    explanation = payload.get("explanation")
    if isinstance(explanation, dict):
        shown = explanation.get("pictures", [])
        for picture, message in zip(shown, reply.explanation.pictures, strict=True):
            picture.pop("data", None)
            picture["size_bytes"] = len(message.data)
    return payload


def instance_text(args: argparse.Namespace) -> str:
    """``row 17 of the reference sample`` or ``the values given (30)``."""
    if args.values is not None:
        return f"the values given ({len(args.values)})"
    return f"row {args.row} of the reference sample"


def print_explanation(reply: rpc.ExplainResponse, *, asked: str = "", instance: str = "") -> None:
    """The explanation on stdout: the summary fields, then the contributions' table."""
    explanation = reply.explanation
    out.print_fields(explanation_fields(reply, asked=asked, instance=instance))
    print()
    if explanation.contributions:
        tabular = explanation.method == pb.EXPLANATION_METHOD_LIME_TABULAR
        columns = COLUMNS if tabular else tuple(c for c in COLUMNS if c != "condition")
        out.print_table(columns, contribution_rows(explanation, conditions=tabular))
    else:
        print("no contribution was returned")


def explanation_fields(
    reply: rpc.ExplainResponse, *, asked: str = "", instance: str = ""
) -> list[tuple[str, str]]:
    """The summary (``asked``: the name the command was given, shown when it
    was an alias; ``instance``: what was explained)."""
    explanation = reply.explanation
    version = explanation.model_version
    if asked and asked != version:
        version = f"{version} ({asked})"
    fields = [("version", version)]
    if instance:
        fields.append(("instance", instance))
    fields += [
        ("method", METHOD_LABELS.get(explanation.method, "-")),
        ("target", target_text(explanation)),
        ("prediction", number(explanation.prediction)),
        ("base value", number(explanation.base_value)),
    ]
    if explanation.HasField("local_prediction"):
        fields.append(("local prediction", number(explanation.local_prediction)))
    if explanation.HasField("local_fidelity_r2"):
        fields.append(("local fidelity R²", number(explanation.local_fidelity_r2)))
    fields.append(("features", features_text(explanation)))
    if explanation.omitted_weight:
        fields.append(("omitted weight", signed(explanation.omitted_weight)))
    fields += [
        ("seed", str(explanation.seed)),
        ("model evaluations", f"{explanation.num_model_evaluations:,}"),
        ("ModelInfer calls", f"{reply.num_inference_calls:,}"),
    ]
    if reply.report_attachment:
        fields.append(("report", reply.report_attachment))
    return fields


def target_text(explanation: pb.Explanation) -> str:
    """``benign (index 1)``, or ``index 0`` when the signature names no classes."""
    index = f"index {explanation.target_index}"
    return f"{explanation.target_label} ({index})" if explanation.target_label else index


def features_text(explanation: pb.Explanation) -> str:
    """``30 (8 shown)`` or ``16 superpixels (5 shown)``."""
    noun = "superpixel" if explanation.HasField("segmentation") else "feature"
    return f"{plural(explanation.num_features, noun)} ({len(explanation.contributions)} shown)"


def contribution_rows(explanation: pb.Explanation, *, conditions: bool) -> list[list[str]]:
    """The table's rows, in :data:`COLUMNS` order (without the condition unless
    ``conditions``)."""
    rows = []
    for rank, contribution in enumerate(explanation.contributions, start=1):
        row = [str(rank), contribution.feature, number(contribution.value)]
        if conditions:
            row.append(contribution.condition or "-")
        row.append(signed(contribution.weight))
        rows.append(row)
    return rows


def number(value: float) -> str:
    """Six significant digits: ``0.981234``, ``17.99``, ``1.2e-07``."""
    return f"{value:.6g}"


def signed(value: float) -> str:
    """A weight with its sign: ``+0.0412``, ``-0.00317``."""
    return f"{value:+.6g}"
