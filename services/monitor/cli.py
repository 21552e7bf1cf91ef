"""``conveyor drift MODEL``: a model version's drift, for people.

``conveyor drift cnn`` asks the monitor's gRPC API (``--monitor``, else
``CONVEYOR_MONITOR_ADDR``, else loopback) for the drift report of the version
``cnn@production`` points at, over its latest closed window (``--window N``
for one window, ``--open`` for the window still filling, ``--since 24h`` for
the last 24 hours), and prints it on stdout: the version, the window, the
reference, the correction and the dataset-level verdict, then one row per
feature (test, statistic, p-values, threshold, counts, verdict) and the
prediction drift row. ``--json`` prints the API's own message instead;
``--html PATH`` also writes a self-contained page with a histogram per feature
(:mod:`conveyor.services.monitor.html_report`, which needs matplotlib, the
``monitor`` extra).

An alias is passed to the monitor as ``models/{model}@{alias}``: the contract
resolves it through the registry at call time (as the optimizer resolves its
sources), and the report names the version it resolved to. The command runs
as the optimizer's and trainer's do: one channel with the client settings'
TLS, token and retries, a deadline on the call, and a failed call prints
``conveyor: <CODE>: <message>``, the field violations and a hint, and exits 1;
usage errors exit 2. A report that shows drift still exits 0: the call worked.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import math
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import monitor_service_pb2, monitor_service_pb2_grpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.optimizer.cli import seconds, source_name
from conveyor.services.registry import cli_output as out
from conveyor.services.registry.cli import CommandError, reported
from conveyor.services.trainer.cli import whole_number
from conveyor.services.trainer.cli_output import plural
from conveyor.shared.errors import ConveyorError
from conveyor.shared.settings import ClientSettings

if TYPE_CHECKING:
    Monitor = monitor_service_pb2_grpc.MonitorServiceAsyncStub

MONITOR_SERVICE: Final = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"]
DEFAULT_ALIAS: Final = "production"
MAX_INT64: Final = 2**63 - 1
HTML_MODULE: Final = "conveyor.services.monitor.html_report"
TESTS: Final = {
    pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV: "K-S",
    pb.DRIFT_TEST_POPULATION_STABILITY_INDEX: "PSI",
    pb.DRIFT_TEST_WASSERSTEIN: "Wasserstein",
    pb.DRIFT_TEST_CHI_SQUARED: "chi²",
    pb.DRIFT_TEST_JENSEN_SHANNON: "Jensen-Shannon",
    pb.DRIFT_TEST_NONE: "none",
}
CORRECTIONS: Final = {
    pb.MULTIPLE_TESTING_CORRECTION_NONE: "none",
    pb.MULTIPLE_TESTING_CORRECTION_BONFERRONI: "Bonferroni",
    pb.MULTIPLE_TESTING_CORRECTION_BENJAMINI_HOCHBERG: "Benjamini-Hochberg",
}
COLUMNS: Final = (
    "feature",
    "type",
    "test",
    "statistic",
    "p-value",
    "adj. p-value",
    "threshold",
    "current",
    "missing",
    "verdict",
)
PREDICTION: Final = "(prediction)"
"""The feature cell of the prediction drift row (a feature may be named ``prediction``)."""
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclasses.dataclass(frozen=True)
class Session:
    """What a command needs to call the monitor."""

    monitor: Monitor
    target: str
    timeout: float
    """Deadline of each call, in seconds."""


Command = Callable[[Session, argparse.Namespace], Awaitable[int]]


# -- arguments -------------------------------------------------------------------


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection flags every monitor command takes."""
    parser.add_argument(
        "--monitor",
        metavar="HOST:PORT",
        help="monitor address (default: $CONVEYOR_MONITOR_ADDR, else 127.0.0.1:50055)",
    )
    parser.add_argument(
        "--timeout", type=seconds, metavar="SECONDS", help="deadline of each call (default: 30)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the API's messages)")


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``conveyor drift``: the version, the window, the page."""
    parser.add_argument(
        "model",
        type=version_name,
        metavar="MODEL[@ALIAS_OR_VERSION]",
        help=f"cnn (its {DEFAULT_ALIAS} alias), cnn@staging, cnn@3, models/cnn/versions/3",
    )
    window = parser.add_argument_group("window (default: the latest closed one)")
    choice = window.add_mutually_exclusive_group()
    choice.add_argument(
        "--window", type=whole_number(0, MAX_INT64), metavar="INDEX", help="a window by index"
    )
    choice.add_argument(
        "--open", action="store_true", help="the window still filling (no verdict until closed)"
    )
    choice.add_argument(
        "--since",
        type=duration,
        metavar="DURATION",
        help="the predictions of the last DURATION (30m, 24h, 7d, 1h30m), as one range",
    )
    parser.add_argument(
        "--html",
        type=Path,
        metavar="PATH",
        help="also write an HTML report with a histogram per feature (needs matplotlib)",
    )


def version_name(text: str) -> str:
    """The API name of the version ``text`` names: ``models/cnn@production`` from
    ``cnn``, ``models/cnn/versions/3`` from ``cnn@3``, full names as they are."""
    name = text if text.startswith("models/") else f"models/{text}"
    if "@" not in name and "/" not in name.removeprefix("models/"):
        name = f"{name}@{DEFAULT_ALIAS}"
    try:
        return source_name(name)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected MODEL, MODEL@ALIAS or MODEL@VERSION (cnn, cnn@staging, cnn@3) or "
            f"models/MODEL/versions/N, got {text!r}"
        ) from None


def duration(text: str) -> timedelta:
    """A positive span such as ``30m``, ``24h``, ``7d``, ``90s`` or ``1h30m``."""
    parts = _DURATION.findall(text)
    span = timedelta(0)
    if "".join(number + unit for number, unit in parts) == text:
        for number, unit in parts:
            span += timedelta(**{_UNITS[unit]: float(number)})
    if span <= timedelta(0):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30m, 24h, 7d or 1h30m, got {text!r}"
        )
    return span


def drift_request(
    args: argparse.Namespace, *, now: datetime | None = None
) -> rpc.GetDriftReportRequest:
    """The request the arguments describe; ``--since`` ends at ``now``."""
    request = rpc.GetDriftReportRequest(
        model_version=args.model, include_distributions=args.html is not None
    )
    if args.window is not None:
        request.window.index = args.window
    elif args.open:
        request.window.open_window = True
    elif args.since is not None:
        end = now or datetime.now(UTC)
        request.window.time_range.start_time.FromDatetime(end - args.since)
        request.window.time_range.end_time.FromDatetime(end)
    return request


# -- running a command --------------------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Runs ``command`` against the monitor; every expected failure exits 1."""
    target = getattr(args, "monitor", None) or "the monitor"

    def call() -> int:
        nonlocal target
        settings = ClientSettings()
        target = args.monitor or settings.monitor_addr
        return asyncio.run(_with_session(command, args, settings, target))

    return reported(call, lambda failure: hint(failure, args, target=target))


