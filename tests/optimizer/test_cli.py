"""``conveyor optimize`` and ``conveyor optimizations …`` against a real
optimizer and registry, the trained breast-cancer MLP registered as
``models/mlp/versions/1``.

The CLI runs its own event loop, so each command runs in a worker thread
while the servers keep serving on the test's loop; stdout and stderr are read
as a person (or a script, with ``--json``) would read them. Timing never
decides a gate here (``--latency-tolerance 1000``), and the runs are short.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services import cli
from conveyor.services.optimizer import cli as optimizer_cli
from conveyor.services.optimizer.cli_output import OptimizationView, progress_line
from conveyor.services.optimizer.server import build_server as build_optimizer
from conveyor.services.optimizer.settings import OptimizerSettings
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from tests.support.registry import create_model, set_alias, upload_requests
from tests.support.trained import Trained

TEST_TIMEOUT_S = 240
QUICK = ("--timed-runs", "10", "--warmup-runs", "1", "--latency-tolerance", "1000")
"""Short measurements, and a gate that timing never decides."""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.out)
        return loaded


@dataclass
class Served:
    target: str
    registry: registry_service_pb2_grpc.RegistryServiceAsyncStub


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer and the registry by themselves: no authentication, no gates;
    the CLI sends no token and knows no address but the one it is given."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")
    for name in ("CONVEYOR_TOKEN_FILE", "CONVEYOR_TOKEN", "CONVEYOR_OPTIMIZER_ADDR"):
        monkeypatch.delenv(name, raising=False)


async def serving(tmp_path: Path, mlp: Trained, **settings: Any) -> AsyncIterator[Served]:
    registry_server = await build_registry(
        RegistrySettings(data_dir=tmp_path, shutdown_grace=timedelta(seconds=1))
    )
    optimizer_server = await build_optimizer(
        OptimizerSettings(
            data_dir=tmp_path,
            shutdown_grace=timedelta(seconds=1),
            registry_addr=f"127.0.0.1:{registry_server.port}",
            **settings,
        )
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}")
    registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
    try:
        await create_model(registry, "mlp")
        version = registry_pb.ModelVersion()
        version.CopyFrom(mlp.source.version)
        version.ClearField("name")
        await registry.CreateModelVersion(
            upload_requests("models/mlp", mlp.source.artifact, version=version), timeout=60
        )
        yield Served(f"127.0.0.1:{optimizer_server.port}", registry)
    finally:
        await channel.close(None)
        await optimizer_server.shutdown()
        await registry_server.shutdown()


@pytest.fixture
async def served(tmp_path: Path, mlp: Trained) -> AsyncIterator[Served]:
    async for running in serving(tmp_path, mlp):
        yield running


@pytest.fixture
async def paused(tmp_path: Path, mlp: Trained) -> AsyncIterator[Served]:
    """An optimizer that queues jobs (two at most) without starting any."""
    async for running in serving(tmp_path, mlp, max_running_jobs=0, max_queued_jobs=2):
        yield running


async def conveyor(
    capsys: pytest.CaptureFixture[str], *argv: str, served: Served | None = None
) -> Result:
    """``conveyor *argv`` (pointed at ``served``'s optimizer) in a worker thread."""
    capsys.readouterr()
    address = ("--optimizer", served.target) if served else ()
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


async def versions_of(served: Served) -> list[str]:
    reply = await served.registry.ListModelVersions(
        registry_rpc.ListModelVersionsRequest(parent="models/mlp"), timeout=30
    )
    return sorted(version.name for version in reply.model_versions)


def table(text: str, first: str) -> dict[str, list[str]]:
    """The rows of the report table that starts with the header ``first``,
    by their label (the cells are separated by two spaces or more)."""
    lines = text.split(first, 1)[1].splitlines()[1:]
    rows: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("gate: "):
            break
        cells = [cell.strip() for cell in line.split("  ") if cell.strip()]
        rows[cells[0]] = cells[1:]
    return rows


# -- names and flags -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("fraud@3", "models/fraud/versions/3"),
        ("fraud@production", "models/fraud@production"),
        ("models/fraud/versions/3", "models/fraud/versions/3"),
        ("models/fraud@production", "models/fraud@production"),
        ("models/fraud@12", "models/fraud/versions/12"),
        ("fraud/versions/3", "models/fraud/versions/3"),
    ],
)
def test_sources_are_normalised_to_api_names(given: str, name: str) -> None:
    assert optimizer_cli.source_name(given) == name


