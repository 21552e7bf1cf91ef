"""The Kubernetes manifests in deploy/k8s/ are valid, render, and fit together.

Validated offline with kubernetes-validate (the API schemas it bundles, strict:
an unknown field fails) as files and as ``kubectl kustomize`` renders them;
the distributed training Job's launcher arguments are parsed by PyTorch's own
launcher parser, and its rendezvous names, ports, world size and volume are
checked against the Service, the Job and the claim they refer to.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from torch.distributed.run import config_from_args, get_args_parser

from conveyor.services.trainer.distributed import WORKER_MODULE

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def _documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


def _by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {document["kind"]: document for document in documents}
    assert len(kinds) == len(documents), "one resource of each kind expected"
    return kinds


def _validate(documents: list[dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.name)
def test_each_manifest_is_valid_kubernetes(manifest: Path) -> None:
    documents = _documents(manifest.read_text())
    assert documents
    _validate(documents)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in MANIFESTS]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_valid_manifests_with_the_image_set() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True
    ).stdout
    documents = _documents(rendered)
    _validate(documents)
    job = _by_kind(documents)["Job"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{image['newName']}:{image['newTag']}"


def test_the_ddp_job_runs_one_rank_per_pod_with_rendezvous_at_pod_zero() -> None:
    documents = [
        document for manifest in MANIFESTS for document in _documents(manifest.read_text())
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
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    job_dir = env["CONVEYOR_TRAINER_JOB_DIR"]["value"]
    command = [
        argument.replace("$(NODE_RANK)", "1").replace("$(CONVEYOR_TRAINER_JOB_DIR)", job_dir)
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

    # The job directory lies on the shared claim.
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (data,) = (name for name, volume in volumes.items() if "persistentVolumeClaim" in volume)
    assert volumes[data]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert job_dir.startswith(mounts[data] + "/")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