async def _with_session(
    command: Command, args: argparse.Namespace, settings: ClientSettings, target: str
) -> int:
    timeout = args.timeout or settings.default_timeout.total_seconds()
    channel = settings.channel(target, [MONITOR_SERVICE], timeout=timedelta(seconds=timeout))
    async with channel:
        stub = monitor_service_pb2_grpc.MonitorServiceStub(channel)
        return await command(Session(stub, target, timeout), args)


def hint(error: ConveyorError, args: argparse.Namespace, *, target: str) -> str:
    """What to do next after a failed call."""
    code = error.code
    model = out.model_id(args.model).partition("@")[0].partition("/")[0]
    if code == grpc.StatusCode.NOT_FOUND and getattr(args, "window", None) is not None:
        return (
            f"window {args.window} has not been reached yet, or the version does not exist: "
            f"`conveyor drift {model} --open` shows the window still filling"
        )
    hints = {
        grpc.StatusCode.UNAVAILABLE: (
            f"is a monitor running at {target}? start one with `conveyor serve monitor` "
            "(or `conveyor up`), or point at it with --monitor HOST:PORT or "
            "CONVEYOR_MONITOR_ADDR; the monitor also answers this while its registry "
            "cannot be reached"
        ),
        grpc.StatusCode.NOT_FOUND: (
            f"check the name: `conveyor models versions {model}` shows its versions, "
            f"`conveyor models alias list {model}` its aliases"
        ),
        grpc.StatusCode.FAILED_PRECONDITION: (
            "a report needs the version's reference (its training statistics or an "
            "uploaded one) and a closed window whose rows are still kept: --open reports "
            "the window still filling, --since DURATION a range of recent predictions"
        ),
        grpc.StatusCode.INVALID_ARGUMENT: "fix the fields named above and run the command again",
        grpc.StatusCode.DEADLINE_EXCEEDED: (
            f"no answer in time: raise --timeout, or check `conveyor health {target}`"
        ),
        grpc.StatusCode.UNAUTHENTICATED: (
            "no valid credentials: set CONVEYOR_TOKEN_FILE to a token file "
            "(`conveyor up` writes development ones under <data-dir>/credentials)"
        ),
        grpc.StatusCode.PERMISSION_DENIED: (
            "your role does not allow reading this model's reports: ask its owner team"
        ),
    }
    return hints.get(code, "this looks like a monitor bug: report it with the message above")


# -- commands ---------------------------------------------------------------------


