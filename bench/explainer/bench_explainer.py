"""Explainer benchmark: one 5,000-sample LIME explanation through the services,
against the same explanation with the model called row by row over gRPC, and
against a local in-process call (the limit).

The numbers issue 9 asks for. The model is the trained breast-cancer MLP
(``tests/support/trained.py`` ``breast_cancer_mlp()``: 30 features, two class
probabilities), exported to ONNX (opset 18) with its softmax as
``tests/explainer/conftest.py`` does, registered with its signature and
reference statistics (398 reference rows) and deployed with batches of up to
4,096 rows, prediction log off. Every case computes the same explanation
(LIME tabular in regression mode on the predicted class's probability,
``--samples`` perturbed samples, one fixed seed, ``--top-k`` features, no
pictures):

* **services** (``services``): ``Explain`` on the explainer, which reads the
  version from the registry and evaluates the samples with batched
  ``ModelInfer`` calls to the inference service; registry, inference and
  explainer each run as their own process (``conveyor serve``). Each run also
  times ``Explain`` with 10 samples (``services_fixed``): the per-call cost
  that does not grow with the samples;
* **row by row** (``rows``): ``LimeTabularExplainer`` called here with the
  explainer's arguments (``services/explainer/methods.py``) and a prediction
  function that sends one ``ModelInfer`` per row, one after the other, to the
  same inference server, after one call for the instance (which picks the
  explained class, as the explainer's first call does);
* **local** (``local``): the same library call with the model run by ONNX
  Runtime in this process (``CPUExecutionProvider``): no gRPC; the limit;
* **split** (``split``): ``Explain`` again, on the explainer's own server
  (``build_server``) started in this process against the same registry and
  inference processes, with timers wrapped around its steps (registry lookup,
  ``ModelConfig``, the instance's evaluation, LIME, LIME's waits for the
  samples' outputs, the batched evaluation, the message): where the time of
  the services case goes.

Every run records the wall time, the ``ModelInfer`` calls the inference service
counted (``ModelStatistics``) and the time it spent answering them and
computing the model, the CPU seconds of each process, and, for the cases that
run LIME here, the time inside the prediction function (the rest is LIME's own
work). The weights, intercept, score and local prediction of every explanation
are compared with the local case's first. Run from the repository root::

    .venv/bin/python bench/explainer/bench_explainer.py --json bench/explainer/results.json
    .venv/bin/python bench/explainer/bench_explainer.py --quick

Not a test: ``make test`` never runs it and nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime
from lime.lime_tabular import LimeTabularExplainer

from conveyor.explainer.v1 import explainer_messages_pb2 as explainer_rpc
from conveyor.explainer.v1 import explainer_service_pb2_grpc
from conveyor.explainer.v1 import resources_pb2 as explainer_pb
from conveyor.inference.v1 import inference_messages_pb2 as inference_rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.inference.v1 import resources_pb2 as inference_pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer.transforms import export_onnx
from conveyor.services.trainer.architectures import ProbabilityOutput
from conveyor.shared.health import ServerExitedError, wait_until_serving

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # bench/ and the test support live at the repository root
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import Metric, free_port, machine_info  # noqa: E402
from tests.support.registry import create_model, set_alias, upload_requests  # noqa: E402
from tests.support.trained import breast_cancer_mlp  # noqa: E402

FloatArray = npt.NDArray[np.float64]

MODEL_ID: Final = "cancer"
ROWS_MODEL_ID: Final = "cancer-rows"
"""The row-by-row case's own deployment of the same file (``--rows-max-batch``)."""
MAX_BATCH: Final = 4096
"""The deployment's max batch size (as in ``tests/explainer/conftest.py``)."""
FIXED_SAMPLES: Final = 10
"""The explainer's smallest ``num_samples``: ``services_fixed`` measures the
per-call cost that does not grow with the samples."""
MIB: Final = 1024 * 1024
START_TIMEOUT_S: Final = 120.0
CALL_TIMEOUT_S: Final = 600.0
CASES: Final = ("services", "rows", "local", "split")
BLAS_VARIABLES: Final = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# -- options ----------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 samples, 1 run")
    parser.add_argument("--runs", type=int, help="timed runs of every case (10; --quick 1)")
    parser.add_argument("--samples", type=int, help="LIME's num_samples (5,000; --quick 500)")
    parser.add_argument("--seed", type=int, default=7, help="LIME's random_state (7)")
    parser.add_argument(
        "--row-index", type=int, default=17, help="the explained row of the reference sample (17)"
    )
    parser.add_argument("--top-k", type=int, default=10, help="features in the explanation (10)")
    parser.add_argument(
        "--rows-max-batch",
        type=int,
        help="send the row-by-row calls to a second deployment of the same file with this "
        "max batch size (default: the explainer's deployment, max batch 4,096)",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: services, rows, local, split"
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        help="limit BLAS threads (OpenBLAS/OpenMP/MKL) in this process and in the three "
        "servers (default: the libraries' own, one per core)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the explainer process (repeatable), "
        "e.g. CONVEYOR_EXPLAINER_MAX_CALLS_IN_FLIGHT=1",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work-dir", type=Path, help="where the servers' data go (temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 10
    if args.samples is None:
        args.samples = 500 if args.quick else 5_000
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.case_list) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.runs < 1 or args.samples < 10:
        raise SystemExit("--runs must be at least 1 and --samples at least 10")
    return args


