"""The Tiltfile evaluates, and declares what development with Tilt needs.

Tilt cannot be installed here, so the Tiltfile runs in a Starlark interpreter
(starlark-pyo3) with Tilt's builtins recorded instead of executed. Each recorded
builtin has Tilt's own signature (its API reference), so an argument Tilt does
not take fails here as it would there. As in Tilt, ``local()`` and
``kustomize()`` really run their commands while the Tiltfile loads, except
``command -v <binary>``, which answers as if exactly the binaries a test names
were installed. Last, one service's serve command and readiness probe run for real.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import starlark
import yaml

from conveyor.services import catalog
from conveyor.shared.ports import SERVICE_PORTS
from conveyor.shared.settings import TelemetrySettings

REPO = Path(__file__).resolve().parents[2]
COLLECTOR_OTLP = "http://127.0.0.1:4317"
JAEGER_OTLP = "http://127.0.0.1:14317"
SERVICES = list(catalog.IMPLEMENTED)


@dataclass
class Tilt:
    """What one evaluation of the Tiltfile declared (arguments by Tilt's names)."""

    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``local_resource`` calls by name."""
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``docker_build`` calls by image reference."""
    manifests: list[dict[str, Any]] = field(default_factory=list)
    """The objects given to ``k8s_yaml``."""
    k8s: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``k8s_resource`` calls by resource name (``new_name``, else the workload)."""
    flags: dict[str, str] = field(default_factory=dict)
    """``config.define_*`` calls: flag name to the kind defined."""
    enabled: list[str] | None = None
    """The argument of ``config.set_enabled_resources``."""


class TiltfileFailedError(Exception):
    """The Tiltfile called ``fail()``."""


def evaluate_tiltfile(*, installed: Iterable[str] = (), args: dict[str, Any] | None = None) -> Tilt:
    """Evaluate the Tiltfile as ``tilt up -- <args>`` would, on a machine whose
    optional binaries (``vault``, ``otelcol-contrib``, ``jaeger`` …) are ``installed``."""
    tilt = Tilt()
    on_path = set(installed)
    given = dict(args or {})

    def local_resource(name: str, **options: Any) -> None:
        assert name not in tilt.resources, f"resource {name} declared twice"
        tilt.resources[name] = options

    def local(command: str, **options: Any) -> str:
        lookup = re.fullmatch(r"command -v (\S+) \|\| true", command)
        if lookup:
            return f"/usr/local/bin/{lookup[1]}\n" if lookup[1] in on_path else ""
        return _run(command)

    def kustomize(pathToDir: str, **options: Any) -> str:  # noqa: N803 - Tilt's name
        return _kustomize(pathToDir)

    def k8s_yaml(yaml: str, **options: Any) -> None:
        tilt.manifests.extend(_documents(yaml))

    def docker_build(ref: str, **options: Any) -> None:
        assert ref not in tilt.images, f"image {ref} built twice"
        tilt.images[ref] = options

    def k8s_resource(workload: str, new_name: str, **options: Any) -> None:
        name = new_name or workload
        assert name not in tilt.k8s, f"k8s resource {name} configured twice"
        tilt.k8s[name] = {"workload": workload, **options}

    def define(kind: str) -> Callable[..., None]:
        def define_flag(name: str, **options: Any) -> None:
            tilt.flags[name] = kind

        return define_flag

    def parse() -> dict[str, Any]:
        undefined = set(given) - set(tilt.flags)
        assert not undefined, f"Tilt refuses flags the Tiltfile does not define: {undefined}"
        return given

    def set_enabled_resources(resources: list[str]) -> None:
        tilt.enabled = resources

    def fail(msg: str) -> None:
        raise TiltfileFailedError(msg)

    recorders: dict[str, Callable[..., Any]] = {
        "local_resource": local_resource,
        "local": local,
        "kustomize": kustomize,
        "k8s_yaml": k8s_yaml,
        "decode_yaml_stream": lambda yaml: _documents(yaml),
        "docker_build": docker_build,
        "k8s_resource": k8s_resource,
        "fail": fail,
        "config.define_string": define("string"),
        "config.define_string_list": define("string_list"),
        "config.define_bool": define("bool"),
        "config.parse": parse,
        "config.set_enabled_resources": set_enabled_resources,
    }
    module = starlark.Module()
    for name, stub in TILT_BUILTINS.items():
        recorder = recorders.get(name, functools.partial(_value, name))
        module.add_callable(name.replace("config.", "_config_"), _bound(stub, recorder))
    module["TRIGGER_MODE_AUTO"] = "auto"
    module["TRIGGER_MODE_MANUAL"] = "manual"
    # Tilt's `config` is a module; to the Tiltfile a struct of the same functions is one.
    members = ", ".join(
        f"{name[len('config.') :]}=_config_{name[len('config.') :]}"
        for name in TILT_BUILTINS
        if name.startswith("config.")
    )
    structs = starlark.Globals.extended_by([starlark.LibraryExtension.StructType])
    starlark.eval(module, starlark.parse("prelude", f"config = struct({members})"), structs)
    source = (REPO / "Tiltfile").read_text()
    ast = starlark.parse("Tiltfile", source, starlark.Dialect.extended())
    try:
        starlark.eval(module, ast, starlark.Globals.standard())
    except starlark.StarlarkError as error:
        if "TiltfileFailedError" in str(error):
            raise TiltfileFailedError(str(error)) from error
        raise
    _check_dependencies(tilt)
    return tilt


def _bound(stub: Callable[..., None], recorder: Callable[..., Any]) -> Callable[..., Any]:
    """``recorder`` called with every argument by name, as Tilt's signature
    (``stub``) binds them: a TypeError for one Tilt does not take, the ones
    left out at Tilt's defaults."""
    signature = inspect.signature(stub)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return recorder(**bound.arguments)

    return call


def _value(builtin: str, **arguments: Any) -> dict[str, Any]:
    """What a value-making builtin (``probe``, ``port_forward`` …) returns here."""
    return {"builtin": builtin, **arguments}


@functools.cache
def _run(command: str) -> str:
    """``local()``: the command's output (the same for every evaluation of a run)."""
    return subprocess.run(
        command, shell=True, cwd=REPO, check=True, capture_output=True, text=True
    ).stdout


@functools.cache
def _kustomize(path: str) -> str:
    """``kustomize()``: Tilt runs kubectl's Kustomize when no kustomize binary is found."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    return subprocess.run(
        ["kubectl", "kustomize", str(REPO / path)], check=True, capture_output=True, text=True
    ).stdout


def _documents(text: str) -> list[dict[str, Any]]:
    """The objects of a YAML stream (``decode_yaml_stream``), parsed by libyaml."""
    return [document for document in yaml.load_all(text, Loader=yaml.CSafeLoader) if document]


def _check_dependencies(tilt: Tilt) -> None:
    """Resource names are unique, every dependency names a resource, none is circular."""
    assert not set(tilt.resources) & set(tilt.k8s)
    declared = {**tilt.resources, **tilt.k8s}
    for name, options in declared.items():
        for dependency in options["resource_deps"]:
            assert dependency in declared, f"{name} depends on undeclared {dependency}"
    for name in declared:
        assert name not in _dependencies(tilt, name), f"{name} depends on itself"


def _dependencies(tilt: Tilt, name: str) -> set[str]:
    """Everything ``name`` waits for, directly or not."""
    declared = {**tilt.resources, **tilt.k8s}
    seen: set[str] = set()
    pending = list(declared[name]["resource_deps"])
    while pending:
        dependency = pending.pop()
        if dependency not in seen:
            seen.add(dependency)
            pending.extend(declared[dependency]["resource_deps"])
    return seen


# Tilt's builtins as its API reference (docs.tilt.dev/api.html) declares them:
# parameter names and defaults. Only the signatures are used.
def _api_local_resource(  # Tilt's signature
    name: str,
    cmd: Any = "",
    deps: Any = None,
    trigger_mode: Any = "auto",
    resource_deps: Any = (),
    ignore: Any = (),
    auto_init: bool = True,
    serve_cmd: Any = "",
    cmd_bat: Any = "",
    serve_cmd_bat: Any = "",
    allow_parallel: bool = False,
    links: Any = (),
    tags: Any = (),
    env: Any = None,
    serve_env: Any = None,
    readiness_probe: Any = None,
    dir: str = "",
    serve_dir: str = "",
    labels: Any = (),
) -> None: ...


def _api_local(
    command: Any,
    quiet: bool = False,
    command_bat: Any = "",
    echo_off: bool = False,
    env: Any = None,
    dir: str = "",
    stdin: Any = None,
) -> None: ...


def _api_docker_build(
    ref: str,
    context: str,
    build_args: Any = None,
    dockerfile: str = "Dockerfile",
    dockerfile_contents: Any = "",
    live_update: Any = (),
    match_in_env_vars: bool = False,
    ignore: Any = (),
    only: Any = (),
    entrypoint: Any = (),
    target: str = "",
    ssh: Any = "",
    network: str = "",
    secret: Any = "",
    extra_tag: Any = "",
    container_args: Any = None,
    cache_from: Any = (),
    pull: bool = False,
    platform: str = "",
) -> None: ...


def _api_k8s_resource(
    workload: str = "",
    new_name: str = "",
    port_forwards: Any = (),
    extra_pod_selectors: Any = (),
    trigger_mode: Any = "auto",
    resource_deps: Any = (),
    objects: Any = (),
    auto_init: bool = True,
    pod_readiness: str = "",
    links: Any = (),
    labels: Any = (),
    discovery_strategy: str = "",
) -> None: ...


def _api_probe(
    initial_delay_secs: int = 0,
    timeout_secs: int = 1,
    period_secs: int = 10,
    success_threshold: int = 1,
    failure_threshold: int = 3,
    exec: Any = None,
    http_get: Any = None,
    tcp_socket: Any = None,
) -> None: ...


def _api_exec_action(command: list[str]) -> None: ...


def _api_http_get_action(
    port: int, host: str = "localhost", scheme: str = "http", path: str = ""
) -> None: ...


def _api_tcp_socket_action(port: int, host: str = "localhost") -> None: ...


def _api_port_forward(
    local_port: int,
    container_port: int | None = None,
    name: str | None = None,
    link_path: str | None = None,
    host: str | None = None,
) -> None: ...


def _api_link(url: str, name: str | None = None) -> None: ...


def _api_kustomize(pathToDir: str, kustomize_bin: str | None = None) -> None: ...  # noqa: N803


def _api_k8s_yaml(yaml: Any, allow_duplicates: bool = False) -> None: ...


def _api_decode_yaml_stream(yaml: Any) -> None: ...


def _api_fail(msg: str) -> None: ...


def _api_define(name: str, args: bool = False, usage: str = "") -> None: ...


def _api_parse() -> None: ...


def _api_set_enabled_resources(resources: list[str]) -> None: ...


TILT_BUILTINS: dict[str, Callable[..., None]] = {
    "local_resource": _api_local_resource,
    "local": _api_local,
    "docker_build": _api_docker_build,
    "k8s_resource": _api_k8s_resource,
    "probe": _api_probe,
    "exec_action": _api_exec_action,
    "http_get_action": _api_http_get_action,
    "tcp_socket_action": _api_tcp_socket_action,
    "port_forward": _api_port_forward,
    "link": _api_link,
    "kustomize": _api_kustomize,
    "k8s_yaml": _api_k8s_yaml,
    "decode_yaml_stream": _api_decode_yaml_stream,
    "fail": _api_fail,
    "config.define_string": _api_define,
    "config.define_string_list": _api_define,
    "config.define_bool": _api_define,
    "config.parse": _api_parse,
    "config.set_enabled_resources": _api_set_enabled_resources,
}


# --- local mode: `tilt up` -------------------------------------------------------


def test_every_implemented_service_is_a_local_resource_after_the_contracts() -> None:
    tilt = evaluate_tiltfile()
    assert {"install", "protos", "credentials", "test"} <= set(tilt.resources)
    assert tilt.resources["protos"]["cmd"] == "make protos"
    assert tilt.resources["protos"]["resource_deps"] == ["install"]
    assert tilt.resources["test"]["auto_init"] is False
    assert tilt.resources["test"]["trigger_mode"] == "manual"
    assert [name for name in tilt.resources if name in catalog.ALL_SERVICES] == SERVICES
    assert not tilt.images
    assert not tilt.k8s
    assert not tilt.manifests
    for previous, name in zip(["credentials", *SERVICES], SERVICES, strict=False):
        options = tilt.resources[name]
        port = SERVICE_PORTS[name]
        assert options["serve_cmd"] == (
            f".venv/bin/conveyor serve {name} --listen 127.0.0.1:{port} --data-dir .data/tilt"
        )
        assert f"services/{name}" in options["deps"]
        assert "shared" in options["deps"]
        assert options["resource_deps"] == [previous]  # policy first, then registry …
        assert "protos" in _dependencies(tilt, name)
        assert options["labels"] == ["services"]
        probe = options["readiness_probe"]
        assert probe["exec"]["command"] == [".venv/bin/conveyor", "health", f"127.0.0.1:{port}"]
        # `conveyor health` takes seconds to start; Tilt's default 1 s would fail it.
        assert probe["timeout_secs"] >= 5
    assert "policies" in tilt.resources["policy"]["deps"]


def test_flags_are_the_mode_and_the_resources_to_run() -> None:
    assert evaluate_tiltfile().flags == {"mode": "string", "to-run": "string_list"}
    assert evaluate_tiltfile().enabled == []  # every resource
    assert evaluate_tiltfile(args={"to-run": ["policy"]}).enabled == ["policy"]
    with pytest.raises(TiltfileFailedError, match="--mode is 'local' or 'k8s'"):
        evaluate_tiltfile(args={"mode": "docker"})


def test_with_nothing_installed_secrets_are_local_and_no_trace_is_exported() -> None:
    tilt = evaluate_tiltfile()
    assert not {"vault", "vault-transit", "otel-collector", "jaeger"} & set(tilt.resources)
    assert tilt.resources["credentials"]["cmd"] == (
        ".venv/bin/conveyor credentials --data-dir .data/tilt"
    )
    assert tilt.resources["credentials"]["resource_deps"] == ["protos"]
    for name in SERVICES:
        assert tilt.resources[name]["serve_env"] == {}


def test_a_vault_dev_server_backs_the_services_when_vault_is_installed() -> None:
    tilt = evaluate_tiltfile(installed=["vault"])
    vault = tilt.resources["vault"]
    assert vault["serve_cmd"].startswith("vault server -dev ")
    assert vault["readiness_probe"]["http_get"]["port"] == 8200
    transit = tilt.resources["vault-transit"]
    assert transit["cmd"].startswith("vault secrets enable -path=transit transit")
    assert transit["resource_deps"] == ["vault"]
    assert "vault-transit" in tilt.resources["credentials"]["resource_deps"]
    assert tilt.resources["credentials"]["env"]["CONVEYOR_SECRETS_BACKEND"] == "vault"
    for name in SERVICES:
        env = tilt.resources[name]["serve_env"]
        assert env["CONVEYOR_SECRETS_BACKEND"] == "vault"
        assert env["CONVEYOR_SECRETS_VAULT_ADDR"] == "http://127.0.0.1:8200"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


@pytest.mark.parametrize("collector", ["otelcol-contrib", "otelcol"])
def test_services_trace_to_the_collector_which_forwards_to_jaeger(
    collector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tilt = evaluate_tiltfile(installed=[collector, "jaeger"])
    jaeger = tilt.resources["jaeger"]
    assert jaeger["serve_cmd"] == "jaeger --config deploy/local/jaeger.yaml"
    assert jaeger["labels"] == ["telemetry"]
    assert jaeger["links"][0]["url"] == "http://127.0.0.1:16686"
    otelcol = tilt.resources["otel-collector"]
    configs = _config_files(otelcol["serve_cmd"], collector)
    assert configs == [
        "deploy/local/otel-collector.yaml",
        "deploy/local/otel-collector-jaeger.yaml",
    ]
    assert otelcol["deps"] == configs  # a changed configuration restarts it
    assert otelcol["resource_deps"] == ["jaeger"]
    pipeline = _collector_config(configs)
    assert _otlp_grpc_port(pipeline) == _probed_port(otelcol) == 4317
    (exporter,) = pipeline["service"]["pipelines"]["traces"]["exporters"]
    jaeger_config = yaml.safe_load((REPO / "deploy/local/jaeger.yaml").read_text())
    jaeger_port = _otlp_grpc_port(jaeger_config)
    assert pipeline["exporters"][exporter]["endpoint"] == f"127.0.0.1:{jaeger_port}"
    assert _probed_port(jaeger) == jaeger_port == 14317
    for name in SERVICES:
        options = tilt.resources[name]
        assert "otel-collector" in options["resource_deps"]
        assert options["serve_env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == COLLECTOR_OTLP
    # The services read it as their collector's address.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", COLLECTOR_OTLP)
    assert TelemetrySettings().otlp_endpoint == COLLECTOR_OTLP


def test_a_collector_without_jaeger_writes_the_spans_to_its_log() -> None:
    tilt = evaluate_tiltfile(installed=["otelcol-contrib"])
    assert "jaeger" not in tilt.resources
    otelcol = tilt.resources["otel-collector"]
    configs = _config_files(otelcol["serve_cmd"], "otelcol-contrib")
    assert configs == ["deploy/local/otel-collector.yaml"]
    assert otelcol["resource_deps"] == []
    pipeline = _collector_config(configs)
    assert pipeline["service"]["pipelines"]["traces"]["exporters"] == ["debug"]
    for name in SERVICES:
        assert tilt.resources[name]["serve_env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == COLLECTOR_OTLP


@pytest.mark.parametrize("jaeger", ["jaeger", "jaeger-all-in-one"])
def test_with_jaeger_alone_the_services_export_straight_to_it(jaeger: str) -> None:
    tilt = evaluate_tiltfile(installed=[jaeger])
    assert "otel-collector" not in tilt.resources
    serve = shlex.split(tilt.resources["jaeger"]["serve_cmd"])
    assert serve[0] == jaeger
    if jaeger == "jaeger-all-in-one":  # v1: flags, not a configuration file
        assert "--collector.otlp.grpc.host-port=127.0.0.1:14317" in serve
        assert "--query.http-server.host-port=127.0.0.1:16686" in serve
    else:
        config = yaml.safe_load((REPO / "deploy/local/jaeger.yaml").read_text())
        assert _otlp_grpc_port(config) == 14317
        assert config["extensions"]["jaeger_query"]["http"]["endpoint"] == "127.0.0.1:16686"
    assert _probed_port(tilt.resources["jaeger"]) == 14317
    for name in SERVICES:
        options = tilt.resources[name]
        assert "jaeger" in options["resource_deps"]
        assert options["serve_env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == JAEGER_OTLP


def test_the_local_collector_and_jaeger_configurations_are_complete() -> None:
    """Every component a pipeline names is defined, and no two listen on one port."""
    collector = _collector_config(
        ["deploy/local/otel-collector.yaml", "deploy/local/otel-collector-jaeger.yaml"]
    )
    jaeger = yaml.safe_load((REPO / "deploy/local/jaeger.yaml").read_text())
    for config in (collector, jaeger):
        for pipeline in config["service"]["pipelines"].values():
            for kind in ("receivers", "processors", "exporters"):
                assert set(pipeline[kind]) <= set(config[kind]), kind
        assert set(config["service"].get("extensions", [])) <= set(config.get("extensions", {}))
        assert config["service"]["telemetry"]["metrics"]["level"] == "none"  # no :8888
    collector_ports = set(_ports(collector))
    jaeger_ports = set(_ports(jaeger))
    assert not collector_ports & jaeger_ports
    assert all(address.startswith("127.0.0.1:") for address in _ports(collector) + _ports(jaeger))


# --- k8s mode: `tilt up -- --mode=k8s` ------------------------------------------


def test_k8s_mode_applies_the_dev_overlay_with_an_image_per_service() -> None:
    tilt = evaluate_tiltfile(args={"mode": "k8s"}, installed=["vault", "otelcol-contrib", "jaeger"])
    assert set(tilt.resources) == {"install", "protos", "test"}  # no local services
    rendered = {(d["kind"], d["metadata"]["name"]) for d in tilt.manifests}
    assert ("Namespace", "conveyor-dev") in rendered
    used = _images_in(tilt.manifests)
    targets = _dockerfile_targets()
    assert set(tilt.images) == {f"conveyor/{name}" for name in SERVICES}
    for ref, build in tilt.images.items():
        assert ref in used, f"{ref} is not an image of the manifests"
        assert build["context"] == "."
        assert build["dockerfile"] == "deploy/Dockerfile"
        assert build["target"] == ref.removeprefix("conveyor/")
        assert build["target"] in targets
        assert not build["live_update"]
        for path in build["only"]:
            assert (REPO / path).exists(), path
    # The image's build context holds whatever the Dockerfile copies.
    for source in _dockerfile_sources():
        assert any(source == path or source.startswith(f"{path}/") for path in build["only"])


def test_k8s_mode_has_a_resource_per_workload_with_its_ports_forwarded() -> None:
    tilt = evaluate_tiltfile(args={"mode": "k8s"})
    workloads = {
        d["metadata"]["name"]: d for d in tilt.manifests if d["kind"] in {"Deployment", "Job"}
    }
    configured = {options["workload"]: name for name, options in tilt.k8s.items()}
    assert set(configured) - {""} == set(workloads)
    for service in SERVICES:
        assert configured[f"conveyor-{service}"] == service
        options = tilt.k8s[service]
        forwards = {(f["local_port"], f["container_port"]) for f in options["port_forwards"]}
        port = SERVICE_PORTS[service]
        assert (port, port) in forwards
        container_ports = {
            p["containerPort"]
            for c in workloads[f"conveyor-{service}"]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert {container for _, container in forwards} <= container_ports
        assert options["labels"] == ["services"]
    # Policy first, registry next, the rest after the registry.
    assert not set(SERVICES) & _dependencies(tilt, "policy")
    assert "policy" in tilt.k8s["registry"]["resource_deps"]
    for service in set(SERVICES) - {"policy", "registry"}:
        assert "registry" in _dependencies(tilt, service)
    assert {"k8s-setup", "protos"} <= _dependencies(tilt, "policy")
    assert tilt.k8s["trainer-ddp"]["auto_init"] is False


def test_k8s_mode_applies_every_other_object_first_as_one_resource() -> None:
    tilt = evaluate_tiltfile(args={"mode": "k8s"})
    # Tilt's object selectors ("name:kind", lower case) must each name exactly one
    # object, and none that Tilt already gave a resource: workloads and Services.
    selectors = tilt.k8s["k8s-setup"]["objects"]
    names = [f"{d['metadata']['name']}:{d['kind']}".lower() for d in tilt.manifests]
    for selector in selectors:
        assert names.count(selector) == 1, selector
    kinds = {selector.split(":")[1] for selector in selectors}
    assert not kinds & {"deployment", "job", "service"}
    assert "conveyor-dev:namespace" in selectors
    unresourced = {
        f"{d['metadata']['name']}:{d['kind']}".lower()
        for d in tilt.manifests
        if d["kind"] not in {"Deployment", "Job", "Service"}
    }
    assert set(selectors) == unresourced
    for name in tilt.k8s:
        if name != "k8s-setup":
            assert "k8s-setup" in _dependencies(tilt, name), name


# --- the commands run --------------------------------------------------------------


def test_a_service_starts_with_its_tilt_command_and_passes_its_readiness_probe(
    tmp_path: Path,
) -> None:
    """The policy service's serve command, on a free port and a fresh data
    directory, answers its readiness probe SERVING within the probe's timeout."""
    resource = evaluate_tiltfile().resources["policy"]
    serve = shlex.split(resource["serve_cmd"])
    probe = resource["readiness_probe"]
    address = _option(serve, "--listen")
    assert probe["exec"]["command"][-1] == address
    port = _free_port()
    ours = f"127.0.0.1:{port}"
    serve = _with_option(_with_option(serve, "--listen", ours), "--data-dir", str(tmp_path))
    health = [*probe["exec"]["command"][:-1], ours]
    # No load balancer to drain from here: stop at once on SIGTERM.
    env = {**os.environ, **resource["serve_env"], "CONVEYOR_POLICY_SHUTDOWN_DELAY": "PT0S"}
    log = tmp_path / "policy.log"
    with log.open("wb") as output:
        server = subprocess.Popen(serve, cwd=REPO, env=env, stdout=output, stderr=output)
    try:
        _wait_for_port(port, server, log, timeout_s=15)
        answer = subprocess.run(
            health, cwd=REPO, env=env, capture_output=True, text=True,
            timeout=probe["timeout_secs"],
        )  # fmt: skip
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == f"{ours}: SERVING"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0, log.read_text()[-4000:]


# --- helpers ---------------------------------------------------------------------------


def _config_files(command: str, binary: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == binary
    assert words[1::2] == ["--config"] * (len(words) // 2)
    files = words[2::2]
    for path in files:
        assert (REPO / path).is_file(), path
    return files


def _collector_config(files: list[str]) -> dict[str, Any]:
    """The collector's configuration from several --config files: maps merged,
    the later file's lists and values replacing the earlier's."""
    merged: dict[str, Any] = {}
    for path in files:
        _merge(merged, yaml.safe_load((REPO / path).read_text()))
    return merged


def _merge(into: dict[str, Any], overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _otlp_grpc_port(config: dict[str, Any]) -> int:
    endpoint: str = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    return int(endpoint.rsplit(":", 1)[1])


def _probed_port(resource: dict[str, Any]) -> int:
    action = resource["readiness_probe"]["tcp_socket"]
    assert action["host"] == "127.0.0.1"
    port: int = action["port"]
    return port


def _ports(config: Any) -> list[str]:
    """Every ``endpoint: host:port`` a configuration listens on."""
    found: list[str] = []
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "exporters":
                continue  # where it sends, not where it listens
            if key == "endpoint" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_ports(value))
    elif isinstance(config, list):
        for value in config:
            found.extend(_ports(value))
    return found


def _images_in(manifests: list[dict[str, Any]]) -> set[str]:
    """Every container image of the manifests, without its tag."""
    images = set()
    for document in manifests:
        spec = document.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            images.add(container["image"].rsplit(":", 1)[0])
    return images


def _dockerfile_targets() -> set[str]:
    text = (REPO / "deploy/Dockerfile").read_text()
    return set(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.MULTILINE))


def _dockerfile_sources() -> set[str]:
    """The repository paths deploy/Dockerfile copies from its build context."""
    text = (REPO / "deploy/Dockerfile").read_text()
    sources: set[str] = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        words = [w for w in line.split() if not w.startswith("--")]
        sources.update(w.rstrip("/") for w in words[:-1])
    return sources


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _with_option(words: list[str], name: str, value: str) -> list[str]:
    index = words.index(name) + 1
    return [*words[:index], value, *words[index + 1 :]]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, server: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"the server exited: {log.read_text()[-4000:]}"
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"not listening after {timeout_s} s"
        time.sleep(0.1)


def test_the_readme_documents_every_local_resource_command() -> None:
    """Each command Tilt runs, as the README's Local development section gives it
    (``<service>`` and ``<port>`` for the services' own)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Local development") : readme.index("## Tests")]
    prose = " ".join(section.split())  # commands may wrap across lines
    tilt = evaluate_tiltfile(installed=["vault", "otelcol-contrib", "jaeger"])
    documented = []
    for name, options in tilt.resources.items():
        command = options.get("serve_cmd") or options.get("cmd")
        assert isinstance(command, str), name
        command = command.removeprefix(".venv/bin/")
        if name in catalog.ALL_SERVICES:
            command = command.replace(f" {name} ", " <service> ").replace(
                f":{SERVICE_PORTS[name]}", ":<port>"
            )
        # The README names a command by its program and first arguments; options
        # such as a dev server's listen address are described in the prose.
        words = command.split()
        head = " ".join(words[: 4 if words[0] == "conveyor" else 3])
        assert head in prose, f"{name}: README does not show `{head}`"
        documented.append(name)
    assert {"install", "protos", "credentials", "vault", "otel-collector", "jaeger"} <= set(
        documented
    )
    assert "tilt up -- --mode=k8s" in prose
