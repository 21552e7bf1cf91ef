"""Where each service listens by default (DESIGN.md); standard library only."""

from __future__ import annotations

SERVICE_PORTS: dict[str, int] = {
    "registry": 50051,
    "trainer": 50052,
    "optimizer": 50053,
    "inference": 50054,
    "monitor": 50055,
    "explainer": 50056,
    "policy": 50057,
}
"""gRPC port of each service on loopback; Prometheus metrics use 9100 + last digit."""


def default_address(service: str, host: str = "127.0.0.1") -> str:
    """``host:port`` of ``service`` at its default port."""
    return f"{host}:{SERVICE_PORTS[service]}"