# -- results ----------------------------------------------------------------------


@dataclass
class InferStats:
    """The inference service's cumulative ``ModelStatistics`` of the version."""

    calls: int = 0
    rows: int = 0
    executions: int = 0
    success_ns: int = 0
    queue_ns: int = 0
    input_ns: int = 0
    compute_ns: int = 0
    output_ns: int = 0

    def minus(self, before: InferStats) -> InferStats:
        return InferStats(
            *(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__)
        )


@dataclass
class Explained:
    """One explanation's result, as compared across the cases."""

    target: int
    weights: dict[int, float]
    intercept: float
    score: float
    local_prediction: float


@dataclass
class CaseRun:
    """One timed run of one case."""

    case: str
    wall_s: float
    explained: Explained
    client_calls: int
    """Model calls made by this process (ModelInfer or ONNX Runtime runs);
    for ``services`` the explainer's own count (``num_inference_calls``)."""
    model_s: float | None = None
    """Time inside the prediction function (rows and local only)."""
    inference: InferStats = field(default_factory=InferStats)
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system, all threads) of each process during the run."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        explained = self.explained
        return {
            "wall_s": self.wall_s,
            "model_s": self.model_s,
            "lime_own_s": None if self.model_s is None else self.wall_s - self.model_s,
            "client_calls": self.client_calls,
            "inference": self.inference.__dict__,
            "cpu_s": self.cpu_s,
            "target": explained.target,
            "weights": {str(k): v for k, v in sorted(explained.weights.items())},
            "intercept": explained.intercept,
            "score": explained.score,
            "local_prediction": explained.local_prediction,
            **self.extra,
        }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.blas_threads is not None:
        for name in BLAS_VARIABLES:
            server_env.setdefault(name, str(args.blas_threads))
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-explainer-", dir=args.work_dir))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {**machine_info(root), **library_versions()},
        "settings": {
            "quick": args.quick,
            "runs": args.runs,
            "samples": args.samples,
            "seed": args.seed,
            "row_index": args.row_index,
            "top_k": args.top_k,
            "cases": args.case_list,
            "max_batch_size": MAX_BATCH,
            "rows_max_batch": args.rows_max_batch,
            "blas_threads": args.blas_threads,
            "server_env": server_env,
            "work_dir": str(root),
            **source_state(),
        },
    }
    runs: list[dict[str, CaseRun]] = []
    error = None
    blas = contextlib.ExitStack()
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        blas.enter_context(threadpool_limits(limits=args.blas_threads))
    try:
        with blas:
            model = prepare_model()
            report["model"] = model.summary()
            with suite(root, server_env) as services:
                setup_started = time.perf_counter()
                deployments = {MODEL_ID: MAX_BATCH}
                if args.rows_max_batch is not None:
                    deployments[ROWS_MODEL_ID] = args.rows_max_batch
                version = asyncio.run(register_and_deploy(services, model, deployments))
                report["setup"] = {
                    "servers_start_s": services.start_s,
                    "register_and_deploy_s": time.perf_counter() - setup_started,
                    "version": version,
                }
                with Bench(services, model, args) as bench:
                    if "split" in args.case_list:
                        bench.split = bench.stack.enter_context(
                            InProcessExplainer(services, server_env)
                        )
                    bench.warm_up()
                    for index in range(args.runs):
                        runs.append(bench.run(index))
    except Exception as failure:  # noqa: BLE001 (keep what was measured before it)
        error = failure
        report["error"] = repr(failure)
        traceback.print_exc()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    results = summarize(runs)
    report["results"] = {key: metric.as_json() for key, metric in results.items()}
    report["agreement"] = agreement(runs)
    report["runs"] = [{case: run.as_json() for case, run in r.items()} for r in runs]
    print_table(report, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if error is None else 1


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"onnxruntime": str(onnxruntime.__version__), "numpy": np.__version__}
    for name in ("lime", "scikit-learn", "scipy", "protobuf"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the service code differed from it."""

    def git(*arguments: str) -> str:
        try:
            return subprocess.run(
                ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--porcelain", "--", "services", "shared", "protos")
    return {"commit": git("rev-parse", "HEAD"), "services_modified": bool(changed)}


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the model ----------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """The trained MLP as registered and as run here."""

    onnx: bytes
    version: registry_pb.ModelVersion
    test_accuracy: float
    train_s: float

    @property
    def reference(self) -> FloatArray:
        sample = self.version.reference_statistics.sample
        return np.asarray(sample.values, dtype=np.float64).reshape(-1, sample.column_count)

    @property
    def feature_names(self) -> list[str]:
        return list(self.version.signature.inputs[0].feature_names)

    @property
    def input_name(self) -> str:
        return str(self.version.signature.inputs[0].name)

    @property
    def output_name(self) -> str:
        return str(self.version.signature.outputs[0].name)

    def summary(self) -> dict[str, Any]:
        reference = self.reference
        return {
            "name": "breast-cancer MLP (hidden 32, 16), tests/support/trained.py",
            "test_accuracy": self.test_accuracy,
            "train_and_export_s": self.train_s,
            "onnx_bytes": len(self.onnx),
            "features": reference.shape[1],
            "reference_rows": reference.shape[0],
            "input": self.input_name,
            "output": self.output_name,
        }


def prepare_model() -> Model:
    """Train the MLP (seeded, on the CPU) and export it with its softmax, as the
    explainer tests do."""
    log("training the breast-cancer MLP and exporting it to ONNX")
    started = time.perf_counter()
    trained = breast_cancer_mlp()
    source = trained.source
    # As the optimizer's ONNX export (and tests/explainer/conftest.py): the
    # classifier with its softmax, so the output is the signature's probabilities.
    data = export_onnx(ProbabilityOutput(source.pytorch_model()), source.input_shape, opset=18)
    version = registry_pb.ModelVersion(
        format=registry_pb.MODEL_FORMAT_ONNX_FP32,
        task=source.version.task,
        signature=source.version.signature,
        reference_statistics=source.version.reference_statistics,
        metrics=dict(source.version.metrics),
    )
    elapsed = time.perf_counter() - started
    log(f"model ready in {elapsed:.1f} s (test accuracy {trained.test_accuracy:.3f})")
    return Model(data, version, trained.test_accuracy, elapsed)


# -- the services --------------------------------------------------------------------


@dataclass
class Service:
    name: str
    address: str
    process: subprocess.Popen[bytes]


@dataclass
class Suite:
    registry: Service
    inference: Service
    explainer: Service
    data_dir: Path
    start_s: float

    @property
    def services(self) -> tuple[Service, ...]:
        return (self.registry, self.inference, self.explainer)


def start_service(name: str, data_dir: Path, env: dict[str, str], address: str) -> Service:
    """``conveyor serve NAME`` in a child process on ``address`` (not waited for)."""
    upper = name.upper()
    process_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CONVEYOR_", "OTEL_"))
    }
    process_env.update(
        {
            f"CONVEYOR_{upper}_LOG_LEVEL": "WARNING",
            f"CONVEYOR_{upper}_SHUTDOWN_GRACE": "PT5S",
            # The services alone: what authentication and policy cost per call is
            # bench/policy's subject.
            "CONVEYOR_AUTH_MODE": "off",
            **env,
        }
    )
    command = [sys.executable, "-m", "conveyor.services.cli", "serve", name]
    command += ["--listen", address, "--data-dir", str(data_dir)]
    with (data_dir / f"{name}.log").open("ab") as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=process_env, stdout=output, stderr=subprocess.STDOUT
        )
    return Service(name, address, process)


def stop_service(service: Service) -> None:
    if service.process.poll() is not None:
        return
    service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()


def wait_serving(service: Service, data_dir: Path) -> None:
    try:
        wait_until_serving(service.address, process=service.process, timeout_s=START_TIMEOUT_S)
    except (ServerExitedError, TimeoutError) as error:
        log_text = (data_dir / f"{service.name}.log").read_text(errors="replace")
        raise RuntimeError(f"{service.name}: {error}:\n{log_text}") from error


@contextlib.contextmanager
def suite(root: Path, server_env: dict[str, str]) -> Iterator[Suite]:
    """The registry (first: it creates the shared local secret store), then
    inference and the explainer side by side, each its own process, sharing
    one data directory."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    registry_address = f"127.0.0.1:{free_port()}"
    inference_address = f"127.0.0.1:{free_port()}"
    blas = {k: v for k, v in server_env.items() if k in BLAS_VARIABLES}
    started: list[Service] = []
    began = time.perf_counter()
    log("starting registry, inference and explainer (conveyor serve)")
    try:
        registry = start_service(
            "registry",
            data_dir,
            {"CONVEYOR_REGISTRY_PROMOTION_GATE": "off", **blas},
            registry_address,
        )
        started.append(registry)
        wait_serving(registry, data_dir)
        inference = start_service(
            "inference",
            data_dir,
            {
                "CONVEYOR_REGISTRY_ADDR": registry_address,
                # Never called: the deployment logs no predictions.
                "CONVEYOR_MONITOR_ADDR": f"127.0.0.1:{free_port()}",
                "CONVEYOR_INFERENCE_METRICS_LISTEN": "",
                **blas,
            },
            inference_address,
        )
        started.append(inference)
        explainer = start_service(
            "explainer",
            data_dir,
            {
                "CONVEYOR_REGISTRY_ADDR": registry_address,
                "CONVEYOR_INFERENCE_ADDR": inference_address,
                **server_env,
            },
            f"127.0.0.1:{free_port()}",
        )
        started.append(explainer)
        wait_serving(inference, data_dir)
        wait_serving(explainer, data_dir)
        elapsed = time.perf_counter() - began
        log(f"servers up in {elapsed:.1f} s")
        yield Suite(registry, inference, explainer, data_dir, elapsed)
    finally:
        for service in reversed(started):
            stop_service(service)


async def register_and_deploy(services: Suite, model: Model, deployments: dict[str, int]) -> str:
    """Register the model as each of ``deployments`` (model id: max batch size;
    ``production`` alias) and deploy it with that batching, no prediction log;
    the first version's name once every deployment is READY."""
    options = [("grpc.max_send_message_length", 64 * MIB)]
    names: list[str] = []
    async with (
        grpc.aio.insecure_channel(services.registry.address, options=options) as registry,
        grpc.aio.insecure_channel(services.inference.address) as inference,
    ):
        registry_stub = registry_service_pb2_grpc.RegistryServiceStub(registry)
        management = inference_service_pb2_grpc.InferenceManagementServiceStub(inference)
        for model_id, max_batch in deployments.items():
            await create_model(registry_stub, model_id)
            reply = await registry_stub.CreateModelVersion(
                upload_requests(f"models/{model_id}", model.onnx, version=model.version),
                timeout=60,
            )
            name = str(reply.model_version.name)
            names.append(name)
            await set_alias(registry_stub, f"models/{model_id}/aliases/production", name, "bench")
            await management.CreateDeployment(
                inference_rpc.CreateDeploymentRequest(
                    deployment=inference_pb.Deployment(
                        model=f"models/{model_id}",
                        batching=inference_pb.BatchingConfig(max_batch_size=max_batch),
                        prediction_log_sample_rate=0.0,
                    )
                ),
                timeout=60,
            )
            give_up = time.monotonic() + START_TIMEOUT_S
            while True:
                status = (
                    await management.GetDeploymentStatus(
                        inference_rpc.GetDeploymentStatusRequest(name=f"deployments/{model_id}"),
                        timeout=10,
                    )
                ).status
                if status.state == inference_pb.DEPLOYMENT_STATE_READY:
                    break
                if status.state == inference_pb.DEPLOYMENT_STATE_FAILED:
                    raise RuntimeError(f"the deployment failed: {status}")
                if time.monotonic() > give_up:
                    raise TimeoutError(f"the deployment is not READY: {status}")
                await asyncio.sleep(0.1)
            log(f"{name} registered and deployed (max batch {max_batch})")
    return names[0]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the cases ----------------------------------------------------------------------


class Bench:
    """The cases against one set of servers."""

    def __init__(self, services: Suite, model: Model, args: argparse.Namespace) -> None:
        self.services = services
        self.model = model
        self.args = args
        self.reference = model.reference
        self.row = self.reference[args.row_index]
        self.top_k = min(args.top_k, len(self.row))
        self.session = onnxruntime.InferenceSession(model.onnx, providers=["CPUExecutionProvider"])
        self._channels = [
            grpc.insecure_channel(services.explainer.address),
            grpc.insecure_channel(services.inference.address),
        ]
        self.explainer = explainer_service_pb2_grpc.ExplainerServiceStub(self._channels[0])
        self.oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channels[1])
        self.stack = contextlib.ExitStack()
        self.split: InProcessExplainer | None = None
        """The instrumented explainer of the ``split`` case, in this process."""

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()
        for channel in self._channels:
            channel.close()

    # -- one run of every case

    def warm_up(self) -> None:
        """Every case once, untimed: connections, the explainer's first call
        (its cost estimate, LIME's first use), ONNX Runtime's first run."""
        log("warm-up: every case once")
        cases = self.args.case_list
        if "services" in cases:
            self.services_case(self.args.samples)
        if "rows" in cases:
            self.rows_case(min(self.args.samples, 500))
        if "local" in cases:
            self.local_case(self.args.samples)
        if "split" in cases:
            self.split_case(self.args.samples)

    def run(self, index: int) -> dict[str, CaseRun]:
        """Every case once, starting with a different one each run (so a noisy
        moment of the shared machine does not always hit the same case)."""
        cases = list(self.args.case_list)
        shift = index % len(cases)
        order = cases[shift:] + cases[:shift]
        results: dict[str, CaseRun] = {}
        for case in order:
            if case == "services":
                results[case] = self.services_case(self.args.samples)
                results["services_fixed"] = self.services_case(FIXED_SAMPLES)
            elif case == "rows":
                results[case] = self.rows_case(self.args.samples)
            elif case == "local":
                results[case] = self.local_case(self.args.samples)
            else:
                results[case] = self.split_case(self.args.samples)
        text = ", ".join(f"{case} {results[case].wall_s:.3f} s" for case in order)
        log(f"run {index + 1}/{self.args.runs}: {text}")
        return results

    # -- measuring

    @contextlib.contextmanager
    def measured(self, model_id: str = MODEL_ID) -> Iterator[dict[str, Any]]:
        """The inference statistics of ``model_id`` and CPU seconds over the block."""
        seen: dict[str, Any] = {}
        stats_before = self.inference_stats(model_id)
        cpu_before = self.cpu()
        started = time.perf_counter()
        yield seen
        seen["wall_s"] = time.perf_counter() - started
        cpu_after = self.cpu()
        seen["cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        seen["inference"] = self.inference_stats(model_id).minus(stats_before)

    def cpu(self) -> dict[str, float]:
        cpu = {s.name: process_cpu_s(s.process.pid) for s in self.services.services}
        cpu["bench"] = time.process_time()
        return cpu

    def inference_stats(self, model_id: str) -> InferStats:
        reply = self.oip.ModelStatistics(
            oip.ModelStatisticsRequest(name=model_id, version="1"), timeout=10
        )
        total = InferStats()
        for stats in reply.model_stats:
            infer = stats.inference_stats
            total.calls += infer.success.count
            total.rows += stats.inference_count
            total.executions += stats.execution_count
            total.success_ns += infer.success.ns
            total.queue_ns += infer.queue.ns
            total.input_ns += infer.compute_input.ns
            total.compute_ns += infer.compute_infer.ns
            total.output_ns += infer.compute_output.ns
        return total

    # -- the cases

    def explain_request(self, samples: int) -> explainer_rpc.ExplainRequest:
        return explainer_rpc.ExplainRequest(
            model=f"models/{MODEL_ID}",
            instance=explainer_pb.Instance(row=explainer_pb.TabularRow(values=self.row.tolist())),
            config=explainer_pb.ExplanationConfig(
                method=explainer_pb.EXPLANATION_METHOD_LIME_TABULAR,
                seed=self.args.seed,
                num_samples=samples,
                top_k=self.top_k,
            ),
        )

    def services_case(self, samples: int) -> CaseRun:
        """``Explain`` on the explainer process."""
        request = self.explain_request(samples)
        with self.measured() as seen:
            reply = self.explainer.Explain(request, timeout=CALL_TIMEOUT_S)
        name = "services" if samples == self.args.samples else "services_fixed"
        return explain_run(name, reply, seen, samples)

    def split_case(self, samples: int) -> CaseRun:
        """``Explain`` on the instrumented explainer in this process."""
        split = self.split
        assert split is not None  # started by main when the case is asked for
        request = self.explain_request(samples)
        split.timers.reset()
        with self.measured() as seen:
            reply = split.stub.Explain(request, timeout=CALL_TIMEOUT_S)
        run = explain_run("split", reply, seen, samples)
        run.extra["split"] = split.timers.split(run.wall_s)
        return run

    def rows_case(self, samples: int) -> CaseRun:
        """LIME here, one ``ModelInfer`` per row to the inference service."""
        calls = [0]
        spent = [0.0]
        input_name, output_name = self.model.input_name, self.model.output_name
        model_id = MODEL_ID if self.args.rows_max_batch is None else ROWS_MODEL_ID

        def infer_rows(rows: FloatArray) -> FloatArray:
            started = time.perf_counter()
            batch = np.ascontiguousarray(rows, dtype="<f4")
            outputs: list[FloatArray] = []
            for index in range(len(batch)):
                row = batch[index : index + 1]
                request = oip.ModelInferRequest(
                    model_name=model_id,
                    model_version="1",
                    inputs=[
                        oip.ModelInferRequest.InferInputTensor(
                            name=input_name, datatype="FP32", shape=list(row.shape)
                        )
                    ],
                    outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=output_name)],
                    raw_input_contents=[row.tobytes()],
                )
                reply = self.oip.ModelInfer(request, timeout=30)
                outputs.append(np.frombuffer(reply.raw_output_contents[0], dtype="<f4"))
            calls[0] += len(batch)
            spent[0] += time.perf_counter() - started
            return np.stack(outputs).astype(np.float64)

        with self.measured(model_id) as seen:
            explained = self.lime(infer_rows, samples)
        return CaseRun(
            "rows",
            seen["wall_s"],
            explained,
            calls[0],
            model_s=spent[0],
            inference=seen["inference"],
            cpu_s=seen["cpu_s"],
            extra={"samples": samples, "us_per_call": 1e6 * spent[0] / max(1, calls[0])},
        )

    def local_case(self, samples: int) -> CaseRun:
        """LIME here, the model run here by ONNX Runtime."""
        calls = [0]
        spent = [0.0]
        input_name = self.model.input_name

        def run_model(rows: FloatArray) -> FloatArray:
            started = time.perf_counter()
            batch = np.ascontiguousarray(rows, dtype=np.float32)
            [outputs] = self.session.run(None, {input_name: batch})
            calls[0] += 1
            spent[0] += time.perf_counter() - started
            return np.asarray(outputs, dtype=np.float64).reshape(len(batch), -1)

        with self.measured() as seen:
            explained = self.lime(run_model, samples)
        return CaseRun(
            "local",
            seen["wall_s"],
            explained,
            calls[0],
            model_s=spent[0],
            inference=seen["inference"],
            cpu_s=seen["cpu_s"],
            extra={"samples": samples},
        )

    def lime(self, model_rows: Callable[[FloatArray], FloatArray], samples: int) -> Explained:
        """The explainer's call (``services/explainer/methods.py`` ``lime_tabular``):
        the instance evaluated first to pick the predicted class, then LIME in
        regression mode on that class's output."""
        outputs = model_rows(self.row[np.newaxis, :])[0]
        target = int(np.argmax(outputs))
        explainer = LimeTabularExplainer(
            self.reference,
            mode="regression",
            feature_names=self.model.feature_names,
            discretize_continuous=True,
            random_state=self.args.seed,
        )
        explanation = explainer.explain_instance(
            self.row,
            lambda rows: model_rows(np.asarray(rows, dtype=np.float64))[:, target],
            num_features=self.top_k,
            num_samples=samples,
        )
        label = 1  # regression mode keeps the surrogate's weights under label 1
        return Explained(
            target=target,
            weights={int(i): float(w) for i, w in explanation.local_exp[label]},
            intercept=float(explanation.intercept[label]),
            score=float(explanation.score),
            local_prediction=float(np.ravel(explanation.local_pred)[0]),
        )