@pytest.mark.parametrize("given", ["fraud", "fraud@", "@3", "fraud@0", "Fraud@3", "fraud@3@4"])
def test_malformed_sources_are_refused(given: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected MODEL@VERSION"):
        optimizer_cli.source_name(given)


def test_job_and_report_names() -> None:
    assert optimizer_cli.job_name("abc") == "optimizationJobs/abc"
    assert optimizer_cli.job_name("optimizationJobs/abc") == "optimizationJobs/abc"
    for given in ("abc/int8", "optimizationJobs/abc/int8", "optimizationJobs/abc/reports/int8"):
        assert optimizer_cli.report_name(given) == "optimizationJobs/abc/reports/int8"
    with pytest.raises(argparse.ArgumentTypeError, match="expected JOB/RESULT_ID"):
        optimizer_cli.report_name("abc")


def test_flags_make_the_job_they_name() -> None:
    args = cli._parser().parse_args(
        [
            "optimize",
            "fraud@production",
            "--prune",
            "structured",
            "--int8-static",
            "--onnx",
            "--fp16",
            "--graph",
            "--int8-dynamic",
            "--opset",
            "18",
            "--graph-level",
            "basic",
            "--per-channel",
            "--calibration-samples",
            "64",
            "--calibration-method",
            "entropy",
            "--fp16-io",
            "--prune-amount",
            "0.3",
            "--fine-tune-epochs",
            "2",
            "--fine-tune-lr",
            "1e-3",
            "--max-accuracy-drop",
            "0.5",
            "--gate-metric",
            "f1",
            "--latency-tolerance",
            "0.1",
            "--parity-tolerance",
            "1e-5",
            "--batch-sizes",
            "1,8,64",
            "--warmup-runs",
            "3",
            "--timed-runs",
            "50",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--dataset",
            "breast-cancer",
        ]
    )
    job = optimizer_cli.optimization_job(args)
    expected = pb.OptimizationJob(
        source_model_version="models/fraud@production",
        techniques=[
            pb.TechniqueSpec(
                pruning=pb.PruningOptions(
                    method=pb.PRUNING_METHOD_STRUCTURED,
                    amount=0.3,
                    fine_tune_epochs=2,
                    fine_tune_learning_rate=1e-3,
                )
            ),
            pb.TechniqueSpec(
                static_int8=pb.StaticInt8Options(
                    calibration_samples=64,
                    calibration_method=pb.CALIBRATION_METHOD_ENTROPY,
                    per_channel=True,
                )
            ),
            pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions(opset=18)),
            pb.TechniqueSpec(fp16=pb.Fp16Options(fp16_io=True)),
            pb.TechniqueSpec(
                graph_optimization=pb.GraphOptimizationOptions(
                    level=pb.GRAPH_OPTIMIZATION_LEVEL_BASIC
                )
            ),
            pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options(per_channel=True)),
        ],
        gate=pb.OptimizationGate(
            max_accuracy_drop_points=0.5,
            accuracy_metric="f1",
            latency_tolerance=0.1,
            parity_tolerance=1e-5,
        ),
        measurement=pb.MeasurementConfig(
            batch_sizes=[1, 8, 64],
            warmup_runs=3,
            timed_runs=50,
            intra_op_threads=2,
            execution_provider=pb.EXECUTION_PROVIDER_CPU,
        ),
        dataset="datasets/breast-cancer",
    )
    assert job == expected
    # Unset flags leave the gate's fields unset: the optimizer's defaults apply.
    plain = optimizer_cli.optimization_job(
        cli._parser().parse_args(["optimize", "fraud@3", "--prune", "unstructured"])
    )
    assert plain.techniques[0].pruning.amount == 0.5
    assert not plain.gate.HasField("max_accuracy_drop_points")
    assert plain.measurement == pb.MeasurementConfig()


