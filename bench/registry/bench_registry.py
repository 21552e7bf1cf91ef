"""Registry benchmark: artifact transfer beside a plain file copy, and version creation.

Measures, against a registry started as a separate process (``conveyor serve
registry``) so that the client and the server do not share an event loop:

* upload (``CreateModelVersion``, 1 MiB chunks) and download
  (``DownloadArtifact``) throughput of one large artifact over loopback gRPC,
  each run beside the physical reference on the same disk: the same bytes
  written to a file with fsync, then that file copied with
  ``shutil.copyfile`` + fsync;
* version-creation throughput: N concurrent clients (one channel each) create
  small versions of one model, on SQLite and on a throwaway PostgreSQL;
* with ``--encryption-ab N``: what encryption at rest costs, as N pairs of
  transfers alternating between two registries side by side, one encrypting
  artifacts and one not (so both see the same moments of a shared machine),
  with the server process's CPU seconds per transfer.

Every measurement is repeated ``--runs`` times; the table gives the median and
the spread. MB is 10**6 bytes. Run from the repository root::

    .venv/bin/python bench/registry/bench_registry.py --json bench/registry/results.json

Not a test: ``make test`` never runs it and nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.shared.health import ServerExitedError, wait_until_serving

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # bench/ and the test support live at the repository root
    sys.path.insert(0, str(REPO_ROOT))

from bench.benchkit import Metric, free_port, machine_info  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402
from tests.support.registry import a_model, upload_requests  # noqa: E402

MIB = 1024 * 1024
MB = 1_000_000
TARGET_RATIO = 0.5
"""The issue's target: artifact transfer at >= 50% of the plain copy's speed."""

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 * MIB),
    ("grpc.max_receive_message_length", 16 * MIB),
]
CALL_TIMEOUT_S = 600.0
START_TIMEOUT_S = 60.0

Stub = registry_service_pb2_grpc.RegistryServiceStub
"""Typed as ``RegistryServiceAsyncStub`` (the .pyi name) when built on an aio channel."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        raise SystemExit(f"unknown backend(s): {', '.join(sorted(unknown))}")
    server_env = dict(item.split("=", 1) for item in args.server_env)
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-", dir=args.work_dir))
    report: dict[str, Any] = {
        "machine": machine_info(root),
        "settings": {
            "size_mib": args.size_mib,
            "runs": args.runs,
            "clients": args.clients,
            "versions": args.versions,
            "version_kib": args.version_kib,
            "backends": backends,
            "work_dir": str(root),
            "server_env": server_env,
            # The registry's own default (on) unless the server environment says otherwise.
            "encrypt_artifacts": _encrypts(server_env),
        },
        "results": {},
    }
    results: dict[str, Metric] = {}
    try:
        if args.size_mib > 0:
            results.update(
                bench_transfer(root / "transfer", args.size_mib * MIB, args.runs, server_env)
            )
        if args.encryption_ab > 0 and args.size_mib > 0:
            results.update(
                bench_encryption(
                    root / "encryption", args.size_mib * MIB, args.encryption_ab, server_env
                )
            )
        for backend in backends:
            results.update(
                bench_versions(
                    root / f"versions-{backend}",
                    backend,
                    runs=args.runs,
                    clients=args.clients,
                    versions=args.versions,
                    size=args.version_kib * 1024,
                    server_env=server_env,
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    report["results"] = {key: metric.as_json() for key, metric in results.items()}
    report["target"] = target_verdict(results)
    print_table(report, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="artifact size (0 skips)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent version creators")
    parser.add_argument("--versions", type=int, default=400, help="versions created per run")
    parser.add_argument("--version-kib", type=int, default=4, help="artifact size of each")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql"
    )
    parser.add_argument(
        "--encryption-ab",
        type=int,
        default=0,
        metavar="PAIRS",
        help="also compare encryption at rest on and off over this many alternating "
        "transfer pairs (0: skip)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the registry data and the plain-copy files go (default: system temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the registry process (repeatable), e.g. MALLOC_ARENA_MAX=1",
    )
    return parser.parse_args(argv)


# -- measurements -------------------------------------------------------------


def bench_transfer(
    directory: Path, size: int, runs: int, server_env: dict[str, str]
) -> dict[str, Metric]:
    """Plain write, plain copy, upload and download of ``size`` bytes, ``runs`` times."""
    directory.mkdir(parents=True)
    base = bytearray(os.urandom(size))
    write: list[float] = []
    copy: list[float] = []
    upload: list[float] = []
    download: list[float] = []
    with registry_process(directory / "registry", None, server_env) as server:
        for run in range(runs):
            # Different bytes each run: identical content would be stored once.
            base[:16] = uuid.uuid4().bytes
            data = bytes(base)
            digest = hashlib.sha256(data).hexdigest()  # the client knows it before uploading
            write_s, copy_s = plain_copy(data, directory)
            upload_s, download_s = asyncio.run(transfer(server.address, data, digest))
            write.append(size / write_s / MB)
            copy.append(size / copy_s / MB)
            upload.append(size / upload_s / MB)
            download.append(size / download_s / MB)
            print(
                f"  transfer run {run + 1}/{runs}: write {write[-1]:.0f}, copy {copy[-1]:.0f}, "
                f"upload {upload[-1]:.0f}, download {download[-1]:.0f} MB/s",
                file=sys.stderr,
            )
    mib = size // MIB
    return {
        "plain_write": Metric(f"plain write {mib} MiB + fsync", "MB/s", write),
        "plain_copy": Metric(f"plain copy {mib} MiB (copyfile + fsync)", "MB/s", copy),
        "upload": Metric(f"upload {mib} MiB (CreateModelVersion)", "MB/s", upload),
        "download": Metric(f"download {mib} MiB (DownloadArtifact)", "MB/s", download),
        "upload_vs_copy": Metric(
            "upload / plain copy", "%", [100 * u / c for u, c in zip(upload, copy, strict=True)]
        ),
        "download_vs_copy": Metric(
            "download / plain copy", "%", [100 * d / c for d, c in zip(download, copy, strict=True)]
        ),
        "upload_vs_write": Metric(
            "upload / plain write (not the target)",
            "%",
            [100 * u / w for u, w in zip(upload, write, strict=True)],
        ),
    }


def bench_encryption(
    directory: Path, size: int, pairs: int, server_env: dict[str, str]
) -> dict[str, Metric]:
    """Upload and download ``size`` bytes ``pairs`` times on each of two registries,
    one with encryption at rest on and one with it off, alternating which goes first."""
    directory.mkdir(parents=True)
    base = bytearray(os.urandom(size))
    rates: dict[str, dict[str, list[float]]] = {
        mode: {"upload": [], "download": [], "cpu": []} for mode in ("on", "off")
    }
    flag = "CONVEYOR_REGISTRY_ENCRYPT_ARTIFACTS"
    with (
        registry_process(directory / "on", None, {**server_env, flag: "true"}) as on,
        registry_process(directory / "off", None, {**server_env, flag: "false"}) as off,
    ):
        for pair in range(pairs):
            order = [("on", on), ("off", off)] if pair % 2 == 0 else [("off", off), ("on", on)]
            for mode, server in order:
                base[:16] = uuid.uuid4().bytes
                data = bytes(base)
                digest = hashlib.sha256(data).hexdigest()
                cpu_before = _process_cpu_s(server.process.pid)
                upload_s, download_s = asyncio.run(transfer(server.address, data, digest))
                cpu_s = _process_cpu_s(server.process.pid) - cpu_before
                rates[mode]["upload"].append(size / upload_s / MB)
                rates[mode]["download"].append(size / download_s / MB)
                rates[mode]["cpu"].append(cpu_s)
            print(
                f"  encryption pair {pair + 1}/{pairs}: upload on {rates['on']['upload'][-1]:.0f}"
                f" / off {rates['off']['upload'][-1]:.0f}, download on "
                f"{rates['on']['download'][-1]:.0f} / off {rates['off']['download'][-1]:.0f} MB/s",
                file=sys.stderr,
            )
    mib = size // MIB
    results: dict[str, Metric] = {}
    for mode, label in (("on", "encrypted"), ("off", "plaintext")):
        results[f"upload_encryption_{mode}"] = Metric(
            f"A/B upload {mib} MiB, {label}", "MB/s", rates[mode]["upload"]
        )
        results[f"download_encryption_{mode}"] = Metric(
            f"A/B download {mib} MiB, {label}", "MB/s", rates[mode]["download"]
        )
    for phase in ("upload", "download"):
        results[f"{phase}_encrypted_vs_plaintext"] = Metric(
            f"A/B {phase}: encrypted / plaintext",
            "%",
            [100 * a / b for a, b in zip(rates["on"][phase], rates["off"][phase], strict=True)],
        )
    if all(rates[mode]["cpu"][0] >= 0 for mode in rates):
        for mode, label in (("on", "encrypted"), ("off", "plaintext")):
            results[f"server_cpu_encryption_{mode}"] = Metric(
                f"A/B server CPU (up+download), {label}",
                "ms",
                [1000 * cpu_s for cpu_s in rates[mode]["cpu"]],
            )
    return results


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); -1 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_copy(data: bytes, directory: Path) -> tuple[float, float]:
    """Seconds to write ``data`` to a file with fsync, then to copy that file with fsync."""
    source = directory / "plain-source.bin"
    target = directory / "plain-copy.bin"
    try:
        start = time.perf_counter()
        with source.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        shutil.copyfile(source, target)
        descriptor = os.open(target, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return write_s, time.perf_counter() - start
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)


