"""Builds the policy service's gRPC server from its settings."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from dataclasses import replace
from pathlib import Path

from google.protobuf.message import Message

from conveyor.policy.v1 import policy_service_pb2, policy_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2
from conveyor.services.policy.approvals import ApprovalStore
from conveyor.services.policy.audit import AuditLog
from conveyor.services.policy.decisions import DecisionRecorder, LocalAuthorizer
from conveyor.services.policy.engine import PolicyEngine
from conveyor.services.policy.migrate import upgrade_to_head
from conveyor.services.policy.policy_sets import VERSION_FILE, PolicySetStore
from conveyor.services.policy.registry_reader import GrpcRegistryReader, RegistryReader
from conveyor.services.policy.servicer import PolicyServicer
from conveyor.services.policy.settings import PolicySettings
from conveyor.shared.auth.authorizer import DecisionCache
from conveyor.shared.auth.credentials import server_auth_interceptors, service_channel
from conveyor.shared.auth.interceptor import AuthInterceptor, ResourceResolver, default_resource
from conveyor.shared.auth.principal import Resource, model_attributes
from conveyor.shared.errors import ConveyorError
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

SERVICE_NAME = policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def default_policy_dir() -> Path:
    """The policy set shipped with Conveyor (the ``conveyor.policies`` package)."""
    return Path(str(importlib.resources.files("conveyor.policies")))


async def build_server(
    settings: PolicySettings,
    *,
    secret_store: SecretStore | None = None,
    registry: RegistryReader | None = None,
) -> ConveyorServer:
    """Load and validate the policy set, open (and migrate) the database, start
    serving, and sign the audit chain's head periodically."""
    policy_dir = settings.policy_dir or default_policy_dir()
    engine = await asyncio.to_thread(PolicyEngine.load, policy_dir)
    store = secret_store or settings.open_secret_store()
    directory = settings.service_data_dir
    directory.mkdir(parents=True, exist_ok=True)
    database = create_engine(
        settings.database_url or sqlite_url(directory / "policy.db"),
        pool_size=settings.worker_threads,
    )
    await asyncio.to_thread(upgrade_to_head, database)
    version_file = policy_dir / VERSION_FILE
    version = version_file.read_text().strip() if version_file.is_file() else ""
    policy_sets = PolicySetStore(database, engine, version)
    await asyncio.to_thread(policy_sets.record_active)
    logger.info(
        "policy set loaded",
        extra={"policy_set_digest": engine.policy_set_digest, "policies": len(engine.policy_ids)},
    )

    workers = WorkerThreads(settings.worker_threads, name="policy")
    audit = AuditLog(database, store, settings.audit_signing_key)
    recorder = DecisionRecorder(engine, audit, workers)
    registry_channel = None
    if registry is None:
        registry_channel = service_channel(
            settings,
            store,
            target=settings.registry_addr,
            audience="registry",
            services=[registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]],
        )
        registry = GrpcRegistryReader(registry_channel)
    servicer = PolicyServicer(
        recorder=recorder,
        approvals=ApprovalStore(database),
        policy_sets=policy_sets,
        registry=registry,
        secret_store=store,
        artifact_signing_key=settings.artifact_signing_key,
        decision_cache_ttl=settings.decision_cache_ttl,
    )
    authorizer = LocalAuthorizer(
        recorder,
        DecisionCache(settings.auth.decision_cache_size, settings.decision_cache_ttl),
        settings.decision_cache_ttl,
    )
    interceptors = server_auth_interceptors(
        settings, store, resolver=policy_resolver(registry), authorizer=authorizer
    )
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                SERVICE_NAME,
                lambda s: policy_service_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, s),
            )
        ],
        interceptors=interceptors,
    )
    signer = asyncio.create_task(
        _sign_heads(audit, workers, settings.head_sign_interval.total_seconds())
    )

    async def stop_signing() -> None:
        signer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await signer
        await _sign_once(audit, workers)  # the last entries get a signed head too

    async def close_channel() -> None:
        if registry_channel is not None:
            await registry_channel.close(None)

    server.before_stop.append(stop_signing)
    server.on_shutdown.extend(
        [
            close_channel,
            *(i.close for i in interceptors if isinstance(i, AuthInterceptor)),
            workers.shutdown,
            database.dispose,
        ]
    )
    return server


_APPROVAL_TYPES = ("policy.conveyor.dev/Approval", "registry.conveyor.dev/ModelVersion")
_AUDIT_TYPES = (
    "policy.conveyor.dev/Decision",
    "policy.conveyor.dev/AuditLog",
    "policy.conveyor.dev/PolicySet",
)
_METHOD_RESOURCE_TYPES: dict[str, tuple[str, ...]] = {
    # The resource types each method's action applies to (policies/schema.cedarschema).
    "CreateApproval": _APPROVAL_TYPES,
    "GetApproval": _APPROVAL_TYPES,
    "ListApprovals": _APPROVAL_TYPES,
    "RevokeApproval": _APPROVAL_TYPES,
    "Authorize": (
        "policy.conveyor.dev/Decision",
        "registry.conveyor.dev/Model",
        "registry.conveyor.dev/ModelVersion",
    ),
    "EvaluatePromotion": (
        "registry.conveyor.dev/ModelVersion",
        "registry.conveyor.dev/Model",
        "policy.conveyor.dev/Decision",
    ),
    "GetDecision": _AUDIT_TYPES,
    "ListDecisions": _AUDIT_TYPES,
    "VerifyAuditLog": ("policy.conveyor.dev/AuditLog", *_AUDIT_TYPES),
    "ExportAuditLog": ("policy.conveyor.dev/AuditLog", *_AUDIT_TYPES),
    "GetPolicySet": ("policy.conveyor.dev/PolicySet", *_AUDIT_TYPES),
}


def policy_resolver(registry: RegistryReader) -> ResourceResolver:
    """Names a policy call's resource; a model, version or approval carries its
    model's owner team, risk tier and compliance tags, read from the registry
    (unknown models: none, and ownership rules deny)."""

    async def resolve(method: str, request: Message) -> Resource:
        resource = default_resource("policy", method, request)
        applies = _METHOD_RESOURCE_TYPES.get(method)
        if applies and resource.type not in applies:
            # A name of the wrong kind (a model where a version belongs): let the
            # policies decide on the method's own kind, so that the method answers
            # INVALID_ARGUMENT instead of a deny the policies could not decide.
            resource = replace(resource, type=applies[0])
        segments = resource.name.split("/")
        if len(segments) < 2 or segments[0] != "models" or segments[1] == "-":
            return resource
        try:
            model = await registry.get_model(f"models/{segments[1]}")
        except ConveyorError:  # unknown: the method itself answers NOT_FOUND
            return resource
        return replace(resource, owner_team=model.owner_team, attributes=model_attributes(model))

    return resolve


async def _sign_heads(audit: AuditLog, workers: WorkerThreads, interval_s: float) -> None:
    """Sign the chain head every ``interval_s`` (a head already signed is kept)."""
    while True:
        await asyncio.sleep(interval_s)
        await _sign_once(audit, workers)


async def _sign_once(audit: AuditLog, workers: WorkerThreads) -> None:
    try:
        await workers.run(audit.sign_head)
    except Exception as error:  # noqa: BLE001 - a later round retries; the log stays verifiable
        logger.warning("the audit chain head could not be signed (%s)", type(error).__name__)