async def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert "expected whole numbers separated by commas (e.g. 1,32), got '1,x'" in (
        await usage_error(capsys, "optimize", "mlp@1", "--onnx", "--batch-sizes", "1,x")
    )
    assert "expected MODEL@VERSION or MODEL@ALIAS" in await usage_error(
        capsys, "optimize", "mlp", "--onnx"
    )
    assert "invalid choice: 'random'" in await usage_error(
        capsys, "optimize", "mlp@1", "--prune", "random"
    )
    assert "expected JOB/RESULT_ID" in await usage_error(capsys, "optimizations", "report", "x")
    # Flags that parse but make no job: refused before any call.
    none = await conveyor(capsys, "optimize", "mlp@1", "--batch-sizes", "1,32")
    assert (none.code, none.out) == (2, "")
    assert none.err == (
        "conveyor optimize: error: name at least one technique: --onnx, --graph, "
        "--int8-dynamic, --int8-static, --fp16 or --prune\n"
    )
    orphan = await conveyor(capsys, "optimize", "mlp@1", "--fp16", "--opset", "18")
    assert (orphan.code, orphan.err) == (2, "conveyor optimize: error: --opset needs --onnx\n")
    usage = await conveyor(capsys, "optimizations")
    assert usage.code == 2
    assert "report" in usage.err


async def test_an_unreachable_optimizer_says_where_it_looked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CONVEYOR_OPTIMIZER_ADDR", f"127.0.0.1:{port}")
    result = await conveyor(capsys, "optimize", "mlp@1", "--onnx", "--timeout", "5")
    assert result.code == 1
    assert result.err.startswith("conveyor: UNAVAILABLE: "), result.err
    assert f"hint: is an optimizer running at 127.0.0.1:{port}? start one with " in result.err
    assert "`conveyor serve optimizer` (or `conveyor up`)" in result.err
    assert "Traceback" not in result.err


