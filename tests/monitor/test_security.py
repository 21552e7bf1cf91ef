"""The monitor with authentication on, asking the real policy service: who may
configure a model's monitoring, and the right to erasure recorded in the audit
log before anything is erased."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import monitor_service_pb2_grpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.policy.v1 import policy_messages_pb2 as policy_rpc
from conveyor.policy.v1 import resources_pb2 as policy_pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.services.monitor.server import Monitor, build_monitor
from conveyor.services.monitor.settings import MonitorSettings
from conveyor.shared.auth.credentials import DEV_USERS
from conveyor.shared.auth.principal import Principal
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.channel import create_channel
from tests.monitor.conftest import records
from tests.support.registry import a_model, a_version, expect_error, upload_requests
from tests.support.suite import ALICE, ERIN, MALLORY, SAM, Suite, free_port, running_suite

PRIYA = DEV_USERS[-1]
"""The development privacy officer: may erase a data subject's predictions."""


@dataclass
class Secured:
    suite: Suite
    monitor: Monitor
    channels: list[grpc.aio.Channel]

    def stub(self, principal: Principal) -> monitor_service_pb2_grpc.MonitorServiceStub:
        token = self.suite.token(principal, ("monitor", "registry", "policy"))
        channel = create_channel(
            f"127.0.0.1:{self.monitor.server.port}",
            bearer_token=token,
            default_timeout=timedelta(seconds=30),
        )
        self.channels.append(channel)
        return monitor_service_pb2_grpc.MonitorServiceStub(channel)


@pytest.fixture
async def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Secured]:
    monkeypatch.delenv("CONVEYOR_AUTH_MODE")
    async with running_suite(tmp_path) as suite:
        monitor = await build_monitor(
            MonitorSettings(
                data_dir=tmp_path,
                shutdown_grace=timedelta(seconds=1),
                registry_addr=suite.registry_target,
                trainer_addr=f"127.0.0.1:{free_port()}",
                metrics_listen="",
                auth=AuthSettings(mode="enforce", policy_addr=suite.policy_target),
            ),
            secret_store=suite.secret_store,
        )
        secured = Secured(suite, monitor, [])
        try:
            yield secured
        finally:
            for channel in secured.channels:
                await channel.close(None)
            await monitor.server.shutdown()


async def team_a_model(secured: Secured) -> str:
    """``models/churn`` of team A with one version; its name."""
    registry = secured.suite.registry(ERIN)
    await registry.CreateModel(
        registry_rpc.CreateModelRequest(model_id="churn", model=a_model(owner_team="team-a"))
    )
    reply = await registry.CreateModelVersion(
        upload_requests("models/churn", b"onnx-bytes", version=a_version())
    )
    return str(reply.model_version.name)


async def test_only_the_owning_team_configures_its_models_monitoring(secured: Secured) -> None:
    await team_a_model(secured)
    rule = pb.AlertRule(model="models/churn", drift=pb.DriftCondition(scope=pb.DRIFT_SCOPE_DATASET))

    created = await secured.stub(ALICE).CreateAlertRule(
        rpc.CreateAlertRuleRequest(alert_rule=rule, alert_rule_id="churn-drift")
    )
    await expect_error(
        secured.stub(MALLORY).CreateAlertRule(
            rpc.CreateAlertRuleRequest(alert_rule=rule, alert_rule_id="sneaky")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        secured.stub(MALLORY).DeleteAlertRule(
            rpc.DeleteAlertRuleRequest(name="alertRules/churn-drift")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        secured.stub(MALLORY).UpdateMonitoringConfig(
            rpc.UpdateMonitoringConfigRequest(
                monitoring_config=pb.MonitoringConfig(name="models/churn/monitoringConfig"),
                update_mask={"paths": ["window"]},
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    listed = await secured.stub(MALLORY).ListAlertRules(rpc.ListAlertRulesRequest())

    assert created.alert_rule.name == "alertRules/churn-drift"
    assert [r.name for r in listed.alert_rules] == ["alertRules/churn-drift"]  # reading is open


async def test_an_erasure_is_decided_and_audited_before_rows_go(secured: Secured) -> None:
    version = await team_a_model(secured)
    inference = secured.suite.token(Principal("service", "inference"), ("monitor",))
    channel = create_channel(
        f"127.0.0.1:{secured.monitor.server.port}",
        bearer_token=inference,
        default_timeout=timedelta(seconds=30),
    )
    secured.channels.append(channel)
    logged = await monitor_service_pb2_grpc.MonitorServiceStub(channel).BatchLogPredictions(
        rpc.BatchLogPredictionsRequest(
            records=records(version, np.zeros((3, 30)), subject="customer-9")
        )
    )
    assert logged.accepted_count == 3

    await expect_error(
        secured.stub(ALICE).ErasePredictions(rpc.ErasePredictionsRequest(subject_key="customer-9")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    erased = await secured.stub(PRIYA).ErasePredictions(
        rpc.ErasePredictionsRequest(subject_key="customer-9", reason="ticket DSR-7")
    )

    assert erased.erased_predictions == 3
    assert erased.decision.startswith("decisions/")
    decision = await secured.suite.policy(SAM).GetDecision(
        policy_rpc.GetDecisionRequest(name=erased.decision)
    )
    recorded = decision.decision
    assert recorded.action == "monitor.ErasePredictions"
    assert recorded.outcome == policy_pb.OUTCOME_ALLOW
    assert recorded.principal.id == "priya"
    assert recorded.policy_ids == ["privacy-officers-erase"]
