"""``conveyor deploy``, ``conveyor deployments status`` and ``conveyor predict``
against a real registry and inference server.

The CLI runs its own event loop, so each command runs in a worker thread while
the servers keep serving on the test's loop. Predictions are compared with the
linear classifier computed here.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conveyor.services import cli
from tests.inference.conftest import FEATURES, Suite, expected, weights


@dataclass
class Result:
    code: int
    out: str
    err: str


async def conveyor(capsys: pytest.CaptureFixture[str], suite: Suite, *argv: str) -> Result:
    """``conveyor *argv --inference <the suite's>`` in a worker thread."""
    capsys.readouterr()
    address = ("--inference", f"127.0.0.1:{suite.inference_server.port}")
    code = await asyncio.to_thread(cli.main, [*argv, *address])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def rows(count: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)


async def deployed(capsys: pytest.CaptureFixture[str], suite: Suite) -> None:
    """``churn`` version 1 in production, deployed through the CLI, serving."""
    await suite.register("churn", weights(0))
    created = await conveyor(capsys, suite, "deploy", "churn", "--max-batch-size", "16")
    assert created.code == 0, created.err
    assert created.out.startswith("deployments/churn: serves models/churn@production")
    ready = await conveyor(capsys, suite, "deployments", "status", "churn", "--until-serving", "1")
    assert ready.code == 0, ready.err


async def test_deploy_status_and_a_hot_swap_followed_to_its_end(
    suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    await deployed(capsys, suite)
    status = await conveyor(capsys, suite, "deployments", "status", "churn")
    lines = status.out.splitlines()
    assert lines[0] == "deployments/churn: ready"
    assert lines[1].split() == [
        "VERSION",
        "TARGET",
        "ROLE",
        "STATE",
        "TRAFFIC",
        "PROVIDER",
        "DEVICE",
        "BATCH",
    ]
    assert lines[2].split() == [
        "models/churn/versions/1",
        "models/churn@production",
        "traffic",
        "ready",
        "100%",
        "cpu",
        "cpu",
        "16",
    ]
    assert lines[3] == "last swap: nothing -> models/churn/versions/1 (succeeded, alias revision 0)"

    await suite.register("churn", weights(1), create=False)  # moves production to 2
    swapped = await conveyor(
        capsys, suite, "deployments", "status", "churn", "--until-serving", "2", "--json"
    )
    assert swapped.code == 0, swapped.err
    status_json = json.loads(swapped.out)
    assert status_json["last_swap"]["from_version"] == "models/churn/versions/1"
    assert status_json["last_swap"]["to_version"] == "models/churn/versions/2"

    never = await conveyor(
        capsys, suite, "deployments", "status", "churn", "--until-serving", "7", "--wait", "0.5"
    )
    assert never.code == 1
    assert "version 7 did not take all the traffic in 0.5 s" in never.err
    assert "deployments/churn: ready" in never.out  # what it saw last


async def test_predict_one_row_and_a_csv_file_in_batches(
    suite: Suite, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await deployed(capsys, suite)
    x = rows(1)
    one = await conveyor(capsys, suite, "predict", "churn", "--values", ",".join(map(str, x[0])))
    assert one.code == 0, one.err
    best = int(np.argmax(expected(x, weights(0))[0]))
    probability = expected(x, weights(0))[0, best]
    assert one.out.strip() == f"row 0: version 1: class {best} ({probability:.2f})"

    table = rows(70)
    path = tmp_path / "rows.csv"
    header = ",".join(f"f{i}" for i in range(FEATURES))
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt="%.9g")
    counted = await conveyor(capsys, suite, "predict", "churn", "--csv", str(path))
    assert counted.code == 0, counted.err
    classes = np.argmax(expected(table, weights(0)), axis=1)
    counts = {f"class {c}": int((classes == c).sum()) for c in np.unique(classes)}
    summary = counted.out.strip()
    assert summary.startswith("70 rows in ")
    assert "answered by version 1: 70" in summary
    for label, count in counts.items():
        assert f"{label}: {count}" in summary

    as_json = await conveyor(capsys, suite, "predict", "churn", "--csv", str(path), "--json")
    answers = [json.loads(line) for line in as_json.out.splitlines()]
    assert [a["row"] for a in answers] == list(range(70))
    assert {a["version"] for a in answers} == {"1"}
    got = np.asarray([a["outputs"]["probabilities"] for a in answers])
    np.testing.assert_allclose(got, expected(table, weights(0)), atol=1e-5)


async def test_a_version_outside_the_split_is_loaded_on_demand(
    suite: Suite, capsys: pytest.CaptureFixture[str]
) -> None:
    await deployed(capsys, suite)
    await suite.register("churn", weights(1), create=False, alias="")  # version 2, no alias
    x = rows(1)
    pinned = await conveyor(
        capsys, suite, "predict", "churn", "--version", "2", "--values", ",".join(map(str, x[0]))
    )
    assert pinned.code == 0, pinned.err
    best = int(np.argmax(expected(x, weights(1))[0]))
    assert pinned.out.startswith(f"row 0: version 2: class {best}")


async def test_failures_say_what_to_do_next(
    suite: Suite, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    not_deployed = await conveyor(capsys, suite, "predict", "churn", "--values", "1,2,3,4")
    assert not_deployed.code == 1
    assert "NOT_FOUND" in not_deployed.err
    assert "`conveyor deploy churn`" in not_deployed.err

    await deployed(capsys, suite)
    again = await conveyor(capsys, suite, "deploy", "churn")
    assert again.code == 1
    assert "ALREADY_EXISTS" in again.err
    assert "conveyor deployments status churn" in again.err

    narrow = await conveyor(capsys, suite, "predict", "churn", "--values", "1,2,3")
    assert narrow.code == 1
    assert "INVALID_ARGUMENT" in narrow.err
    assert "has shape [-1, 4]; the rows have 3 values" in narrow.err

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,d\n1,2,3,4\n1,2,x,4\n")
    unreadable = await conveyor(capsys, suite, "predict", "churn", "--csv", str(bad))
    assert unreadable.code == 1
    assert "could not convert string to float: 'x'" in unreadable.err
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,c,d\n1,2,3,4\n1,2,3\n")
    uneven = await conveyor(capsys, suite, "predict", "churn", "--csv", str(ragged))
    assert uneven.code == 1
    assert "expected rows of 4 numbers under the header" in uneven.err

    unknown_version = await conveyor(
        capsys, suite, "predict", "churn", "--version", "9", "--values", "1,2,3,4"
    )
    assert unknown_version.code == 1
    assert "NOT_FOUND" in unknown_version.err
    # Nothing of that disturbed serving.
    fine = await conveyor(capsys, suite, "predict", "churn", "--values", "1,2,3,4")
    assert fine.code == 0, fine.err
