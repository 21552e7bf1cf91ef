"""``conveyor drift``: what it prints and writes, and the arguments it takes.

The reports are built here as the monitor would send them (numerical and
categorical features, p-value tests and distances, prediction drift, a window
too small for verdicts). The table and the HTML page are read as a person or
a browser would; the command's arguments go through ``conveyor``'s own parser.
One stand-in monitor (a servicer that answers ``GetDriftReport`` with a built
report) checks the wiring: the request the flags make, ``--json``, ``--html``
and a failed call's hint. The end-to-end test against the real monitor is the
service's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import socket
import struct
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services import cli
from conveyor.services.monitor import cli as monitor_cli
from conveyor.services.monitor.html_report import DPI, FIGURE_INCHES, render_html
from tests.monitor.conftest import Suite, records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
START = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
SCRIPT = "<script>alert(1)</script>"


# -- reports as the monitor sends them ----------------------------------------------


def numerical(
    name: str,
    test: int,
    statistic: float,
    *,
    threshold: float,
    drifted: bool = False,
    p_values: tuple[float, float] | None = None,
    missing: int = 0,
    shift: int = 0,
) -> pb.FeatureDrift:
    drift = pb.FeatureDrift(
        feature=name,
        type=pb.FEATURE_TYPE_NUMERICAL,
        test=test,
        statistic=statistic,
        threshold=threshold,
        drifted=drifted,
        current_count=1000 - missing,
        missing_count=missing,
    )
    if p_values is not None:
        drift.p_value, drift.adjusted_p_value = p_values
    distribution = drift.distribution
    distribution.bin_edges.extend([-math.inf, -1.28, -0.84, -0.52, -0.25, 0.0, math.inf])
    distribution.reference_counts.extend([100, 100, 100, 100, 100, 500])
    distribution.current_counts.extend([100 - shift, 100, 100, 100, 100, 500 + shift])
    return drift


def categorical(
    name: str, test: int, statistic: float, *, threshold: float, drifted: bool = False
) -> pb.FeatureDrift:
    drift = pb.FeatureDrift(
        feature=name,
        type=pb.FEATURE_TYPE_CATEGORICAL,
        test=test,
        statistic=statistic,
        threshold=threshold,
        drifted=drifted,
        current_count=990,
        missing_count=10,
    )
    distribution = drift.distribution
    distribution.categories.extend(["red", "green", "$blue$", "__other__"])
    distribution.reference_counts.extend([500, 300, 200, 0])
    distribution.current_counts.extend([300, 300, 200, 190])
    return drift


def full_report(*, distributions: bool = True) -> pb.DriftReport:
    """Five features (two drifted, one with no values in the window) and the
    predictions, over closed window 41."""
    report = pb.DriftReport(
        model_version="models/cnn/versions/3",
        reference="models/cnn/versions/3/reference",
        reference_rows=100_000,
        correction=pb.MULTIPLE_TESTING_CORRECTION_BENJAMINI_HOCHBERG,
        window=pb.Window(index=41, row_count=1000, closed=True),
        dataset=pb.DatasetDrift(
            drifted_features=2,
            tested_features=4,
            drifted_share=0.5,
            share_threshold=0.5,
            drifted=True,
        ),
    )
    report.window.start_time.FromDatetime(START)
    report.window.end_time.FromDatetime(START + timedelta(hours=1, minutes=5, seconds=12))
    report.compute_time.FromDatetime(START + timedelta(hours=1, minutes=6))
    report.features.extend(
        [
            numerical(
                "age",
                pb.DRIFT_TEST_KOLMOGOROV_SMIRNOV,
                0.18734,
                threshold=0.05,
                drifted=True,
                p_values=(1.234e-9, 6.17e-9),
                missing=3,
                shift=80,
            ),
            numerical("income", pb.DRIFT_TEST_POPULATION_STABILITY_INDEX, 0.0421, threshold=0.1),
            numerical("tenure", pb.DRIFT_TEST_WASSERSTEIN, math.nan, threshold=0.1, missing=1000),
            categorical(SCRIPT, pb.DRIFT_TEST_CHI_SQUARED, 12.5, threshold=0.05, drifted=True),
            categorical("colour", pb.DRIFT_TEST_JENSEN_SHANNON, 0.0312, threshold=0.1),
        ]
    )
    report.features[3].p_value, report.features[3].adjusted_p_value = 0.00193, 0.00965
    report.features[4].ClearField("distribution")  # a feature without histograms
    prediction = categorical("prediction", pb.DRIFT_TEST_CHI_SQUARED, 1.2, threshold=0.05)
    prediction.p_value, prediction.adjusted_p_value = 0.2734, 0.2734
    report.prediction.CopyFrom(prediction)
    if not distributions:
        for drift in [*report.features, report.prediction]:
            drift.ClearField("distribution")
    return report


def rows_of(text: str) -> dict[str, list[str]]:
    """The table's rows by feature (cells are separated by two spaces or more)."""
    lines = text.split("\n\n", 1)[1].splitlines()
    assert lines[0].split() == [
        "FEATURE", "TYPE", "TEST", "STATISTIC", "P-VALUE", "ADJ.", "P-VALUE",
        "THRESHOLD", "CURRENT", "MISSING", "VERDICT",
    ]  # fmt: skip
    cells = [re.split(r" {2,}", line.strip()) for line in lines[1:]]
    return {row[0]: row[1:] for row in cells}


