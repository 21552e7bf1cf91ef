"""Triton's perf_analyzer, one concurrency level against one server per run.

Every run: gRPC, synchronous calls (perf_analyzer starts one thread per
concurrent request and shares one gRPC channel, one TCP connection, among up
to 6 of them; with ``--streaming``, asynchronous calls on streams), batch-1
requests of one fixed sample of finite random FP32 data (``--input-data``),
200 warm-up requests, then 3 ``--measurement-interval`` windows of
``interval_ms``, merged into the reported numbers. The stability check is
effectively off (``-s 1000``: the 3 windows may differ by up to 11x; ``-r
3``), because this shared machine moves by +-25 % and more between windows and
an unstable measurement would report nothing; the peers are interleaved
instead (see bench_inference.py). A run that fails anyway is tried once more
(see the README for why Conveyor's sometimes do). The request shape comes
from the server's own ModelConfig answer: ``-b 1`` when it reports
``max_batch_size`` > 0 (the batch dimension is implicit), ``--shape
input:1,...`` otherwise.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import Server, model_config
from servables import ModelSpec

SETUP_SCRIPT = Path("/work/shared/tools/setup_perf_analyzer.sh")
ENV_VAR = "PERF_ANALYZER"
STABILITY_PERCENTAGE = 1000
"""max/min of the 3 windows' throughput and latency may be up to 11: no run is
refused as unstable (a window with no response at all still is)."""


@dataclass(frozen=True)
class Settings:
    interval_ms: int = 1500
    windows: int = 3
    warmup_requests: int = 200
    attempts: int = 2
    timeout_s: float = 120.0

    def as_json(self) -> dict[str, Any]:
        return {
            "measurement_interval_ms": self.interval_ms,
            "max_trials": self.windows,
            "stability_percentage": STABILITY_PERCENTAGE,
            "warmup_request_count": self.warmup_requests,
            "mode": "time_windows",
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class Target:
    """One (server, model, call style) that perf_analyzer drives."""

    label: str
    server: Server
    spec: ModelSpec
    model_name: str
    input_data: Path
    streaming: bool = False


@dataclass
class Measurement:
    target: str
    model: str
    concurrency: int
    infer_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    server_cpu_s: float = 0.0
    wall_s: float = 0.0
    attempts: int = 0
    error: str = ""
    failed_attempts: list[str] = field(default_factory=list)
    server_stats: dict[str, float] = field(default_factory=dict)
    """What the server's ModelStatistics said about the run (perf_analyzer's
    "Server:" section), when it reports any: counts and average microseconds."""

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model": self.model,
            "concurrency": self.concurrency,
            "infer_per_s": round(self.infer_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "server_cpu_s": round(self.server_cpu_s, 2),
            "wall_s": round(self.wall_s, 2),
            "attempts": self.attempts,
            "error": self.error,
            "failed_attempts": self.failed_attempts,
            "server_stats": self.server_stats,
        }


def locate(install_dir: Path) -> Path:
    """perf_analyzer from ``$PERF_ANALYZER``, else ``install_dir``, installed there
    with the shared setup script when missing."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured)
        if not path.exists():
            raise SystemExit(f"{ENV_VAR}={configured} does not exist")
        return path
    binary = install_dir / "perf_analyzer"
    if not binary.exists():
        if not SETUP_SCRIPT.exists():
            raise SystemExit(f"no perf_analyzer: set {ENV_VAR} (see {SETUP_SCRIPT.name})")
        pip = f"{sys.executable} -m pip"  # the script only downloads a wheel with it
        subprocess.run(["bash", str(SETUP_SCRIPT), str(install_dir), pip], check=True)
    return binary


def shape_arguments(target: Target) -> list[str]:
    """``-b 1`` or ``--shape``, whichever the server's ModelConfig calls for."""
    config = model_config(target.server.address, target.model_name).config
    name = target.spec.inputs[0].name
    if config.max_batch_size > 0:
        arguments = ["-b", "1"]
        if any(size < 0 for size in config.input[0].dims):
            arguments += ["--shape", f"{name}:" + ",".join(map(str, target.spec.sample_shape))]
        return arguments
    return ["--shape", f"{name}:" + ",".join(map(str, (1, *target.spec.sample_shape)))]