def explain_run(
    name: str, reply: explainer_rpc.ExplainResponse, seen: dict[str, Any], samples: int
) -> CaseRun:
    explanation = reply.explanation
    explained = Explained(
        target=explanation.target_index,
        weights={c.index: c.weight for c in explanation.contributions},
        intercept=explanation.base_value,
        score=explanation.local_fidelity_r2,
        local_prediction=explanation.local_prediction,
    )
    return CaseRun(
        name,
        seen["wall_s"],
        explained,
        reply.num_inference_calls,
        inference=seen["inference"],
        cpu_s=seen["cpu_s"],
        extra={
            "samples": samples,
            "num_model_evaluations": explanation.num_model_evaluations,
            "prediction": explanation.prediction,
        },
    )


# -- the split: the explainer in this process, its steps timed --------------------------

SPLIT_STEPS: Final = {
    "server": "Explain in the servicer (request received to response returned)",
    "registry": "registry lookup of the version (RegistryClient.version)",
    "model_config": "ModelConfig (the deployment's max batch size)",
    "instance": "the instance's evaluation (the first ModelInfer)",
    "lime": "LIME (methods.lime_tabular, in its thread)",
    "lime_waits": "LIME waiting for the samples' outputs (thread to event loop and back)",
    "samples": "the samples' evaluation (InferenceClient.evaluate: batched ModelInfer)",
    "lime_own": "LIME's own work (LIME - waiting)",
    "message": "the Explanation message (explaining.explanation_message)",
    "server_other": "the rest in the server (thread pool, checks, background)",
    "outside_server": "outside the servicer (the Explain call's gRPC, client)",
}