# -- the table ---------------------------------------------------------------------


def test_the_table_gives_the_summary_then_a_row_per_feature(
    capsys: pytest.CaptureFixture[str],
) -> None:
    monitor_cli.print_report(full_report(), asked="models/cnn@production")
    text = capsys.readouterr().out
    summary = text.split("\n\n", 1)[0].splitlines()
    assert summary == [
        "version:        models/cnn/versions/3 (models/cnn@production)",
        "window:         41 (closed): 1,000 rows, 2026-01-31 12:00:00Z to 2026-01-31 13:05:12Z",
        "reference:      models/cnn/versions/3/reference (100,000 rows)",
        "correction:     Benjamini-Hochberg",
        "dataset drift:  2 of 4 features drifted (share 0.50 >= 0.50): DRIFT",
        "computed:       2026-01-31 13:06:00Z",
    ]
    rows = rows_of(text)
    assert list(rows) == ["age", "income", "tenure", SCRIPT, "colour", "(prediction)"]
    assert rows["age"] == [
        "numerical", "K-S", "0.1873", "1.234e-09", "6.17e-09", "0.05", "997", "3", "DRIFT",
    ]  # fmt: skip
    # Distances have no p-values; a feature with no value in the window has no verdict.
    assert rows["income"] == ["numerical", "PSI", "0.0421", "-", "-", "0.1", "1,000", "0", "ok"]
    assert rows["tenure"] == ["numerical", "Wasserstein", "-", "-", "-", "0.1", "0", "1,000", "-"]
    assert rows[SCRIPT] == [
        "categorical", "chi²", "12.5", "0.00193", "0.00965", "0.05", "990", "10", "DRIFT",
    ]  # fmt: skip
    assert rows["colour"][1:3] == ["Jensen-Shannon", "0.0312"]
    assert rows["(prediction)"] == [
        "categorical", "chi²", "1.2", "0.2734", "0.2734", "0.05", "990", "10", "ok",
    ]  # fmt: skip


def test_a_window_too_small_shows_statistics_without_verdicts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = full_report()
    report.insufficient_data = True
    report.window.row_count = 40
    report.window.closed = False
    report.dataset.drifted = False
    for drift in report.features:
        drift.drifted = False
    monitor_cli.print_report(report)
    text = capsys.readouterr().out
    assert "window:         41 (open, still filling): 40 rows, " in text
    assert "dataset drift:  2 of 4 features drifted (share 0.50 >= 0.50): no verdict (insuf" in text
    assert "warning:        insufficient data: the window has fewer rows than the monitor's" in text
    rows = rows_of(text)
    assert {row[-1] for row in rows.values()} == {"-"}
    assert rows["age"][2] == "0.1873"


def test_a_time_range_with_nothing_tested(capsys: pytest.CaptureFixture[str]) -> None:
    report = pb.DriftReport(
        model_version="models/cnn/versions/3",
        window=pb.Window(row_count=1),
        dataset=pb.DatasetDrift(share_threshold=0.5),
    )
    monitor_cli.print_report(report)
    text = capsys.readouterr().out
    assert "window:         time range: 1 row, - to -\n" in text
    assert "dataset drift:  0 of 0 features drifted (share 0.00 < 0.50): no drift\n" in text
    assert text.endswith("\nno feature was tested\n")


# -- the HTML page -----------------------------------------------------------------


