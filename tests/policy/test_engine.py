"""The Cedar policy engine: the policies in ``policies/``, loading, digests, decisions."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conveyor.services.policy.engine import (
    AuthorizationDecision,
    PolicyEngine,
    PolicyLoadError,
    Principal,
    Resource,
)

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
MODEL = "registry.conveyor.dev/Model"
VERSION = "registry.conveyor.dev/ModelVersion"


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load(POLICY_DIR)


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, target)
    return target


def user(name: str, *roles: str, team: str = "team-a") -> Principal:
    return Principal(kind="user", id=name, roles=roles, team=team)


def service(name: str) -> Principal:
    return Principal(kind="service", id=name, roles=("service",))


def model(team: str, name: str = "models/fraud") -> Resource:
    return Resource(type=MODEL, name=name, owner_team=team)


def set_alias(engine: PolicyEngine, who: Principal, team: str, alias: str) -> AuthorizationDecision:
    return engine.authorize(who, "registry.SetAlias", model(team), {"alias": alias})


# --- people ---------------------------------------------------------------------


def test_data_scientist_cannot_alias_another_teams_model(engine: PolicyEngine) -> None:
    decision = set_alias(engine, user("alice", "data_scientist"), "team-b", "staging")
    assert not decision.allowed
    assert decision.policy_ids == ["forbid-cross-team-alias"]
    assert decision.errors == []
    assert "forbid-cross-team-alias" in decision.reasons[0]


def test_data_scientist_can_alias_own_teams_staging(engine: PolicyEngine) -> None:
    decision = set_alias(engine, user("alice", "data_scientist"), "team-a", "staging")
    assert decision.allowed
    assert decision.policy_ids == ["modelling-roles-alias-non-production"]


def test_alias_may_come_from_resource_attributes(engine: PolicyEngine) -> None:
    resource = Resource(MODEL, "models/fraud", "team-a", {"alias": "staging"})
    decision = engine.authorize(user("alice", "data_scientist"), "registry.SetAlias", resource, {})
    assert decision.allowed


def test_alias_change_without_an_alias_is_denied(engine: PolicyEngine) -> None:
    decision = engine.authorize(
        user("alice", "ml_engineer"), "registry.SetAlias", model("team-a"), {}
    )
    assert not decision.allowed
    assert decision.policy_ids == []


def test_only_an_ml_engineer_of_the_owning_team_moves_production(engine: PolicyEngine) -> None:
    engineer = user("bob", "ml_engineer")
    allowed = set_alias(engine, engineer, "team-a", "production")
    assert allowed.allowed
    assert allowed.policy_ids == ["ml-engineers-alias-production"]

    assert not set_alias(engine, user("alice", "data_scientist"), "team-a", "production").allowed
    assert not set_alias(engine, user("ann", "approver"), "team-a", "production").allowed
    assert not set_alias(engine, engineer, "team-b", "production").allowed
    assert not set_alias(engine, user("bob", "ml_engineer", team=""), "", "production").allowed


def test_unknown_owner_team_denies_ownership_rules(engine: PolicyEngine) -> None:
    decision = set_alias(engine, user("alice", "data_scientist", team=""), "", "staging")
    assert not decision.allowed


def test_modelling_roles_read_everything_and_create_for_their_team(engine: PolicyEngine) -> None:
    alice = user("alice", "data_scientist")
    assert engine.authorize(alice, "registry.GetModel", model("team-b"), {}).allowed
    assert engine.authorize(
        alice, "registry.ListModels", Resource(type=MODEL, owner_team=""), {}
    ).allowed
    assert engine.authorize(
        alice, "monitor.GetDriftReport", Resource("monitor.conveyor.dev/Model", "m"), {}
    ).allowed
    own = engine.authorize(alice, "registry.CreateModelVersion", model("team-a"), {})
    assert own.allowed
    assert own.policy_ids == ["modelling-roles-author-own-team"]
    assert not engine.authorize(alice, "registry.CreateModelVersion", model("team-b"), {}).allowed
    # Reading everything stops at the audit log.
    decisions = Resource(type="policy.conveyor.dev/Decision")
    assert not engine.authorize(alice, "policy.ListDecisions", decisions, {}).allowed


def test_modelling_roles_infer_and_ml_engineers_deploy_their_teams_models(
    engine: PolicyEngine,
) -> None:
    deployment = Resource("inference.conveyor.dev/Deployment", "deployments/fraud", "team-b")
    alice = user("alice", "data_scientist")
    infer = engine.authorize(alice, "inference.ModelInfer", deployment, {})
    assert infer.allowed
    assert infer.policy_ids == ["modelling-roles-infer"]
    assert not engine.authorize(alice, "inference.CreateDeployment", deployment, {}).allowed
    erin = user("erin", "ml_engineer")
    assert not engine.authorize(erin, "inference.CreateDeployment", deployment, {}).allowed
    own = Resource("inference.conveyor.dev/Deployment", "deployments/fraud", "team-a")
    deploy = engine.authorize(erin, "inference.UpdateDeployment", own, {})
    assert deploy.allowed
    assert deploy.policy_ids == ["ml-engineers-deploy-own-team"]
    carol = user("carol", "security_auditor", team="security")
    assert not engine.authorize(carol, "inference.ModelInfer", deployment, {}).allowed


def test_auditor_lists_decisions_but_cannot_upload(engine: PolicyEngine) -> None:
    carol = user("carol", "security_auditor", team="security")
    listed = engine.authorize(
        carol, "policy.ListDecisions", Resource(type="policy.conveyor.dev/Decision"), {}
    )
    assert listed.allowed
    assert listed.policy_ids == ["security-auditors-audit"]
    assert engine.authorize(
        carol, "policy.VerifyAuditLog", Resource(type="policy.conveyor.dev/AuditLog"), {}
    ).allowed
    upload = engine.authorize(carol, "registry.CreateModelVersion", model("security"), {})
    assert not upload.allowed
    assert upload.policy_ids == []
    assert upload.reasons == [
        "user:carol registry.CreateModelVersion on models/fraud: denied, no policy permits it"
    ]


def test_approver_approves(engine: PolicyEngine) -> None:
    version = Resource(type=VERSION, name="models/fraud/versions/3", owner_team="team-a")
    decision = engine.authorize(
        user("ann", "approver", team="risk"), "policy.CreateApproval", version, {}
    )
    assert decision.allowed
    assert decision.policy_ids == ["approvers-approve"]
    assert not engine.authorize(
        user("alice", "data_scientist"), "policy.CreateApproval", version, {}
    ).allowed


# --- service identities ------------------------------------------------------------

# Every RPC action; `promotion.*` actions are gate questions, not calls.
ALL_ACTIONS = sorted(
    action
    for action in set(
        re.findall(r'"([a-z]+\.[A-Z]\w+)"', (POLICY_DIR / "schema.cedarschema").read_text())
    )
    if not action.startswith("promotion.")
)
RESOURCE_FOR_SERVICE = {
    "registry": MODEL,
    "trainer": "trainer.conveyor.dev/TrainingJob",
    "optimizer": "optimizer.conveyor.dev/OptimizationJob",
    "inference": "inference.conveyor.dev/Deployment",
    "monitor": "monitor.conveyor.dev/Model",
    "explainer": "explainer.conveyor.dev/Model",
}
AUDIT_ACTIONS = {
    "policy.GetDecision",
    "policy.ListDecisions",
    "policy.VerifyAuditLog",
    "policy.ExportAuditLog",
    "policy.GetPolicySet",
}


def resource_for(action: str) -> Resource:
    service_name = action.split(".")[0]
    if service_name == "policy":
        kind = VERSION if action not in AUDIT_ACTIONS else "policy.conveyor.dev/Decision"
        return Resource(type=kind, name="x", owner_team="team-a")
    return Resource(type=RESOURCE_FOR_SERVICE[service_name], name="x", owner_team="team-a")


SERVICE_CALLS = {
    "registry": {"policy.EvaluatePromotion"},
    "trainer": {
        "registry.GetModel",
        "registry.CreateModelVersion",
        "registry.GetModelVersion",
        "registry.CreateAttachment",
    },
    "optimizer": {
        "registry.GetModel",
        "registry.GetModelVersion",
        "registry.DownloadArtifact",
        "registry.CreateModelVersion",
        "registry.CreateAttachment",
    },
    "inference": {
        "registry.GetModel",
        "registry.ListModels",
        "registry.GetModelVersion",
        "registry.ListModelVersions",
        "registry.DownloadArtifact",
        "registry.ListAliases",
        "registry.WatchAliases",
        "monitor.LogPredictions",
        "monitor.BatchLogPredictions",
    },
    "monitor": {
        "registry.GetModel",
        "registry.GetModelVersion",
        "registry.ListAliases",
        "registry.SetAlias",
        "inference.GetDeployment",
        "inference.GetDeploymentStatus",
        "trainer.GetTrainingJob",
        "trainer.GetDataset",
        "trainer.CreateDataset",
        "trainer.CreateTrainingJob",
    },
    "explainer": {
        "registry.GetModel",
        "registry.GetModelVersion",
        "registry.CreateAttachment",
        "registry.ListAttachments",
        "registry.GetAttachment",
        "inference.ModelMetadata",
        "inference.ModelConfig",
        "inference.ModelInfer",
    },
    "policy": {
        "registry.GetModel",
        "registry.GetModelVersion",
        "registry.GetAttachment",
        "registry.ListAttachments",
    },
}


def test_schema_declares_every_rpc_checked() -> None:
    assert len(ALL_ACTIONS) > 90
    assert "registry.SetAlias" in ALL_ACTIONS


@pytest.mark.parametrize("name", sorted(SERVICE_CALLS))
def test_service_identities_are_allowed_exactly_their_calls(
    engine: PolicyEngine, name: str
) -> None:
    allowed = set()
    for action in ALL_ACTIONS:
        decision = engine.authorize(service(name), action, resource_for(action), {"alias": "x"})
        assert decision.errors == [], (action, decision.errors)
        if decision.allowed:
            allowed.add(action)
    assert allowed == SERVICE_CALLS[name] | {"policy.Authorize"}


def test_a_service_name_is_not_a_user(engine: PolicyEngine) -> None:
    impostor = Principal(kind="user", id="trainer", roles=("service",))
    assert not engine.authorize(
        impostor, "registry.CreateModelVersion", model("team-a"), {}
    ).allowed


def test_monitor_rolls_back_with_named_policy(engine: PolicyEngine) -> None:
    decision = engine.authorize(
        service("monitor"), "registry.SetAlias", model("team-a"), {"alias": "production"}
    )
    assert decision.allowed
    assert decision.policy_ids == ["service-monitor"]


# --- malformed and unknown requests -----------------------------------------------


def test_unknown_action_is_denied_with_an_error(engine: PolicyEngine) -> None:
    decision = engine.authorize(
        user("bob", "ml_engineer"), "registry.DropDatabase", model("team-a"), {}
    )
    assert not decision.allowed
    assert decision.policy_ids == []
    assert any("registry.DropDatabase" in e for e in decision.errors)


@pytest.mark.parametrize(
    ("principal", "action", "resource"),
    [
        (Principal(kind="robot", id="x"), "registry.GetModel", model("team-a")),
        (Principal(kind="user", id=""), "registry.GetModel", model("team-a")),
        (user("bob", "ml_engineer"), "GetModel", model("team-a")),
        (user("bob", "ml_engineer"), "registry.GetModel", Resource(type="Model")),
        (user("bob", "ml_engineer"), "registry.GetModel", Resource("registry.conveyor.dev/Nope")),
        (user("bob", "ml_engineer"), "registry.GetModel", Resource("trainer.conveyor.dev/Model")),
    ],
)
def test_malformed_requests_are_denied(
    engine: PolicyEngine, principal: Principal, action: str, resource: Resource
) -> None:
    decision = engine.authorize(principal, action, resource, {})
    assert not decision.allowed
    assert decision.errors
    assert decision.policy_ids == []


def test_unknown_context_keys_and_odd_attributes_are_ignored(engine: PolicyEngine) -> None:
    resource = Resource(
        MODEL,
        "models/fraud",
        "team-a",
        {"risk_tier": 3, "compliance_tags": "gdpr", "other": {"nested": 1.5}},
    )
    decision = engine.authorize(
        user("alice", "data_scientist"),
        "registry.SetAlias",
        resource,
        {"alias": "staging", "token": "s3cret", "source_ip": 7},
    )
    assert decision.allowed
    assert decision.errors == []


# --- loading and the digest -------------------------------------------------------


def test_load_names_every_policy(engine: PolicyEngine) -> None:
    assert "forbid-cross-team-alias" in engine.policy_ids
    assert len(set(engine.policy_ids)) == len(engine.policy_ids)
    assert [f.path for f in engine.files] == sorted(f.path for f in engine.files)
    assert "schema.cedarschema" in [f.path for f in engine.files]


def test_syntax_error_is_refused_naming_the_file(policy_copy: Path) -> None:
    (policy_copy / "broken.cedar").write_text('@id("broken")\npermit (principal, action\n')
    with pytest.raises(PolicyLoadError, match=r"broken\.cedar") as raised:
        PolicyEngine.load(policy_copy)
    assert raised.value.path == "broken.cedar"
    assert "syntax error" in raised.value.problem


def test_policy_that_does_not_validate_is_refused(policy_copy: Path) -> None:
    (policy_copy / "typo.cedar").write_text(
        '@id("typo")\npermit (principal is User, action, resource)\n'
        'when { principal.rolez.contains("x") };\n'
    )
    with pytest.raises(PolicyLoadError, match=r"typo\.cedar.*'typo'"):
        PolicyEngine.load(policy_copy)


def test_unknown_action_in_a_policy_is_refused(policy_copy: Path) -> None:
    (policy_copy / "extra.cedar").write_text(
        '@id("extra")\npermit (principal, action == Action::"registry.Nope", resource);\n'
    )
    with pytest.raises(PolicyLoadError, match=r"extra\.cedar"):
        PolicyEngine.load(policy_copy)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("permit (principal, action, resource);\n", "no @id"),
        ('@id("forbid-cross-team-alias")\nforbid (principal, action, resource);\n', "already"),
        ("// nothing here\n", "defines no policy"),
    ],
)
def test_ids_are_required_and_unique(policy_copy: Path, text: str, problem: str) -> None:
    (policy_copy / "zz.cedar").write_text(text)
    with pytest.raises(PolicyLoadError, match=problem) as raised:
        PolicyEngine.load(policy_copy)
    assert raised.value.path == "zz.cedar"


def test_missing_schema_is_refused(policy_copy: Path) -> None:
    (policy_copy / "schema.cedarschema").unlink()
    with pytest.raises(PolicyLoadError, match="no schema file"):
        PolicyEngine.load(policy_copy)


def test_digest_is_stable(engine: PolicyEngine, policy_copy: Path) -> None:
    again = PolicyEngine.load(policy_copy)
    assert again.policy_set_digest == engine.policy_set_digest
    assert re.fullmatch(r"[0-9a-f]{64}", engine.policy_set_digest)
    decision = again.authorize(user("alice", "data_scientist"), "registry.GetModel", model("a"))
    assert decision.policy_set_digest == engine.policy_set_digest


@pytest.mark.parametrize("name", ["people.cedar", "services.cedar", "schema.cedarschema"])
def test_digest_changes_when_any_file_changes(
    engine: PolicyEngine, policy_copy: Path, name: str
) -> None:
    path = policy_copy / name
    path.write_text(path.read_text() + "\n// reviewed\n")
    assert PolicyEngine.load(policy_copy).policy_set_digest != engine.policy_set_digest


def test_digest_changes_when_a_file_is_renamed_or_added(
    engine: PolicyEngine, policy_copy: Path
) -> None:
    (policy_copy / "services.cedar").rename(policy_copy / "services2.cedar")
    renamed = PolicyEngine.load(policy_copy).policy_set_digest
    assert renamed != engine.policy_set_digest
    (policy_copy / "more.cedar").write_text(
        '@id("more")\nforbid (principal, action == Action::"registry.ArchiveModel", resource);\n'
    )
    assert PolicyEngine.load(policy_copy).policy_set_digest not in {
        renamed,
        engine.policy_set_digest,
    }


def test_a_forbid_in_a_new_file_decides(policy_copy: Path) -> None:
    (policy_copy / "freeze.cedar").write_text(
        '@id("freeze-production")\n'
        'forbid (principal, action == Action::"registry.SetAlias", resource)\n'
        'when { context has alias && context.alias == "production" };\n'
    )
    frozen = PolicyEngine.load(policy_copy)
    decision = set_alias(frozen, user("bob", "ml_engineer"), "team-a", "production")
    assert not decision.allowed
    assert decision.policy_ids == ["freeze-production"]
