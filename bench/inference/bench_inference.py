"""Inference benchmark: Conveyor against KServe, a bare gRPC server and in-process ONNX Runtime.

Triton's perf_analyzer drives every server over gRPC (Open Inference
Protocol), batch-1 requests at concurrency 1, 4, 8 and 16:

* **conveyor-pN**: ``conveyor serve inference`` with N serving processes
  (``CONVEYOR_INFERENCE_PROCESSES``), models from ``conveyor serve registry``,
  dynamic batching per deployment; unary ModelInfer and, for the MLP,
  ModelStreamInfer (``-stream``);
* **kserve / kserve-quiet**: KServe 0.21's Python model server (its own venv)
  with its default logging and with its quiet logging;
* **bare / bare-stream**: a bare ``grpc.aio`` server answering with a fixed
  response, without computing: the Python transport ceiling;

and, beside them, the same ONNX files in-process with ONNX Runtime (the
compute ceiling), before and after the servers run. The servers run side by
side and every concurrency level visits each of them in turn (the order
rotates), in ``--rounds`` sweeps whose medians are reported, so a noisy moment
of this shared machine hits them all alike. Run from the repository root::

    .venv/bin/python bench/inference/bench_inference.py --out bench/inference/results.json

It creates KServe's venv (``bench/inference/.venv-kserve``) and installs
perf_analyzer (``bench/inference/.tools/``, or ``$PERF_ANALYZER``) when they
are missing. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import conveyor_leg
import inprocess
import perf
import report
from procs import Server, oip_models_ready, started, wait_for
from servables import ModelSpec, export_models, write_input_data, write_spec

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import free_port, machine_info  # noqa: E402

KSERVE_VERSION = "0.21.0"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    started_at = time.time()
    binary = perf.locate(HERE / ".tools" / "perf_analyzer")
    legs = set(args.legs.split(","))
    kserve_python = _kserve_venv(HERE / ".venv-kserve") if "kserve" in legs else None
    if args.work_dir is None:  # a fresh folder per run: runs side by side do not collide
        (HERE / ".work").mkdir(exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="run-", dir=HERE / ".work"))
    else:
        root = args.work_dir.resolve()
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    models = [m for m in args.models.split(",") if m]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    settings = perf.Settings(interval_ms=args.interval_ms, warmup_requests=args.warmup_requests)
    batching = {
        "mlp": [conveyor_leg.Batching.parse(b) for b in args.mlp_batching.split(",")],
        "resnet18": [conveyor_leg.Batching.parse(b) for b in args.resnet_batching.split(",")],
    }
    results: dict[str, Any] = {
        "machine": {**machine_info(root), "gpus": gpu_names()},
        "settings": {
            "legs": sorted(legs),
            "models": models,
            "concurrency": concurrency,
            "perf_analyzer": {**settings.as_json(), "binary": str(binary)},
            "conveyor_processes": args.processes,
            "conveyor_batching": {k: [b.label for b in v] for k, v in batching.items()},
            "conveyor_env": dict(args.conveyor_env),
            "conveyor_prediction_log_sample_rate": args.prediction_log_rate,
            "kserve_intra_op_threads": args.kserve_threads,
            "inprocess_seconds": args.inprocess_seconds,
            "versions": _versions(binary, kserve_python),
            "conveyor_code": _code_state(),
        },
    }
    print(f"exporting the models into {root / 'models'}", file=sys.stderr)
    all_specs, results["models"] = export_models(root / "models")
    specs = [spec for spec in all_specs if spec.name in models]
    spec_files = [write_spec(spec, root / "specs")[0] for spec in specs]
    data = {spec.name: write_input_data(spec, root / "input-data") for spec in specs}

    inprocess_rows: list[dict[str, Any]] = []
    if "inprocess" in legs:
        inprocess_rows += _inprocess(specs, args.inprocess_seconds, "before", args.gpu)
    measurements: list[perf.Measurement] = []
    with contextlib.ExitStack() as stack:
        targets = _start_servers(
            stack, legs, specs, spec_files, data, root, kserve_python, batching, args, results
        )
        print(f"servers ready; {len(targets)} targets", file=sys.stderr)
        measurements = _sweep(binary, targets, concurrency, settings, root / "perf", args.rounds)
    if "inprocess" in legs:
        inprocess_rows += _inprocess(specs, args.inprocess_seconds, "after", args.gpu)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["duration_s"] = round(time.time() - started_at, 1)
    results["inprocess"] = inprocess_rows
    results["measurements"] = [m.as_json() for m in measurements]
    results["summary"] = report.summarise(measurements)
    results["ratios"] = report.ratios(results["summary"])
    results["targets"] = report.targets(results["summary"], inprocess_rows, batching)
    text = report.render(results)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results JSON (and a .md table beside it)")
    parser.add_argument(
        "--legs",
        default="inprocess,bare,kserve,conveyor",
        help="what to measure, comma-separated: inprocess, bare, kserve, conveyor",
    )
    parser.add_argument("--models", default="mlp,resnet18")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument(
        "--processes", default="1,2", help="CONVEYOR_INFERENCE_PROCESSES values to serve with"
    )
    parser.add_argument(
        "--mlp-batching",
        default="64:0",
        help="Conveyor's MLP batching as MAX:DELAY_US[:INSTANCES]; several, comma-separated, "
        "are deployed side by side (the first is the one judged against the targets)",
    )
    parser.add_argument("--resnet-batching", default="32:0", help="as --mlp-batching")
    parser.add_argument("--interval-ms", type=int, default=1500, help="perf_analyzer window")
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument(
        "--rounds", type=int, default=2, help="sweeps over all targets; medians are reported"
    )
    parser.add_argument("--inprocess-seconds", type=float, default=2.0)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="in-process ceiling on ONNX Runtime's CUDA provider, the card named in the "
        "JSON (Conveyor picks CUDA by itself where a GPU is present)",
    )
    parser.add_argument(
        "--conveyor-env",
        action="append",
        default=[],
        type=lambda item: tuple(item.split("=", 1)),
        help="NAME=VALUE for the Conveyor inference servers (repeatable)",
    )
    parser.add_argument(
        "--kserve-threads",
        type=int,
        default=0,
        help="KServe's ONNX Runtime intra-op threads; 0: ONNX Runtime's default (one per "
        "core), what a session created without options gets",
    )
    parser.add_argument(
        "--prediction-log-rate",
        type=float,
        default=0.0,
        help="the deployments' prediction_log_sample_rate (no monitor runs here)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="default: a new folder under bench/inference/.work/"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, CSVs)")
    return parser.parse_args(argv)


# -- set-up ----------------------------------------------------------------------


def _kserve_venv(venv: Path) -> Path:
    """KServe's own venv, created (and pinned to the ONNX Runtime version of
    this one) when missing."""
    ort_version = _version("onnxruntime-gpu") or _version("onnxruntime")
    requirements = [f"kserve=={KSERVE_VERSION}", f"onnxruntime=={ort_version}", "numpy"]
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == " ".join(requirements):
        return python
    print(f"creating {venv} with {' '.join(requirements)}", file=sys.stderr)
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    stamp.write_text(" ".join(requirements))
    return python


def _version(distribution: str) -> str:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(distribution)
    return ""


def _versions(binary: Path, kserve_python: Path | None) -> dict[str, str]:
    versions = {
        name: _version(name)
        for name in ("onnxruntime-gpu", "onnxruntime", "torch", "grpcio", "protobuf")
    }
    versions = {name: value for name, value in versions.items() if value}
    reply = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    versions["perf_analyzer"] = (reply.stdout + reply.stderr).strip().splitlines()[-1]
    if kserve_python is not None:
        script = (
            "from importlib.metadata import version as v; "
            "print(v('kserve'), v('onnxruntime'), v('grpcio'), v('protobuf'))"
        )
        out = subprocess.run([str(kserve_python), "-c", script], capture_output=True, text=True)
        names = ("kserve", "kserve_onnxruntime", "kserve_grpcio", "kserve_protobuf")
        versions.update(zip(names, out.stdout.split(), strict=False))
    return versions


def _code_state() -> dict[str, str]:
    """The commit, and a digest of the inference service's files as they are
    (its code may be uncommitted work while it is measured)."""
    import hashlib

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "services" / "inference").rglob("*.py")):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "services/inference", "shared"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    ).stdout
    return {
        "git_head": head,
        "services_inference_sha256": digest.hexdigest()[:16],
        "uncommitted_changes": "yes" if dirty.strip() else "no",
    }


def _inprocess(
    specs: list[ModelSpec], seconds: float, when: str, gpu: bool
) -> list[dict[str, Any]]:
    print(f"in-process ONNX Runtime ({when})", file=sys.stderr)
    batches = {"mlp": (1,), "resnet18": (1, 8, 16, 32)}
    provider = inprocess.CUDA if gpu else inprocess.CPU
    rows = inprocess.ceiling(
        specs, threads=(1, 2), batches=batches, seconds=seconds, provider=provider
    )
    return [{**row.as_json(), "when": when, "provider": provider} for row in rows]


def gpu_names() -> list[str]:
    """The GPUs ``nvidia-smi`` lists, to name the card beside its numbers."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def _start_servers(
    stack: contextlib.ExitStack,
    legs: set[str],
    specs: list[ModelSpec],
    spec_files: list[Path],
    data: dict[str, Path],
    root: Path,
    kserve_python: Path | None,
    batching: dict[str, list[conveyor_leg.Batching]],
    args: argparse.Namespace,
    results: dict[str, Any],
) -> list[perf.Target]:
    """Every server of the chosen legs, started and ready; the perf_analyzer targets."""
    names = [spec.name for spec in specs]
    targets: list[perf.Target] = []
    if "bare" in legs:
        bare = _start(
            stack,
            "bare",
            [sys.executable, str(HERE / "bare_server.py"), "--listen", "{address}"]
            + [str(path) for path in spec_files],
            root,
            names,
        )
        targets += [perf.Target("bare", bare, s, s.name, data[s.name]) for s in specs]
        targets += [
            perf.Target("bare-stream", bare, s, s.name, data[s.name], streaming=True)
            for s in specs
            if s.name == "mlp"
        ]
    if "kserve" in legs and kserve_python is not None:
        for label, extra in (("kserve", []), ("kserve-quiet", ["--quiet"])):
            command = [str(kserve_python), str(HERE / "kserve_server.py"), *extra]
            command += ["--threads", str(args.kserve_threads)]
            command += ["--grpc-port", "{port}", "--http-port", str(free_port())]
            server = _start(stack, label, command + [str(p) for p in spec_files], root, names)
            targets += [perf.Target(label, server, s, s.name, data[s.name]) for s in specs]
    if "conveyor" in legs:
        targets += _start_conveyor(stack, specs, data, root, batching, args, results)
    return targets