def png_size(picture: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    assert picture[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", picture[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", picture[16:24])
    return width, height


def test_the_page_has_a_picture_per_distribution_and_escapes_every_name() -> None:
    page = render_html(full_report())
    assert page.startswith("<!DOCTYPE html>")
    pictures = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # Every feature with histograms and the predictions; "colour" has none.
    assert len(pictures) == 5
    expected = (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))
    for picture in pictures:
        assert png_size(base64.b64decode(picture, validate=True)) == expected
    # The feature named like a script is text, everywhere.
    assert SCRIPT not in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # Self-contained: no external asset of any kind.
    assert not re.search(r"""(?:src|href)=["'](?!data:)""", page)
    assert "<link" not in page
    assert "@import" not in page
    assert "url(" not in page
    # The same summary and rows as the table; drifted rows stand out.
    assert "dataset drift</dt><dd>2 of 4 features drifted (share 0.50 &gt;= 0.50): DRIFT" in page
    drifted = re.findall(r'<tr class="drift"><td>([^<]*)</td>', page)
    assert drifted == ["age", "&lt;script&gt;alert(1)&lt;/script&gt;"]
    assert "<td>income</td><td>numerical</td><td>PSI</td><td>0.0421</td><td>-</td>" in page
    assert "<td>(prediction)</td>" in page


def test_a_page_without_distributions_or_verdicts() -> None:
    report = full_report(distributions=False)
    report.insufficient_data = True
    page = render_html(report)
    assert "data:image/png" not in page
    assert '<tr class="drift">' not in page
    assert "Too few rows in the window for a verdict" in page
    assert page.count("<tr>") == 1 + 6  # the header and every row


def test_many_categories_are_pooled_into_one_bar() -> None:
    drift = categorical("city", pb.DRIFT_TEST_CHI_SQUARED, 3.0, threshold=0.05)
    distribution = drift.distribution
    for field_name in ("categories", "reference_counts", "current_counts"):
        distribution.ClearField(field_name)
    distribution.categories.extend(f"city-{i}" for i in range(40))
    distribution.reference_counts.extend(range(1, 41))
    distribution.current_counts.extend(range(40, 0, -1))
    report = pb.DriftReport(model_version="models/cnn/versions/3", window=pb.Window(index=0))
    report.features.append(drift)
    pictures = re.findall(r'src="data:image/png;base64,([^"]+)"', render_html(report))
    assert len(pictures) == 1
    assert png_size(base64.b64decode(pictures[0]))[0] == round(FIGURE_INCHES[0] * DPI)


# -- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("cnn", "models/cnn@production"),
        ("models/cnn", "models/cnn@production"),
        ("cnn@staging", "models/cnn@staging"),
        ("cnn@3", "models/cnn/versions/3"),
        ("cnn/versions/3", "models/cnn/versions/3"),
        ("models/cnn/versions/3", "models/cnn/versions/3"),
        ("models/cnn@canary", "models/cnn@canary"),
    ],
)
def test_models_are_normalised_to_api_names(given: str, name: str) -> None:
    assert monitor_cli.version_name(given) == name