class Timers:
    """Seconds spent in the explainer's steps during one call, by step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spent: dict[str, list[float]] = {}

    def reset(self) -> None:
        with self._lock:
            self._spent = {}

    def add(self, step: str, seconds: float) -> None:
        with self._lock:
            self._spent.setdefault(step, []).append(seconds)

    def split(self, wall_s: float) -> dict[str, float]:
        """The steps of one ``Explain`` (``evaluate``'s first call is the
        instance's, the others LIME's samples'), and what is left."""
        with self._lock:
            spent = {step: list(values) for step, values in self._spent.items()}
        evaluations = spent.get("evaluate", [])
        found = {
            step: sum(spent.get(step, []))
            for step in ("server", "registry", "model_config", "lime", "lime_waits", "message")
        }
        found["instance"] = evaluations[0] if evaluations else 0.0
        found["samples"] = sum(evaluations[1:])
        found["lime_own"] = found["lime"] - found["lime_waits"]
        found["server_other"] = found["server"] - sum(
            found[step] for step in ("registry", "model_config", "instance", "lime", "message")
        )
        found["outside_server"] = wall_s - found["server"]
        found["evaluate_calls"] = len(evaluations)
        return found


@contextlib.contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    """Timers around the explainer's steps (class and module attributes,
    restored afterwards); in place before its server is built, which binds
    the servicer's methods."""
    from conveyor.services.explainer import explaining, methods, servicer, sharing
    from conveyor.services.explainer.inference_client import InferenceClient
    from conveyor.shared.registry_client import RegistryClient

    patches: list[tuple[object, str, Any]] = []

    def wrap_async(owner: object, name: str, step: str) -> None:
        original = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                timers.add(step, time.perf_counter() - started)

        patches.append((owner, name, original))
        setattr(owner, name, timed)

    def wrap_sync(owner: object, name: str, step: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.add(step, time.perf_counter() - started)

        patches.append((owner, name, original))
        setattr(owner, name, timed)

    wrap_async(servicer.ExplainerServicer, "Explain", "server")
    wrap_async(RegistryClient, "version", "registry")
    wrap_async(InferenceClient, "max_batch_size", "model_config")
    wrap_async(InferenceClient, "evaluate", "evaluate")
    wrap_sync(methods, "lime_tabular", "lime")
    wrap_sync(sharing.SharedEvaluations, "evaluate", "lime_waits")
    wrap_sync(explaining, "explanation_message", "message")
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


class InProcessExplainer:
    """The explainer's server (``build_server``, the settings ``conveyor serve``
    would read, authentication off) on an event loop in a thread of this
    process, against the registry and inference processes, with its steps
    timed."""

    def __init__(self, services: Suite, server_env: dict[str, str]) -> None:
        self.timers = Timers()
        self._services = services
        self._env = {k: v for k, v in server_env.items() if k.startswith("CONVEYOR_")}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="explainer-loop", daemon=True
        )
        self._stack = contextlib.ExitStack()
        self._server: Any = None
        self._channel: grpc.Channel | None = None
        self.stub: Any = None

    def __enter__(self) -> InProcessExplainer:
        from conveyor.services.explainer.server import build_server
        from conveyor.services.explainer.settings import ExplainerSettings

        os.environ.update({"CONVEYOR_AUTH_MODE": "off", **self._env})
        settings = ExplainerSettings(
            listen="127.0.0.1:0",
            data_dir=self._services.data_dir,
            log_level="WARNING",
            shutdown_grace=timedelta(seconds=1),
            registry_addr=self._services.registry.address,
            inference_addr=self._services.inference.address,
        )
        self._stack.enter_context(instrumented(self.timers))
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(build_server(settings), self._loop).result(
            START_TIMEOUT_S
        )
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self._server.port}")
        self.stub = explainer_service_pb2_grpc.ExplainerServiceStub(self._channel)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self._stack.close()


