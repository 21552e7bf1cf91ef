"""The registry end to end: a model, a version, a download, an alias."""

from __future__ import annotations

import hashlib

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from tests.support.registry import create_model, create_version, download


async def test_a_model_goes_from_upload_to_alias(
    registry: registry_service_pb2_grpc.RegistryServiceAsyncStub,
) -> None:
    model = await create_model(registry, "churn")
    assert model.name == "models/churn"
    version = await create_version(registry, "churn", b"weights" * 1000)
    assert version.name == "models/churn/versions/1"
    assert version.artifact.sha256 == hashlib.sha256(b"weights" * 1000).hexdigest()
    _, data = await download(registry, "models/churn@latest")
    assert data == b"weights" * 1000
    alias = await registry.SetAlias(
        rpc.SetAliasRequest(
            name="models/churn/aliases/production", version=version.name, reason="first release"
        ),
        timeout=10,
    )
    assert alias.alias.version == version.name
    got = await registry.GetModelVersion(rpc.GetModelVersionRequest(name="models/churn@production"))
    assert list(got.model_version.aliases) == ["production"]
