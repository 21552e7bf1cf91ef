"""The ``conveyor`` command.

``conveyor serve <service>`` runs one service in this process;
``conveyor up`` runs every implemented service, each in its own process, on
loopback with embedded defaults, prints their addresses and drains them all on
Ctrl-C or SIGTERM; ``conveyor health HOST:PORT`` exits 0 when a server is SERVING.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.services import catalog
from conveyor.shared.ports import default_address
from conveyor.shared.settings import TelemetrySettings
from conveyor.shared.telemetry import (
    configure_logging,
    create_tracer_provider,
    install_tracer_provider,
)

STARTUP_TIMEOUT_S = 60.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conveyor`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.service, listen=args.listen, data_dir=args.data_dir)
    if args.command == "up":
        return _up(data_dir=args.data_dir, host=args.host)
    if args.command == "health":
        return _health(args.address, service=args.service)
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=catalog.ALL_SERVICES)
    serve.add_argument("--listen", help="HOST:PORT (default: loopback, the service's port)")
    serve.add_argument("--data-dir", type=Path, help="root data directory (default: .data)")
    up = commands.add_parser("up", help="run every implemented service on this machine")
    up.add_argument("--data-dir", type=Path, default=Path(".data"), help="default: .data")
    up.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    health = commands.add_parser("health", help="exit 0 if a server reports SERVING")
    health.add_argument("address", help="HOST:PORT")
    health.add_argument("--service", default="", help="one service's full name (default: all)")
    return parser


def _health(address: str, *, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name} {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _serve(name: str, *, listen: str | None, data_dir: Path | None) -> int:
    try:
        entry = catalog.load(name)
    except KeyError:
        print(
            f"conveyor: the {name} service has no server yet; implemented: "
            f"{', '.join(catalog.IMPLEMENTED) or 'none'}",
            file=sys.stderr,
        )
        return 2
    overrides: dict[str, object] = {"listen": listen or default_address(name)}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = entry.settings_class(**overrides)
    configure_logging(name, level=settings.log_level, json_lines=settings.log_json)
    install_tracer_provider(create_tracer_provider(name, TelemetrySettings()))

    async def run() -> None:
        server = await entry.build_server(settings)
        await server.serve_until_signal()

    asyncio.run(run())
    return 0


def _up(*, data_dir: Path, host: str) -> int:
    if not catalog.IMPLEMENTED:
        print("conveyor up: no service has a server yet; nothing to start.", file=sys.stderr)
        return 1
    children: dict[str, subprocess.Popen[bytes]] = {}
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        for name in catalog.IMPLEMENTED:
            address = default_address(name, host)
            children[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "conveyor.services.cli",
                    "serve",
                    name,
                    "--listen",
                    address,
                    "--data-dir",
                    str(data_dir),
                ],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            _wait_until_serving(name, address, children[name])
        print("\nConveyor is up:")
        for name in children:
            print(f"  {name:<10} {default_address(name, host)}")
        print("Ctrl-C drains and stops every service.\n", flush=True)
        while not stop_requested and all(c.poll() is None for c in children.values()):
            time.sleep(0.2)
        crashed = [n for n, c in children.items() if c.returncode not in (None, 0)]
        for name in crashed:
            print(f"conveyor up: {name} exited with {children[name].returncode}", file=sys.stderr)
        return 1 if crashed else 0
    finally:
        _stop_all(children)


def _wait_until_serving(name: str, address: str, child: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise SystemExit(f"conveyor up: {name} exited with {child.returncode} at start")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit(f"conveyor up: {name} did not become healthy on {address}")


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    # Stop in reverse start order so that callers drain before their dependencies.
    for child in reversed(children.values()):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in reversed(children.values()):
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


if __name__ == "__main__":
    raise SystemExit(main())