# -- summary ----------------------------------------------------------------------


def summarize(runs: list[dict[str, CaseRun]]) -> dict[str, Metric]:
    """The per-run numbers as metrics (median and range over the runs)."""
    results: dict[str, Metric] = {}

    def add(key: str, label: str, unit: str, values: list[float]) -> None:
        if values:
            results[key] = Metric(label, unit, values)

    def of(case: str, pick: Callable[[CaseRun], float | None]) -> list[float]:
        values = [pick(r[case]) for r in runs if case in r]
        return [v for v in values if v is not None]

    labels = {
        "services": "through the services (Explain)",
        "rows": "row by row over gRPC (one ModelInfer per row)",
        "local": "local, in process (ONNX Runtime)",
        "split": "through the services, the explainer in this process, timed",
    }
    for case, label in labels.items():
        add(f"{case}_wall", f"{label}: wall", "s", of(case, lambda r: r.wall_s))
        add(f"{case}_calls", f"{label}: model calls", "calls", of(case, lambda r: r.client_calls))
        add(
            f"{case}_infer_calls",
            f"{label}: ModelInfer calls counted by inference",
            "calls",
            of(case, lambda r: r.inference.calls),
        )
    for case in ("rows", "local"):
        add(
            f"{case}_model",
            f"{labels[case]}: in the prediction function",
            "s",
            of(case, lambda r: r.model_s),
        )
        add(
            f"{case}_lime_own",
            f"{labels[case]}: LIME's own work (wall - prediction)",
            "s",
            of(case, lambda r: None if r.model_s is None else r.wall_s - r.model_s),
        )
    add(
        "rows_us_per_call",
        "row by row: one ModelInfer round trip",
        "µs",
        of("rows", lambda r: r.extra.get("us_per_call")),
    )
    for case in ("services", "rows"):
        add(
            f"{case}_infer_server",
            f"{labels[case]}: inside inference (ModelInfer received to answered)",
            "s",
            of(case, lambda r: r.inference.success_ns / 1e9),
        )
        add(
            f"{case}_infer_compute",
            f"{labels[case]}: the model's computations in inference",
            "s",
            of(case, lambda r: r.inference.compute_ns / 1e9),
        )
        add(
            f"{case}_cpu_inference",
            f"{labels[case]}: inference process CPU",
            "s",
            of(case, lambda r: r.cpu_s.get("inference")),
        )
    add(
        "services_cpu_explainer",
        f"{labels['services']}: explainer process CPU",
        "s",
        of("services", lambda r: r.cpu_s.get("explainer")),
    )
    add(
        "services_cpu_registry",
        f"{labels['services']}: registry process CPU",
        "s",
        of("services", lambda r: r.cpu_s.get("registry")),
    )
    for case in ("rows", "local"):
        add(
            f"{case}_cpu_bench",
            f"{labels[case]}: benchmark process CPU",
            "s",
            of(case, lambda r: r.cpu_s.get("bench")),
        )
    add(
        "services_fixed_wall",
        f"Explain with {FIXED_SAMPLES} samples: wall (the per-call cost)",
        "s",
        of("services_fixed", lambda r: r.wall_s),
    )
    for step, label in SPLIT_STEPS.items():
        split = [r["split"].extra["split"][step] for r in runs if "split" in r]
        add(f"split_{step}", f"split: {label}", "s", split)
    pairs = [("services", "local"), ("rows", "local"), ("rows", "services")]
    for slow, fast in pairs:
        add(
            f"ratio_{slow}_{fast}",
            f"{slow} / {fast} (per run)",
            "x",
            [r[slow].wall_s / r[fast].wall_s for r in runs if slow in r and fast in r],
        )
    return results