def _start(
    stack: contextlib.ExitStack,
    label: str,
    command: list[str],
    root: Path,
    models: list[str],
) -> Server:
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [part.format(address=address, port=port) for part in command]
    server = stack.enter_context(
        started(label, command, address=address, log=root / f"{label}.log", cwd=HERE)
    )
    wait_for(server, oip_models_ready(models), timeout_s=120)
    return server


def _start_conveyor(
    stack: contextlib.ExitStack,
    specs: list[ModelSpec],
    data: dict[str, Path],
    root: Path,
    batching: dict[str, list[conveyor_leg.Batching]],
    args: argparse.Namespace,
    results: dict[str, Any],
) -> list[perf.Target]:
    """The Conveyor leg; on failure, the reason goes into the results and the
    other legs go on."""
    from conveyor.services import catalog

    status: dict[str, Any] = {"implemented": "inference" in catalog.IMPLEMENTED}
    results["conveyor"] = status
    if not status["implemented"]:
        status["error"] = "inference is not in services/catalog.py IMPLEMENTED"
        print(f"conveyor leg skipped: {status['error']}", file=sys.stderr)
        return []
    deployments = conveyor_leg.plan(specs, batching)
    processes = [int(p) for p in args.processes.split(",")]
    try:
        conveyor = stack.enter_context(
            conveyor_leg.conveyor_stack(
                root / "conveyor",
                deployments,
                processes,
                dict(args.conveyor_env),
                args.prediction_log_rate,
            )
        )
    except Exception as error:  # noqa: BLE001 - reported, and the other legs still run
        status["error"] = f"{type(error).__name__}: {error}"
        print(f"conveyor leg failed to start: {status['error']}", file=sys.stderr)
        return []
    status["deployments"] = conveyor.statuses
    targets = []
    for count, server in conveyor.servers.items():
        for deployment in deployments:
            label = f"conveyor-p{count}"
            if deployment.name != deployment.spec.name:
                label += f"/{deployment.batching.label}"
            spec, inputs = deployment.spec, data[deployment.spec.name]
            targets.append(perf.Target(label, server, spec, deployment.name, inputs))
            if spec.name == "mlp":
                stream = perf.Target(label + "-stream", server, spec, deployment.name, inputs, True)
                targets.append(stream)
    return targets


