"""``conveyor lifecycle``: a model from training to production and back, with
the ``conveyor`` commands a person would type, against a running suite.

``make run`` runs it once the services are up (``conveyor up --lifecycle``);
``conveyor lifecycle`` runs it against any running suite. Each step prints its
title, who runs it (the development users ``conveyor up`` issues tokens to:
alice the data scientist, erin the ML engineer, bob the approver, sam the
security auditor) and the exact command, then the command's own output. A step
whose exit code is not the expected one stops the run (exit 1). The steps
share one model (``--model``, default ``cancer``): a data directory where the
lifecycle completed is not run again (its record says when and how it went);
``--again`` runs it with a fresh model id.

The traffic is the breast-cancer data set that ships with scikit-learn: live
traffic is 1,000 of its rows drawn at random, drifted traffic the same rows
with every measurement 25% high (as after a scanner's recalibration), each
written as a CSV file that ``conveyor predict --csv`` sends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np

from conveyor.shared.ports import SERVICE_PORTS

TRAFFIC_ROWS: Final = 1_000
"""Rows of live and of drifted traffic: one monitor window each (its default size)."""
DRIFT_FACTOR: Final = 1.25
TRAFFIC_SEED: Final = 7
RECORD_NAME: Final = "lifecycle.json"


@dataclass(frozen=True)
class Step:
    """One command of the lifecycle."""

    title: str
    user: str
    """Whose development token it runs with."""
    argv: tuple[str, ...]
    """The ``conveyor`` arguments."""
    expected_exit: int = 0
    """1 for the promotion a gate must refuse."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``conveyor lifecycle``'s flags."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".data"),
        help="the suite's data directory: credentials and the record (default: .data)",
    )
    parser.add_argument("--model", default="cancer", help="the model's id (default: cancer)")
    parser.add_argument(
        "--again", action="store_true", help="run it even if it completed (with a new model id)"
    )


def steps(model: str, work: Path) -> list[Step]:
    """The lifecycle, in order; ``work`` holds its traffic files and pictures."""
    live, drifted = work / "live.csv", work / "drifted.csv"
    return [
        Step(
            "create the model (team-a owns it)",
            "alice",
            (
                "models",
                "create",
                model,
                "--owner-team",
                "team-a",
                "--risk-tier",
                "medium",
                "--description",
                "breast-cancer screening: malignant or benign",
            ),
        ),
        Step(
            "train the breast-cancer MLP; the trainer registers it as version 1",
            "alice",
            ("train", "breast-cancer", "--register-model", model, "--epochs", "20", "--seed", "0"),
        ),
        Step(
            "optimise: ONNX fp32 (version 2) and static int8 (version 3), each with its "
            "before/after report; the gate allows 2 accuracy points and does not hold int8 "
            "to fp32's latency (a 30-input MLP takes microseconds either way: the report "
            "shows by how much)",
            "alice",
            (
                "optimize",
                f"{model}@1",
                "--onnx",
                "--int8-static",
                "--max-accuracy-drop",
                "2",
                "--latency-tolerance",
                "100",
            ),
        ),
        Step(
            "deploy: inference serves the production alias as soon as it exists",
            "erin",
            ("deploy", model),
        ),
        Step(
            "explain version 2's prediction for a reference row, attached to the version",
            "alice",
            (
                "explain",
                f"{model}@2",
                "--row",
                "0",
                "--attach",
                "--top-k",
                "5",
                "--picture",
                str(work / "explanation-v2.png"),
            ),
        ),
        Step(
            "explain version 3 (int8) the same way",
            "alice",
            (
                "explain",
                f"{model}@3",
                "--row",
                "0",
                "--attach",
                "--top-k",
                "5",
                "--picture",
                str(work / "explanation-v3.png"),
            ),
        ),
        Step(
            "approve the fp32 baseline (a second person)",
            "bob",
            ("approve", f"{model}/versions/2", "--comment", "fp32 baseline reviewed"),
        ),
        Step(
            "promote the baseline to production",
            "erin",
            ("promote", f"{model}@2", "--reason", "first production version"),
        ),
        Step(
            "inference loads it", "erin", ("deployments", "status", model, "--until-serving", "2")
        ),
        Step(
            "watch the data: an alert when a window's features drift from training",
            "erin",
            (
                "alerts",
                "rules",
                "create",
                f"{model}-drift",
                "--model",
                model,
                "--drift",
                "dataset",
                "--trigger-windows",
                "1",
            ),
        ),
        Step(
            "try to promote the int8 version: the approval gate refuses (no approval yet)",
            "erin",
            ("promote", f"{model}@3", "--reason", "int8: a third smaller"),
            expected_exit=1,
        ),
        Step(
            "approve the int8 version (a second person)",
            "bob",
            ("approve", f"{model}/versions/3", "--comment", "int8 report reviewed"),
        ),
        Step("promote it", "erin", ("promote", f"{model}@3", "--reason", "int8: a third smaller")),
        Step(
            "inference hot-swaps to version 3",
            "erin",
            ("deployments", "status", model, "--until-serving", "3"),
        ),
        Step(
            f"live traffic: {TRAFFIC_ROWS:,} rows through the Open Inference Protocol",
            "alice",
            ("predict", model, "--csv", str(live)),
        ),
        Step(
            f"drifted traffic: every measurement {DRIFT_FACTOR - 1:.0%} high",
            "alice",
            ("predict", model, "--csv", str(drifted)),
        ),
        Step(
            "the monitor raises the drift alert",
            "erin",
            ("alerts", "watch", "--model", model, "--until-firing", "--timeout", "60"),
        ),
        Step("its drift report", "erin", ("drift", model)),
        Step(
            "roll back to the baseline",
            "erin",
            ("rollback", model, "--reason", "dataset drift since the int8 rollout"),
        ),
        Step(
            "inference swaps back to version 2",
            "erin",
            ("deployments", "status", model, "--until-serving", "2"),
        ),
        Step("verify the audit log's hash chain and signatures", "sam", ("audit", "verify")),
        Step(
            "the promotion decisions it holds: the refusal, the promotions, the rollback",
            "sam",
            ("audit", "decisions", "--filter", 'action = "registry.SetAlias"', "--limit", "6"),
        ),
    ]