def agreement(runs: list[dict[str, CaseRun]]) -> dict[str, Any]:
    """How far each case's explanations are from the local case's first run
    (and, without a local case, from the first case's)."""
    if not runs:
        return {}
    first = runs[0]
    base_case = "local" if "local" in first else next(iter(first))
    base = first[base_case].explained
    found: dict[str, Any] = {"reference": f"{base_case}, run 1"}
    for case in CASES:
        explained = [r[case].explained for r in runs if case in r]
        if not explained:
            continue
        weight_diffs: list[float] = []
        same_features = True
        for e in explained:
            same_features &= set(e.weights) == set(base.weights)
            common = set(e.weights) & set(base.weights)
            weight_diffs += [abs(e.weights[i] - base.weights[i]) for i in common]
        found[case] = {
            "same_target": all(e.target == base.target for e in explained),
            "same_features": same_features,
            "max_abs_weight_diff": max(weight_diffs, default=float("nan")),
            "max_abs_intercept_diff": max(abs(e.intercept - base.intercept) for e in explained),
            "max_abs_score_diff": max(abs(e.score - base.score) for e in explained),
            "max_abs_local_prediction_diff": max(
                abs(e.local_prediction - base.local_prediction) for e in explained
            ),
            "identical_across_runs": all(e == explained[0] for e in explained),
        }
    if "services" in first and "rows" in first:
        services, rows = first["services"].explained, first["rows"].explained
        common = set(services.weights) & set(rows.weights)
        found["services_vs_rows_max_abs_weight_diff"] = max(
            (abs(services.weights[i] - rows.weights[i]) for i in common), default=float("nan")
        )
    found["weights"] = {str(k): v for k, v in sorted(base.weights.items())}
    found["target"] = base.target
    return found


