"""Builds the explainer service's server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Final

from google.protobuf.message import Message

from conveyor.explainer.v1 import explainer_service_pb2, explainer_service_pb2_grpc
from conveyor.oip.v2 import grpc_service_pb2
from conveyor.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from conveyor.services.explainer.explaining import Explainer
from conveyor.services.explainer.inference_client import InferenceClient
from conveyor.services.explainer.reports import ReportStore
from conveyor.services.explainer.servicer import ExplainerServicer
from conveyor.services.explainer.settings import ExplainerSettings
from conveyor.shared.auth.credentials import server_auth_interceptors, service_channel
from conveyor.shared.auth.interceptor import AuthInterceptor, ResourceResolver, default_resource
from conveyor.shared.auth.principal import Resource, model_attributes
from conveyor.shared.errors import ConveyorError
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.registry_writer import RegistryWriter
from conveyor.shared.secrets import SecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server

SERVICE_NAME: Final = explainer_service_pb2.DESCRIPTOR.services_by_name[
    "ExplainerService"
].full_name
REGISTRY_SERVICE: Final = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]
INFERENCE_SERVICE: Final = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def explainer_resolver(registry: RegistryClient) -> ResourceResolver:
    """Names a call's resource for policy: the model it explains, owned by
    the team that owns it in the registry."""

    async def resolve(method: str, request: Message) -> Resource:
        resource = default_resource("explainer", method, request)
        segments = resource.name.split("/")
        if len(segments) < 2 or segments[0] != "models":
            return resource
        try:
            model = await registry.model(f"models/{segments[1].split('@')[0]}")
        except ConveyorError:  # unknown: the method itself answers NOT_FOUND
            return resource
        return replace(resource, owner_team=model.owner_team, attributes=model_attributes(model))

    return resolve


async def build_server(
    settings: ExplainerSettings, *, secret_store: SecretStore | None = None
) -> ConveyorServer:
    """Start serving explanations."""
    secrets = secret_store or settings.open_secret_store()
    registry_channel = service_channel(
        settings,
        secrets,
        target=settings.registry_addr,
        audience="registry",
        services=[REGISTRY_SERVICE],
    )
    inference_channel = service_channel(
        settings,
        secrets,
        target=settings.inference_addr,
        audience="inference",
        services=[INFERENCE_SERVICE],
        max_message_bytes=settings.infer_message_bytes + (1 << 20),
    )
    registry = RegistryClient(registry_channel)
    inference = InferenceClient(
        inference_channel,
        message_bytes=settings.infer_message_bytes,
        calls_in_flight=settings.max_calls_in_flight,
    )
    explainer = Explainer(
        inference,
        seconds_per_evaluation=settings.seconds_per_evaluation,
        seconds_per_call=settings.seconds_per_call.total_seconds(),
    )
    reports = ReportStore(
        registry, RegistryWriter(registry_service_pb2_grpc.RegistryServiceStub(registry_channel))
    )
    servicer = ExplainerServicer(
        registry, explainer, reports, max_concurrent=settings.max_concurrent_explanations
    )
    interceptors = server_auth_interceptors(
        settings, secrets, resolver=explainer_resolver(registry)
    )
    server = await create_server(
        settings,
        [
            ServiceRegistration(
                SERVICE_NAME,
                lambda s: explainer_service_pb2_grpc.add_ExplainerServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
        interceptors=interceptors,
    )

    async def close() -> None:
        for interceptor in interceptors:
            if isinstance(interceptor, AuthInterceptor):
                await interceptor.close()
        await asyncio.gather(registry_channel.close(None), inference_channel.close(None))

    server.on_shutdown.append(close)
    return server
