"""Server processes for the benchmark: start, wait until they answer, read their
CPU time, stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc as oip_grpc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A started server process (and, for some, the processes it starts)."""

    label: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and every live descendant."""
        return sum(_cpu_seconds(pid) for pid in _tree(self.process.pid))

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.label} exited with {self.process.returncode}; log {self.log}:\n"
                + _tail(self.log)
            )


@contextlib.contextmanager
def started(
    label: str,
    command: Sequence[str],
    *,
    address: str,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[Server]:
    """``command`` as a child process logging to ``log``; SIGTERM (then SIGKILL) on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command), stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
    server = Server(label, address, process, log)
    try:
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(
    server: Server, ready: Callable[[grpc.Channel], bool], *, timeout_s: float = 120.0
) -> None:
    """Poll ``ready`` on a channel to the server until it says yes."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(server.address) as channel:
        while time.monotonic() < deadline:
            server.check_alive()
            try:
                if ready(channel):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{server.label} at {server.address} not ready after {timeout_s} s")


def oip_models_ready(models: Sequence[str]) -> Callable[[grpc.Channel], bool]:
    """Ready when ServerLive says live and ModelReady says ready for every model."""

    def ready(channel: grpc.Channel) -> bool:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        if not stub.ServerLive(oip.ServerLiveRequest(), timeout=2).live:
            return False
        return all(
            stub.ModelReady(oip.ModelReadyRequest(name=name), timeout=2).ready for name in models
        )

    return ready


def model_config(address: str, model: str) -> oip.ModelConfigResponse:
    """The server's Triton ModelConfig answer for ``model``."""
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        reply: oip.ModelConfigResponse = stub.ModelConfig(
            oip.ModelConfigRequest(name=model), timeout=10
        )
        return reply


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat; [0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
