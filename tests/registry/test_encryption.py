"""Artifacts and attachments are encrypted at rest (envelope encryption with a
data key per blob from the secret store), on SQLite and PostgreSQL: the bytes
on disk are not the plaintext, downloads decrypt and resume from any offset,
any change to the stored bytes is DATA_LOSS, blobs stored before encryption
was turned on stay readable, key rotation and Vault work, and a backup restores
with the same secret store (and only with it)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.backup import backup_registry, restore_registry
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.artifacts import ArtifactCache
from conveyor.shared.errors import DataLossError, FailedPreconditionError
from conveyor.shared.secrets import DecryptionFailedError, SecretStore, SecretStoreSettings
from conveyor.shared.secrets.vault import VaultSecretStore
from conveyor.shared.storage import encryption
from conveyor.shared.storage.blobs import ENCRYPTED_SUFFIX
from tests.support.fake_vault import FakeVault
from tests.support.registry import (
    a_version,
    create_model,
    create_version,
    download,
    refused,
    upload_requests,
)

if TYPE_CHECKING:
    Registry = registry_service_pb2_grpc.RegistryServiceAsyncStub

MIB = 1024 * 1024
CHUNK = encryption.DEFAULT_CHUNK_BYTES
TAG = encryption.TAG_BYTES
KEY = "artifact-encryption"  # RegistrySettings.artifact_encryption_key's default
MARKER = b"PLAINTEXT-MARKER-of-the-weights-5e1d"


def weights(size: int, seed: int = 0) -> bytes:
    """``size`` bytes in which MARKER recurs (so a plaintext copy is easy to find)."""
    block = MARKER + hashlib.sha256(str(seed).encode()).digest() * 30
    return (block * (size // len(block) + 1))[:size]


ARTIFACT = weights(3 * CHUNK + 17)  # three full chunks and a short one


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


def blob_file(settings: RegistrySettings, sha256: str) -> Path:
    """The stored file of a blob, in whichever form it is."""
    [path] = (settings.service_data_dir / "blobs" / "sha256" / sha256[:2]).glob(f"{sha256}*")
    return path


def header_of(path: Path, sha256: str) -> tuple[encryption.EncryptionHeader, int]:
    with path.open("rb") as file:
        header, raw = encryption.read_header(file, sha256)
    return header, len(raw)


def stored_files(settings: RegistrySettings) -> list[str]:
    root = settings.service_data_dir / "blobs"
    return sorted(p.name for p in (root / "sha256").rglob("*") if p.is_file())


async def test_artifacts_and_attachments_are_encrypted_at_rest(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", ARTIFACT)
    report = MARKER + b' {"auc": 0.93}'
    attachment = (
        await registry.CreateAttachment(
            rpc.CreateAttachmentRequest(
                parent=version.name,
                attachment_id="eval",
                attachment=pb.Attachment(
                    kind=pb.ATTACHMENT_KIND_EVALUATION_REPORT,
                    content_type="application/json",
                    content=report,
                ),
            ),
            timeout=10,
        )
    ).attachment

    # Addressed by the plaintext digest, as before: the signed digest is the same.
    assert version.artifact.sha256 == hashlib.sha256(ARTIFACT).hexdigest()
    assert stored_files(registry_settings) == sorted(
        f"{digest}{ENCRYPTED_SUFFIX}" for digest in (version.artifact.sha256, attachment.sha256)
    )
    path = blob_file(registry_settings, version.artifact.sha256)
    stored = path.read_bytes()
    assert MARKER not in stored
    assert MARKER not in blob_file(registry_settings, attachment.sha256).read_bytes()
    header, header_bytes = header_of(path, version.artifact.sha256)
    assert (header.chunk_bytes, header.key_name, header.key_version) == (CHUNK, KEY, 1)
    # Plaintext plus a 16-byte tag per chunk (three full, one short), plus the header.
    assert len(stored) == header_bytes + len(ARTIFACT) + 4 * TAG

    assert (await download(registry, version.name))[1] == ARTIFACT
    fetched = await registry.GetAttachment(
        rpc.GetAttachmentRequest(name=attachment.name), timeout=10
    )
    assert fetched.attachment.content == report


async def test_downloads_resume_at_any_offset(registry: Registry) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", ARTIFACT)
    size = len(ARTIFACT)
    for offset in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK, size - 1, size):
        messages, data = await download(registry, version.name, offset)
        assert data == ARTIFACT[offset:], offset
        assert messages[0].offset == offset
        assert messages[0].model_version == version.name
        assert all(len(m.data) <= CHUNK for m in messages)
        position = offset
        for message in messages:
            assert message.offset == position
            position += len(message.data)


async def test_a_download_stopped_midway_leaves_nothing_running(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """The server reads (and decrypts) one chunk ahead; a client that goes away
    mid-download leaves no read behind and no error of the registry's in the log.
    (gRPC may finalize the abandoned stream in another task, where the tracing
    and deadline interceptors' context tokens do not reset: those errors are the
    interceptors' and are left out here.)"""
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", ARTIFACT)
    for _ in range(3):
        call = registry.DownloadArtifact(rpc.DownloadArtifactRequest(name=version.name))
        async for message in call:
            assert message.data == ARTIFACT[: len(message.data)]
            break
        call.cancel()
    assert (await download(registry, version.name))[1] == ARTIFACT
    ours = [
        r
        for r in caplog.records
        if r.levelname == "ERROR"
        and (
            r.name.startswith("conveyor")
            or ("never retrieved" in r.getMessage() and "athrow" not in r.getMessage())
        )
    ]
    assert not ours


def flip_a_byte(path: Path, sha256: str) -> None:
    _, start = header_of(path, sha256)
    data = bytearray(path.read_bytes())
    data[start + CHUNK + TAG + 100] ^= 0x20  # in chunk 1's ciphertext
    path.write_bytes(bytes(data))


def swap_chunks(path: Path, sha256: str) -> None:
    _, start = header_of(path, sha256)
    data, step = path.read_bytes(), CHUNK + TAG
    first, second = data[start : start + step], data[start + step : start + 2 * step]
    path.write_bytes(data[:start] + second + first + data[start + 2 * step :])


def truncate(path: Path, sha256: str) -> None:
    path.write_bytes(path.read_bytes()[: -(17 + TAG)])  # the short last chunk is gone


def cut_mid_chunk(path: Path, sha256: str) -> None:
    path.write_bytes(path.read_bytes()[:-3])


TAMPERS: dict[str, Callable[[Path, str], None]] = {
    "flipped-byte": flip_a_byte,
    "swapped-chunks": swap_chunks,
    "truncated": truncate,
    "cut-mid-chunk": cut_mid_chunk,
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
async def test_altered_ciphertext_fails_the_download_with_data_loss(
    registry: Registry,
    registry_settings: RegistrySettings,
    tamper: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", ARTIFACT)
    digest = version.artifact.sha256
    path = blob_file(registry_settings, digest)
    header, _ = header_of(path, digest)
    data_key = registry_settings.open_secret_store().unwrap_data_key(
        header.key_name, header.wrapped_key, bytes.fromhex(digest)
    )
    TAMPERS[tamper](path, digest)

    error = await refused(download(registry, version.name), grpc.StatusCode.DATA_LOSS)
    assert error.reason in {"BLOB_AUTHENTICATION_FAILED", "BLOB_SIZE_MISMATCH", "BLOB_TRUNCATED"}
    assert error.metadata["sha256"] == digest
    # Logged, with the blob's digest, and never with key material.
    assert any(
        r.levelname == "ERROR" and r.__dict__.get("sha256") == digest for r in caplog.records
    )
    for secret in (
        data_key.hex(),
        base64.b64encode(data_key).decode(),
        repr(data_key),
        header.wrapped_key.decode(),
    ):
        assert secret not in caplog.text
        assert secret not in error.message
        assert secret not in str(error.metadata)


async def test_a_header_from_another_blob_is_data_loss(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "churn")
    victim = await create_version(registry, "churn", ARTIFACT)
    other = await create_version(registry, "churn", weights(len(ARTIFACT), seed=1))
    victim_path = blob_file(registry_settings, victim.artifact.sha256)
    other_path = blob_file(registry_settings, other.artifact.sha256)
    _, victim_header = header_of(victim_path, victim.artifact.sha256)
    _, other_header = header_of(other_path, other.artifact.sha256)

    # The other blob's header (its wrapped key) on the victim's chunks.
    transplanted = other_path.read_bytes()[:other_header] + victim_path.read_bytes()[victim_header:]
    victim_path.write_bytes(transplanted)
    error = await refused(download(registry, victim.name), grpc.StatusCode.DATA_LOSS)
    assert error.metadata["sha256"] == victim.artifact.sha256

    # The other blob's whole file in the victim's place.
    victim_path.write_bytes(other_path.read_bytes())
    await refused(download(registry, victim.name), grpc.StatusCode.DATA_LOSS)
    assert (await download(registry, other.name))[1] == weights(len(ARTIFACT), seed=1)


async def test_identical_content_is_stored_once(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "churn")
    first = await create_version(registry, "churn", ARTIFACT)
    second = await create_version(registry, "churn", ARTIFACT)
    assert first.artifact.sha256 == second.artifact.sha256
    assert stored_files(registry_settings) == [f"{first.artifact.sha256}{ENCRYPTED_SUFFIX}"]
    assert list((registry_settings.service_data_dir / "blobs" / "tmp").iterdir()) == []
    for version in (first, second):
        assert (await download(registry, version.name))[1] == ARTIFACT


async def test_blobs_stored_unencrypted_stay_readable_once_encryption_is_on(
    registry_settings: RegistrySettings,
) -> None:
    plaintext = registry_settings.model_copy(update={"encrypt_artifacts": False})
    async with serving(plaintext) as registry:
        await create_model(registry, "churn")
        old = await create_version(registry, "churn", ARTIFACT)
    assert blob_file(registry_settings, old.artifact.sha256).read_bytes() == ARTIFACT

    async with serving(registry_settings) as registry:  # encryption on: no migration
        _, data = await download(registry, old.name, offset=CHUNK + 5)
        assert data == ARTIFACT[CHUNK + 5 :]
        assert (await download(registry, old.name))[1] == ARTIFACT
        new = await create_version(registry, "churn", b"retrained" + MARKER)
        assert blob_file(registry_settings, new.artifact.sha256).name.endswith(ENCRYPTED_SUFFIX)

        # The same content uploaded again with encryption on replaces the plaintext copy.
        again = await create_version(registry, "churn", ARTIFACT)
        assert again.artifact.sha256 == old.artifact.sha256
        assert blob_file(registry_settings, old.artifact.sha256).name.endswith(ENCRYPTED_SUFFIX)
        assert MARKER not in blob_file(registry_settings, old.artifact.sha256).read_bytes()
        assert (await download(registry, old.name))[1] == ARTIFACT

    async with serving(plaintext) as registry:  # and off again: everything still reads
        assert (await download(registry, new.name))[1] == b"retrained" + MARKER
        assert (await download(registry, old.name))[1] == ARTIFACT


async def test_rotating_the_encryption_key_keeps_old_artifacts_readable(
    registry: Registry, registry_settings: RegistrySettings
) -> None:
    await create_model(registry, "churn")
    old = await create_version(registry, "churn", ARTIFACT)
    assert registry_settings.open_secret_store().rotate_key(KEY) == 2
    new = await create_version(registry, "churn", weights(CHUNK + 1, seed=2))

    versions = [
        header_of(blob_file(registry_settings, v.artifact.sha256), v.artifact.sha256)[0]
        for v in (old, new)
    ]
    assert [h.key_version for h in versions] == [1, 2]
    assert versions[0].wrapped_key.startswith(b"local:v1:")
    assert versions[1].wrapped_key.startswith(b"local:v2:")
    assert (await download(registry, old.name))[1] == ARTIFACT
    assert (await download(registry, new.name))[1] == weights(CHUNK + 1, seed=2)


async def test_vault_derives_a_key_per_blob_and_rotation_keeps_old_blobs_readable(
    registry_settings: RegistrySettings,
) -> None:
    with FakeVault() as vault:
        store = VaultSecretStore(vault.url, token=vault.issue_token(), timeout=5.0)
        async with serving(registry_settings, store) as registry:
            await create_model(registry, "churn")
            old = await create_version(registry, "churn", ARTIFACT)
            assert vault.transit["transit"][KEY].derived  # per-context keys
            assert ("POST", f"transit/datakey/plaintext/{KEY}") in vault.requests
            assert store.rotate_key(KEY) == 2
            new = await create_version(registry, "churn", weights(CHUNK, seed=3))

            for version, prefix in ((old, b"vault:v1:"), (new, b"vault:v2:")):
                digest = version.artifact.sha256
                header, _ = header_of(blob_file(registry_settings, digest), digest)
                assert header.wrapped_key.startswith(prefix)
                # The digest is the context: the wrapped key opens for no other blob.
                other = hashlib.sha256(b"another blob").digest()
                with pytest.raises(DecryptionFailedError):
                    store.unwrap_data_key(KEY, header.wrapped_key, other)
            assert (await download(registry, old.name, offset=2 * CHUNK + 1))[1] == ARTIFACT[
                2 * CHUNK + 1 :
            ]
            assert (await download(registry, new.name))[1] == weights(CHUNK, seed=3)

            vault.stop()  # Vault goes down: nothing is stored, nothing is served
            error = await refused(
                registry.CreateModelVersion(
                    upload_requests("models/churn", b"v3 weights", version=a_version()),
                    timeout=30,
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert error.reason == "BLOB_ENCRYPTION_UNAVAILABLE"
            assert vault.root_token not in error.message
            error = await refused(download(registry, old.name), grpc.StatusCode.UNAVAILABLE)
            assert error.reason == "BLOB_DECRYPTION_UNAVAILABLE"
    assert list((registry_settings.service_data_dir / "blobs" / "tmp").iterdir()) == []
    assert len(stored_files(registry_settings)) == 2


async def test_backup_and_restore_keep_blobs_encrypted_and_need_the_same_secret_store(
    registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    async with serving(registry_settings) as registry:
        await create_model(registry, "churn")
        first = await create_version(registry, "churn", ARTIFACT)
        second = await create_version(registry, "churn", b"small" + MARKER)
    manifest = backup_registry(registry_settings, tmp_path / "backup")

    assert all(blob.encrypted for blob in manifest.blobs)
    copies = sorted((tmp_path / "backup" / "blobs").rglob("*.enc"))
    assert len(copies) == 2
    assert all(MARKER not in copy.read_bytes() for copy in copies)

    # Another secret store cannot unwrap the data keys: refused before anything is written.
    stranger = RegistrySettings(
        data_dir=tmp_path / "elsewhere",
        secrets=SecretStoreSettings(local_dir=tmp_path / "other-secrets"),
    )
    with pytest.raises(FailedPreconditionError) as refused_restore:
        restore_registry(stranger, tmp_path / "backup")
    assert refused_restore.value.reason == "BACKUP_KEYS_UNAVAILABLE"
    assert not (stranger.service_data_dir / "registry.db").exists()

    # The same secret store (here: the source's local key directory) restores.
    target = RegistrySettings(
        data_dir=tmp_path / "restored",
        secrets=SecretStoreSettings(local_dir=registry_settings.data_dir / "secrets"),
    )
    assert restore_registry(target, tmp_path / "backup") == manifest
    assert all(name.endswith(ENCRYPTED_SUFFIX) for name in stored_files(target))
    async with serving(target) as registry:
        assert (await download(registry, first.name, offset=CHUNK))[1] == ARTIFACT[CHUNK:]
        assert (await download(registry, second.name))[1] == b"small" + MARKER


async def test_a_backup_refuses_a_damaged_encrypted_blob(
    registry: Registry, registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", ARTIFACT)
    flip_a_byte(blob_file(registry_settings, version.artifact.sha256), version.artifact.sha256)
    with pytest.raises(DataLossError):
        backup_registry(registry_settings, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()


async def test_the_artifact_cache_refuses_a_tampered_encrypted_blob(
    registry: Registry, registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    cache = ArtifactCache(
        tmp_path / "cache", registry_settings.open_secret_store(), "artifact-signing"
    )
    await create_model(registry, "churn")
    version = await create_version(registry, "churn", ARTIFACT)
    swap_chunks(blob_file(registry_settings, version.artifact.sha256), version.artifact.sha256)
    with pytest.raises(DataLossError):
        await cache.fetch(registry, version.name)
    assert list(cache.directory.iterdir()) == []


def test_encryption_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RegistrySettings().encrypt_artifacts is True
    assert RegistrySettings().artifact_encryption_key == KEY
    monkeypatch.setenv("CONVEYOR_REGISTRY_ENCRYPT_ARTIFACTS", "false")
    monkeypatch.setenv("CONVEYOR_REGISTRY_ARTIFACT_ENCRYPTION_KEY", "blob-keys")
    settings = RegistrySettings()
    assert (settings.encrypt_artifacts, settings.artifact_encryption_key) == (False, "blob-keys")