def write_traffic(work: Path) -> None:
    """The live and drifted traffic as CSV files (header: the feature names)."""
    from sklearn.datasets import load_breast_cancer  # heavy; only the lifecycle needs it

    data = load_breast_cancer()
    rows = np.random.default_rng(TRAFFIC_SEED).integers(0, len(data.data), TRAFFIC_ROWS)
    live = data.data[rows]
    header = ",".join(str(name) for name in data.feature_names)
    work.mkdir(parents=True, exist_ok=True)
    for name, values in (("live.csv", live), ("drifted.csv", live * DRIFT_FACTOR)):
        np.savetxt(work / name, values, delimiter=",", header=header, comments="", fmt="%.6g")


def run(args: argparse.Namespace, conveyor: Callable[[Sequence[str]], int]) -> int:
    """Runs the lifecycle with ``conveyor`` (the CLI's ``main``); 0 when every
    step ended as expected."""
    data_dir: Path = args.data_dir
    record_path = data_dir / RECORD_NAME
    model: str = args.model
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if not args.again:
            print(
                f"The lifecycle ran on {data_dir} at {record['finished']} (model "
                f"{record['model']}): `conveyor lifecycle --again` runs it once more."
            )
            print_how_to_call(record["model"], data_dir)
            return 0
        model = f"{model}-{record['runs'] + 1}"
    credentials = data_dir / "credentials"
    work = data_dir / "lifecycle" / model
    write_traffic(work)
    plan = steps(model, work)
    for number, step in enumerate(plan, 1):
        command = " ".join(_quoted(part) for part in step.argv)
        print(f"\n── {number}/{len(plan)}  {step.title}", flush=True)
        print(f"   {step.user}$ conveyor {command}", flush=True)
        with _token_file(credentials / f"{step.user}.token"):
            try:
                code = conveyor(step.argv)
            except SystemExit as exit_:  # argparse refused the arguments
                code = exit_.code if isinstance(exit_.code, int) else 2
        sys.stdout.flush()
        if code != step.expected_exit:
            print(
                f"\nThe lifecycle stopped at step {number} ({step.title}): exit {code}, "
                f"expected {step.expected_exit}.",
                file=sys.stderr,
            )
            return 1
    runs = json.loads(record_path.read_text())["runs"] + 1 if record_path.exists() else 1
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    record_path.write_text(json.dumps({"model": model, "finished": finished, "runs": runs}))
    print(f"\nThe lifecycle completed: {len(plan)} steps, model {model}.")
    print_how_to_call(model, data_dir)
    return 0


def print_how_to_call(model: str, data_dir: Path) -> None:
    """The ways a backend or a person calls the served model."""
    inference = os.environ.get("CONVEYOR_INFERENCE_ADDR", f"127.0.0.1:{SERVICE_PORTS['inference']}")
    token_file = data_dir / "credentials" / "alice.token"
    token = f"$(cat {token_file})"
    conveyor, grpcurl = _installed("conveyor"), _installed("grpcurl")
    print(
        f"\nConveyor keeps serving {model}@production at {inference} until Ctrl-C. Call it:\n"
        f"  CLI:           CONVEYOR_TOKEN_FILE={token_file} {conveyor} predict "
        f"{model} --values <30 numbers>\n"
        f"  Python:        conveyor.shared.client.ConveyorClient (README: Calling Conveyor "
        f"from a backend)\n"
        f'  grpcurl:       {grpcurl} -plaintext -H "authorization: Bearer {token}" '
        f'-d \'{{"name": "{model}"}}\' {inference} '
        f"inference.GRPCInferenceService/ModelMetadata\n"
        f'  tritonclient:  tritonclient.grpc.InferenceServerClient("{inference}")'
        f'.infer("{model}", inputs, headers={{"authorization": "Bearer <token>"}})',
        flush=True,
    )


def _installed(command: str) -> str:
    """``command`` as this shell can run it: the virtual environment's, relative to
    the working directory when it is below it (``.venv/bin/conveyor``)."""
    path = Path(sys.executable).parent / command
    if not path.exists():
        return command
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


@contextlib.contextmanager
def _token_file(path: Path) -> Iterator[None]:
    """Runs a step as the user whose token ``path`` holds (the CLI reads
    ``CONVEYOR_TOKEN_FILE`` when it opens its channel)."""
    previous = os.environ.get("CONVEYOR_TOKEN_FILE")
    os.environ["CONVEYOR_TOKEN_FILE"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CONVEYOR_TOKEN_FILE", None)
        else:
            os.environ["CONVEYOR_TOKEN_FILE"] = previous


def _quoted(part: str) -> str:
    return shlex.quote(part)
