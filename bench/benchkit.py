"""What every benchmark here shares: a free loopback port for the server under
test, and a description of the machine the numbers were measured on.

The benchmark scripts run as files (``python bench/<service>/bench_<service>.py``)
and put this directory on ``sys.path`` to import it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc


@dataclass
class Metric:
    """One measured quantity over several runs."""

    label: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "runs": self.values,
        }


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def machine_info(directory: Path | None = None) -> dict[str, Any]:
    """The CPU, cores, memory, load, platform and versions; with ``directory``,
    also the filesystem that holds it."""
    info: dict[str, Any] = {
        "cpu": _proc_field("/proc/cpuinfo", "model name")
        or platform.processor()
        or platform.machine(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory": "",
        "load_average_before": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }
    total = _proc_field("/proc/meminfo", "MemTotal")
    if total:
        info["memory"] = f"{int(total.split()[0]) / 1024 / 1024:.0f} GiB"
    if directory is not None:
        info["filesystem"] = _filesystem(directory)
    return info


def _proc_field(path: str, name: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return ""


def _filesystem(directory: Path) -> str:
    """The device and type of the filesystem holding ``directory`` (from /proc/mounts)."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            inside = str(directory).startswith(mount.rstrip("/") + "/") or mount == "/"
            if inside and len(mount) > len(best[0]):
                best = (mount, device, kind)
    return f"{best[1]} ({best[2]}) at {best[0]}"
