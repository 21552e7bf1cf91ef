"""A backend gets the stubs and the client with grpcio and protobuf only.

Builds Conveyor's wheel, installs it without extras into a brand-new virtual
environment, and from there imports every contract and the client, checks that
no server dependency came along, and makes a real call to a server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from conveyor.shared.server import ConveyorServer
from tests.contracts.test_reflection import server  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {
    "conveyor",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",
    "typing_extensions",
    "pip",
    "setuptools",
}
SERVER_ONLY = [
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "opentelemetry",
    "torch",
    "onnxruntime",
    "numpy",
    "grpc_health",
    "grpc_reflection",
]

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, sys
    import grpc
    from conveyor.shared.client import ConveyorClient
    from conveyor.shared.errors import from_rpc_error
    from conveyor.policy.v1 import policy_messages_pb2
    for module in sys.argv[2:]:
        assert importlib.util.find_spec(module) is None, module + " is installed"

    async def main():
        async with ConveyorClient(addresses={"policy": sys.argv[1]}) as conveyor:
            try:
                await conveyor.policy.GetPolicySet(policy_messages_pb2.GetPolicySetRequest())
            except grpc.aio.AioRpcError as error:
                print(from_rpc_error(error).code.name)

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def backend_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Python of a new virtual environment holding Conveyor's base install only."""
    root = tmp_path_factory.mktemp("light-client")
    wheels = root / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels)]
    subprocess.run([*pip_wheel, str(REPO)], check=True, cwd=root)
    environment = root / "backend"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    (wheel,) = wheels.glob("conveyor-*.whl")
    constraints = str(REPO / "constraints.txt")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-c", constraints, wheel], check=True
    )
    return python


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_base_install_holds_only_grpc_and_protobuf(backend_python: Path) -> None:
    listed = subprocess.run(
        [backend_python, "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    installed = {line.split("==")[0].lower() for line in listed.split()}
    assert installed <= {name.lower() for name in ALLOWED}, installed


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_light_client_calls_a_server_without_server_extras(
    server: ConveyorServer,  # noqa: F811 - fixture
    backend_python: Path,
    tmp_path: Path,
) -> None:
    script = tmp_path / "backend.py"
    script.write_text(CLIENT_SCRIPT)
    process = await asyncio.create_subprocess_exec(
        str(backend_python),
        str(script),
        f"127.0.0.1:{server.port}",
        *SERVER_ONLY,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    # The base servicer offers no GetPolicySet: the call reached it and came back mapped.
    assert output.decode().strip() == "UNIMPLEMENTED"