async def transfer(address: str, data: bytes, digest: str) -> tuple[float, float]:
    """Seconds to upload ``data`` as a new version, then to download it again."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub: registry_service_pb2_grpc.RegistryServiceAsyncStub = Stub(channel)
        model_id = f"transfer-{uuid.uuid4().hex[:8]}"
        await stub.CreateModel(
            rpc.CreateModelRequest(model_id=model_id, model=a_model()), timeout=30
        )
        start = time.perf_counter()
        reply = await stub.CreateModelVersion(
            upload_requests(f"models/{model_id}", data, sha256=digest, request_id=uuid.uuid4().hex),
            timeout=CALL_TIMEOUT_S,
        )
        upload_s = time.perf_counter() - start
        if reply.model_version.artifact.sha256 != digest:
            raise RuntimeError("the registry stored other bytes than were uploaded")
        chunks: list[bytes] = []
        start = time.perf_counter()
        async for message in stub.DownloadArtifact(
            rpc.DownloadArtifactRequest(name=reply.model_version.name), timeout=CALL_TIMEOUT_S
        ):
            chunks.append(message.data)
        download_s = time.perf_counter() - start
    if hashlib.sha256(b"".join(chunks)).hexdigest() != digest:
        raise RuntimeError("the download returned other bytes than were uploaded")
    return upload_s, download_s


def bench_versions(
    directory: Path,
    backend: str,
    *,
    runs: int,
    clients: int,
    versions: int,
    size: int,
    server_env: dict[str, str],
) -> dict[str, Metric]:
    """Versions per second with ``clients`` concurrent creators, ``runs`` times."""
    directory.mkdir(parents=True)
    rates: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    with contextlib.ExitStack() as stack:
        database_url = None
        if backend == "postgresql":
            database_url = stack.enter_context(throwaway_postgres())
        server = stack.enter_context(
            registry_process(directory / "registry", database_url, server_env)
        )
        asyncio.run(create_versions(server.address, clients, clients, size))  # warm-up
        for run in range(runs):
            elapsed, latencies = asyncio.run(
                create_versions(server.address, clients, versions, size)
            )
            rates.append(versions / elapsed)
            quantiles = statistics.quantiles(latencies, n=100)
            p50.append(1000 * statistics.median(latencies))
            p99.append(1000 * quantiles[98])
            print(
                f"  {backend} run {run + 1}/{runs}: {rates[-1]:.1f} versions/s, "
                f"p50 {p50[-1]:.1f} ms, p99 {p99[-1]:.1f} ms",
                file=sys.stderr,
            )
    kib = size // 1024
    label = f"{backend}: {clients} clients x {kib} KiB versions"
    return {
        f"versions_{backend}": Metric(label, "versions/s", rates),
        f"versions_{backend}_p50": Metric(f"{backend}: latency p50", "ms", p50),
        f"versions_{backend}_p99": Metric(f"{backend}: latency p99", "ms", p99),
    }


async def create_versions(
    address: str, clients: int, versions: int, size: int
) -> tuple[float, list[float]]:
    """Seconds for ``clients`` channels to create ``versions`` versions of one new model,
    and the latency of each call. Checks that the numbers are 1..versions."""
    payloads = [os.urandom(size) for _ in range(versions)]
    digests = [hashlib.sha256(p).hexdigest() for p in payloads]
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(clients)]
    try:
        stubs: list[registry_service_pb2_grpc.RegistryServiceAsyncStub]
        stubs = [Stub(channel) for channel in channels]
        model_id = f"versions-{uuid.uuid4().hex[:8]}"
        await stubs[0].CreateModel(
            rpc.CreateModelRequest(model_id=model_id, model=a_model()), timeout=30
        )
        await asyncio.gather(*(channel.channel_ready() for channel in channels))

        async def client(
            stub: registry_service_pb2_grpc.RegistryServiceAsyncStub, indices: range
        ) -> list[tuple[float, str]]:
            done = []
            for i in indices:
                start = time.perf_counter()
                reply = await stub.CreateModelVersion(
                    upload_requests(
                        f"models/{model_id}",
                        payloads[i],
                        sha256=digests[i],
                        request_id=uuid.uuid4().hex,
                    ),
                    timeout=60,
                )
                done.append((time.perf_counter() - start, reply.model_version.name))
            return done

        start = time.perf_counter()
        per_client = await asyncio.gather(
            *(client(stub, range(k, versions, clients)) for k, stub in enumerate(stubs))
        )
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))
    results = [result for done in per_client for result in done]
    numbers = sorted(int(name.rsplit("/", 1)[1]) for _, name in results)
    if numbers != list(range(1, versions + 1)):
        raise RuntimeError(f"version numbers are not 1..{versions} without gaps: {numbers}")
    return elapsed, [latency for latency, _ in results]


# -- the registry and its database ----------------------------------------------


@dataclass
class RegistryProcess:
    address: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def registry_process(
    data_dir: Path, database_url: str | None, extra_env: dict[str, str] | None = None
) -> Iterator[RegistryProcess]:
    """``conveyor serve registry`` in a child process, SERVING on a free loopback port."""
    data_dir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "CONVEYOR_REGISTRY_LOG_LEVEL": "WARNING",
        "CONVEYOR_REGISTRY_SHUTDOWN_GRACE": "PT5S",
        # The registry alone: this measures transfers and the store; what
        # authentication and policy cost per call is bench/policy's subject.
        "CONVEYOR_AUTH_MODE": "off",
        "CONVEYOR_REGISTRY_PROMOTION_GATE": "off",
        **(extra_env or {}),
    }
    env.pop("CONVEYOR_REGISTRY_DATABASE_URL", None)
    if database_url is not None:
        env["CONVEYOR_REGISTRY_DATABASE_URL"] = database_url
    command = [sys.executable, "-m", "conveyor.services.cli", "serve", "registry"]
    command += ["--listen", address, "--data-dir", str(data_dir)]
    log_path = data_dir / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _wait_until_serving(address, process, log_path)
        yield RegistryProcess(address, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    try:
        wait_until_serving(address, process=process, timeout_s=START_TIMEOUT_S)
    except (ServerExitedError, TimeoutError) as error:
        raise RuntimeError(f"{error}:\n{log.read_text()}") from error


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A fresh database on a throwaway cluster (tests/support/postgres.py); its URL."""
    cluster = ThrowawayPostgres()
    cluster.start()
    try:
        yield cluster.create_database()
    finally:
        cluster.stop()


