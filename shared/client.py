"""The light client: typed asyncio stubs for every Conveyor service.

A backend installs the base package (grpcio, protobuf and
googleapis-common-protos only) and calls::

    from conveyor.shared.client import ConveyorClient
    from conveyor.registry.v1 import registry_messages_pb2 as registry

    async with ConveyorClient() as conveyor:
        reply = await conveyor.registry.GetModel(registry.GetModelRequest(name="models/churn"))

Every call gets a deadline (``default_timeout`` unless the call names one),
idempotent calls are retried on UNAVAILABLE, and TLS and a bearer token are used
when given: a fixed ``bearer_token``, or a ``token_provider`` asked on every call
(the same token goes to every service, so it must name each one's audience; a
Conveyor service gives each peer channel its own provider instead). A failed call
raises ``grpc.aio.AioRpcError``;
:func:`conveyor.shared.errors.from_rpc_error` turns it into the matching
:class:`~conveyor.shared.errors.ConveyorError` with its reason and field violations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from types import TracebackType

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from conveyor.explainer.v1 import explainer_service_pb2, explainer_service_pb2_grpc
from conveyor.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from conveyor.monitor.v1 import monitor_service_pb2, monitor_service_pb2_grpc
from conveyor.oip.v2 import grpc_service_pb2, grpc_service_pb2_grpc
from conveyor.optimizer.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc
from conveyor.policy.v1 import policy_service_pb2, policy_service_pb2_grpc
from conveyor.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from conveyor.shared.channel import ClientTLS, create_channel
from conveyor.shared.ports import SERVICE_PORTS, default_address
from conveyor.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc

DEFAULT_ADDRESSES: Mapping[str, str] = {name: default_address(name) for name in SERVICE_PORTS}
"""Where ``conveyor up`` serves each service."""

SERVICE_DESCRIPTORS: Mapping[str, tuple[ServiceDescriptor, ...]] = {
    "registry": (registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"],),
    "trainer": (trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"],),
    "optimizer": (optimizer_service_pb2.DESCRIPTOR.services_by_name["OptimizerService"],),
    "inference": (
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        inference_service_pb2.DESCRIPTOR.services_by_name["InferenceManagementService"],
    ),
    "monitor": (monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"],),
    "explainer": (explainer_service_pb2.DESCRIPTOR.services_by_name["ExplainerService"],),
    "policy": (policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"],),
}
"""The gRPC services each Conveyor service hosts."""


class ConveyorClient:
    """Stubs for the seven services, one lazily opened channel per address.

    ``addresses`` overrides :data:`DEFAULT_ADDRESSES` per service name.
    """

    def __init__(
        self,
        *,
        addresses: Mapping[str, str] | None = None,
        tls: ClientTLS | None = None,
        bearer_token: str | None = None,
        token_provider: Callable[[], str] | None = None,
        default_timeout: timedelta = timedelta(seconds=30),
    ) -> None:
        unknown = set(addresses or {}) - set(DEFAULT_ADDRESSES)
        if unknown:
            raise ValueError(f"unknown services: {sorted(unknown)}")
        self.addresses = {**DEFAULT_ADDRESSES, **(addresses or {})}
        self._tls = tls
        if bearer_token is not None and token_provider is not None:
            raise ValueError("pass bearer_token or token_provider, not both")
        self._bearer_token = bearer_token
        self._token_provider = token_provider
        self._default_timeout = default_timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        """The channel to ``service`` (shared by services at the same address)."""
        address = self.addresses[service]
        if address not in self._channels:
            hosted = [
                descriptor
                for name, descriptors in SERVICE_DESCRIPTORS.items()
                if self.addresses[name] == address
                for descriptor in descriptors
            ]
            self._channels[address] = create_channel(
                address,
                services=hosted,
                default_timeout=self._default_timeout,
                tls=self._tls,
                bearer_token=self._bearer_token,
                token_provider=self._token_provider,
            )
        return self._channels[address]

    @property
    def registry(self) -> registry_service_pb2_grpc.RegistryServiceAsyncStub:
        return registry_service_pb2_grpc.RegistryServiceStub(self.channel("registry"))

    @property
    def trainer(self) -> trainer_service_pb2_grpc.TrainerServiceAsyncStub:
        return trainer_service_pb2_grpc.TrainerServiceStub(self.channel("trainer"))

    @property
    def optimizer(self) -> optimizer_service_pb2_grpc.OptimizerServiceAsyncStub:
        return optimizer_service_pb2_grpc.OptimizerServiceStub(self.channel("optimizer"))

    @property
    def inference(self) -> grpc_service_pb2_grpc.GRPCInferenceServiceAsyncStub:
        """The Open Inference Protocol (data plane)."""
        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel("inference"))

    @property
    def serving(self) -> inference_service_pb2_grpc.InferenceManagementServiceAsyncStub:
        """Deployments, traffic split and shadow traffic (control plane)."""
        return inference_service_pb2_grpc.InferenceManagementServiceStub(self.channel("inference"))

    @property
    def monitor(self) -> monitor_service_pb2_grpc.MonitorServiceAsyncStub:
        return monitor_service_pb2_grpc.MonitorServiceStub(self.channel("monitor"))

    @property
    def explainer(self) -> explainer_service_pb2_grpc.ExplainerServiceAsyncStub:
        return explainer_service_pb2_grpc.ExplainerServiceStub(self.channel("explainer"))

    @property
    def policy(self) -> policy_service_pb2_grpc.PolicyServiceAsyncStub:
        return policy_service_pb2_grpc.PolicyServiceStub(self.channel("policy"))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    async def __aenter__(self) -> ConveyorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