@pytest.mark.parametrize(
    ("given", "span"),
    [
        ("30m", timedelta(minutes=30)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_durations(given: str, span: timedelta) -> None:
    assert monitor_cli.duration(given) == span


def parse(*argv: str) -> Any:
    return cli._parser().parse_args(["drift", *argv])


def test_each_window_selector_makes_its_request() -> None:
    now = START + timedelta(days=1)
    latest = monitor_cli.drift_request(parse("cnn"), now=now)
    assert latest == rpc.GetDriftReportRequest(model_version="models/cnn@production")
    assert not latest.HasField("window")
    indexed = monitor_cli.drift_request(parse("cnn@3", "--window", "41"), now=now)
    assert indexed.model_version == "models/cnn/versions/3"
    assert indexed.window.WhichOneof("selector") == "index"
    assert indexed.window.index == 41
    first = monitor_cli.drift_request(parse("cnn", "--window", "0"), now=now)
    assert first.window.WhichOneof("selector") == "index"
    filling = monitor_cli.drift_request(parse("cnn", "--open"), now=now)
    assert filling.window.WhichOneof("selector") == "open_window"
    recent = monitor_cli.drift_request(parse("cnn", "--since", "24h", "--html", "r.html"), now=now)
    span = recent.window.time_range
    assert span.start_time.ToDatetime(tzinfo=UTC) == START
    assert span.end_time.ToDatetime(tzinfo=UTC) == now
    assert recent.include_distributions


async def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The message of a command argparse refuses (exit 2), before any call."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli.main, ["drift", *argv])
    assert exited.value.code == 2
    return capsys.readouterr().err


async def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    together = await usage_error(capsys, "cnn", "--window", "3", "--open")
    assert "argument --open: not allowed with argument --window" in together
    also = await usage_error(capsys, "cnn", "--since", "1h", "--window", "3")
    assert "argument --window: not allowed with argument --since" in also
    for bad in ("1y", "24", "h", "-1h", "0m", "1h 30m", ""):
        message = await usage_error(capsys, "cnn", f"--since={bad}")
        assert f"expected a duration such as 30m, 24h, 7d or 1h30m, got {bad!r}" in message
    assert "expected a whole number from 0 to" in await usage_error(capsys, "cnn", "--window", "-1")
    assert "expected MODEL, MODEL@ALIAS or MODEL@VERSION" in await usage_error(capsys, "CNN")
    assert "expected MODEL, MODEL@ALIAS or MODEL@VERSION" in await usage_error(capsys, "cnn@0")
    assert "expected a positive number of seconds" in await usage_error(
        capsys, "cnn", "--timeout", "0"
    )


# -- the command against a real monitor -------------------------------------------


async def drifted_cnn(suite: Suite) -> str:
    """``cnn`` with a reference and two closed windows, the second one drifted in x2."""
    version = await suite.register("cnn")
    rng = np.random.default_rng(7)
    await suite.set_reference(version, rng.normal(size=(600, 4)))
    await suite.configure("models/cnn", ["window"], window=pb.WindowSpec(row_count=300))
    await suite.log(records(version, rng.normal(size=(300, 4)), prefix="a"))
    shifted = rng.normal(size=(300, 4))
    shifted[:, 2] += 1.0
    await suite.log(records(version, shifted, prefix="b"))
    return version


@dataclass
class Result:
    code: int
    out: str
    err: str


async def conveyor(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``conveyor drift *argv`` in a worker thread (the CLI runs its own loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["drift", *argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def test_drift_prints_the_report_as_a_table_json_and_a_page(
    suite: Suite, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    version = await drifted_cnn(suite)
    target = f"127.0.0.1:{suite.parts.server.port}"

    table = await conveyor(capsys, "cnn", "--monitor", target)
    assert (table.code, table.err) == (0, "")
    assert table.out.startswith(f"version:        {version} (models/cnn@production)\n")
    assert rows_of(table.out)["x2"][-1] == "DRIFT"
    assert rows_of(table.out)["x0"][-1] == "ok"

    machine = await conveyor(capsys, "cnn@1", "--window", "0", "--json", "--monitor", target)
    assert machine.code == 0
    report = json.loads(machine.out)["drift_report"]
    assert report["model_version"] == version
    assert [f["feature"] for f in report["features"]] == ["x0", "x1", "x2", "x3"]
    assert not any(f.get("drifted") for f in report["features"])

    pages = tmp_path / "pages"
    pages.mkdir()
    page = pages / "drift.html"
    written = await conveyor(capsys, "cnn", "--html", str(page), "--monitor", target)
    assert written.code == 0
    assert written.err == f"wrote {page}\n"
    assert page.read_text(encoding="utf-8").count("data:image/png;base64,") == 5  # and prediction
    assert await asyncio.to_thread(lambda: [path.name for path in pages.iterdir()]) == [
        "drift.html"  # the page, and no partial file beside it
    ]


async def test_failed_calls_say_what_to_do_next(
    suite: Suite,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = await drifted_cnn(suite)
    target = f"127.0.0.1:{suite.parts.server.port}"
    missing = await conveyor(capsys, "cnn", "--window", "99", "--monitor", target)
    assert (missing.code, missing.out) == (1, "")
    assert missing.err == (
        f"conveyor: NOT_FOUND: {version} has not reached window 99 [WINDOW_NOT_FOUND]\n"
        "hint: window 99 has not been reached yet, or the version does not exist: "
        "`conveyor drift cnn --open` shows the window still filling\n"
    )
    nowhere = tmp_path / "missing" / "drift.html"
    unwritable = await conveyor(capsys, "cnn", "--html", str(nowhere), "--monitor", target)
    assert unwritable.code == 1
    assert unwritable.err.startswith("conveyor: [Errno 2] No such file or directory")

    # Without matplotlib (a light install) --html is refused before any call.
    monkeypatch.setitem(sys.modules, monitor_cli.HTML_MODULE, None)
    light = await conveyor(capsys, "cnn", "--html", str(tmp_path / "x.html"), "--monitor", target)
    assert (light.code, light.out) == (1, "")
    assert light.err.startswith("conveyor: FAILED_PRECONDITION: --html needs matplotlib, ")
    assert "hint: install Conveyor with its monitor extra" in light.err

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = await conveyor(capsys, "cnn", "--monitor", f"127.0.0.1:{port}", "--timeout", "5")
    assert down.code == 1
    assert down.err.startswith("conveyor: UNAVAILABLE: "), down.err
    assert f"hint: is a monitor running at 127.0.0.1:{port}? start one with " in down.err
    assert "Traceback" not in down.err
