"""ArtifactCache against a real registry: only bytes that match the registry's
signed digest ever land in the cache, whatever was tampered with (the stored
blob, the signature in the database, the signing key), and key rotation in
Vault leaves older artifacts loadable."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import sqlalchemy as sa

from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.artifacts import (
    ArtifactCache,
    ArtifactDigestError,
    ArtifactSignatureError,
    verify_artifact_signature,
)
from conveyor.shared.errors import NotFoundError
from conveyor.shared.secrets import LocalSecretStore, SecretStore
from conveyor.shared.secrets.vault import VaultSecretStore
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url
from tests.support.fake_vault import FakeVault
from tests.support.registry import create_model, create_version

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

KEY = "artifact-signing"
WEIGHTS = b"\x08\x07onnx graph" * 300_000  # several download chunks


@pytest.fixture(autouse=True)
def registry_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry by itself: no authentication, no promotion gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> RegistrySettings:
    """The registry's settings; ``indirect`` parametrization with "plaintext"
    turns encryption at rest off (so a test can alter a blob's bytes in place)."""
    encrypt = getattr(request, "param", "encrypted") != "plaintext"
    return RegistrySettings(data_dir=tmp_path / "data", encrypt_artifacts=encrypt)


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


@pytest.fixture
async def registry(settings: RegistrySettings) -> AsyncIterator[Registry]:
    async with serving(settings) as stub:
        yield stub


@pytest.fixture
def cache(settings: RegistrySettings, tmp_path: Path) -> ArtifactCache:
    """Inference's cache, trusting the key the registry signs with (one local store)."""
    return ArtifactCache(tmp_path / "cache", settings.open_secret_store(), KEY)


def blob_path(settings: RegistrySettings, sha256: str) -> Path:
    """The stored file: ``<digest>``, or ``<digest>.enc`` when encrypted."""
    [path] = (settings.service_data_dir / "blobs" / "sha256" / sha256[:2]).glob(f"{sha256}*")
    return path


def cached_files(cache: ArtifactCache) -> list[str]:
    return sorted(path.name for path in cache.directory.iterdir())


def update_version_row(settings: RegistrySettings, name: str, **values: object) -> None:
    """Change the version's row behind the registry's back (an attacker with
    database access)."""
    model_id, _, number = name.removeprefix("models/").partition("/versions/")
    engine = create_engine(sqlite_url(settings.service_data_dir / "registry.db"))
    with engine.begin() as db:
        db.execute(
            sa.text(
                "UPDATE model_versions SET "
                + ", ".join(f"{column} = :{column}" for column in values)
                + " WHERE version = :number AND model_pk = "
                "(SELECT id FROM models WHERE model_id = :model_id)"
            ),
            {**values, "number": int(number), "model_id": model_id},
        )
    engine.dispose()


async def test_a_good_artifact_is_fetched_verified_and_cached(
    registry: Registry, settings: RegistrySettings, cache: ArtifactCache
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)

    path = await cache.fetch(registry, "models/churn@latest")

    assert path == cache.directory / version.artifact.sha256
    assert path.read_bytes() == WEIGHTS
    assert cached_files(cache) == [version.artifact.sha256]

    # Cached by digest: a later fetch, of this or another version with the same
    # bytes, downloads nothing (the registry's copy is gone and it still works).
    twin = await create_version(registry, "churn", WEIGHTS)
    blob_path(settings, version.artifact.sha256).unlink()
    assert await cache.fetch(registry, version.name) == path
    assert await cache.fetch(registry, twin.name) == path


async def test_concurrent_fetches_of_one_artifact_share_the_file(
    registry: Registry, cache: ArtifactCache
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)

    paths = await asyncio.gather(*(cache.fetch(registry, version.name) for _ in range(4)))

    assert set(paths) == {cache.directory / version.artifact.sha256}
    assert cached_files(cache) == [version.artifact.sha256]


# The registry's own check of encrypted blobs answers DATA_LOSS before the cache
# sees a byte (tests/registry/test_encryption.py); here the blob is plaintext,
# so it is the cache's digest check that refuses the altered bytes.
@pytest.mark.parametrize("settings", ["plaintext"], indirect=True)
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 1]), id="bit-flip"),
        pytest.param(lambda data: data[:1000], id="truncated"),
        pytest.param(lambda data: data + b"backdoor", id="appended"),
    ],
)
async def test_a_blob_altered_in_the_registry_is_refused_and_not_cached(
    registry: Registry, settings: RegistrySettings, cache: ArtifactCache, tamper: object
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)
    blob = blob_path(settings, version.artifact.sha256)
    blob.write_bytes(tamper(WEIGHTS))  # type: ignore[operator]

    with pytest.raises(ArtifactDigestError) as refused:
        await cache.fetch(registry, version.name)

    assert refused.value.reason == "ARTIFACT_DIGEST_MISMATCH"
    assert refused.value.metadata["sha256"] == version.artifact.sha256
    assert cached_files(cache) == []  # no file, not even a partial one


async def test_a_signature_altered_in_the_database_is_refused_and_nothing_cached(
    registry: Registry, settings: RegistrySettings, cache: ArtifactCache
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)
    forged = bytearray(version.artifact.signature.signature)
    forged[0] ^= 0xFF
    update_version_row(settings, version.name, signature=bytes(forged))

    with pytest.raises(ArtifactSignatureError) as refused:
        await cache.fetch(registry, version.name)

    assert refused.value.reason == "ARTIFACT_SIGNATURE_INVALID"
    assert refused.value.metadata["key_id"] == version.artifact.signature.key_id
    assert cached_files(cache) == []


