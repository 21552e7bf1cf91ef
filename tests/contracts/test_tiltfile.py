"""The Tiltfile evaluates, and declares what local development needs.

Tilt cannot be installed here, so the Tiltfile runs in a Starlark interpreter
(starlark-pyo3) with Tilt's builtins recorded instead of executed; ``local()``
really runs its command, as Tilt would at load time.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import starlark

from conveyor.services import catalog
from conveyor.shared.ports import SERVICE_PORTS

REPO = Path(__file__).resolve().parents[2]


def evaluate_tiltfile(*, vault_installed: bool = False) -> dict[str, dict[str, Any]]:
    resources: dict[str, dict[str, Any]] = {}

    def local_resource(name: str, **options: Any) -> None:
        assert name not in resources, f"resource {name} declared twice"
        resources[name] = options

    def local(command: str, quiet: bool = False) -> str:
        if command.startswith("command -v vault"):
            return "/usr/bin/vault\n" if vault_installed else ""
        return subprocess.run(
            command, shell=True, cwd=REPO, check=True, capture_output=True, text=True
        ).stdout

    def probe(**options: Any) -> dict[str, Any]:
        return {"probe": options}

    def exec_action(command: list[str]) -> dict[str, Any]:
        return {"exec": command}

    def http_get_action(port: int, path: str = "/") -> dict[str, Any]:
        return {"port": port, "path": path}

    module = starlark.Module()
    for builtin in (local_resource, local, probe, exec_action, http_get_action):
        module.add_callable(builtin.__name__, builtin)
    module["TRIGGER_MODE_MANUAL"] = "manual"
    source = (REPO / "Tiltfile").read_text()
    ast = starlark.parse("Tiltfile", source, starlark.Dialect.extended())
    starlark.eval(module, ast, starlark.Globals.standard())
    return resources


def test_every_implemented_service_is_a_resource_after_generate() -> None:
    resources = evaluate_tiltfile()
    assert {"install", "generate", "test"} <= set(resources)
    assert resources["generate"]["cmd"] == "make protos"
    assert resources["test"]["auto_init"] is False
    services = [name for name in resources if name in catalog.ALL_SERVICES]
    assert services == list(catalog.IMPLEMENTED)
    for name in services:
        options = resources[name]
        port = SERVICE_PORTS[name]
        assert f"conveyor serve {name} --listen 127.0.0.1:{port}" in options["serve_cmd"]
        assert f"services/{name}" in options["deps"]
        assert options["resource_deps"]
        command = options["readiness_probe"]["probe"]["exec"]["exec"]
        assert command[-2:] == ["health", f"127.0.0.1:{port}"]


def test_secrets_come_from_local_key_files_without_vault() -> None:
    resources = evaluate_tiltfile(vault_installed=False)
    assert "vault" not in resources
    assert resources["credentials"]["cmd"].endswith("conveyor credentials --data-dir .data/tilt")
    for name in catalog.IMPLEMENTED:
        assert resources[name]["serve_env"] == {}


def test_a_vault_dev_server_backs_the_services_when_vault_is_installed() -> None:
    resources = evaluate_tiltfile(vault_installed=True)
    assert resources["vault"]["serve_cmd"].startswith("vault server -dev")
    assert resources["vault"]["readiness_probe"]["probe"]["http_get"]["port"] == 8200
    transit = resources["vault-transit"]
    assert transit["cmd"].startswith("vault secrets enable -path=transit transit")
    assert transit["resource_deps"] == ["vault"]
    assert "vault-transit" in resources["credentials"]["resource_deps"]
    for name in catalog.IMPLEMENTED:
        env = resources[name]["serve_env"]
        assert env["CONVEYOR_SECRETS_BACKEND"] == "vault"
        assert env["CONVEYOR_SECRETS_VAULT_ADDR"] == "http://127.0.0.1:8200"
    assert resources["credentials"]["env"]["CONVEYOR_SECRETS_BACKEND"] == "vault"
