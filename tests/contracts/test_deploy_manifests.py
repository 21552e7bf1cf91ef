"""The Kubernetes manifests in deploy/k8s/ are valid, render, and fit together.

``kubectl kustomize`` renders the base and every overlay; kubernetes-validate
checks every object against the API schemas it bundles (strict: an unknown
field fails). Then the rendered objects are held to what the suite needs:
each service's Deployment, Service, ServiceAccount and PodDisruptionBudget,
gRPC health probes on its port, non-root containers, Vault Agent annotations,
inference's autoscaler and (prod) GPU, NetworkPolicies that allow exactly the
calls of the data flow below, and environment variables that are real
settings of the service they are set on (checked against its settings class,
and loaded by it). The distributed training Job's launcher arguments are
parsed by PyTorch's own launcher parser.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url
from torch.distributed.run import config_from_args, get_args_parser

from conveyor.services import catalog
from conveyor.services.cli import _parser as conveyor_parser
from conveyor.services.trainer.distributed import WORKER_MODULE
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.ports import SERVICE_PORTS
from conveyor.shared.secrets.settings import SecretStoreSettings
from conveyor.shared.settings import ClientSettings, ServiceSettings, TelemetrySettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
RENDERS = ("base", "overlays/dev", "overlays/prod")
# The base's Kubernetes objects (not its kustomization or the collector's config).
MANIFESTS = sorted(
    p.name
    for p in BASE.glob("*.yaml")
    if p.name not in ("kustomization.yaml", "otel-collector-config.yaml")
)
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
DDP_FILES = ("trainer-data-pvc.yaml", "trainer-ddp-job.yaml")
COLLECTOR = "otel-collector"
OTLP_PORT = 4317
GPU = "nvidia.com/gpu"

SERVICES = tuple(SERVICE_PORTS)

# The data flow, as gRPC calls between the services (../shared/DESIGN.md; each
# server opens a channel to exactly these peers): caller -> callees. Every
# service but policy asks policy to authorize each call it serves.
CALLS: dict[str, set[str]] = {
    "registry": {"policy"},  # Authorize, EvaluatePromotion
    "trainer": {"registry", "policy"},  # registration
    "optimizer": {"registry", "policy"},  # sources and results
    "inference": {"registry", "monitor", "policy"},  # versions, WatchAliases; prediction log
    "monitor": {"registry", "trainer", "policy"},  # references, rollbacks; retraining
    "explainer": {"registry", "inference", "policy"},  # versions, reports; ModelInfer
    "policy": {"registry"},  # promotion facts
}
# Prometheus /metrics (9100 + the last digit of the gRPC port) where served.
METRICS_PORTS = {"inference": 9104, "monitor": 9105}


# -- rendering and validation -------------------------------------------------


def _documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization, rendered by ``kubectl kustomize`` (side by side)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    processes = {
        name: subprocess.Popen(
            ["kubectl", "kustomize", str(K8S / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in RENDERS
    }
    rendered = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, f"kubectl kustomize {name}: {err}"
        rendered[name] = _documents(out)
    return rendered


@pytest.fixture(scope="module")
def cached_schemas() -> Iterator[None]:
    """kubernetes-validate reads and parses its schema files on every call
    (most of its time); cache them while this module runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            functools.cache(kubernetes_validate.utils.schema_contents),
        )
        yield