async def drift(session: Session, args: argparse.Namespace) -> int:
    """``conveyor drift MODEL``: one window's drift report, as a table or JSON,
    and with ``--html`` as a page."""
    render = _html_renderer() if args.html is not None else None
    reply = await session.monitor.GetDriftReport(drift_request(args), timeout=session.timeout)
    report = reply.drift_report
    if args.json:
        out.print_json({"drift_report": out.message_dict(report)})
    else:
        print_report(report, asked=args.model)
    if render is not None:
        await asyncio.to_thread(_write_html, args.html, render, report)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _html_renderer() -> Callable[[pb.DriftReport], str]:
    # Imported when used: matplotlib is the monitor extra's, and every other
    # command (and this one without --html) must work without it.
    try:
        module = importlib.import_module(HTML_MODULE)
    except ImportError as error:
        raise CommandError(
            "FAILED_PRECONDITION",
            f"--html needs matplotlib, which cannot be imported: {error}",
            hint="install Conveyor with its monitor extra (pip install 'conveyor[monitor]'), "
            "or leave --html out",
        ) from None
    render: Callable[[pb.DriftReport], str] = module.render_html
    return render


def _write_html(
    path: Path, render: Callable[[pb.DriftReport], str], report: pb.DriftReport
) -> None:
    """Renders the page and writes it whole: ``path`` is the old file or the new one."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(render(report), encoding="utf-8")
    partial.replace(path)


# -- what it prints ---------------------------------------------------------------


def print_report(report: pb.DriftReport, *, asked: str = "") -> None:
    """The report on stdout: the summary fields, then the features' table."""
    out.print_fields(report_fields(report, asked=asked))
    print()
    entries = report_entries(report)
    if entries:
        insufficient = report.insufficient_data
        rows = [feature_cells(label, d, insufficient=insufficient) for label, d in entries]
        out.print_table(COLUMNS, rows)
    else:
        print("no feature was tested")


def report_fields(report: pb.DriftReport, *, asked: str = "") -> list[tuple[str, str]]:
    """The summary: version, window, reference, correction, dataset verdict
    (``asked``: the name the command was given, shown when it was an alias)."""
    version = report.model_version
    if asked and asked != version:
        version = f"{version} ({asked})"
    fields = [
        ("version", version),
        ("window", window_text(report.window)),
        ("reference", f"{report.reference} ({_rows(report.reference_rows)})"),
        ("correction", CORRECTIONS.get(report.correction, "-")),
        ("dataset drift", dataset_text(report)),
    ]
    if report.insufficient_data:
        fields.append(
            (
                "warning",
                "insufficient data: the window has fewer rows than the monitor's minimum "
                "(WindowSpec.min_rows); statistics are shown, verdicts are not",
            )
        )
    fields.append(("computed", out.timestamp(report.compute_time)))
    return fields


def window_text(window: pb.Window) -> str:
    """``41 (closed): 1,000 rows, 2026-01-31 12:00:00Z to 2026-01-31 13:05:12Z``."""
    if window.HasField("index"):
        state = "closed" if window.closed else "open, still filling"
        what = f"{window.index} ({state})"
    else:
        what = "time range"
    span = f"{out.timestamp(window.start_time)} to {out.timestamp(window.end_time)}"
    return f"{what}: {_rows(window.row_count)}, {span}"


def dataset_text(report: pb.DriftReport) -> str:
    """``3 of 30 features drifted (share 0.10 < 0.50): no drift``."""
    dataset = report.dataset
    sign = ">=" if dataset.drifted_share >= dataset.share_threshold else "<"
    if report.insufficient_data:
        verdict = "no verdict (insufficient data)"
    else:
        verdict = "DRIFT" if dataset.drifted else "no drift"
    return (
        f"{dataset.drifted_features} of {plural(dataset.tested_features, 'feature')} drifted "
        f"(share {dataset.drifted_share:.2f} {sign} {dataset.share_threshold:.2f}): {verdict}"
    )


def report_entries(report: pb.DriftReport) -> list[tuple[str, pb.FeatureDrift]]:
    """The table's rows as (label, drift): each feature by name, then the
    predictions as :data:`PREDICTION` when the report has them."""
    entries = [(drift.feature, drift) for drift in report.features]
    if report.HasField("prediction"):
        entries.append((PREDICTION, report.prediction))
    return entries


def feature_cells(label: str, drift: pb.FeatureDrift, *, insufficient: bool) -> list[str]:
    """One row of the table, in :data:`COLUMNS` order (``insufficient``: the
    report's ``insufficient_data``)."""
    return [
        label,
        out.enum_label(pb.FeatureType, drift.type, "FEATURE_TYPE_"),
        TESTS.get(drift.test, "-"),
        _number(drift.statistic),
        _number(drift.p_value) if drift.HasField("p_value") else "-",
        _number(drift.adjusted_p_value) if drift.HasField("adjusted_p_value") else "-",
        f"{drift.threshold:g}",
        f"{drift.current_count:,}",
        f"{drift.missing_count:,}",
        verdict(drift, insufficient=insufficient),
    ]


def verdict(drift: pb.FeatureDrift, *, insufficient: bool) -> str:
    """``DRIFT``, ``ok``, or ``-`` where there is none: too few rows in the
    window, or no value of the feature in it (a NaN statistic)."""
    if insufficient or math.isnan(drift.statistic):
        return "-"
    return "DRIFT" if drift.drifted else "ok"


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def _rows(count: int) -> str:
    return f"{count:,} row" if count == 1 else f"{count:,} rows"
