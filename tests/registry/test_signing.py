"""The registry signs every artifact's digest at registration: the signature is
returned on every read, names the key version that made it, survives key
rotation, backup and restore, and an upload the secret store cannot sign is
refused with nothing left behind. Versions registered before signing existed
(migration 0003) stay unsigned and say so."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import sqlalchemy as sa
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from sqlalchemy.engine import Engine

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.backup import backup_registry, restore_registry
from conveyor.services.registry.migrate import alembic_config
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.artifacts import ArtifactSignatureError, verify_artifact_signature
from conveyor.shared.secrets import SecretStore
from conveyor.shared.secrets.vault import VaultSecretStore
from conveyor.shared.storage import BlobStore, create_engine
from conveyor.shared.storage.database import sqlite_url
from tests.support.fake_vault import FakeVault
from tests.support.registry import (
    a_model,
    a_version,
    create_model,
    create_version,
    download,
    refused,
    upload_requests,
)

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

KEY = "artifact-signing"  # RegistrySettings.artifact_signing_key's default


def secret_store_of(settings: RegistrySettings) -> SecretStore:
    """The store the registry signs with by default: the same local key directory."""
    return settings.open_secret_store()


@asynccontextmanager
async def serving(
    settings: RegistrySettings, secret_store: SecretStore | None = None
) -> AsyncIterator[Registry]:
    server = await build_server(settings, secret_store=secret_store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield registry_service_pb2_grpc.RegistryServiceStub(channel)
    finally:
        await server.shutdown()


async def get_version(registry: Registry, name: str) -> pb.ModelVersion:
    reply = await registry.GetModelVersion(rpc.GetModelVersionRequest(name=name), timeout=10)
    return reply.model_version


async def test_an_uploaded_version_carries_a_signature_that_verifies(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    data = b"onnx weights" * 10_000
    await create_model(registry, "churn")
    created = await create_version(registry, "churn", data)

    signature = created.artifact.signature
    assert signature.algorithm == pb.SIGNATURE_ALGORITHM_ED25519
    assert signature.key_id.startswith("local/")
    assert abs(signature.sign_time.ToDatetime(UTC) - datetime.now(UTC)).total_seconds() < 60
    store = secret_store_of(registry_settings)
    verify_artifact_signature(store, KEY, created.artifact)

    # Every read returns the same signature.
    listed = await registry.ListModelVersions(
        rpc.ListModelVersionsRequest(parent="models/churn"), timeout=10
    )
    messages, received = await download(registry, "models/churn@latest")
    assert received == data
    for artifact in (
        (await get_version(registry, created.name)).artifact,
        (await get_version(registry, "models/churn@latest")).artifact,
        listed.model_versions[0].artifact,
        messages[0].artifact,
    ):
        assert artifact == created.artifact

    # The key id names the key version: its public key alone checks the signature.
    pem = store.public_key_pem(KEY, signature.key_id)
    public = load_pem_public_key(pem.encode())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(signature.signature, hashlib.sha256(data).digest())


async def test_rotation_keeps_old_versions_verifiable_and_signs_new_ones_with_the_new_key(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    store = secret_store_of(registry_settings)
    await create_model(registry, "churn")
    first = await create_version(registry, "churn", b"v1 weights")

    store.rotate_key(KEY)
    second = await create_version(registry, "churn", b"v2 weights")

    old, new = first.artifact.signature.key_id, second.artifact.signature.key_id
    assert old != new
    assert list(store.public_keys_pem(KEY)) == [old, new]
    for version in (first, second):
        reread = await get_version(registry, version.name)
        assert reread.artifact == version.artifact
        verify_artifact_signature(store, KEY, reread.artifact)


async def test_a_signature_does_not_verify_for_other_bytes_or_another_key(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    store = secret_store_of(registry_settings)
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", b"weights")

    other_digest = pb.Artifact()
    other_digest.CopyFrom(version.artifact)
    other_digest.sha256 = hashlib.sha256(b"other weights").hexdigest()
    with pytest.raises(ArtifactSignatureError) as wrong_bytes:
        verify_artifact_signature(store, KEY, other_digest)
    assert wrong_bytes.value.reason == "ARTIFACT_SIGNATURE_INVALID"

    store.ensure_key("someone-else", "ed25519")
    with pytest.raises(ArtifactSignatureError):
        verify_artifact_signature(store, "someone-else", version.artifact)


async def test_an_upload_the_secret_store_cannot_sign_is_refused_and_leaves_nothing(
    registry_settings: RegistrySettings,
) -> None:
    # Unencrypted, so that signing is the first thing the store is asked for
    # (test_encryption covers an upload it cannot encrypt).
    registry_settings = registry_settings.model_copy(update={"encrypt_artifacts": False})
    with FakeVault() as vault:
        store = VaultSecretStore(vault.url, token=vault.root_token, timeout=5.0)
        async with serving(registry_settings, store) as registry:
            await create_model(registry, "churn")
            signed = await create_version(registry, "churn", b"v1 weights")
            assert signed.artifact.signature.key_id == f"vault-transit/{KEY}/1"
            verify_artifact_signature(store, KEY, signed.artifact)

            vault.stop()  # Vault goes down
            error = await refused(
                registry.CreateModelVersion(
                    upload_requests("models/churn", b"v2 weights", version=a_version()),
                    timeout=30,
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert error.reason == "ARTIFACT_SIGNING_UNAVAILABLE"
            assert vault.root_token not in error.message

            listed = await registry.ListModelVersions(
                rpc.ListModelVersionsRequest(parent="models/churn"), timeout=10
            )
            assert [v.name for v in listed.model_versions] == [signed.name]
            model = await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)
            assert model.model.latest_version == signed.name
    blobs = registry_settings.service_data_dir / "blobs"
    assert [p.name for p in (blobs / "sha256").glob("*/*")] == [signed.artifact.sha256]
    assert list((blobs / "tmp").iterdir()) == []


async def test_a_registry_started_while_the_secret_store_is_down_serves_reads(
    registry_settings: RegistrySettings,
) -> None:
    with FakeVault() as vault:
        down = VaultSecretStore(vault.url, token=vault.root_token, timeout=5.0)
    async with serving(registry_settings, down) as registry:
        await create_model(registry, "churn")
        assert await registry.GetModel(rpc.GetModelRequest(name="models/churn"), timeout=10)
        await refused(
            registry.CreateModelVersion(upload_requests("models/churn", b"w"), timeout=30),
            grpc.StatusCode.UNAVAILABLE,
        )


async def test_backup_and_restore_keep_the_signatures(
    registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    store = secret_store_of(registry_settings)
    async with serving(registry_settings) as registry:
        await create_model(registry, "churn")
        version = await create_version(registry, "churn", b"weights")
    backup_registry(registry_settings, tmp_path / "backup")
    restored = RegistrySettings(data_dir=tmp_path / "restored")
    # The registry's own secret store: it unwraps the blobs' data keys.
    restore_registry(restored, tmp_path / "backup", secret_store=store)

    async with serving(restored, store) as registry:
        again = await get_version(registry, version.name)
    assert again.artifact == version.artifact
    verify_artifact_signature(store, KEY, again.artifact)


# -- migration 0003 -------------------------------------------------------------


def migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def database_of(settings: RegistrySettings) -> Engine:
    """The database the registry of ``settings`` opens."""
    settings.service_data_dir.mkdir(parents=True, exist_ok=True)
    return create_engine(
        settings.database_url or sqlite_url(settings.service_data_dir / "registry.db")
    )


_models_0002 = sa.table(
    "models",
    *(sa.column(name) for name in ("id", "model_id", "state", "next_version", "etag", "body")),
    sa.column("create_time", sa.DateTime(timezone=True)),
    sa.column("update_time", sa.DateTime(timezone=True)),
)
_versions_0002 = sa.table(
    "model_versions",
    *(
        sa.column(name)
        for name in (
            "model_pk",
            "version",
            "state",
            "sha256",
            "size_bytes",
            "parent_version",
            "etag",
            "body",
        )
    ),
    sa.column("create_time", sa.DateTime(timezone=True)),
    sa.column("update_time", sa.DateTime(timezone=True)),
)


def register_unsigned(engine: Engine, blobs: BlobStore, data: bytes) -> None:
    """What a registry at revision 0002 left behind: a model with one version."""
    stored = blobs.put(data)
    body = a_version()
    body.artifact.sha256, body.artifact.size_bytes = stored.sha256, stored.size_bytes
    now = datetime.now(UTC)
    with engine.begin() as db:
        model_pk = db.execute(
            sa.insert(_models_0002)
            .values(
                model_id="legacy",
                state="ACTIVE",
                next_version=2,
                create_time=now,
                update_time=now,
                etag="e0",
                body=a_model().SerializeToString(),
            )
            .returning(_models_0002.c.id)
        ).scalar_one()
        db.execute(
            sa.insert(_versions_0002).values(
                model_pk=model_pk,
                version=1,
                state="ACTIVE",
                sha256=stored.sha256,
                size_bytes=stored.size_bytes,
                parent_version="",
                create_time=now,
                update_time=now,
                etag="e1",
                body=body.SerializeToString(),
            )
        )


async def test_0003_upgrades_a_0002_registry_whose_versions_stay_unsigned(
    registry_settings: RegistrySettings,
) -> None:
    engine = database_of(registry_settings)
    migrate(engine, "0002")
    data = b"weights registered before signing"
    register_unsigned(engine, BlobStore(registry_settings.service_data_dir / "blobs"), data)
    engine.dispose()
    store = secret_store_of(registry_settings)

    async with serving(registry_settings) as registry:  # migrates to head
        legacy = await get_version(registry, "models/legacy/versions/1")
        assert legacy.artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert not legacy.artifact.HasField("signature")
        with pytest.raises(ArtifactSignatureError) as unsigned:
            verify_artifact_signature(store, KEY, legacy.artifact)
        assert unsigned.value.reason == "ARTIFACT_UNSIGNED"
        assert (await download(registry, legacy.name))[1] == data

        fresh = await create_version(registry, "legacy", b"weights registered after")
        assert fresh.name == "models/legacy/versions/2"
        verify_artifact_signature(store, KEY, fresh.artifact)


def test_0003_downgrades_and_upgrades_again_with_rows_in_place(
    registry_settings: RegistrySettings,
) -> None:
    engine = database_of(registry_settings)
    migrate(engine, "0002")
    register_unsigned(engine, BlobStore(registry_settings.service_data_dir / "blobs"), b"w")
    migrate(engine, "head")
    migrate(engine, "0002", down=True)
    with engine.connect() as db:
        columns = {c["name"] for c in sa.inspect(db).get_columns("model_versions")}
        assert "signature" not in columns
        assert db.execute(sa.select(sa.func.count()).select_from(_versions_0002)).scalar() == 1
    migrate(engine, "head")
    engine.dispose()
