"""Asking a server's gRPC health service, from tools and tests."""

from __future__ import annotations

import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServerExitedError(RuntimeError):
    """The process expected to serve exited before it did."""


def serving_status(address: str, *, service: str = "", timeout_s: float = 5.0) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, …) at ``address``.

    Raises ``grpc.RpcError`` when the server cannot be asked.
    """
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status


def wait_until_serving(
    address: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Block until ``address`` reports SERVING.

    Raises :class:`ServerExitedError` when ``process`` exits first and
    ``TimeoutError`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ServerExitedError(
                    f"the server for {address} exited with {process.returncode}"
                )
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} was not SERVING after {timeout_s} s")