# -- a job end to end --------------------------------------------------------------------


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_optimize_follows_the_job_and_prints_each_report(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await versions_of(served)
    result = await conveyor(
        capsys,
        "optimize",
        "mlp@1",
        "--onnx",
        "--int8-static",
        "--batch-sizes",
        "1,16",
        *QUICK,
        "--job-id",
        "cli-run",
        served=served,
    )
    assert result.code == 0, result.err
    registered = sorted(set(await versions_of(served)) - set(before))
    assert len(registered) == 2
    out = result.out
    assert out.startswith(
        "optimizationJobs/cli-run succeeded: 2 techniques on models/mlp/versions/1"
    )
    export, int8 = out.split("\n[1/2] onnx-export: ONNX export\n")[1].split(
        "\n[2/2] static-int8: static int8\n"
    )
    job = (await job_json(capsys, served, "cli-run"))["optimization_job"]
    for text, reported in zip((export, int8), job["results"], strict=True):
        assert text.startswith("baseline:  ")
        rows = table(text, "CHANGE")
        assert rows["accuracy"][:2] == [
            f"{reported['report']['baseline']['metrics']['accuracy']:.4f}",
            f"{reported['report']['candidate']['metrics']['accuracy']:.4f}",
        ]
        assert rows["accuracy"][2].endswith(" pts")
        for label in ("p50 latency @1", "p99 latency @1", "p50 latency @16", "throughput @16"):
            assert len(rows[label]) == 3, label
        assert rows["file size"][0].endswith("B")
        assert rows["prediction agreement"][1].endswith("%")
        assert rows["provider"][1] == "CPU (ONNX Runtime)"
        assert "gate: passed\n  ✓ accuracy " in text
        assert f"outcome: registered as {reported['model_version']}" in text
    assert table(export, "CHANGE")["provider"][0] == "CPU (PyTorch)"
    assert "  ✓ max abs output difference " in export  # parity: fp32 techniques only
    assert sorted(r["model_version"] for r in job["results"]) == registered
    assert out.rstrip().endswith("2 registered")
    # Off a terminal, progress is plain lines on stderr, one per phase.
    lines = result.err.splitlines()
    assert "\r" not in result.err
    # Updates are coalesced: some phases of the second technique show.
    assert any(line.startswith("[2/2] static-int8: ") for line in lines), result.err
    assert f"[1/2] onnx-export: registered as {job['results'][0]['model_version']}" in lines
    assert lines[-1] == "optimizationJobs/cli-run: succeeded (2 registered)"
    assert len(lines) == len(set(lines))  # a line per change, not per update

    # The job through the other commands.
    listed = await conveyor(capsys, "optimizations", "list", served=served)
    assert listed.code == 0, listed.err
    header, row = listed.out.splitlines()
    assert header.split() == ["JOB", "STATE", "SOURCE", "TECHNIQUES", "CREATED"]
    numbers = [name.rpartition("/")[2] for name in registered]
    assert row.split()[:5] == [
        "cli-run",
        "succeeded",
        "mlp@1",
        f"onnx-export:v{job['results'][0]['model_version'].rpartition('/')[2]}",
        f"static-int8:v{job['results'][1]['model_version'].rpartition('/')[2]}",
    ]
    assert sorted(numbers) == sorted(r["model_version"].rpartition("/")[2] for r in job["results"])
    shown = await conveyor(capsys, "optimizations", "show", "cli-run", served=served)
    assert shown.code == 0, shown.err
    fields = dict(line.split(":", 1) for line in shown.out.split("\n\n")[0].splitlines())
    assert fields["state"].strip() == "SUCCEEDED"
    assert fields["source"].strip() == "models/mlp/versions/1"
    assert fields["techniques"].strip() == "ONNX export; static int8"
    assert fields["gate"].strip() == (
        "accuracy may drop 1 point (default), p50 latency may rise 100000%, "
        "parity within 0.0001 (default)"
    )
    assert fields["measurement"].strip().startswith("batch sizes 1, 16; 1 warm-up and 10 timed")
    assert "[2/2] static-int8: static int8\nbaseline:  " in shown.out
    report = await conveyor(capsys, "optimizations", "report", "cli-run/static-int8", served=served)
    assert report.code == 0, report.err
    assert report.out.startswith(
        "optimizationJobs/cli-run/reports/static-int8: static int8 (512 samples, minmax) of "
        "models/mlp/versions/1\n"
    )
    assert table(report.out, "CHANGE") == table(int8, "CHANGE")
    assert report.out.rstrip().endswith(f"registered as {job['results'][1]['model_version']}")
    as_json = await conveyor(
        capsys, "optimizations", "report", "cli-run/static-int8", "--json", served=served
    )
    assert as_json.json()["report"] == job["results"][1]["report"]
    # A finished job's watch prints its outcome again, and nothing on stderr.
    late = await conveyor(capsys, "optimizations", "watch", "cli-run", served=served)
    assert (late.code, late.err) == (0, "")
    assert late.out.startswith("optimizationJobs/cli-run succeeded: ")


async def job_json(capsys: pytest.CaptureFixture[str], served: Served, job: str) -> dict[str, Any]:
    shown = await conveyor(capsys, "optimizations", "show", job, "--json", served=served)
    assert shown.code == 0, shown.err
    return shown.json()


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_no_watch_then_watch_with_json(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    await set_alias(served.registry, "models/mlp/aliases/production", "models/mlp/versions/1")
    queued = await conveyor(
        capsys,
        "optimize",
        "mlp@production",
        "--int8-dynamic",
        "--batch-sizes",
        "4",
        *QUICK,
        "--job-id",
        "later",
        "--no-watch",
        served=served,
    )
    assert (queued.code, queued.out) == (0, "optimizationJobs/later\n"), queued.err
    assert "follow it with `conveyor optimizations watch later`" in queued.err
    watched = await conveyor(capsys, "optimizations", "watch", "later", "--json", served=served)
    assert watched.code == 0, watched.err
    job = watched.json()["optimization_job"]
    assert job["name"] == "optimizationJobs/later"
    assert job["state"] == "OPTIMIZATION_JOB_STATE_SUCCEEDED"
    assert job["source_model_version"] == "models/mlp@production"
    assert job["resolved_source_model_version"] == "models/mlp/versions/1"
    [result] = job["results"]
    assert result["state"] == "TECHNIQUE_STATE_SUCCEEDED"
    assert result["model_version"] in await versions_of(served)
    assert job["measurement"] == {"batch_sizes": [4], "warmup_runs": 1, "timed_runs": 10}
    assert job["gate"] == {"latency_tolerance": 1000.0}
    assert "optimizationJobs/later: succeeded (1 registered)" in watched.err


# -- queued jobs and refusals ------------------------------------------------------------


async def test_list_show_cancel_and_refusals_with_their_hints(
    paused: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await conveyor(
        capsys, "optimize", "mlp@1", "--fp16", "--job-id", "a", "--no-watch", served=paused
    )
    assert first.code == 0, first.err
    second = await conveyor(
        capsys,
        "optimize",
        "models/mlp/versions/1",
        "--prune",
        "structured",
        "--no-watch",
        "--json",
        served=paused,
    )
    assert second.json()["optimization_job"]["state"] == "OPTIMIZATION_JOB_STATE_QUEUED"
    full = await conveyor(capsys, "optimize", "mlp@1", "--onnx", "--no-watch", served=paused)
    assert full.code == 1
    assert full.err.startswith("conveyor: RESOURCE_EXHAUSTED: ")
    assert "hint: the optimizer's queue is full" in full.err

    queued = await conveyor(capsys, "optimizations", "list", "--state", "queued", served=paused)
    rows = {line.split()[0]: line.split()[1:4] for line in queued.out.splitlines()[1:]}
    assert len(rows) == 2
    assert rows["a"] == ["queued", "mlp@1", "fp16:pending"]
    shown = await conveyor(capsys, "optimizations", "show", "optimizationJobs/a", served=paused)
    assert "\nstate:        QUEUED\n" in shown.out
    assert "[1/1] fp16: fp16\noutcome: pending" in shown.out
    unmeasured = await conveyor(capsys, "optimizations", "report", "a/fp16", served=paused)
    assert unmeasured.code == 1
    assert unmeasured.err.startswith("conveyor: NOT_FOUND: ")
    assert "hint: `conveyor optimizations show a` lists the job's results" in unmeasured.err

    cancelled = await conveyor(capsys, "optimizations", "cancel", "a", served=paused)
    assert (cancelled.code, cancelled.out) == (0, "optimizationJobs/a: cancelled\n")
    again = await conveyor(capsys, "optimizations", "cancel", "a", served=paused)
    assert again.code == 1
    assert again.err.startswith("conveyor: FAILED_PRECONDITION: ")
    assert "hint: the job has already ended: `conveyor optimizations show a` says how" in (
        again.err
    )
    ended = await conveyor(capsys, "optimizations", "watch", "a", served=paused)
    assert ended.code == 1
    assert "[1/1] fp16: fp16\noutcome: cancelled" in ended.out
    assert "conveyor: optimizationJobs/a was cancelled (1 cancelled)" in ended.err
    missing = await conveyor(capsys, "optimizations", "show", "nope", served=paused)
    assert missing.code == 1
    assert "hint: check the name: `conveyor optimizations list` shows the jobs" in missing.err

    # Refusals at creation name the flags to fix, or say what to do.
    amount = await conveyor(
        capsys, "optimize", "mlp@1", "--prune", "unstructured", "--prune-amount", "1.5",
        served=paused,
    )  # fmt: skip
    assert (amount.code, amount.out) == (1, "")
    assert amount.err.startswith("conveyor: INVALID_ARGUMENT: invalid optimisation job: ")
    assert "optimization_job.techniques[0].pruning.amount" in amount.err
    assert amount.err.splitlines()[-1] == "hint: fix --prune-amount and run the command again"
    opset = await conveyor(
        capsys, "optimize", "mlp@1", "--onnx", "--opset", "5", "--timed-runs", "-1",
        served=paused,
    )  # fmt: skip
    assert opset.err.splitlines()[-1] == "hint: fix --opset, --timed-runs and run the command again"
    shape = await conveyor(
        capsys, "optimize", "mlp@1", "--int8-static", "--dataset", "digits", served=paused
    )
    assert shape.code == 1
    assert shape.err.startswith("conveyor: FAILED_PRECONDITION: ")
    assert "[DATASET_SHAPE_MISMATCH]" in shape.err
    assert "name the dataset it was trained on with --dataset" in shape.err
    unknown = await conveyor(capsys, "optimize", "nowhere@1", "--fp16", served=paused)
    assert unknown.code == 1
    assert unknown.err.startswith("conveyor: NOT_FOUND: ")
    assert "`conveyor models versions nowhere`" in unknown.err
    assert "Traceback" not in amount.err + opset.err + shape.err + unknown.err


async def test_ctrl_c_stops_watching_and_leaves_the_job_queued(
    paused: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(view: OptimizationView, job: pb.OptimizationJob) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(OptimizationView, "show", interrupt)
    result = await conveyor(
        capsys, "optimize", "mlp@1", "--fp16", "--job-id", "kept", served=paused
    )
    assert result.code == 130
    assert "stopped watching optimizationJobs/kept; it keeps running." in result.err
    assert "follow it again: conveyor optimizations watch kept" in result.err
    assert "cancel it:       conveyor optimizations cancel kept" in result.err
    monkeypatch.undo()
    shown = await job_json(capsys, paused, "kept")
    assert shown["optimization_job"]["state"] == "OPTIMIZATION_JOB_STATE_QUEUED"


# -- presentation ------------------------------------------------------------------------


def a_job(state: int = pb.OPTIMIZATION_JOB_STATE_RUNNING) -> pb.OptimizationJob:
    job = pb.OptimizationJob(name="optimizationJobs/t", state=state)
    job.results.add(result_id="onnx-export", state=pb.TECHNIQUE_STATE_RUNNING)
    job.results.add(result_id="static-int8", state=pb.TECHNIQUE_STATE_PENDING)
    job.progress.result_id = "onnx-export"
    job.progress.phase = pb.OPTIMIZATION_PHASE_EXPORTING
    job.progress.message = "exporting the source to ONNX"
    return job


def test_a_terminal_gets_one_redrawn_line() -> None:
    stream = io.StringIO()
    view = OptimizationView(stream, tty=True, columns=lambda: 200)
    job = a_job()
    view.show(job)
    assert stream.getvalue() == (
        "optimizationJobs/t: running\n\r\x1b[K[1/2] onnx-export: exporting the source to ONNX"
    )
    job.results[0].state = pb.TECHNIQUE_STATE_SUCCEEDED
    job.results[0].model_version = "models/mlp/versions/2"
    job.progress.result_id = "static-int8"
    job.progress.phase = pb.OPTIMIZATION_PHASE_CALIBRATING
    job.progress.message = "static-int8: 256/512 samples"
    view.show(job)
    # The outcome is printed above the line, which is drawn again, then redrawn.
    tail = stream.getvalue().split("ONNX", 1)[1]
    assert tail == (
        "\r\x1b[K[1/2] onnx-export: registered as models/mlp/versions/2\n"
        "[1/2] onnx-export: exporting the source to ONNX"
        "\r\x1b[K[2/2] static-int8: calibrating (256/512 samples)"
    )
    before = stream.getvalue()
    view.show(job)
    assert stream.getvalue() == before  # an unchanged line is not drawn again
    view.close()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_logs_get_a_line_per_phase() -> None:
    stream = io.StringIO()
    view = OptimizationView(stream, tty=False)
    job = a_job(pb.OPTIMIZATION_JOB_STATE_QUEUED)
    view.show(job)
    job.state = pb.OPTIMIZATION_JOB_STATE_RUNNING
    view.show(job)
    job.progress.message = "still exporting"
    view.show(job)  # same phase: no line
    job.results[0].state = pb.TECHNIQUE_STATE_GATE_REFUSED
    job.results[0].error.message = "onnx-export: max abs output difference 0.1 > 0.0001"
    job.results[1].state = pb.TECHNIQUE_STATE_FAILED
    job.results[1].error.code = 9
    job.results[1].error.reason = "CALIBRATION_FAILED"
    job.results[1].error.message = "no calibration data"
    job.state = pb.OPTIMIZATION_JOB_STATE_FAILED
    view.show(job)
    assert stream.getvalue().splitlines() == [
        "optimizationJobs/t: queued",
        "optimizationJobs/t: running",
        "[1/2] onnx-export: exporting the source to ONNX",
        "[1/2] onnx-export: refused by the gate: max abs output difference 0.1 > 0.0001",
        "[2/2] static-int8: failed: FAILED_PRECONDITION: no calibration data [CALIBRATION_FAILED]",
        "optimizationJobs/t: failed",
    ]
    job.progress.result_id = ""
    job.progress.phase = pb.OPTIMIZATION_PHASE_PREPARING
    job.progress.message = "fetching the source"
    assert progress_line(job) == "preparing (fetching the source)"


def test_a_failed_job_says_why_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    job = a_job(pb.OPTIMIZATION_JOB_STATE_FAILED)
    job.source_model_version = "models/mlp/versions/1"
    job.techniques.add(onnx_export=pb.OnnxExportOptions())
    job.techniques.add(static_int8=pb.StaticInt8Options(calibration_samples=64))
    job.results[0].state = pb.TECHNIQUE_STATE_SUCCEEDED
    job.results[0].model_version = "models/mlp/versions/2"
    job.results[1].state = pb.TECHNIQUE_STATE_FAILED
    job.results[1].error.code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    job.results[1].error.reason = "CALIBRATION_FAILED"
    job.results[1].error.message = "no calibration data"
    assert optimizer_cli.finish(job, as_json=False) == 1
    captured = capsys.readouterr()
    assert "[2/2] static-int8: static int8 (64 samples)\noutcome: failed: " in captured.out
    assert "outcome: registered as models/mlp/versions/2" in captured.out
    assert captured.err.splitlines() == [
        "conveyor: optimizationJobs/t failed: FAILED_PRECONDITION: no calibration data "
        "[CALIBRATION_FAILED]",
        "hint: `conveyor optimizations show t` shows every technique's outcome",
    ]
