"""``conveyor train`` and ``conveyor jobs …`` against a real trainer (and registry).

The CLI runs its own event loop, so each command runs in a worker thread while
the servers keep serving on the test's loop; stdout and stderr are read as a
person (or a script, with ``--json``) would read them. Off a terminal the
progress is plain lines; the redrawn progress bar is checked on its own, fed
the events a watch delivers.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from conveyor.services import cli
from conveyor.services.trainer import cli as trainer_cli
from conveyor.services.trainer import cli_output
from conveyor.services.trainer.cli_output import ProgressView
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.registry import create_model
from tests.support.trainer import Running, get_job, running_trainer, wait_until

TRAINING_TIMEOUT_S = 240
CANCER = (
    "breast-cancer",
    "--arch",
    "mlp",
    "--arch-arg",
    "hidden_sizes=[32,16]",
    "--dropout",
    "0.1",
    "--seed",
    "1",
    "--split-seed",
    "7",
)
"""The breast-cancer MLP of the server's tests (95% test accuracy in 30 epochs)."""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.out)
        return loaded


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer and the registry by themselves: no authentication, no gates;
    the CLI sends no token and knows no address but the one it is given."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")
    for name in ("CONVEYOR_TOKEN_FILE", "CONVEYOR_TOKEN", "CONVEYOR_TRAINER_ADDR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_trainer(tmp_path, max_running_jobs=1) as running:
        yield running


async def conveyor(
    capsys: pytest.CaptureFixture[str], *argv: str, served: Running | None = None
) -> Result:
    """``conveyor *argv`` (pointed at ``served``'s trainer) in a worker thread."""
    capsys.readouterr()
    address = ("--trainer", served.trainer_target) if served else ()
    code = await asyncio.to_thread(cli.main, [*argv, *address])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The message of a command argparse refuses (exit 2), before any call."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli.main, list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- conveyor train ------------------------------------------------------------------


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_train_follows_the_job_and_prints_it_as_json(
    served: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert served.registry is not None
    await create_model(served.registry, "cancer")
    result = await conveyor(
        capsys,
        "train",
        *CANCER,
        "--epochs",
        "30",
        "--register-model",
        "cancer",
        "--description",
        "from the CLI",
        "--job-id",
        "cancer-cli",
        "--label",
        "purpose=test",
        "--json",
        served=served,
    )
    assert result.code == 0, result.err
    job = result.json()["training_job"]
    assert job["name"] == "trainingJobs/cancer-cli"
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["result"]["test_metrics"]["accuracy"] >= 0.95
    assert job["result"]["model_version"] == "models/cancer/versions/1"
    assert job["labels"] == {"purpose": "test"}
    spec = job["spec"]
    assert spec["architecture"] == {"name": "mlp", "args": {"hidden_sizes": [32.0, 16.0]}}
    assert spec["hyperparameters"]["epochs"] == 30
    assert spec["hyperparameters"]["dropout"] == 0.1
    assert spec["data"]["dataset"] == "datasets/breast-cancer"
    assert spec["registration"] == {"model": "models/cancer", "description": "from the CLI"}
    assert len(job["history"]) == 30
    # The same job through the API: what the CLI printed is the job itself.
    assert (await get_job(served.trainer, "trainingJobs/cancer-cli")).result.model_version == (
        "models/cancer/versions/1"
    )

    # Off a terminal, progress is plain lines on stderr: the states and every epoch.
    lines = result.err.splitlines()
    assert "\r" not in result.err
    states = [line for line in lines if line.startswith("trainingJobs/")]
    # Queued first unless the job started before the watch did.
    assert states[0].startswith(("trainingJobs/cancer-cli: queued", "trainingJobs/cancer-cli: run"))
    assert states[-2].startswith("trainingJobs/cancer-cli: running")
    assert states[-1] == lines[-1] == "trainingJobs/cancer-cli: succeeded"
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == [f"{n}/30" for n in range(1, 31)]
    assert all("val loss " in line and "val accuracy " in line for line in epochs)
    assert all("samples/s" in line for line in epochs)


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_train_prints_the_result_table(
    served: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await conveyor(
        capsys, "train", *CANCER, "--epochs", "4", "--job-id", "table", served=served
    )
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("trainingJobs/table succeeded: 4 epochs in ")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert lines[0].endswith(f" on {device} (kept epoch 4)")
    assert lines[1].split() == ["METRIC", "TEST", "VALIDATION"]
    metrics = {line.split()[0]: line.split()[1:] for line in lines[2:8]}
    assert list(metrics) == ["accuracy", "f1", "roc_auc", "precision", "recall", "log_loss"]
    assert lines[8] == ""  # the validation loss is log_loss: not a row of its own
    job = await get_job(served.trainer, "trainingJobs/table")
    assert metrics["accuracy"] == [
        f"{job.result.test_metrics['accuracy']:.4f}",
        f"{job.result.validation_metrics['accuracy']:.4f}",
    ]
    assert "confusion matrix on the test split" in result.out
    matrix = result.out.split("(rows: true class, columns: predicted):\n")[1].splitlines()
    assert matrix[0].split() == ["malignant", "benign"]
    assert [row.split()[0] for row in matrix[1:3]] == ["malignant", "benign"]
    counts = [int(c) for row in matrix[1:3] for c in row.split()[1:]]
    assert counts == list(job.result.confusion_matrix.counts)
    assert sum(counts) == 86  # 15% of 569 examples
    assert len({len(row) for row in matrix[:3]}) == 1  # aligned columns
    assert "not registered (train with --register-model MODEL to register it)" in result.out


async def test_validate_only_creates_nothing_and_no_watch_returns_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No job ever starts here, so the queue shows exactly what was created.
    async with running_trainer(tmp_path, with_registry=False, max_running_jobs=0) as served:
        checked = await conveyor(capsys, "train", *CANCER, "--validate-only", served=served)
        assert checked.code == 0, checked.err
        assert checked.out.startswith("valid: trainingJobs/job-")
        assert checked.out.rstrip().endswith("would be queued; nothing was created")
        empty = await conveyor(capsys, "jobs", "list", served=served)
        assert (empty.code, empty.out, empty.err) == (0, "", "no training jobs\n")

        queued = await conveyor(
            capsys, "train", *CANCER, "--job-id", "later", "--no-watch", served=served
        )
        assert (queued.code, queued.out) == (0, "trainingJobs/later\n"), queued.err
        assert "conveyor jobs watch later" in queued.err
        as_json = await conveyor(capsys, "train", *CANCER, "--no-watch", "--json", served=served)
        assert as_json.json()["training_job"]["state"] == "JOB_STATE_QUEUED"
        listed = await conveyor(capsys, "jobs", "list", "--json", served=served)
        names = [job["name"] for job in listed.json()["training_jobs"]]
        assert names == [as_json.json()["training_job"]["name"], "trainingJobs/later"]


# -- conveyor jobs ---------------------------------------------------------------------


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_jobs_list_show_watch_and_cancel(
    served: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    # A long job that runs, a short one queued behind it.
    long = await conveyor(
        capsys,
        "train",
        "synthetic",
        "--data-arg",
        "num_samples=20000",
        "--arch-arg",
        "hidden_sizes=[64,64]",
        "--epochs",
        "1000",
        "--job-id",
        "long",
        "--label",
        "size=big",
        "--no-watch",
        served=served,
    )
    assert long.code == 0, long.err
    short = await conveyor(
        capsys, "train", *CANCER, "--epochs", "3", "--job-id", "short", "--no-watch", served=served
    )
    assert short.code == 0, short.err
    await wait_until(
        served.trainer,
        "trainingJobs/long",
        lambda e: e.type == pb.TRAINING_JOB_EVENT_TYPE_PROGRESS,
    )

    listed = await conveyor(capsys, "jobs", "list", served=served)
    assert listed.code == 0, listed.err
    rows = [line.split() for line in listed.out.splitlines()]
    assert rows[0] == ["JOB", "STATE", "DATASET", "ARCH", "EPOCH", "METRICS", "CREATED"]
    assert [row[:5] for row in rows[1:]] == [
        ["short", "queued", "breast-cancer", "mlp", "0/3"],
        ["long", "running", "synthetic", "mlp", rows[2][4]],
    ]
    running = await conveyor(capsys, "jobs", "list", "--state", "RUNNING", served=served)
    assert [line.split()[0] for line in running.out.splitlines()[1:]] == ["long"]
    labelled = await conveyor(
        capsys, "jobs", "list", "--filter", 'labels.size="big"', "--json", served=served
    )
    assert [j["name"] for j in labelled.json()["training_jobs"]] == ["trainingJobs/long"]

    shown = await conveyor(capsys, "jobs", "show", "long", served=served)
    assert shown.code == 0, shown.err
    fields = dict(line.split(":", 1) for line in shown.out.splitlines() if ":" in line)
    assert fields["name"].strip() == "trainingJobs/long"
    assert fields["state"].strip() == "RUNNING"
    assert fields["dataset"].strip().startswith("datasets/synthetic (num_samples=20000)")
    assert fields["architecture"].strip() == "mlp (hidden_sizes=[64, 64])"
    assert fields["hyperparameters"].strip().startswith("1000 epochs, batch 32, adam lr 0.001")
    assert fields["register in"].strip() == "- (not registered)"
    assert fields["progress"].strip().startswith("epoch ")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert fields["ran"].strip().startswith(f"on {device}")
    assert fields["ran"].strip().endswith(f"torch {torch.__version__}")
    queued = await conveyor(capsys, "jobs", "show", "trainingJobs/short", "--json", served=served)
    assert queued.json()["training_job"]["state"] == "JOB_STATE_QUEUED"

    cancelled = await conveyor(capsys, "jobs", "cancel", "long", served=served)
    assert cancelled.code == 0, cancelled.err
    assert cancelled.out.startswith("trainingJobs/long: cancel requested; it stops after")
    watched = await conveyor(capsys, "jobs", "watch", "long", served=served)
    assert watched.code == 1
    assert "conveyor: trainingJobs/long was cancelled after " in watched.err
    assert "nothing was registered" in watched.err
    again = await conveyor(capsys, "jobs", "cancel", "long", "--json", served=served)
    assert again.json()["training_job"]["state"] == "JOB_STATE_CANCELLED"

    # The short job runs once the long one is gone; a watch follows it to the end.
    done = await conveyor(capsys, "jobs", "watch", "short", served=served)
    assert done.code == 0, done.err
    assert done.out.startswith("trainingJobs/short succeeded: 3 epochs in ")
    assert [line.split()[1] for line in done.err.splitlines() if line.startswith("epoch ")][
        -1
    ] == "3/3"
    late = await conveyor(capsys, "jobs", "watch", "short", "--json", served=served)
    assert late.code == 0
    assert late.json()["training_job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert late.err == ""  # a finished job's watch is its snapshot alone
    history = await conveyor(capsys, "jobs", "show", "short", served=served)
    assert "EPOCH  LOSS    VAL LOSS  VAL ACCURACY  VAL F1" in history.out
    assert "trainingJobs/short succeeded: 3 epochs" in history.out

    ended = await conveyor(capsys, "jobs", "cancel", "short", served=served)
    assert ended.code == 1
    assert ended.err.startswith("conveyor: FAILED_PRECONDITION: ")
    assert "hint: the job has already ended: `conveyor jobs show short`" in ended.err


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_ctrl_c_stops_watching_and_leaves_the_job_running(
    served: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = ProgressView.show

    def interrupt_at_the_first_epoch(
        view: ProgressView, event: rpc.WatchTrainingJobResponse
    ) -> None:
        shown(view, event)
        if event.type == pb.TRAINING_JOB_EVENT_TYPE_EPOCH_COMPLETED:
            raise KeyboardInterrupt

    monkeypatch.setattr(ProgressView, "show", interrupt_at_the_first_epoch)
    spec_flags = ("--data-arg", "num_samples=4000", "--epochs", "1000", "--job-id", "kept")
    result = await conveyor(capsys, "train", "synthetic", *spec_flags, served=served)
    assert result.code == 130
    assert "epoch 1/1000" in result.err
    assert "stopped watching trainingJobs/kept; it keeps running." in result.err
    assert "follow it again: conveyor jobs watch kept" in result.err
    assert "cancel it:       conveyor jobs cancel kept" in result.err
    job = await get_job(served.trainer, "trainingJobs/kept")
    assert job.state == pb.JOB_STATE_RUNNING
    assert not job.cancel_requested
    monkeypatch.undo()
    await conveyor(capsys, "jobs", "cancel", "kept", served=served)


# -- failures --------------------------------------------------------------------------


async def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert "expected KEY=VALUE, got 'hidden_sizes'" in await usage_error(
        capsys, "train", "digits", "--arch-arg", "hidden_sizes"
    )
    assert "unknown augmentation 'blur'" in await usage_error(
        capsys, "train", "digits", "--augment", "blur"
    )
    assert "invalid int value: 'many'" in await usage_error(
        capsys, "train", "digits", "--epochs", "many"
    )
    assert "expected three fractions" in await usage_error(
        capsys, "train", "digits", "--split", "0.8,0.2"
    )
    assert "expected a whole number of at least 1, got '0'" in await usage_error(
        capsys, "jobs", "list", "--limit", "0"
    )
    assert "invalid choice: 'sleeping'" in await usage_error(
        capsys, "jobs", "list", "--state", "sleeping"
    )
    assert "the following arguments are required: job" in await usage_error(capsys, "jobs", "show")
    # Flags that parse but cannot go together: refused before any call.
    result = await conveyor(capsys, "train", "digits", "--patience", "2")
    assert (result.code, result.out) == (2, "")
    assert result.err == "conveyor train: error: --patience needs --early-stopping-metric\n"
    usage = await conveyor(capsys, "jobs")
    assert usage.code == 2
    assert "watch" in usage.err


async def test_integers_their_api_field_cannot_hold_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    int32 = "expected a whole number from -2,147,483,648 to 2,147,483,647"
    uint64 = "expected a whole number from 0 to 18,446,744,073,709,551,615"
    for argv, message in (
        (("--epochs", "99999999999"), f"argument --epochs: {int32}, got '99999999999'"),
        (("--batch-size", str(2**31)), f"argument --batch-size: {int32}, got '2147483648'"),
        (("--world-size", str(-(2**31) - 1)), f"argument --world-size: {int32}, got '-2147483649'"),
        (
            ("--early-stopping-metric", "loss", "--patience", str(2**31)),
            f"argument --patience: {int32}, got '2147483648'",
        ),
        (
            ("--augment", "crop=99999999999"),
            f"argument --augment: crop: {int32}, got '99999999999'",
        ),
        (("--seed", "-1"), f"argument --seed: {uint64}, got '-1'"),
        (("--split-seed", str(2**64)), f"argument --split-seed: {uint64}, got '{2**64}'"),
    ):
        err = await usage_error(capsys, "train", "digits", *argv)
        assert err.splitlines()[-1] == f"conveyor train: error: {message}", argv
    # The bounds themselves make a spec.
    args = cli._parser().parse_args(
        ["train", "digits", "--epochs", str(2**31 - 1), "--seed", str(2**64 - 1)]
    )
    hp = trainer_cli.training_spec(args).hyperparameters
    assert (hp.epochs, hp.seed) == (2**31 - 1, 2**64 - 1)


async def test_the_trainer_refusals_name_the_flags_to_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_trainer(tmp_path, with_registry=False, max_running_jobs=0) as served:
        bad = await conveyor(
            capsys,
            "train",
            "breast-cancer",
            "--epochs",
            "0",
            "--learning-rate",
            "-1",
            "--augment",
            "flip",
            served=served,
        )
        assert (bad.code, bad.out) == (1, "")
        assert bad.err.startswith("conveyor: INVALID_ARGUMENT: invalid training job")
        assert "training_job.spec.hyperparameters.epochs" in bad.err
        hint = bad.err.splitlines()[-1]
        assert hint.startswith("hint: fix ")
        assert {"--epochs", "--learning-rate", "--augment"} <= set(
            hint.removeprefix("hint: fix ").removesuffix(" and run the command again").split(", ")
        )
        assert "Traceback" not in bad.err

        arch = await conveyor(
            capsys, "train", "breast-cancer", "--arch", "small_cnn", served=served
        )
        assert arch.code == 1
        assert "training_job.spec.architecture.name" in arch.err
        assert arch.err.splitlines()[-1] == "hint: fix --arch and run the command again"
        named = await conveyor(capsys, "train", "breast-cancer", "--job-id", "BAD", served=served)
        assert named.code == 1
        assert named.err.splitlines()[-1] == "hint: fix --job-id and run the command again"

        unknown = await conveyor(capsys, "train", "no-such-data", served=served)
        assert unknown.code == 1
        assert unknown.err.startswith("conveyor: NOT_FOUND: ")
        assert "hint: check the dataset (built-in: breast-cancer, digits, synthetic" in unknown.err

        if not torch.cuda.is_available():
            gpu = await conveyor(
                capsys, "train", "breast-cancer", "--device", "cuda", served=served
            )
            assert gpu.code == 1
            assert gpu.err.startswith("conveyor: ")
            assert "--device" in gpu.err

        missing = await conveyor(capsys, "jobs", "show", "nope", served=served)
        assert missing.code == 1
        assert missing.err.startswith("conveyor: NOT_FOUND: ")
        assert "trainingJobs/nope" in missing.err
        assert "hint: check the name: `conveyor jobs list` shows the jobs" in missing.err
        first = await conveyor(
            capsys, "train", *CANCER, "--job-id", "x1", "--no-watch", served=served
        )
        assert first.code == 0, first.err
        second = await conveyor(
            capsys, "train", *CANCER, "--job-id", "x1", "--no-watch", served=served
        )
        assert second.code == 1
        assert second.err.startswith("conveyor: ALREADY_EXISTS: ")
        assert "choose another --job-id" in second.err
        bad_filter = await conveyor(capsys, "jobs", "list", "--filter", "colour=red", served=served)
        assert bad_filter.code == 1
        assert bad_filter.err.startswith("conveyor: INVALID_ARGUMENT: ")


async def test_an_unreachable_trainer_says_where_it_looked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    for argv in (
        ("jobs", "list", "--trainer", f"127.0.0.1:{port}", "--timeout", "5"),
        ("train", "digits", "--trainer", f"127.0.0.1:{port}", "--timeout", "5"),
    ):
        result = await conveyor(capsys, *argv)
        assert result.code == 1, argv
        assert result.err.startswith("conveyor: UNAVAILABLE: "), result.err
        assert f"hint: is a trainer running at 127.0.0.1:{port}? " in result.err
        assert "CONVEYOR_TRAINER_ADDR" in result.err
        assert "Traceback" not in result.err
    other = free_port()
    monkeypatch.setenv("CONVEYOR_TRAINER_ADDR", f"127.0.0.1:{other}")
    result = await conveyor(capsys, "jobs", "show", "x", "--timeout", "5")
    assert result.code == 1
    assert f"is a trainer running at 127.0.0.1:{other}?" in result.err


# -- presentation ------------------------------------------------------------------------


def progress_event(epoch: int, step: int, **fields: Any) -> rpc.WatchTrainingJobResponse:
    progress = pb.TrainingProgress(
        epoch=epoch,
        total_epochs=4,
        step=step,
        steps_per_epoch=10,
        global_step=(epoch - 1) * 10 + step,
        loss=0.5,
        samples_per_second=12345.0,
        **fields,
    )
    progress.eta.FromTimedelta(timedelta(seconds=75))
    return rpc.WatchTrainingJobResponse(type=pb.TRAINING_JOB_EVENT_TYPE_PROGRESS, progress=progress)


def a_running_job() -> pb.TrainingJob:
    job = pb.TrainingJob(name="trainingJobs/t", state=pb.JOB_STATE_RUNNING)
    job.spec.hyperparameters.epochs = 4
    job.spec.hyperparameters.early_stopping.metric = "f1"
    job.environment.device = "cuda:0"
    job.environment.accelerator = "NVIDIA H100"
    job.environment.mixed_precision = True
    return job


def test_a_terminal_gets_one_redrawn_progress_bar() -> None:
    stream = io.StringIO()
    view = ProgressView(stream, tty=True, columns=lambda: 200)
    assert view.interval == cli_output.LIVE_INTERVAL
    view.show(
        rpc.WatchTrainingJobResponse(
            type=pb.TRAINING_JOB_EVENT_TYPE_SNAPSHOT, training_job=a_running_job()
        )
    )
    assert stream.getvalue() == (
        "trainingJobs/t: running on cuda:0 (NVIDIA H100, mixed precision)\n"
    )
    view.show(progress_event(2, 5, validation_metrics={"f1": 0.875, "loss": 0.3}))
    drawn = stream.getvalue().split("\n")[-1]
    assert drawn.startswith("\r\x1b[K")
    line = drawn.removeprefix("\r\x1b[K")
    assert line.startswith("epoch 2/4 [=======>            ]  38%  step 5/10  loss 0.5000")
    assert "val f1 0.8750" in line
    assert "12,345 samples/s" in line
    assert line.endswith("ETA 1:15")

    summary = pb.EpochSummary(epoch=2, train_loss=0.25, samples_per_second=999.0)
    summary.validation_metrics.update({"loss": 0.3, "f1": 0.9})
    summary.duration.FromTimedelta(timedelta(seconds=1.5))
    view.show(
        rpc.WatchTrainingJobResponse(
            type=pb.TRAINING_JOB_EVENT_TYPE_EPOCH_COMPLETED,
            epoch=summary,
            progress=progress_event(2, 10).progress,
        )
    )
    # The epoch is printed above the bar, which is drawn again below it.
    tail = stream.getvalue().split(line, 1)[1]
    assert tail.startswith(
        "\r\x1b[Kepoch 2/4  loss 0.2500  val loss 0.3000  val f1 0.9000  999 samples/s  1.50 s\n"
    )
    assert tail.endswith(line)
    before = stream.getvalue()
    view.show(progress_event(2, 5, validation_metrics={"f1": 0.875, "loss": 0.3}))
    assert stream.getvalue() == before  # an unchanged line is not drawn again
    view.close()
    assert stream.getvalue().endswith("\r\x1b[K")

    narrow = ProgressView(io.StringIO(), tty=True, columns=lambda: 40)
    assert len(cli_output.progress_line(progress_event(1, 1).progress, "f1", width=39)) == 39
    assert narrow.interval == cli_output.LIVE_INTERVAL


def test_logs_get_states_and_epochs_only() -> None:
    stream = io.StringIO()
    view = ProgressView(stream, tty=False)
    assert view.interval == cli_output.LOG_INTERVAL
    job = a_running_job()
    job.state = pb.JOB_STATE_QUEUED
    job.queue_position = 2
    view.show(
        rpc.WatchTrainingJobResponse(type=pb.TRAINING_JOB_EVENT_TYPE_SNAPSHOT, training_job=job)
    )
    view.show(progress_event(1, 3))
    running = a_running_job()
    view.show(
        rpc.WatchTrainingJobResponse(
            type=pb.TRAINING_JOB_EVENT_TYPE_STATE_CHANGED, training_job=running
        )
    )
    view.show(progress_event(1, 4))
    view.close()
    assert stream.getvalue() == (
        "trainingJobs/t: queued (2 ahead)\n"
        "trainingJobs/t: running on cuda:0 (NVIDIA H100, mixed precision)\n"
    )


def test_a_failed_job_prints_its_error_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    job = pb.TrainingJob(name="trainingJobs/oom", state=pb.JOB_STATE_FAILED)
    job.error.code = 8
    job.error.reason = "OUT_OF_MEMORY"
    job.error.message = "the device ran out of memory; try a smaller batch size or model"
    assert trainer_cli.finish(job, as_json=False) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "conveyor: trainingJobs/oom failed: RESOURCE_EXHAUSTED: the device ran out of memory; "
        "try a smaller batch size or model [OUT_OF_MEMORY]",
        "hint: `conveyor jobs show oom` shows the job's spec and progress",
    ]


def test_one_epoch_is_one_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    job = pb.TrainingJob(name="trainingJobs/one", state=pb.JOB_STATE_SUCCEEDED)
    job.spec.hyperparameters.epochs = 1
    job.spec.hyperparameters.batch_size = 32
    job.history.add(epoch=1)
    job.result.best_epoch = 1
    assert dict(cli_output.job_fields(job))["hyperparameters"].startswith("1 epoch, batch 32,")
    assert trainer_cli.finish(job, as_json=False) == 0
    assert capsys.readouterr().out.startswith(
        "trainingJobs/one succeeded: 1 epoch (kept epoch 1)\n"
    )
    job.state = pb.JOB_STATE_CANCELLED
    del job.history[:]
    assert trainer_cli.finish(job, as_json=False) == 1
    assert capsys.readouterr().err == (
        "conveyor: trainingJobs/one was cancelled after 0 of 1 epoch; nothing was registered\n"
    )
    job.spec.hyperparameters.epochs = 2
    assert dict(cli_output.job_fields(job))["hyperparameters"].startswith("2 epochs, batch 32,")


def test_flags_make_the_spec_they_name() -> None:
    parser = cli._parser()
    args = parser.parse_args(
        [
            "train",
            "digits",
            "--arch",
            "small_cnn",
            "--arch-arg",
            "channels=[16,32]",
            "--arch-arg",
            "hidden_size=64",
            "--epochs",
            "7",
            "--batch-size",
            "64",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
            "--weight-decay",
            "1e-4",
            "--dropout",
            "0.2",
            "--seed",
            "5",
            "--early-stopping-metric",
            "accuracy",
            "--patience",
            "2",
            "--augment",
            "crop=1",
            "rotate=10",
            "noise=0.05",
            "--split",
            "0.8,0.1,0.1",
            "--split-seed",
            "3",
            "--device",
            "cpu",
            "--world-size",
            "2",
            "--register-model",
            "models/digits",
        ]
    )
    spec = trainer_cli.training_spec(args)
    expected = pb.TrainingJobSpec()
    expected.data.dataset = "datasets/digits"
    expected.data.train_fraction, expected.data.validation_fraction = 0.8, 0.1
    expected.data.test_fraction = 0.1
    expected.data.split_seed = 3
    expected.data.stratify = True
    expected.architecture.name = "small_cnn"
    expected.architecture.args.update({"channels": [16, 32], "hidden_size": 64})
    hp = expected.hyperparameters
    hp.epochs, hp.batch_size, hp.optimizer = 7, 64, pb.OPTIMIZER_ALGORITHM_SGD
    hp.learning_rate, hp.momentum, hp.weight_decay, hp.dropout = 0.05, 0.9, 1e-4, 0.2
    hp.seed = 5
    hp.early_stopping.metric, hp.early_stopping.patience = "accuracy", 2
    hp.augmentation.random_crop_padding = 1
    hp.augmentation.rotation_degrees = 10
    hp.augmentation.gaussian_noise_std = 0.05
    expected.compute.device = pb.DEVICE_CPU
    expected.compute.distributed.world_size = 2
    expected.registration.model = "models/digits"
    assert spec == expected