# -- the sweep -------------------------------------------------------------------


def _sweep(
    binary: Path,
    targets: list[perf.Target],
    concurrency: list[int],
    settings: perf.Settings,
    out_dir: Path,
    rounds: int,
) -> list[perf.Measurement]:
    """Per model, per round, per concurrency: every target once, in rotating order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = {id(t): perf.shape_arguments(t) for t in targets}
    measurements = []
    for model in dict.fromkeys(t.spec.name for t in targets):
        group = [t for t in targets if t.spec.name == model]
        step = 0
        for round_index in range(rounds):
            for level in concurrency:
                for target in _rotated(group, step):
                    measurement = perf.run(
                        binary,
                        target,
                        level,
                        settings,
                        out_dir / f"r{round_index}",
                        shapes[id(target)],
                    )
                    measurements.append(measurement)
                    print(_progress(measurement), file=sys.stderr)
                step += 1
    return measurements


def _rotated(group: list[perf.Target], step: int) -> Iterator[perf.Target]:
    start = step % len(group)
    yield from group[start:]
    yield from group[:start]


def _progress(m: perf.Measurement) -> str:
    head = f"  {m.model:9} {m.target:28} c={m.concurrency:<3}"
    if m.error:
        return f"{head} ERROR after {m.attempts} attempt(s): {m.error}"
    retried = f"  (attempt {m.attempts}; before: {m.failed_attempts})" if m.failed_attempts else ""
    return (
        f"{head} {m.infer_per_s:9.1f} infer/s  p50 {m.p50_ms:7.2f} ms  p99 {m.p99_ms:7.2f} ms"
        f"  server CPU {m.server_cpu_s:5.1f} s{retried}"
    )


if __name__ == "__main__":
    sys.exit(main())