def print_table(report: dict[str, Any], results: dict[str, Metric]) -> None:
    machine = report["machine"]
    settings = report["settings"]
    print(
        f"\n{machine['cpu']} ({machine['cpus_usable']} usable CPUs), Python "
        f"{machine['python']}, grpcio {machine['grpcio']}, lime {machine['lime']}, "
        f"onnxruntime {machine['onnxruntime']}; {settings['samples']:,} samples, "
        f"{settings['runs']} runs, seed {settings['seed']}; {report['wall_s']:.0f} s in all"
    )
    header = f"{'metric':<78} {'unit':>6} {'median':>10} {'min':>10} {'max':>10}"
    print(header)
    print("-" * len(header))
    for metric in results.values():
        low, high, median = min(metric.values), max(metric.values), metric.median
        digits = 0 if metric.unit in ("calls", "µs") else 2 if metric.unit == "x" else 4
        print(
            f"{metric.label[:78]:<78} {metric.unit:>6} {median:>10,.{digits}f} "
            f"{low:>10,.{digits}f} {high:>10,.{digits}f}"
        )
    found = report.get("agreement", {})
    for case in CASES:
        if case in found:
            entry = found[case]
            print(
                f"agreement {case} (every run) vs {found['reference']}: max |Δweight| "
                f"{entry['max_abs_weight_diff']:.3g}, |Δintercept| "
                f"{entry['max_abs_intercept_diff']:.3g}, |Δscore| {entry['max_abs_score_diff']:.3g}"
                f", same target {entry['same_target']}, same features {entry['same_features']}, "
                f"identical across runs {entry['identical_across_runs']}"
            )
    if "services_vs_rows_max_abs_weight_diff" in found:
        print(
            "agreement services vs rows (run 1): max |Δweight| "
            f"{found['services_vs_rows_max_abs_weight_diff']:.3g}"
        )
    if "error" in report:
        print(f"ERROR: {report['error']}")


if __name__ == "__main__":
    raise SystemExit(main())