def _validate(documents: list[dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def _objects(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


@functools.cache
def _kustomization(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
    return loaded


@pytest.mark.usefixtures("cached_schemas")
@pytest.mark.parametrize("name", MANIFESTS)
def test_each_base_manifest_is_valid_kubernetes(name: str) -> None:
    documents = _documents((BASE / name).read_text())
    assert documents
    _validate(documents)


def test_the_base_lists_every_manifest() -> None:
    assert sorted(_kustomization("base")["resources"]) == MANIFESTS


@pytest.mark.usefixtures("cached_schemas")
def test_every_render_is_valid_kubernetes(renders: dict[str, list[dict[str, Any]]]) -> None:
    unique = {json.dumps(doc, sort_keys=True): doc for docs in renders.values() for doc in docs}
    _validate(list(unique.values()))


def _images(kustomization: str) -> dict[str, dict[str, Any]]:
    return {image["name"]: image for image in _kustomization(kustomization).get("images", [])}


def _image(reference: str, kustomization: str) -> str:
    name = reference.split(":", 1)[0]
    image = _images(kustomization).get(name)
    if image is None:
        return reference
    return f"{image.get('newName', name)}:{image['newTag']}"


@pytest.mark.parametrize("render", RENDERS)
def test_every_image_is_the_one_its_kustomization_sets(
    renders: dict[str, list[dict[str, Any]]], render: str
) -> None:
    # The base names each image; an overlay renames the base's result.
    expected = {_image(_image(name, "base"), render) for name in _images("base")}
    assert len(expected) == len(_images("base"))
    for pod in _pods(renders[render]).values():
        for container in _containers(pod):
            if container["image"].startswith("postgres:"):
                continue  # dev's throwaway database names its own image
            assert container["image"] in expected


# -- every service's objects ---------------------------------------------------


def _pods(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod templates of the Deployments and Jobs, by their owner's name."""
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]
        for doc in documents
        if doc["kind"] in ("Deployment", "Job")
    }


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    containers: list[dict[str, Any]] = spec["containers"] + spec.get("initContainers", [])
    return containers


def _service_container(documents: list[dict[str, Any]], service: str) -> dict[str, Any]:
    deployment = _objects(documents, "Deployment")[f"conveyor-{service}"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("render", RENDERS)
@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_its_objects(
    renders: dict[str, list[dict[str, Any]]], render: str, service: str
) -> None:
    documents = renders[render]
    name = f"conveyor-{service}"
    port = SERVICE_PORTS[service]
    deployment = _objects(documents, "Deployment")[name]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/part-of"] == "conveyor"

    assert pod["spec"]["serviceAccountName"] in _objects(documents, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == name

    service_object = _objects(documents, "Service")[name]
    assert service_object["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service_object["spec"]["ports"]}
    assert ports["grpc"]["port"] == port

    budget = _objects(documents, "PodDisruptionBudget")[name]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()

    (container,) = pod["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports["grpc"] == port
    # `conveyor serve` listens where --listen says (it sets `listen` itself).
    arguments = conveyor_parser().parse_args(container["args"])
    assert (arguments.command, arguments.service) == ("serve", service)
    assert arguments.listen == f"0.0.0.0:{port}"

    if service in METRICS_PORTS:
        assert container_ports["metrics"] == METRICS_PORTS[service] == 9100 + port % 10
        assert ports["metrics"]["port"] == METRICS_PORTS[service]
        env = _env(container)
        assert env[f"CONVEYOR_{service.upper()}_METRICS_LISTEN"]["value"] == (
            f"0.0.0.0:{METRICS_PORTS[service]}"
        )
    else:
        assert "metrics" not in container_ports


@pytest.mark.parametrize("render", RENDERS)
@pytest.mark.parametrize("service", SERVICES)
def test_probes_are_grpc_health_checks_on_the_service_port(
    renders: dict[str, list[dict[str, Any]]], render: str, service: str
) -> None:
    container = _service_container(renders[render], service)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]
        # The whole server's health (grpc.health.v1, service ""), as kubelet asks.
        assert check["grpc"] == {"port": SERVICE_PORTS[service]}, probe
        assert check.keys().isdisjoint({"httpGet", "tcpSocket", "exec"})


@pytest.mark.parametrize("render", RENDERS)
def test_every_pod_runs_as_non_root_with_resources(
    renders: dict[str, list[dict[str, Any]]], render: str
) -> None:
    for name, pod in _pods(renders[render]).items():
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] != 0, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in _containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context.get("runAsUser", security["runAsUser"]) != 0, name
            resources = container["resources"]
            assert resources["requests"].keys() >= {"cpu", "memory"}, name
            assert "memory" in resources["limits"], name


@pytest.mark.parametrize("render", RENDERS)
@pytest.mark.parametrize("service", SERVICES)
def test_vault_agent_logs_in_as_the_service_account(
    renders: dict[str, list[dict[str, Any]]], render: str, service: str
) -> None:
    deployment = _objects(renders[render], "Deployment")[f"conveyor-{service}"]
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["vault.hashicorp.com/agent-inject"] == "true"
    assert annotations["vault.hashicorp.com/role"] == pod["spec"]["serviceAccountName"]
    # The token the image's entrypoint hands over as CONVEYOR_SECRETS_VAULT_TOKEN.
    assert annotations["vault.hashicorp.com/agent-inject-token"] == "true"
    assert "/vault/secrets/token" in (DEPLOY / "docker-entrypoint.sh").read_text()
    assert pod["spec"]["automountServiceAccountToken"] is True  # the agent's login
    env = _env(_service_container(renders[render], service))
    assert env["CONVEYOR_SECRETS_BACKEND"]["value"] == "vault"


# -- inference: autoscaler and GPU ---------------------------------------------


@pytest.mark.parametrize("render", RENDERS)
def test_inference_scales_with_an_autoscaler(
    renders: dict[str, list[dict[str, Any]]], render: str
) -> None:
    documents = renders[render]
    deployment = _objects(documents, "Deployment")["conveyor-inference"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    (autoscaler,) = _objects(documents, "HorizontalPodAutoscaler").values()
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "conveyor-inference")
    spec = autoscaler["spec"]
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    if render == "overlays/prod":
        assert spec["minReplicas"] >= 2  # one may be disrupted at a time
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu"
    container = _service_container(documents, "inference")
    assert "cpu" in container["resources"]["requests"]  # utilization needs a request


@pytest.mark.parametrize("render", RENDERS)
def test_inference_gets_a_gpu_in_prod_only(
    renders: dict[str, list[dict[str, Any]]], render: str
) -> None:
    documents = renders[render]
    pod = _objects(documents, "Deployment")["conveyor-inference"]["spec"]["template"]["spec"]
    container = _service_container(documents, "inference")
    if render != "overlays/prod":
        assert GPU not in container["resources"].get("limits", {})
        assert "nodeSelector" not in pod
        return
    assert container["resources"]["limits"][GPU] == 1
    assert pod["nodeSelector"] == {f"{GPU}.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for other, other_pod in _pods(documents).items():
        if other != "conveyor-inference":
            for each in _containers(other_pod):
                assert GPU not in each["resources"].get("limits", {}), other


# -- environment variables are real settings ----------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def _env_names(settings_class: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (nested settings read
    their own, and are left out)."""
    prefix = settings_class.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, field in settings_class.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            continue
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def _settings_class(service: str) -> type[ServiceSettings]:
    settings_class: type[ServiceSettings] = catalog.load(service).settings_class
    return settings_class


def _server_env_names(service: str) -> set[str]:
    """What a server of ``service`` reads: its settings, with their auth and
    secret store settings, the telemetry settings, and the TLS and deadline of
    its channels to peers (``ClientSettings`` without the CLI's addresses and
    token)."""
    client = {
        name
        for name in _env_names(ClientSettings)
        if not name.endswith("_ADDR") and name not in ("CONVEYOR_TOKEN", "CONVEYOR_TOKEN_FILE")
    }
    return (
        _env_names(_settings_class(service))
        | _env_names(AuthSettings)
        | _env_names(SecretStoreSettings)
        | _env_names(TelemetrySettings)
        | client
    )


def test_the_data_flow_matches_the_servers_peer_settings() -> None:
    for service in SERVICES:
        fields = _settings_class(service).model_fields
        peers = {name.removesuffix("_addr") for name in fields if name.endswith("_addr")}
        if service != "policy":  # policy decides its own calls locally
            peers.add("policy")  # AuthSettings.policy_addr: Authorize on every call
        assert peers == CALLS[service], service


@pytest.mark.parametrize("render", RENDERS)
@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_is_a_setting_of_its_service(
    renders: dict[str, list[dict[str, Any]]],
    render: str,
    service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = renders[render]
    container = _service_container(documents, service)
    env = _env(container)
    unknown = set(env) - _server_env_names(service)
    assert not unknown, f"not settings of {service}: {sorted(unknown)}"

    # The peers it calls, at their Services, and no others.
    services = _objects(documents, "Service")
    peers = {f"CONVEYOR_{peer.upper()}_ADDR": peer for peer in SERVICES}
    addresses = {peers[name]: v["value"] for name, v in env.items() if name in peers}
    assert set(addresses) == CALLS[service]
    for peer, address in addresses.items():
        host, _, port = address.rpartition(":")
        assert host == f"conveyor-{peer}", peer
        assert host in services, peer
        assert int(port) == SERVICE_PORTS[peer], peer
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
    assert endpoint == f"http://{COLLECTOR}:{OTLP_PORT}"

    # The service writes below its data directory, a mounted volume.
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert env[f"CONVEYOR_{service.upper()}_DATA_DIR"]["value"] in mounts

    # Its settings class loads them. Values from Secrets stand in; the Vault
    # token comes from the Vault Agent through the image's entrypoint.
    for name, variable in env.items():
        if "value" in variable:
            value = variable["value"]
        elif name.endswith("_DATABASE_URL"):
            value = "postgresql+psycopg://conveyor:secret@db:5432/conveyor"
        else:
            value = "from-a-secret"
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONVEYOR_SECRETS_VAULT_TOKEN", "from-the-vault-agent")
    settings = _settings_class(service)(listen=f"0.0.0.0:{SERVICE_PORTS[service]}")
    assert settings.data_dir == Path("/data")
    assert settings.secrets.backend == "vault"
    assert settings.shutdown_delay + settings.shutdown_grace < _grace_period(documents, service)
    TelemetrySettings()
    ClientSettings()


def _grace_period(documents: list[dict[str, Any]], service: str) -> timedelta:
    deployment = _objects(documents, "Deployment")[f"conveyor-{service}"]
    return timedelta(
        seconds=deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


@pytest.mark.parametrize("service", ["registry", "inference"])
def test_database_urls_come_from_secrets(
    renders: dict[str, list[dict[str, Any]]], service: str
) -> None:
    for render, documents in renders.items():
        env = _env(_service_container(documents, service))
        reference = env[f"CONVEYOR_{service.upper()}_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert reference["key"] == "url"
        if render != "overlays/dev":
            continue  # base and prod expect the operator's Secret
        # dev generates the Secret, for its own PostgreSQL.
        secret = _objects(documents, "Secret")[reference["name"]]
        url = make_url(base64.b64decode(secret["data"]["url"]).decode())
        assert url.drivername == "postgresql+psycopg"
        assert url.host in _objects(documents, "Service")
        assert url.port == 5432


# -- NetworkPolicies: the data flow, and nothing more --------------------------


def _selected_name(selector: dict[str, Any]) -> str | None:
    name: str | None = selector.get("matchLabels", {}).get("app.kubernetes.io/name")
    return name


def _edges(policies: dict[str, dict[str, Any]], direction: str) -> set[tuple[str, str, int]]:
    """(caller, callee, port) between Conveyor's services that the policies allow,
    read from the ingress rules (``from``) or egress rules (``to``)."""
    names = {f"conveyor-{service}": service for service in SERVICES}
    edges = set()
    for policy in policies.values():
        selected = names.get(_selected_name(policy["spec"]["podSelector"]) or "")
        if selected is None:
            continue
        for rule in policy["spec"].get(direction, []):
            peers = rule.get("from" if direction == "ingress" else "to", [])
            ports = [port["port"] for port in rule.get("ports", [])]
            for peer in peers:
                if "namespaceSelector" in peer or "ipBlock" in peer:
                    continue
                other = names.get(_selected_name(peer["podSelector"]) or "")
                if other is None:
                    continue
                for port in ports:
                    edges.add(
                        (other, selected, port)
                        if direction == "ingress"
                        else (selected, other, port)
                    )
    return edges


@pytest.mark.parametrize("render", RENDERS)
def test_network_policies_allow_exactly_the_data_flow(
    renders: dict[str, list[dict[str, Any]]], render: str
) -> None:
    documents = renders[render]
    policies = _objects(documents, "NetworkPolicy")
    flow = {
        (caller, callee, SERVICE_PORTS[callee])
        for caller, callees in CALLS.items()
        for callee in callees
    }
    assert _edges(policies, "ingress") == flow
    assert _edges(policies, "egress") == flow

    # Everything else is denied: a default deny for the namespace, and no rule
    # of a service's policy that admits any source or any port.
    deny = policies["conveyor-default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for service in SERVICES:
        policy = policies[f"conveyor-{service}"]["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        assert _selected_name(policy["podSelector"]) == f"conveyor-{service}"
        for rule in policy["ingress"]:
            assert rule.get("from"), service
            assert rule.get("ports"), service
        allowed_ports = {SERVICE_PORTS[service], METRICS_PORTS.get(service)}
        assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} <= allowed_ports
        for rule in policy["egress"]:
            assert rule.get("ports"), service
        # Traces to the collector.
        assert {
            "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": COLLECTOR}}}],
            "ports": [{"protocol": "TCP", "port": OTLP_PORT}],
        } in policy["egress"]

    collector = policies[COLLECTOR]["spec"]
    (ingress,) = collector["ingress"]
    (source,) = ingress["from"]
    assert source == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "conveyor"}}}
    assert ingress["ports"] == [{"protocol": "TCP", "port": OTLP_PORT}]


# -- the OpenTelemetry Collector -------------------------------------------------


@pytest.mark.parametrize("render", RENDERS)
def test_the_collector_runs_the_repository_config(
    renders: dict[str, list[dict[str, Any]]], render: str
) -> None:
    documents = renders[render]
    (config_map,) = (
        doc
        for name, doc in _objects(documents, "ConfigMap").items()
        if name.startswith("otel-collector-config-")
    )
    text = config_map["data"]["otel-collector.yaml"]
    # deploy/otel-collector.yaml (what the README names) is that same file.
    assert text == (DEPLOY / "otel-collector.yaml").read_text()
    config = yaml.safe_load(text)
    endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert endpoint == f"0.0.0.0:{OTLP_PORT}"

    deployment = _objects(documents, "Deployment")[COLLECTOR]
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert container["args"] == [f"--config={mount['mountPath']}/otel-collector.yaml"]
    health = config["extensions"]["health_check"]["endpoint"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert health == f"0.0.0.0:{ports['health']}"
    assert ports["otlp-grpc"] == OTLP_PORT
    service = _objects(documents, "Service")[COLLECTOR]
    assert [port["port"] for port in service["spec"]["ports"]] == [OTLP_PORT]
    assert COLLECTOR in _objects(documents, "PodDisruptionBudget")


# -- the container image ----------------------------------------------------------


def test_the_dockerfile_has_a_non_root_target_per_service() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = {stage: base for base, stage in re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.M)}
    runtime = dockerfile.split("AS runtime", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert "python:3.11-slim" in dockerfile
    for service, port in SERVICE_PORTS.items():
        assert stages[service] == "runtime", service
        assert stages[f"build-{service}"] == "builder", service
        body = dockerfile.split(f"AS {service}\n", 1)[1].split("\nFROM ", 1)[0]
        assert f"COPY --from=build-{service} /opt/venv /opt/venv" in body
        cmd = json.loads(re.search(r"^CMD (.+)$", body, re.M)[1])  # type: ignore[index]
        assert cmd == ["serve", service, "--listen", f"0.0.0.0:{port}"]
        build = dockerfile.split(f"AS build-{service}\n", 1)[1].split("\nFROM ", 1)[0]
        assert f"pip install -c constraints.txt '.[{service}]'" in build
    entrypoint = DEPLOY / "docker-entrypoint.sh"
    assert entrypoint.stat().st_mode & 0o111
    assert 'exec conveyor "$@"' in entrypoint.read_text()


# -- the distributed training Job ----------------------------------------------


def _by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {document["kind"]: document for document in documents}
    assert len(kinds) == len(documents), "one resource of each kind expected"
    return kinds


def test_the_ddp_job_runs_one_rank_per_pod_with_rendezvous_at_pod_zero() -> None:
    documents = [
        document for name in DDP_FILES for document in _documents((BASE / name).read_text())
    ]
    resources = _by_kind(documents)
    job, service, claim = resources["Job"], resources["Service"], resources["PersistentVolumeClaim"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]

    assert spec["completionMode"] == "Indexed"
    world_size = spec["completions"]
    assert spec["parallelism"] == world_size >= 2
    assert pod["restartPolicy"] == "Never"
    # The headless Service names every pod: {job}-{index}.{service}.
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()

    env = {variable["name"]: variable for variable in container["env"]}
    # The worker reads no Conveyor setting: only the launcher's placement.
    assert not [name for name in env if name.startswith(("CONVEYOR_", "OTEL_"))]
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    job_dir = env["JOB_DIR"]["value"]
    command = [
        argument.replace("$(NODE_RANK)", "1").replace("$(JOB_DIR)", job_dir)
        for argument in container["command"]
    ]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    # PyTorch's launcher reads the arguments as a static rendezvous at pod 0.
    config, program, arguments = config_from_args(get_args_parser().parse_args(command[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (world_size,) * 2 + (1,)
    assert config.rdzv_backend == "static"
    master = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    (port,) = service["spec"]["ports"]
    assert config.rdzv_endpoint == f"{master}:{port['port']}"
    assert config.rdzv_configs["rank"] == 1
    (container_port,) = container["ports"]
    assert port["targetPort"] == container_port["name"]
    assert container_port["containerPort"] == port["port"]
    # Every rank runs the worker module with the launcher's own interpreter.
    assert arguments == ["-u", "-m", WORKER_MODULE, job_dir]
    assert Path(program).name.startswith("python")

    # The job directory lies on the shared claim, in the trainer's data directory.
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (data,) = (name for name, volume in volumes.items() if "persistentVolumeClaim" in volume)
    assert volumes[data]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert job_dir.startswith(f"{mounts[data]}/trainer/jobs/")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}


def test_the_trainer_and_its_ddp_job_share_the_data_volume(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    for documents in renders.values():
        pods = _pods(documents)
        claims = [
            {
                v["persistentVolumeClaim"]["claimName"]
                for v in pods[name]["spec"]["volumes"]
                if "persistentVolumeClaim" in v
            }
            for name in ("conveyor-trainer", "conveyor-trainer-ddp")
        ]
        assert claims[0] == claims[1] == {"conveyor-trainer-data"}
        policies = _objects(documents, "NetworkPolicy")
        ranks = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "conveyor-trainer-ddp"}}}
        assert policies["conveyor-trainer-ddp"]["spec"]["ingress"] == [{"from": [ranks]}]