# -- report ----------------------------------------------------------------------


def target_verdict(results: dict[str, Metric]) -> dict[str, Any]:
    """Whether upload and download reach TARGET_RATIO of the plain copy (medians of ratios)."""
    verdict: dict[str, Any] = {"ratio": TARGET_RATIO}
    for key in ("upload", "download"):
        metric = results.get(f"{key}_vs_copy")
        if metric is not None:
            verdict[key] = {"percent": metric.median, "met": metric.median >= 100 * TARGET_RATIO}
    return verdict


def print_table(report: dict[str, Any], results: dict[str, Metric]) -> None:
    machine = report["machine"]
    print(
        f"\n{machine['cpu']} ({machine['cpus_usable']} usable CPUs), "
        f"{machine['filesystem']}, Python {machine['python']}, grpcio {machine['grpcio']}"
    )
    encrypted = "on" if report["settings"]["encrypt_artifacts"] else "off"
    print(f"registry: encryption of artifacts at rest {encrypted}")
    header = f"{'metric':<44} {'unit':>10} {'median':>9} {'min':>9} {'max':>9} {'spread':>7}"
    print(header)
    print("-" * len(header))
    for metric in results.values():
        low, high, median = min(metric.values), max(metric.values), metric.median
        spread = 100 * (high - low) / median if median else 0.0
        print(
            f"{metric.label:<44} {metric.unit:>10} {median:>9.1f} {low:>9.1f} {high:>9.1f} "
            f"{spread:>6.0f}%"
        )
    for key, verdict in report["target"].items():
        if isinstance(verdict, dict):
            state = "met" if verdict["met"] else "NOT met"
            print(
                f"target {key} >= {100 * TARGET_RATIO:.0f}% of plain copy: "
                f"{verdict['percent']:.0f}% ({state})"
            )


def _encrypts(server_env: dict[str, str]) -> bool:
    """Whether the registry process encrypts artifacts (CONVEYOR_REGISTRY_ENCRYPT_ARTIFACTS
    from --server-env, else this environment, else the default: on)."""
    value = server_env.get(
        "CONVEYOR_REGISTRY_ENCRYPT_ARTIFACTS",
        os.environ.get("CONVEYOR_REGISTRY_ENCRYPT_ARTIFACTS", "true"),
    )
    return value.strip().lower() not in {"0", "false", "no", "off", "f", "n"}


if __name__ == "__main__":
    raise SystemExit(main())
