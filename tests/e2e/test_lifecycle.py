"""The lifecycle of ``make run``, through the CLI, against a running suite.

``conveyor up`` starts all seven services as a new user's ``make run`` does (on
free ports: ``--base-port``); ``conveyor lifecycle`` then drives the model from
training to production and back with one ``conveyor`` command per step. The
test reads each step's outcome from the lifecycle's output and checks the state
it left behind through the services' own APIs: the registry's versions,
aliases and attachments, the policy service's decisions and audit chain,
inference's deployment and statistics, and the monitor's alert.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conveyor.inference.v1 import inference_messages_pb2 as inference_rpc
from conveyor.inference.v1 import inference_service_pb2_grpc
from conveyor.monitor.v1 import monitor_messages_pb2 as monitor_rpc
from conveyor.monitor.v1 import monitor_service_pb2_grpc
from conveyor.monitor.v1 import resources_pb2 as monitor_pb
from conveyor.oip.v2 import grpc_service_pb2 as oip
from conveyor.oip.v2 import grpc_service_pb2_grpc
from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services import catalog
from conveyor.services.lifecycle import TRAFFIC_ROWS, steps
from conveyor.shared.health import serving_status
from conveyor.shared.ports import SERVICE_PORTS
from tests.support.suite import free_base_port

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 180


@dataclass(frozen=True)
class Ran:
    """The suite's addresses and data, and what the lifecycle printed."""

    data_dir: Path
    addresses: dict[str, str]
    env: dict[str, str]
    exit_code: int
    output: str

    def step_output(self, number: int) -> str:
        """What step ``number`` printed (from its header to the next one)."""
        match = re.search(
            rf"── {number}/\d+ .*?(?=\n── \d+/|\nThe lifecycle|\Z)", self.output, re.S
        )
        assert match, f"step {number} is missing from the output:\n{self.output}"
        return match.group(0)

    def channel(self, service: str, user: str) -> grpc.Channel:
        token = (self.data_dir / "credentials" / f"{user}.token").read_text().strip()
        call = grpc.access_token_call_credentials(token)
        credentials = grpc.composite_channel_credentials(grpc.local_channel_credentials(), call)
        return grpc.secure_channel(self.addresses[service], credentials)


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    data_dir = tmp_path_factory.mktemp("lifecycle") / "data"
    base = free_base_port()
    first = min(SERVICE_PORTS.values())
    addresses = {
        name: f"127.0.0.1:{base + port - first + 1}" for name, port in SERVICE_PORTS.items()
    }
    env = {
        **os.environ,
        **{f"CONVEYOR_{name.upper()}_ADDR": address for name, address in addresses.items()},
        # Metrics ports are fixed by default; a test suite must not hold them.
        "CONVEYOR_INFERENCE_METRICS_LISTEN": "",
        "CONVEYOR_MONITOR_METRICS_LISTEN": "",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("CONVEYOR_TOKEN_FILE", None)
    conveyor = [sys.executable, "-m", "conveyor.services.cli"]
    up = subprocess.Popen(
        [
            *conveyor,
            "up",
            "--data-dir",
            str(data_dir),
            "--base-port",
            str(base),
            "--logs",
            str(data_dir / "logs"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:  # the announcement follows the last service's readiness
            lines.append(line)
            if line.startswith("A service that crashes is restarted"):
                break
        else:
            pytest.fail("conveyor up exited before announcing the suite:\n" + "".join(lines))
        lifecycle = subprocess.run(
            [*conveyor, "lifecycle", "--data-dir", str(data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # as a terminal shows them: interleaved
            text=True,
            timeout=600,
        )
        yield Ran(data_dir, addresses, env, lifecycle.returncode, lifecycle.stdout)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=60)
        finally:
            if up.poll() is None:
                up.kill()
                up.communicate()


def test_every_step_ends_as_expected(ran: Ran) -> None:
    plan = steps("cancer", Path("unused"))
    assert ran.exit_code == 0, ran.output
    assert f"The lifecycle completed: {len(plan)} steps, model cancer." in ran.output
    for number, step in enumerate(plan, 1):
        assert f"── {number}/{len(plan)}  {step.title}" in ran.output
    titles = {step.title: number for number, step in enumerate(plan, 1)}

    def output(fragment: str) -> str:
        (number,) = [n for title, n in titles.items() if fragment in title]
        return ran.step_output(number)

    assert "registered: models/cancer/versions/1" in output("train the breast-cancer MLP")
    optimised = output("optimise")
    assert "registered as models/cancer/versions/2" in optimised
    assert "registered as models/cancer/versions/3" in optimised
    assert "report:" in output("explain version 2")
    refused = output("try to promote the int8 version")
    assert "refused: moving production to models/cancer/versions/3 failed 1 promotion gate" in (
        refused
    )
    assert "✗ approval:" in refused
    assert "conveyor approve cancer/versions/3" in refused
    swapped = output("hot-swaps to version 3")
    assert "last swap: models/cancer/versions/2 -> models/cancer/versions/3 (succeeded" in swapped
    assert f"{TRAFFIC_ROWS:,} rows" in output("live traffic")
    assert "answered by version 3: 1,000" in output("live traffic")
    assert "firing" in output("raises the drift alert")
    assert "drift" in output("its drift report")
    assert "production -> models/cancer/versions/2 (was models/cancer/versions/3)" in (
        output("roll back")
    )
    assert "last swap: models/cancer/versions/3 -> models/cancer/versions/2" in (
        output("swaps back to version 2")
    )
    assert "Conveyor keeps serving cancer@production" in ran.output


def test_the_registry_holds_the_versions_reports_and_the_alias_history(ran: Ran) -> None:
    with ran.channel("registry", "erin") as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        versions = registry.ListModelVersions(
            registry_rpc.ListModelVersionsRequest(parent="models/cancer"), timeout=30
        ).model_versions
        formats = {v.name.rpartition("/")[2]: v.format for v in versions}
        assert formats == {
            "1": registry_pb.MODEL_FORMAT_TORCH_STATE_DICT,
            "2": registry_pb.MODEL_FORMAT_ONNX_FP32,
            "3": registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC,
        }
        for number in ("2", "3"):
            attachments = registry.ListAttachments(
                registry_rpc.ListAttachmentsRequest(parent=f"models/cancer/versions/{number}"),
                timeout=30,
            ).attachments
            kinds = {a.kind for a in attachments}
            assert registry_pb.ATTACHMENT_KIND_EXPLANATION_REPORT in kinds
        (production,) = [
            a
            for a in registry.ListAliases(
                registry_rpc.ListAliasesRequest(parent="models/cancer"), timeout=30
            ).aliases
            if a.name.endswith("/production")
        ]
        assert production.version == "models/cancer/versions/2"
        assert production.previous_version == "models/cancer/versions/3"
        assert production.revision == 3


def test_policy_recorded_the_refusal_the_approvals_and_an_intact_chain(ran: Ran) -> None:
    with ran.channel("policy", "sam") as channel:
        policy = policy_service_pb2_grpc.PolicyServiceStub(channel)
        verified = policy.VerifyAuditLog(policy_rpc.VerifyAuditLogRequest(), timeout=60)
        assert verified.verified, verified
        assert verified.checked_count > 0
        decisions = policy.ListDecisions(
            policy_rpc.ListDecisionsRequest(
                page_size=1000, filter='resource.name = "models/cancer/versions/3"'
            ),
            timeout=30,
        ).decisions
        gated = [d for d in decisions if d.gates]
        # The refusal (approval missing), then the promotion that passed.
        assert [d.outcome for d in gated] == [policy_pb.OUTCOME_DENY, policy_pb.OUTCOME_ALLOW]
        failed = [g.gate for g in gated[0].gates if g.outcome == policy_pb.GATE_OUTCOME_FAILED]
        assert failed == ["approval"]
        assert gated[0].principal.id == "erin"
        approvals = policy.ListApprovals(
            policy_rpc.ListApprovalsRequest(parent="models/cancer/versions/3"), timeout=30
        ).approvals
        assert [a.approver.id for a in approvals] == ["bob"]
    assert "audit log" in ran.step_output(len(steps("cancer", Path("unused"))) - 1)


def test_inference_served_the_traffic_and_the_monitor_fired_on_the_drift(ran: Ran) -> None:
    with ran.channel("inference", "erin") as channel:
        management = inference_service_pb2_grpc.InferenceManagementServiceStub(channel)
        status = management.GetDeploymentStatus(
            inference_rpc.GetDeploymentStatusRequest(name="deployments/cancer/status"), timeout=30
        ).status
        serving = [v for v in status.versions if v.traffic_percent == 100]
        assert [v.model_version for v in serving] == ["models/cancer/versions/2"]
        statistics = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            oip.ModelStatisticsRequest(name="cancer", version="3"), timeout=30
        )
        (version_3,) = statistics.model_stats
        # Batches of at most 32 rows: 2,000 rows of traffic (the explainer's
        # evaluations are counted here too, but never logged as traffic).
        assert version_3.inference_count >= 2 * TRAFFIC_ROWS
    with ran.channel("monitor", "erin") as channel:
        monitor = monitor_service_pb2_grpc.MonitorServiceStub(channel)
        alerts = monitor.ListAlerts(
            monitor_rpc.ListAlertsRequest(filter='model = "models/cancer"'), timeout=30
        ).alerts
        assert len(alerts) == 1, alerts
        (alert,) = alerts
        assert alert.model_version == "models/cancer/versions/3"
        assert alert.alert_rule == "alertRules/cancer-drift"
        # The explainer's perturbed samples stay out of the log: the live
        # traffic is window 0 (no drift) and the drifted traffic window 1.
        assert alert.trigger_window.index == 1
        assert alert.state in (monitor_pb.ALERT_STATE_FIRING, monitor_pb.ALERT_STATE_RESOLVED)


def test_a_second_run_on_the_same_data_directory_does_not_repeat_it(ran: Ran) -> None:
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "conveyor.services.cli",
            "lifecycle",
            "--data-dir",
            str(ran.data_dir),
        ],
        env=ran.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "The lifecycle ran on" in again.stdout
    assert "--again" in again.stdout
    for name in catalog.IMPLEMENTED:
        assert serving_status(ran.addresses[name]) == "SERVING"