async def test_a_digest_swapped_in_the_database_is_refused(
    registry: Registry, settings: RegistrySettings, cache: ArtifactCache
) -> None:
    """Pointing a signed version at other (unsigned) bytes breaks its signature."""
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)
    other = await create_version(registry, "churn", b"malicious weights")
    swapped = pb.ModelVersion(format=version.format, task=version.task)
    swapped.artifact.sha256 = other.artifact.sha256
    swapped.artifact.size_bytes = other.artifact.size_bytes
    update_version_row(
        settings,
        version.name,
        sha256=other.artifact.sha256,
        size_bytes=other.artifact.size_bytes,
        body=swapped.SerializeToString(),
    )

    with pytest.raises(ArtifactSignatureError) as refused:
        await cache.fetch(registry, version.name)
    assert refused.value.reason == "ARTIFACT_SIGNATURE_INVALID"
    assert cached_files(cache) == []


async def test_an_unsigned_version_is_refused(
    registry: Registry, settings: RegistrySettings, cache: ArtifactCache
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)
    update_version_row(
        settings,
        version.name,
        signature=None,
        signature_key_id=None,
        signature_algorithm=None,
        sign_time=None,
    )

    with pytest.raises(ArtifactSignatureError) as refused:
        await cache.fetch(registry, version.name)

    assert refused.value.reason == "ARTIFACT_UNSIGNED"
    assert cached_files(cache) == []


async def test_an_artifact_signed_by_another_key_is_refused(
    settings: RegistrySettings, tmp_path: Path
) -> None:
    # The registry signs with a key of its own store; inference trusts another.
    trusted = LocalSecretStore(tmp_path / "inference-secrets")
    trusted.ensure_key(KEY, "ed25519")
    cache = ArtifactCache(tmp_path / "cache", trusted, KEY)
    async with serving(settings) as registry:
        await create_model(registry, "churn")
        version = await create_version(registry, "churn", WEIGHTS)

        with pytest.raises(ArtifactSignatureError):
            await cache.fetch(registry, version.name)
    assert cached_files(cache) == []


async def test_a_registry_signing_with_another_key_name_is_refused(
    tmp_path: Path,
) -> None:
    settings = RegistrySettings(data_dir=tmp_path / "data", artifact_signing_key="staging-key")
    cache = ArtifactCache(tmp_path / "cache", settings.open_secret_store(), KEY)
    async with serving(settings) as registry:
        await create_model(registry, "churn")
        version = await create_version(registry, "churn", WEIGHTS)

        with pytest.raises(ArtifactSignatureError):
            await cache.fetch(registry, version.name)
    assert cached_files(cache) == []


async def test_a_damaged_cache_file_is_fetched_again(
    registry: Registry, cache: ArtifactCache
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", WEIGHTS)
    path = await cache.fetch(registry, version.name)
    path.write_bytes(WEIGHTS[:10])

    assert await cache.fetch(registry, version.name) == path
    assert path.read_bytes() == WEIGHTS


async def test_registry_errors_come_back_as_conveyor_errors(
    registry: Registry, cache: ArtifactCache
) -> None:
    with pytest.raises(NotFoundError):
        await cache.fetch(registry, "models/missing/versions/1")


def test_abandoned_partial_downloads_are_swept(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    dead = directory / ".999999999-0123.partial"  # no such process
    dead.write_bytes(b"half")
    kept = directory / ("ab" * 32)
    kept.write_bytes(b"whole")

    ArtifactCache(directory, LocalSecretStore(tmp_path / "secrets"), KEY)

    assert not dead.exists()
    assert kept.exists()


async def test_vault_rotation_keeps_old_artifacts_verifiable(
    settings: RegistrySettings, tmp_path: Path
) -> None:
    with FakeVault() as vault:
        registry_store = VaultSecretStore(vault.url, token=vault.issue_token(), timeout=5.0)
        inference_store = VaultSecretStore(vault.url, token=vault.issue_token(), timeout=5.0)
        cache = ArtifactCache(tmp_path / "cache", inference_store, KEY)
        async with serving(settings, registry_store) as registry:
            await create_model(registry, "churn")
            old = await create_version(registry, "churn", WEIGHTS)
            assert registry_store.rotate_key(KEY) == 2
            new = await create_version(registry, "churn", b"retrained weights")

            assert old.artifact.signature.key_id == f"vault-transit/{KEY}/1"
            assert new.artifact.signature.key_id == f"vault-transit/{KEY}/2"
            assert (await cache.fetch(registry, old.name)).read_bytes() == WEIGHTS
            assert (await cache.fetch(registry, new.name)).read_bytes() == b"retrained weights"
    assert cached_files(cache) == sorted(
        hashlib.sha256(data).hexdigest() for data in (WEIGHTS, b"retrained weights")
    )


def test_signature_algorithms_unknown_to_this_code_are_refused(tmp_path: Path) -> None:
    store = LocalSecretStore(tmp_path / "secrets")
    artifact = pb.Artifact(
        sha256=hashlib.sha256(b"x").hexdigest(),
        size_bytes=1,
        signature=pb.ArtifactSignature(key_id="local/" + "0" * 64, signature=b"sig"),
    )
    with pytest.raises(ArtifactSignatureError):
        verify_artifact_signature(store, KEY, artifact)
