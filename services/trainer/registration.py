"""The trainer's side of the registry: checking registration targets, resolving
the owner of a job for policy, and registering trained models.

Calls go over a channel made with the trainer's service identity
(``service:trainer``, :func:`~conveyor.shared.auth.credentials.service_channel`),
so the registry attributes every registered version to the trainer and lists
the job's creator among its authors.

Registration is idempotent: the version's ``request_id`` and the evaluation
report's are derived from the job's name and creation time, so a trainer that
restarts between registering and recording the result registers nothing twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Final

import grpc
from google.protobuf.message import Message

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import protocol
from conveyor.shared import names
from conveyor.shared.auth.interceptor import ResourceResolver, default_resource
from conveyor.shared.auth.principal import Resource, model_attributes
from conveyor.shared.errors import (
    ConveyorError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    from_rpc_error,
)
from conveyor.shared.registry_writer import RegistryWriteError, RegistryWriter
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as pb

logger = logging.getLogger(__name__)

EVALUATION_REPORT_ID: Final = "evaluation-report"
OWNER_CACHE_TTL_S: Final = 5.0
SWEEP_LABEL: Final = "sweep_job"
"""The label naming the sweep whose best trial a version is."""
_REQUEST_NAMESPACE: Final = uuid.UUID("6d1f0c2e-7f0b-4d3a-9a55-3c2b1c8e9f10")


class RegistrationError(Exception):
    """Registering a trained model failed for good; ``error`` says why."""

    def __init__(self, error: pb.JobError) -> None:
        super().__init__(error.message)
        self.error = error


class Registrar:
    """Reads models from the registry and registers trained versions in it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        workers: WorkerThreads,
        *,
        attempts: int = 5,
        backoff_s: float = 0.5,
    ) -> None:
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        self._writer = RegistryWriter(self._stub, attempts=attempts, backoff_s=backoff_s)
        self._workers = workers
        self._owners: dict[str, tuple[float, registry_pb.Model]] = {}

    async def get_model(self, name: str) -> registry_pb.Model:
        """The model ``name``; NOT_FOUND and INVALID_ARGUMENT as the registry
        says them, any other failure UNAVAILABLE."""
        try:
            response = await self._stub.GetModel(registry_rpc.GetModelRequest(name=name))
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error)
            if isinstance(failure, NotFoundError | InvalidArgumentError):
                raise failure from None
            raise UnavailableError(
                f"the registry could not be asked about {name} ({error.code().name})",
                reason="REGISTRY_UNAVAILABLE",
            ) from None
        self._owners[name] = (time.monotonic() + OWNER_CACHE_TTL_S, response.model)
        return response.model

    async def model_for_policy(self, name: str) -> registry_pb.Model | None:
        """The model ``name`` for naming a call's resource (cached for a few
        seconds); None when it cannot be read."""
        cached = self._owners.get(name)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            return await self.get_model(name)
        except ConveyorError:
            return None

    async def check_target(self, name: str) -> registry_pb.Model:
        """The registration target ``name``, which must exist and be active."""
        model = await self.get_model(name)
        if model.state == registry_pb.MODEL_STATE_ARCHIVED:
            raise FailedPreconditionError(
                f"{name} is archived: it takes no new versions",
                reason="MODEL_ARCHIVED",
                metadata={"model": name},
            )
        return model

    async def register(
        self,
        job: pb.TrainingJob,
        job_dir: Path,
        *,
        registration: pb.RegistrationSpec | None = None,
    ) -> str:
        """Register the model the job trained (the files in ``job_dir``) in
        ``job.spec.registration.model``, with its evaluation report; returns the
        version's name. A sweep registers its best trial with the sweep's
        ``registration`` instead (its description, labels and model card). Retries
        while the registry is unavailable; raises :class:`RegistrationError`
        when it refuses or stays away."""
        version, weights, report = await self._workers.run(_read_outputs, job_dir)
        if registration is None:
            registration = job.spec.registration
        else:
            version.description = registration.description
            version.labels.update(registration.labels)
            version.labels[SWEEP_LABEL] = job.sweep_job.removeprefix("sweepJobs/")
            version.model_card = registration.model_card or version.model_card
        model = registration.model
        try:
            registered = await self._writer.create_version(
                model, version, weights, request_id=_request_id(job, "model-version")
            )
            await self._writer.attach(
                registry_rpc.CreateAttachmentRequest(
                    parent=registered.name,
                    attachment_id=EVALUATION_REPORT_ID,
                    attachment=registry_pb.Attachment(
                        kind=registry_pb.ATTACHMENT_KIND_EVALUATION_REPORT,
                        display_name="Evaluation on the held-out test split",
                        content_type="application/json",
                        content=report,
                    ),
                    request_id=_request_id(job, EVALUATION_REPORT_ID),
                )
            )
        except RegistryWriteError as failed:
            raise RegistrationError(
                pb.JobError(
                    code=failed.code.value[0], reason="REGISTRATION_FAILED", message=failed.message
                )
            ) from None
        logger.info(
            "registered", extra={"training_job": job.name, "model_version": registered.name}
        )
        return registered.name


def trainer_resolver(
    registrar: Registrar | None, registration_model_of: Callable[[str], Awaitable[str]]
) -> ResourceResolver:
    """Names a trainer call's resource for policy. A training or sweep job is
    owned by the team that owns its registration model (and carries that
    model's risk tier and compliance tags); ``registration_model_of`` finds a
    job's or sweep's model (empty when it or its model is unknown). Datasets, and jobs that
    register nothing, have no owner team: the ownership rules deny them to
    people."""

    async def resolve(method: str, request: Message) -> Resource:
        resource = default_resource("trainer", method, request)
        model_name = ""
        if method == "CreateTrainingJob":
            model_name = request.training_job.spec.registration.model  # type: ignore[attr-defined]
        elif method == "CreateSweepJob":
            spec = request.sweep_job.spec  # type: ignore[attr-defined]
            model_name = spec.base_spec.registration.model
        elif resource.name.startswith(("trainingJobs/", "sweepJobs/")):
            model_name = await registration_model_of(resource.name)
        if not model_name or registrar is None:
            return resource
        try:
            names.parse_model_name(model_name)
        except InvalidArgumentError:
            return resource
        model = await registrar.model_for_policy(model_name)
        if model is None:
            return resource
        return replace(resource, owner_team=model.owner_team, attributes=model_attributes(model))

    return resolve


def _request_id(job: pb.TrainingJob, purpose: str) -> str:
    created = job.create_time.ToNanoseconds()
    return str(uuid.uuid5(_REQUEST_NAMESPACE, f"{job.name}/{created}/{purpose}"))


def _read_outputs(job_dir: Path) -> tuple[registry_pb.ModelVersion, bytes, bytes]:
    version = registry_pb.ModelVersion.FromString(
        (job_dir / protocol.MODEL_VERSION_FILE).read_bytes()
    )
    weights = (job_dir / protocol.WEIGHTS_FILE).read_bytes()
    report = (job_dir / protocol.EVALUATION_REPORT_FILE).read_bytes()
    return version, weights, report
