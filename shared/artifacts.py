"""Trusting an artifact before using it: the registry's signature over its digest,
and a local cache that only ever holds verified bytes.

The registry signs the raw 32-byte SHA-256 digest of every artifact when it is
registered, with a signing key of the secret store, and returns the signature
in ``Artifact.signature``. A consumer (inference, before it loads a model)
checks three things: the signature verifies with the same key name in its own
secret store (:func:`verify_artifact_signature`), the bytes it received hash to
the signed digest, and they have the signed size. :class:`ArtifactCache` does
all three and keeps what passed under its digest, so a tampered, truncated or
unsigned artifact never reaches the file a loader opens.

Verification errors are :class:`~conveyor.shared.errors.FailedPreconditionError`
subclasses: the artifact exists, it is just not one to trust. A secret store
that cannot be reached raises its own error (UNAVAILABLE), never a verdict.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.errors import FailedPreconditionError, from_rpc_error
from conveyor.shared.secrets.base import (
    ArtifactSignatureValue,
    SecretStore,
    SignatureAlgorithm,
    check_key_name,
)
from conveyor.shared.storage.blobs import SHA256_HEX
from conveyor.shared.storage.files import fsync_directory, process_alive

logger = logging.getLogger(__name__)

_ALGORITHM_PREFIX = "SIGNATURE_ALGORITHM_"
_PARTIAL_SUFFIX = ".partial"


class ArtifactSignatureError(FailedPreconditionError):
    """The artifact's signature is missing (reason ``ARTIFACT_UNSIGNED``) or does
    not verify with the trusted key (``ARTIFACT_SIGNATURE_INVALID``)."""

    default_reason = "ARTIFACT_SIGNATURE_INVALID"


class ArtifactDigestError(FailedPreconditionError):
    """The bytes received do not have the signed digest or size: they were
    altered in storage or in transit."""

    default_reason = "ARTIFACT_DIGEST_MISMATCH"


def verify_artifact_signature(store: SecretStore, key_name: str, artifact: pb.Artifact) -> None:
    """Raise :class:`ArtifactSignatureError` unless ``artifact.signature`` is a
    signature of ``artifact.sha256`` by some version of the signing key
    ``key_name`` (the one its ``key_id`` names; rotated-out versions still count).

    Blocking (the store may ask Vault): call it from a worker thread. Secret
    store failures propagate as they are (UNAVAILABLE when Vault is down).
    """
    value = signature_value(artifact)
    if not store.verify(key_name, bytes.fromhex(artifact.sha256), value):
        raise ArtifactSignatureError(
            f"the signature of artifact {artifact.sha256} does not verify with key {key_name!r}",
            metadata={"sha256": artifact.sha256, "key_id": value.key_id, "key_name": key_name},
        )


def signature_value(artifact: pb.Artifact) -> ArtifactSignatureValue:
    """The secret store's form of ``artifact.signature``; :class:`ArtifactSignatureError`
    when the artifact is unsigned or its signature or digest is malformed."""
    if not SHA256_HEX.match(artifact.sha256):
        raise ArtifactSignatureError(
            "the artifact's sha256 is not 64 lowercase hex characters",
            metadata={"sha256": artifact.sha256[:80]},
        )
    signature = artifact.signature
    if not artifact.HasField("signature") or not signature.signature:
        raise ArtifactSignatureError(
            f"artifact {artifact.sha256} carries no signature (registered before signing, "
            "or by a registry that does not sign)",
            reason="ARTIFACT_UNSIGNED",
            metadata={"sha256": artifact.sha256},
        )
    try:
        name = pb.SignatureAlgorithm.Name(signature.algorithm)
        algorithm = SignatureAlgorithm(name.removeprefix(_ALGORITHM_PREFIX))
    except ValueError:  # UNSPECIFIED, or a number newer than this code
        raise ArtifactSignatureError(
            f"artifact {artifact.sha256} has a signature of unknown algorithm "
            f"{signature.algorithm}",
            metadata={"sha256": artifact.sha256},
        ) from None
    return ArtifactSignatureValue(
        algorithm=algorithm, key_id=signature.key_id, signature=signature.signature
    )


def signature_proto(value: ArtifactSignatureValue, sign_time: datetime) -> pb.ArtifactSignature:
    """``value`` as the registry returns it in ``Artifact.signature``."""
    message = pb.ArtifactSignature(
        algorithm=pb.SignatureAlgorithm.Value(value.algorithm.proto_name),
        key_id=value.key_id,
        signature=value.signature,
    )
    # SQLite hands back naive datetimes; everything stored is UTC.
    message.sign_time.FromDatetime(sign_time if sign_time.tzinfo else sign_time.replace(tzinfo=UTC))
    return message


class ArtifactCache:
    """Verified artifacts on local disk, one file per digest (``<directory>/<sha256>``).

    :meth:`fetch` checks the version's signature, downloads the bytes through
    ``DownloadArtifact`` into a temporary file beside the cache, checks their
    size and digest, and only then renames the file into place (fsynced), so
    the path it returns always holds whole, verified bytes. A digest already
    cached is not downloaded again; its signature is still checked on every
    fetch, since the registry's record is what vouches for the digest.

    Files in the cache are trusted once written: whoever can write the cache
    directory can also write the process that reads it.
    """

    def __init__(
        self,
        directory: Path,
        store: SecretStore,
        key_name: str,
        *,
        call_timeout: timedelta = timedelta(seconds=30),
        download_timeout: timedelta = timedelta(hours=1),
    ) -> None:
        self.directory = directory
        self._store = store
        self._key_name = check_key_name(key_name)
        self._call_timeout = call_timeout.total_seconds()
        self._download_timeout = download_timeout.total_seconds()
        # One download per digest at a time in this process; the lock goes away
        # with its last user.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        directory.mkdir(parents=True, exist_ok=True)
        self.sweep_abandoned_downloads()

    def path(self, sha256: str) -> Path:
        """Where the artifact with this digest is (or would be) cached."""
        return self.directory / sha256

    async def fetch(
        self, registry: registry_service_pb2_grpc.RegistryServiceAsyncStub, version_name: str
    ) -> Path:
        """The local path of the artifact of ``version_name`` (a version name or
        an alias reference such as ``models/churn@production``), verified.

        Raises :class:`ArtifactSignatureError` when the version is unsigned or
        its signature does not verify, :class:`ArtifactDigestError` when the
        bytes do not match the signed digest or size (nothing is cached in
        either case), and the registry's error (NOT_FOUND, UNAVAILABLE, ...) as
        a :class:`~conveyor.shared.errors.ConveyorError` when a call fails.
        """
        try:
            reply = await registry.GetModelVersion(
                rpc.GetModelVersionRequest(name=version_name, view=pb.MODEL_VERSION_VIEW_BASIC),
                timeout=self._call_timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        version = reply.model_version
        artifact = version.artifact
        await asyncio.to_thread(verify_artifact_signature, self._store, self._key_name, artifact)
        target = self.path(artifact.sha256)
        lock = self._locks.setdefault(artifact.sha256, asyncio.Lock())
        async with lock:
            if await asyncio.to_thread(_cached, target, artifact.size_bytes):
                return target
            # The resolved name, not an alias: a move mid-download cannot mix artifacts.
            await self._download(registry, version.name, artifact, target)
        logger.info(
            "artifact cached",
            extra={"model_version": version.name, "sha256": artifact.sha256},
        )
        return target

    def sweep_abandoned_downloads(self) -> int:
        """Remove temporary files of downloads whose process is gone; returns how many."""
        removed = 0
        for leftover in self.directory.glob(f".*{_PARTIAL_SUFFIX}"):
            owner = leftover.name[1:].split("-", 1)[0]
            if owner.isdigit() and process_alive(int(owner)):
                continue
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    async def _download(
        self,
        registry: registry_service_pb2_grpc.RegistryServiceAsyncStub,
        version_name: str,
        artifact: pb.Artifact,
        target: Path,
    ) -> None:
        temporary = self.directory / f".{os.getpid()}-{uuid.uuid4().hex}{_PARTIAL_SUFFIX}"
        call = registry.DownloadArtifact(
            rpc.DownloadArtifactRequest(name=version_name), timeout=self._download_timeout
        )
        try:
            with temporary.open("xb") as file:
                digest, size = hashlib.sha256(), 0
                async for message in call:
                    if message.HasField("artifact") and message.artifact.sha256 != artifact.sha256:
                        raise _mismatch(version_name, artifact, message.artifact.sha256, size)
                    size += len(message.data)
                    if size > artifact.size_bytes:
                        raise _mismatch(version_name, artifact, "", size)
                    await asyncio.to_thread(_append, file, digest, message.data)
                if size != artifact.size_bytes or digest.hexdigest() != artifact.sha256:
                    raise _mismatch(version_name, artifact, digest.hexdigest(), size)
                await asyncio.to_thread(os.fsync, file.fileno())
            await asyncio.to_thread(_install, temporary, target)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        finally:
            call.cancel()  # a no-op once the stream has ended
            temporary.unlink(missing_ok=True)


def _cached(target: Path, size_bytes: int) -> bool:
    """Whether ``target`` holds a cached artifact of the expected size; a file of
    another size (a cache damaged outside this class) is removed to be fetched again."""
    try:
        size = target.stat().st_size
    except FileNotFoundError:
        return False
    if size == size_bytes:
        return True
    logger.warning(
        "cached artifact has the wrong size; fetching it again", extra={"path": str(target)}
    )
    target.unlink(missing_ok=True)
    return False


def _append(file: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    file.write(data)


def _install(temporary: Path, target: Path) -> None:
    os.replace(temporary, target)
    fsync_directory(target.parent)


def _mismatch(
    version_name: str, artifact: pb.Artifact, received_sha256: str, received_size: int
) -> ArtifactDigestError:
    return ArtifactDigestError(
        f"the bytes of {version_name} do not match its signed artifact "
        f"({artifact.size_bytes} bytes, sha256 {artifact.sha256}); refusing them",
        metadata={
            "model_version": version_name,
            "sha256": artifact.sha256,
            "received_sha256": received_sha256,
            "received_size": str(received_size),
        },
    )


__all__ = [
    "ArtifactCache",
    "ArtifactDigestError",
    "ArtifactSignatureError",
    "signature_proto",
    "signature_value",
    "verify_artifact_signature",
]
