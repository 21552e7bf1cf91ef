"""``conveyor explain``: the command against a real registry, inference
service and explainer, serving the trained breast-cancer MLP and digits CNN.

What it prints is compared with what ``Explain`` itself returns for the same
row, config and seed; the picture it saves is the explainer's own PNG, byte
for byte. The failures go through the same ``cli.main`` a person runs, and
their messages and hints are read as a person would.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conveyor.explainer.v1 import explainer_messages_pb2 as rpc
from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services import cli
from conveyor.services.explainer import cli as explainer_cli
from tests.explainer.conftest import ServedModel, Suite
from tests.explainer.test_explain import PNG, reference, tabular
from tests.support.suite import free_port

MLP_ROWS = 398
"""Rows of the breast-cancer MLP's reference sample."""


@dataclass
class Result:
    code: int
    out: str
    err: str


def addresses(suite: Suite) -> list[str]:
    return [
        "--explainer",
        f"127.0.0.1:{suite.explainer_server.port}",
        "--registry",
        f"127.0.0.1:{suite.inference.registry_server.port}",
    ]


async def conveyor(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``conveyor explain *argv`` in a worker thread (the CLI runs its own loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["explain", *argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def fields_of(text: str) -> dict[str, str]:
    """The summary's ``label:  value`` lines."""
    summary = text.split("\n\n", 1)[0]
    fields = {}
    for line in summary.splitlines():
        label, _, value = line.partition(":")
        fields[label] = value.strip()
    return fields


def table_of(text: str) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows (cells are separated by two spaces or more)."""
    lines = text.split("\n\n", 1)[1].splitlines()
    split = [re.split(r"\s{2,}", line.strip()) for line in lines]
    return split[0], split[1:]


async def files_in(directory: Path) -> list[str]:
    """The names in ``directory``, sorted (read in a worker thread)."""
    return await asyncio.to_thread(lambda: sorted(p.name for p in directory.iterdir()))


async def read_bytes(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data.startswith(PNG)
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def explain_directly(
    suite: Suite, model: str, instance: pb.Instance, config: pb.ExplanationConfig
) -> rpc.ExplainResponse:
    reply: rpc.ExplainResponse = await suite.explainer.Explain(
        rpc.ExplainRequest(model=model, instance=instance, config=config, include_pictures=True),
        timeout=60,
    )
    return reply


# -- tabular rows -----------------------------------------------------------------


async def test_row_17_is_printed_as_a_table_and_its_picture_saved(
    suite: Suite,
    mlp_model: ServedModel,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = await suite.serve("cancer", mlp_model)
    work = tmp_path / "work"  # tmp_path also holds the services' data
    work.mkdir()
    monkeypatch.chdir(work)
    result = await conveyor(
        capsys, "cancer", "--row", "17", "--seed", "7", "--top-k", "8", *addresses(suite)
    )
    assert result.code == 0, result.err
    assert result.err == "wrote explanation.png\n"

    row = reference(mlp_model)[17]
    direct = await explain_directly(
        suite,
        version,
        tabular(row),
        pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=7, top_k=8),
    )
    expected = direct.explanation
    fields = fields_of(result.out)
    assert fields["version"] == f"{version} (models/cancer@production)"
    assert fields["instance"] == "row 17 of the reference sample"
    assert fields["method"] == "LIME tabular"
    assert fields["target"] == f"{expected.target_label} (index {expected.target_index})"
    assert expected.target_label in ("malignant", "benign")
    assert fields["prediction"] == f"{expected.prediction:.6g}"
    assert fields["base value"] == f"{expected.base_value:.6g}"
    assert fields["local prediction"] == f"{expected.local_prediction:.6g}"
    assert fields["local fidelity R²"] == f"{expected.local_fidelity_r2:.6g}"
    assert fields["features"] == "30 features (8 shown)"
    assert fields["seed"] == "7"
    assert fields["model evaluations"] == "5,000"
    # The instance in one call, its 5,000 samples in two of at most 4,096 rows.
    assert fields["ModelInfer calls"] == "3"
    assert "report" not in fields

    header, rows = table_of(result.out)
    assert header == ["RANK", "FEATURE", "VALUE", "CONDITION", "WEIGHT"]
    assert len(rows) == 8
    for rank, (cells, contribution) in enumerate(
        zip(rows, expected.contributions, strict=True), start=1
    ):
        assert cells == [
            str(rank),
            contribution.feature,
            f"{row[contribution.index]:.6g}",
            contribution.condition,
            f"{contribution.weight:+.6g}",
        ]
    # Largest absolute weight first, as printed.
    printed = [abs(float(cells[-1])) for cells in rows]
    assert printed == sorted(printed, reverse=True)

    picture = work / "explanation.png"
    data = await read_bytes(picture)
    assert data == expected.pictures[0].data  # the explainer's bar chart, whole
    assert expected.pictures[0].kind == pb.PICTURE_KIND_BAR_CHART
    assert png_size(data) == (640, round(100 * (0.9 + 0.32 * 8)))
    assert await files_in(work) == ["explanation.png"]  # no .part

    # The same row given with --values is the same explanation; --no-picture
    # asks for no picture and writes none.
    values = ",".join(repr(float(v)) for v in row)
    given = await conveyor(
        capsys, "cancer@1", f"--values={values}", "--seed", "7", "--top-k", "8",
        "--no-picture", *addresses(suite),
    )  # fmt: skip
    assert (given.code, given.err) == (0, "")
    assert fields_of(given.out)["version"] == version
    assert fields_of(given.out)["instance"] == "the values given (30)"
    assert table_of(given.out) == (header, rows)
    assert await files_in(work) == ["explanation.png"]


async def test_json_is_the_api_response_with_picture_sizes_and_a_drawn_seed(
    suite: Suite,
    mlp_model: ServedModel,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    version = await suite.serve("cancer", mlp_model)
    picture = tmp_path / "shap.png"
    result = await conveyor(
        capsys, "cancer", "--row", "3", "--method", "shap", "--samples", "300",
        "--background", "10", "--top-k", "5", "--target", "0", "--picture", str(picture),
        "--json", *addresses(suite),
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.err == f"wrote {picture}\n"
    payload = json.loads(result.out)
    explanation = payload["explanation"]
    assert explanation["model_version"] == version
    assert explanation["method"] == "EXPLANATION_METHOD_KERNEL_SHAP"
    assert explanation.get("target_index", 0) == 0
    assert explanation["target_label"] == "malignant"
    assert len(explanation["contributions"]) == 5
    [shown] = explanation["pictures"]
    assert "data" not in shown
    assert shown["kind"] == "PICTURE_KIND_BAR_CHART"
    assert shown["size_bytes"] == len(await read_bytes(picture))
    assert (await read_bytes(picture)).startswith(PNG)
    seed = explanation["seed"]  # drawn by the explainer: no --seed was given

    # The same call made directly with the drawn seed gives the same explanation.
    direct = await explain_directly(
        suite,
        version,
        tabular(reference(mlp_model)[3]),
        pb.ExplanationConfig(
            method=pb.EXPLANATION_METHOD_KERNEL_SHAP,
            seed=seed,
            num_samples=300,
            background_size=10,
            top_k=5,
            target_index=0,
        ),
    )
    expected = explainer_cli.response_dict(direct)
    assert payload == expected
    assert await read_bytes(picture) == direct.explanation.pictures[0].data

    # The table shows the drawn seed, the Shapley values and no condition column.
    table = await conveyor(
        capsys, "cancer", "--row", "3", "--method", "shap", "--samples", "300",
        "--background", "10", "--top-k", "5", "--target", "0", "--seed", str(seed),
        "--no-picture", "--attach", *addresses(suite),
    )  # fmt: skip
    assert table.code == 0, table.err
    fields = fields_of(table.out)
    assert fields["method"] == "Kernel SHAP"
    assert fields["seed"] == str(seed)
    assert fields["target"] == "malignant (index 0)"
    assert "local fidelity R²" not in fields
    assert fields["omitted weight"] == f"{direct.explanation.omitted_weight:+.6g}"
    header, rows = table_of(table.out)
    assert header == ["RANK", "FEATURE", "VALUE", "WEIGHT"]
    assert [float(cells[-1]) for cells in rows] == pytest.approx(
        [c.weight for c in direct.explanation.contributions], rel=1e-5
    )
    # --attach: the report is in the registry under the name printed.
    attached = await suite.registry.ListAttachments(
        registry_rpc.ListAttachmentsRequest(parent=version)
    )
    [report] = attached.attachments
    assert fields["report"] == report.name
    assert report.kind == registry_pb.ATTACHMENT_KIND_EXPLANATION_REPORT


# -- images -----------------------------------------------------------------------


async def test_an_image_model_gets_an_image_and_a_mask_overlay(
    suite: Suite,
    cnn_model: ServedModel,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    version = await suite.serve("digits", cnn_model)
    picture = tmp_path / "digit.png"
    result = await conveyor(
        capsys, "digits", "--row", "17", "--segmentation", "grid", "--segments", "16",
        "--seed", "4", "--samples", "600", "--top-k", "5", "--picture", str(picture),
        *addresses(suite),
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.err.endswith(f"wrote {picture}\n")
    image = reference(cnn_model)[17]
    direct = await explain_directly(
        suite,
        version,
        pb.Instance(image=pb.Image(shape=[8, 8], pixels=image.tolist())),
        pb.ExplanationConfig(
            method=pb.EXPLANATION_METHOD_LIME_IMAGE,
            seed=4,
            num_samples=600,
            top_k=5,
            image_options=pb.ImageOptions(
                segmentation=pb.SEGMENTATION_ALGORITHM_GRID, num_segments=16
            ),
        ),
    )
    expected = direct.explanation
    fields = fields_of(result.out)
    assert fields["method"] == "LIME image"
    assert fields["target"] == f"{expected.target_index} (index {expected.target_index})"
    assert fields["features"] == "16 superpixels (5 shown)"
    header, rows = table_of(result.out)
    assert header == ["RANK", "FEATURE", "VALUE", "WEIGHT"]
    segments = np.asarray(expected.segmentation.segment_ids).reshape(8, 8)
    for cells, contribution in zip(rows, expected.contributions, strict=True):
        assert cells[1] == f"superpixel {contribution.index}"
        mean = image.reshape(8, 8)[segments == contribution.index].mean()
        assert math.isclose(float(cells[2]), mean, rel_tol=1e-5)
        assert cells[3] == f"{contribution.weight:+.6g}"
    data = await read_bytes(picture)
    assert expected.pictures[0].kind == pb.PICTURE_KIND_MASK_OVERLAY
    assert data == expected.pictures[0].data
    assert png_size(data) == (640, 340)

    shap = await conveyor(capsys, "digits", "--row", "17", "--method", "shap", *addresses(suite))
    assert (shap.code, shap.out) == (1, "")
    assert shap.err == (
        f"conveyor: INVALID_ARGUMENT: Kernel SHAP explains rows; {version} takes 8x8 images\n"
        "hint: leave --method out: images are explained with LIME image\n"
    )


@pytest.mark.parametrize(
    ("shape", "sent", "layout"),
    [
        ([-1, 1, 8, 8], [8, 8], pb.IMAGE_LAYOUT_HW),
        ([-1, 8, 8], [8, 8], pb.IMAGE_LAYOUT_HW),
        ([-1, 8, 8, 1], [8, 8], pb.IMAGE_LAYOUT_HW),
        ([-1, 3, 32, 24], [3, 32, 24], pb.IMAGE_LAYOUT_CHW),
        ([-1, 32, 24, 3], [32, 24, 3], pb.IMAGE_LAYOUT_HWC),
        ([-1, 30], None, None),
        ([-1, 4, 5, 6], None, None),
        ([-1, -1, 8], None, None),
    ],
)
def test_an_input_is_an_image_as_the_explainer_reads_it(
    shape: list[int], sent: list[int] | None, layout: int | None
) -> None:
    version = registry_pb.ModelVersion(
        signature=registry_pb.ModelSignature(inputs=[registry_pb.TensorSpec(shape=shape)])
    )
    image = explainer_cli.image_shape(version)
    if sent is None:
        assert image is None
    else:
        assert image is not None
        assert (image.shape, image.layout) == (sent, layout)


# -- failures ---------------------------------------------------------------------


async def test_failed_calls_say_what_to_do_next(
    suite: Suite,
    mlp_model: ServedModel,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    version = await suite.serve("cancer", mlp_model)
    work = tmp_path / "work"  # tmp_path also holds the services' data
    work.mkdir()
    picture = ["--picture", str(work / "x.png")]

    wrong = await conveyor(capsys, "cancer", "--values", "1,2,3", *picture, *addresses(suite))
    assert (wrong.code, wrong.out) == (1, "")
    assert wrong.err.startswith("conveyor: INVALID_ARGUMENT: ")
    assert f"instance.row.values: 3 values; {version} takes 30 features" in wrong.err
    assert wrong.err.endswith("hint: fix --values and run the command again\n")

    unknown = await conveyor(capsys, "nope", "--row", "0", *picture, *addresses(suite))
    assert (unknown.code, unknown.out) == (1, "")
    assert unknown.err.startswith("conveyor: NOT_FOUND: ")
    assert "nope" in unknown.err.splitlines()[0]
    assert unknown.err.splitlines()[-1] == (
        "hint: check the name: `conveyor models list` shows the models, "
        "`conveyor models versions nope` their versions and aliases"
    )

    beyond = await conveyor(capsys, "cancer", "--row", str(MLP_ROWS), *picture, *addresses(suite))
    assert (beyond.code, beyond.out) == (1, "")
    assert beyond.err == (
        f"conveyor: OUT_OF_RANGE: row {MLP_ROWS} is out of range: the reference sample of "
        f"{version} has {MLP_ROWS} rows\n"
        f"hint: --row takes 0 to {MLP_ROWS - 1}, or pass the row itself with --values V1,V2,…\n"
    )
    last = await conveyor(
        capsys, "cancer", "--row", str(MLP_ROWS - 1), "--samples", "50", *picture,
        *addresses(suite),
    )  # fmt: skip
    assert last.code == 0, last.err

    nowhere = work / "missing" / "x.png"
    unwritable = await conveyor(
        capsys, "cancer", "--row", "0", "--picture", str(nowhere), *addresses(suite)
    )
    assert (unwritable.code, unwritable.out) == (1, "")
    assert unwritable.err.startswith(
        f"conveyor: INVALID_ARGUMENT: cannot write the picture to {nowhere}: "
    )
    assert "missing" not in await files_in(work)

    segmented = await conveyor(
        capsys, "cancer", "--row", "0", "--segmentation", "grid", *picture, *addresses(suite)
    )
    assert (segmented.code, segmented.out) == (1, "")
    assert segmented.err.startswith(
        f"conveyor: INVALID_ARGUMENT: --segmentation is for image models; {version} takes rows"
    )

    down_port = free_port()
    down = await conveyor(
        capsys, "cancer", "--row", "0", *picture, *addresses(suite),
        "--explainer", f"127.0.0.1:{down_port}", "--timeout", "5",
    )  # fmt: skip
    assert (down.code, down.out) == (1, "")
    assert down.err.startswith("conveyor: UNAVAILABLE: "), down.err
    assert f"hint: is an explainer running at 127.0.0.1:{down_port}? start one with " in down.err
    assert "Traceback" not in down.err

    registry_port = free_port()
    no_registry = await conveyor(
        capsys, "cancer", "--row", "0", *picture, *addresses(suite),
        "--registry", f"127.0.0.1:{registry_port}", "--timeout", "5",
    )  # fmt: skip
    assert (no_registry.code, no_registry.out) == (1, "")
    assert no_registry.err.startswith("conveyor: UNAVAILABLE: "), no_registry.err
    assert f"hint: is a registry running at 127.0.0.1:{registry_port}? " in no_registry.err
    assert await files_in(work) == ["x.png"]  # the one success


async def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The message of a command argparse refuses (exit 2), before any call."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli.main, ["explain", *argv])
    assert exited.value.code == 2
    return capsys.readouterr().err


async def test_bad_flags_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert "one of the arguments --row --values is required" in await usage_error(capsys, "cancer")
    both = await usage_error(capsys, "cancer", "--row", "1", "--values", "1,2")
    assert "argument --values: not allowed with argument --row" in both
    assert "expected a whole number from 0 to" in await usage_error(capsys, "cancer", "--row=-1")
    for bad in ("1,,2", "a,b", "1,nan", "inf", ""):
        message = await usage_error(capsys, "cancer", f"--values={bad}")
        assert f"expected finite numbers separated by commas (1.0,2.5,-3), got {bad!r}" in message
    assert "invalid choice: 'kernel'" in await usage_error(
        capsys, "cancer", "--row", "1", "--method", "kernel"
    )
    assert "invalid choice: 'watershed'" in await usage_error(
        capsys, "cancer", "--row", "1", "--segmentation", "watershed"
    )
    assert "expected a whole number from 10 to 100,000, got '5'" in await usage_error(
        capsys, "cancer", "--row", "1", "--samples", "5"
    )
    assert "expected a whole number from 0 to 4,294,967,295" in await usage_error(
        capsys, "cancer", "--row", "1", "--seed", str(2**32)
    )
    assert "argument --no-picture: not allowed with argument --picture" in await usage_error(
        capsys, "cancer", "--row", "1", "--picture", "a.png", "--no-picture"
    )
    assert "expected MODEL, MODEL@ALIAS or MODEL@VERSION" in await usage_error(
        capsys, "Cancer", "--row", "1"
    )
    assert "expected a positive number of seconds" in await usage_error(
        capsys, "cancer", "--row", "1", "--timeout", "0"
    )
    # Flags that do not go together are refused before any call (nothing listens here).
    nowhere = ["--explainer", f"127.0.0.1:{free_port()}", "--registry", f"127.0.0.1:{free_port()}"]
    for argv, message in (
        (["--background", "10"], "--background is for --method shap"),
        (["--method", "shap", "--segments", "9"], "--segments is for image models"),
    ):
        result = await conveyor(capsys, "cancer", "--row", "1", *argv, *nowhere)
        assert (result.code, result.out) == (2, "")
        assert result.err.startswith(f"conveyor explain: error: {message}")
    assert await files_in(tmp_path) == []