def run(
    binary: Path,
    target: Target,
    concurrency: int,
    settings: Settings,
    out_dir: Path,
    shape: list[str],
) -> Measurement:
    """One measurement: perf_analyzer run up to ``settings.attempts`` times
    until it reports; every attempt's output and CSV are kept in ``out_dir``."""
    measurement = Measurement(target.label, target.spec.name, concurrency)
    for attempt in range(1, settings.attempts + 1):
        measurement.attempts = attempt
        error = _attempt(binary, target, concurrency, settings, out_dir, shape, measurement)
        if not error:
            measurement.error = ""
            return measurement
        measurement.failed_attempts.append(error)
        measurement.error = error
    return measurement


def _attempt(
    binary: Path,
    target: Target,
    concurrency: int,
    settings: Settings,
    out_dir: Path,
    shape: list[str],
    measurement: Measurement,
) -> str:
    """One perf_analyzer run into ``measurement``; the error, or empty."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{target.label}-{target.model_name}-c{concurrency}-a{measurement.attempts}"
    stem = stem.replace("/", "_")
    csv_path, log_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.log"
    command = [
        str(binary),
        "-i", "grpc",
        "-u", target.server.address,
        "-m", target.model_name,
        "--concurrency-range", str(concurrency),
        "--measurement-interval", str(settings.interval_ms),
        "--stability-percentage", str(STABILITY_PERCENTAGE),
        "--max-trials", str(settings.windows),
        "--warmup-request-count", str(settings.warmup_requests),
        "--input-data", str(target.input_data),
        "-f", str(csv_path),
        *shape,
    ]  # fmt: skip
    if target.streaming:
        command.append("--streaming")
    target.server.check_alive()
    cpu_before = target.server.cpu_seconds()
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=settings.timeout_s, check=False
        )
        output = completed.stdout + completed.stderr
        failed = completed.returncode != 0
    except subprocess.TimeoutExpired as expired:
        output = f"timed out after {settings.timeout_s} s: {expired.stdout!r}"
        failed = True
    measurement.wall_s = time.perf_counter() - started
    measurement.server_cpu_s = target.server.cpu_seconds() - cpu_before
    log_path.write_text(" ".join(command) + "\n\n" + output)
    if failed or not csv_path.exists():
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        return " | ".join(lines[-3:]) or "no output"
    with csv_path.open() as handle:
        row = next(csv.DictReader(handle))
    measurement.infer_per_s = float(row["Inferences/Second"])
    measurement.p50_ms = float(row["p50 latency"]) / 1000
    measurement.p90_ms = float(row["p90 latency"]) / 1000
    measurement.p99_ms = float(row["p99 latency"]) / 1000
    measurement.server_stats = server_stats(output)
    return ""


_SERVER_COUNTS = {
    "inference_count": re.compile(r"^\s*Inference count: (\d+)", re.M),
    "execution_count": re.compile(r"^\s*Execution count: (\d+)", re.M),
}
_SERVER_TIMES = re.compile(
    r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
    r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)"
)
_TIME_NAMES = ("request", "overhead", "queue", "compute_input", "compute_infer", "compute_output")


def server_stats(output: str) -> dict[str, float]:
    """perf_analyzer's summary of the server-side statistics, when it printed one."""
    stats: dict[str, float] = {}
    for name, pattern in _SERVER_COUNTS.items():
        match = pattern.search(output)
        if match:
            stats[name] = float(match.group(1))
    times = _SERVER_TIMES.search(output)
    if times:
        stats.update(
            {f"{n}_us": float(v) for n, v in zip(_TIME_NAMES, times.groups(), strict=True)}
        )
    if stats.get("execution_count"):
        stats["rows_per_execution"] = round(stats["inference_count"] / stats["execution_count"], 2)
    return stats
