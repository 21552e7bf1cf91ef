"""``conveyor.registry.v1.RegistryService`` over the registry store.

Transport only: parse and validate requests, run the store's (blocking) work
in threads, turn results into responses. Errors are raised as ConveyorError
and mapped to statuses by the shared interceptor.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol, TypeVar

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry import queries, validation
from conveyor.services.registry.records import LATEST, request_hash
from conveyor.services.registry.signing import ArtifactSigner, SignedDigest
from conveyor.services.registry.store import RegistryStore
from conveyor.services.registry.watch import AliasWatchHub
from conveyor.shared import names, pagination
from conveyor.shared.auth import caller_principal
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
)
from conveyor.shared.filtering import parse_filter
from conveyor.shared.storage.blobs import BlobInfo, BlobReader, BlobWriter, DigestMismatchError
from conveyor.shared.workers import WorkerThreads

DOWNLOAD_CHUNK_BYTES = 1024 * 1024
MAX_LINEAGE_DEPTH = 100
ALL_MODELS = "models/-"


AliasChange = Literal["set", "delete"]
T = TypeVar("T")


class PromotionGate(Protocol):
    """Asked before an alias moves or is deleted; the policy service provides the
    real one. It is asked before the store checks compare-and-set and states, so
    it may be asked about a change the store then refuses."""

    async def evaluate(
        self,
        *,
        model: pb.Model,
        version: pb.ModelVersion,
        alias_id: str,
        change: AliasChange,
        principal: str,
        reason: str,
    ) -> str:
        """The decision name that allows the change (``decisions/{id}``, or empty
        when no policy decided). ``version`` is the target of a move, or the
        version a deleted alias points at. Raises FailedPreconditionError,
        listing every failed gate, to refuse it."""
        ...


class NoPromotionGate:
    """Allows every change: the embedded default while no policy service is configured."""

    async def evaluate(
        self,
        *,
        model: pb.Model,
        version: pb.ModelVersion,
        alias_id: str,
        change: AliasChange,
        principal: str,
        reason: str,
    ) -> str:
        return ""


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: RegistryStore,
        watch_hub: AliasWatchHub,
        workers: WorkerThreads,
        *,
        gate: PromotionGate,
        signer: ArtifactSigner,
        max_artifact_bytes: int,
    ) -> None:
        self._store = store
        self._signer = signer
        self._workers = workers
        self._watch_hub = watch_hub
        self._gate = gate
        self._max_artifact_bytes = max_artifact_bytes

    # -- models --------------------------------------------------------------

    async def CreateModel(self, request: rpc.CreateModelRequest, context: Any) -> Any:
        model_id = request.model_id or f"model-{uuid.uuid4().hex[:12]}"
        names.check_id(model_id, field="model_id")
        validation.raise_if_any(validation.model_violations(request.model), "invalid model")
        model = await self._workers.run(
            self._store.create_model,
            model_id,
            request.model,
            principal=caller_principal(context),
            request_id=request.request_id,
            request_hash=request_hash(request),
        )
        return rpc.CreateModelResponse(model=model)

    async def GetModel(self, request: rpc.GetModelRequest, context: Any) -> Any:
        model_id = names.parse_model_name(request.name)
        return rpc.GetModelResponse(model=await self._workers.run(self._store.get_model, model_id))

    async def ListModels(self, request: rpc.ListModelsRequest, context: Any) -> Any:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, queries.MODEL_FILTERS)
        order, descending = queries.parse_order(
            request.order_by, ("name", "create_time", "update_time"), "name"
        )
        fingerprint = pagination.fingerprint(
            request.filter, request.order_by, request.show_archived
        )
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        page = await self._workers.run(
            self._store.list_models,
            restrictions,
            queries.resolve_model,
            order_by=order,
            descending=descending,
            show_archived=request.show_archived,
            offset=cursor.offset,
            limit=size,
        )
        return rpc.ListModelsResponse(
            models=page.items, next_page_token=_next_token(page.has_more, cursor, size, fingerprint)
        )

    async def UpdateModel(self, request: rpc.UpdateModelRequest, context: Any) -> Any:
        model_id = names.parse_model_name(request.model.name, field="model.name")
        paths = validation.mask_paths(request.update_mask, validation.MODEL_UPDATABLE)
        validation.raise_if_any(
            (
                v
                for v in validation.model_violations(request.model)
                if v.field.split(".")[1].split("[")[0] in paths
            ),
            "invalid model",
        )
        model = await self._workers.run(
            self._store.update_model, model_id, request.model, paths, etag=request.model.etag
        )
        return rpc.UpdateModelResponse(model=model)

    async def ArchiveModel(self, request: rpc.ArchiveModelRequest, context: Any) -> Any:
        model_id = names.parse_model_name(request.name)
        model = await self._workers.run(
            self._store.set_model_state, model_id, "ARCHIVED", etag=request.etag
        )
        return rpc.ArchiveModelResponse(model=model)

    async def UnarchiveModel(self, request: rpc.UnarchiveModelRequest, context: Any) -> Any:
        model_id = names.parse_model_name(request.name)
        model = await self._workers.run(self._store.set_model_state, model_id, "ACTIVE")
        return rpc.UnarchiveModelResponse(model=model)

    # -- versions and artifacts ----------------------------------------------

    async def CreateModelVersion(
        self, request_iterator: AsyncIterator[rpc.CreateModelVersionRequest], context: Any
    ) -> Any:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise _invalid("metadata", "the first message must carry the metadata")
        metadata = first.metadata
        model_id = names.parse_model_name(metadata.parent, field="metadata.parent")
        if metadata.ByteSize() > validation.MAX_VERSION_METADATA_BYTES:
            raise _invalid("metadata", f"at most {validation.MAX_VERSION_METADATA_BYTES} bytes")
        validation.raise_if_any(
            [
                *validation.upload_violations(
                    metadata.sha256, metadata.size_bytes, self._max_artifact_bytes
                ),
                *validation.version_violations(metadata.model_version, "metadata.model_version"),
            ],
            "invalid model version",
        )
        fingerprint = request_hash(metadata)
        done = await self._workers.run(
            self._store.find_request, metadata.request_id, "CreateModelVersion", fingerprint
        )
        if done is not None:  # a retry of a finished upload: no need for the bytes
            version = await self._workers.run(
                self._store.get_version,
                names.parse_model_version_ref(done),
                pb.MODEL_VERSION_VIEW_FULL,
            )
            return rpc.CreateModelVersionResponse(model_version=version)
        # Refuse an unknown or archived model before receiving any bytes.
        model = await self._workers.run(self._store.get_model, model_id)
        if model.state != pb.MODEL_STATE_ACTIVE:
            raise FailedPreconditionError(
                f"{model.name} is archived: it takes no new versions", reason="MODEL_ARCHIVED"
            )
        artifact, signature = await self._receive_artifact(request_iterator, metadata)
        version = await self._workers.run(
            self._store.create_version,
            model_id,
            metadata.model_version,
            artifact,
            signature=signature,
            principal=caller_principal(context),
            request_id=metadata.request_id,
            request_hash=fingerprint,
        )
        return rpc.CreateModelVersionResponse(model_version=version)

    async def _receive_artifact(
        self,
        chunks: AsyncIterator[rpc.CreateModelVersionRequest],
        metadata: rpc.CreateModelVersionMetadata,
    ) -> tuple[BlobInfo, SignedDigest]:
        """Store the streamed bytes (encrypted at rest when the store encrypts)
        and sign their digest. The digest is checked and signed before the blob
        is committed: when the secret store cannot sign (UNAVAILABLE), the
        temporary file is discarded and nothing remains."""
        # The data key comes from the secret store before the first byte is
        # accepted (the declared digest is its context): a worker's job.
        writer = await self._made_in_worker(
            functools.partial(self._store.blobs.writer, sha256=metadata.sha256), BlobWriter.abort
        )
        # Leaving this block early (a bad chunk, a cancelled or broken stream)
        # discards the temporary file: nothing becomes visible.
        with writer:
            received = 0
            # One chunk is hashed and written in a worker while the next one
            # arrives (hashlib releases the GIL on large buffers).
            writing: asyncio.Future[None] | None = None
            try:
                async for message in chunks:
                    if not message.HasField("chunk"):
                        raise _invalid("chunk", "every message after the first carries a chunk")
                    if len(message.chunk) > validation.MAX_CHUNK_BYTES:
                        raise _invalid("chunk", f"at most {validation.MAX_CHUNK_BYTES} bytes each")
                    received += len(message.chunk)
                    if received > metadata.size_bytes:
                        raise _invalid(
                            "metadata.size_bytes", "more bytes arrived than were declared"
                        )
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(self._workers.run(writer.write, message.chunk))
            finally:
                if writing is not None:  # never discard the file under a running write
                    await asyncio.shield(writing)
            try:
                writer.check(expected_sha256=metadata.sha256, expected_size=metadata.size_bytes)
                signature = await self._workers.run(self._signer.sign, writer.sha256)
                blob = await self._workers.run(
                    writer.commit,
                    expected_sha256=metadata.sha256,
                    expected_size=metadata.size_bytes,
                )
                return blob, signature
            except DigestMismatchError as mismatch:
                field = "size_bytes" if "declared_size" in mismatch.metadata else "sha256"
                raise InvalidArgumentError(
                    mismatch.message,
                    violations=[FieldViolation(f"metadata.{field}", mismatch.message)],
                    reason=mismatch.reason,
                    metadata=mismatch.metadata,
                ) from mismatch

    async def _made_in_worker(self, make: Callable[[], T], discard: Callable[[T], None]) -> T:
        """``make()`` in a worker (it may wait on the secret store). If the call is
        cancelled meanwhile, what the worker still makes is discarded, not leaked."""
        started = asyncio.ensure_future(self._workers.run(make))
        try:
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            started.add_done_callback(functools.partial(_discard_made, discard))
            raise

    async def GetModelVersion(self, request: rpc.GetModelVersionRequest, context: Any) -> Any:
        ref = _version_ref(request.name)
        view = request.view or pb.MODEL_VERSION_VIEW_FULL
        version = await self._workers.run(self._store.get_version, ref, view)
        return rpc.GetModelVersionResponse(model_version=version)

    async def ListModelVersions(self, request: rpc.ListModelVersionsRequest, context: Any) -> Any:
        model_id = _parent_model(request.parent)
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, queries.VERSION_FILTERS)
        order, descending = queries.parse_order(
            request.order_by, ("create_time", "metrics.*"), "create_time desc"
        )
        fingerprint = pagination.fingerprint(
            request.parent, request.filter, request.order_by, request.show_archived, request.view
        )
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        page = await self._workers.run(
            self._store.list_versions,
            model_id,
            restrictions,
            queries.resolve_version,
            sort_key=queries.version_sort_key(order, descending),
            show_archived=request.show_archived,
            view=request.view or pb.MODEL_VERSION_VIEW_BASIC,
            offset=cursor.offset,
            limit=size,
        )
        return rpc.ListModelVersionsResponse(
            model_versions=page.items,
            next_page_token=_next_token(page.has_more, cursor, size, fingerprint),
        )

    async def UpdateModelVersion(self, request: rpc.UpdateModelVersionRequest, context: Any) -> Any:
        ref = _exact_version(request.model_version.name, "model_version.name")
        paths = validation.mask_paths(request.update_mask, validation.VERSION_UPDATABLE)
        validation.raise_if_any(
            (
                v
                for v in validation.version_violations(request.model_version, "model_version")
                if v.field.split(".")[1].split("[")[0] in paths
            ),
            "invalid model version",
        )
        version = await self._workers.run(
            self._store.update_version,
            ref,
            request.model_version,
            paths,
            etag=request.model_version.etag,
            principal=caller_principal(context),
        )
        return rpc.UpdateModelVersionResponse(model_version=version)

    async def ArchiveModelVersion(
        self, request: rpc.ArchiveModelVersionRequest, context: Any
    ) -> Any:
        ref = _exact_version(request.name, "name")
        version = await self._workers.run(
            self._store.set_version_state, ref, "ARCHIVED", etag=request.etag
        )
        return rpc.ArchiveModelVersionResponse(model_version=version)

    async def UnarchiveModelVersion(
        self, request: rpc.UnarchiveModelVersionRequest, context: Any
    ) -> Any:
        ref = _exact_version(request.name, "name")
        version = await self._workers.run(self._store.set_version_state, ref, "ACTIVE")
        return rpc.UnarchiveModelVersionResponse(model_version=version)

    async def DownloadArtifact(
        self, request: rpc.DownloadArtifactRequest, context: Any
    ) -> AsyncIterator[rpc.DownloadArtifactResponse]:
        ref = _version_ref(request.name)
        version = await self._workers.run(self._store.get_version, ref, pb.MODEL_VERSION_VIEW_BASIC)
        size = version.artifact.size_bytes
        if not 0 <= request.offset <= size:
            raise _invalid("offset", f"must be in [0, {size}], the artifact's size")
        offset = request.offset
        # Opening an encrypted blob checks its layout against the size and
        # unwraps its data key (a secret store call); every read decrypts and
        # authenticates one chunk (DATA_LOSS if it fails), in a worker.
        artifact = await self._made_in_worker(
            functools.partial(self._store.blobs.open, version.artifact.sha256, expected_size=size),
            BlobReader.close,
        )
        # An encrypted blob's next chunk is read and decrypted in a worker while
        # this one is sent. The file is closed once the last read is over, never under it
        # (a cancelled call does not stop a worker), and without waiting here
        # (a closing stream must not suspend: gRPC may close it from another task).
        last: asyncio.Future[Any] | None = None

        def in_worker(call: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            nonlocal last
            last = asyncio.ensure_future(self._workers.run(call, *args))
            return last

        try:
            await asyncio.shield(in_worker(artifact.seek, offset))
            # The first message names what is being sent, even for an empty tail.
            message = rpc.DownloadArtifactResponse(
                artifact=version.artifact, model_version=version.name, offset=offset
            )
            message.data = await asyncio.shield(in_worker(artifact.read, DOWNLOAD_CHUNK_BYTES))
            while True:
                # Decrypting is the costly step: start on the next chunk before
                # sending this one. A plaintext read (a page-cache copy) is cheaper
                # than running it beside the send (measured: bench/README.md).
                ahead = (
                    in_worker(artifact.read, DOWNLOAD_CHUNK_BYTES) if artifact.encrypted else None
                )
                yield message
                offset += len(message.data)
                data = await asyncio.shield(ahead or in_worker(artifact.read, DOWNLOAD_CHUNK_BYTES))
                if not data:
                    return
                message = rpc.DownloadArtifactResponse(offset=offset, data=data)
        finally:
            if last is None or last.done():
                _close_after(artifact, last)
            else:
                last.add_done_callback(functools.partial(_close_after, artifact))

    # -- attachments ---------------------------------------------------------

    async def CreateAttachment(self, request: rpc.CreateAttachmentRequest, context: Any) -> Any:
        ref = _exact_version(request.parent, "parent")
        attachment_id = request.attachment_id or f"a-{uuid.uuid4().hex[:12]}"
        names.check_id(attachment_id, field="attachment_id")
        validation.raise_if_any(
            validation.attachment_violations(request.attachment, "attachment"), "invalid attachment"
        )
        attachment = await self._workers.run(
            self._store.create_attachment,
            ref,
            attachment_id,
            request.attachment,
            principal=caller_principal(context),
            request_id=request.request_id,
            request_hash=request_hash(request),
        )
        return rpc.CreateAttachmentResponse(attachment=attachment)

    async def GetAttachment(self, request: rpc.GetAttachmentRequest, context: Any) -> Any:
        parent, separator, attachment_id = request.name.rpartition("/attachments/")
        if not separator:
            raise _invalid("name", "expected models/{m}/versions/{v}/attachments/{attachment}")
        _exact_version(parent, "name")
        names.check_id(attachment_id, field="name")
        attachment = await self._workers.run(self._store.get_attachment, request.name)
        return rpc.GetAttachmentResponse(attachment=attachment)

    async def ListAttachments(self, request: rpc.ListAttachmentsRequest, context: Any) -> Any:
        ref = _version_ref(request.parent, "parent")
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, queries.ATTACHMENT_FILTERS)
        _, descending = queries.parse_order(request.order_by, ("create_time",), "create_time desc")
        fingerprint = pagination.fingerprint(request.parent, request.filter, request.order_by)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        _, page = await self._workers.run(
            self._store.list_attachments,
            ref,
            restrictions,
            queries.resolve_attachment,
            newest_first=descending,
            offset=cursor.offset,
            limit=size,
        )
        return rpc.ListAttachmentsResponse(
            attachments=page.items,
            next_page_token=_next_token(page.has_more, cursor, size, fingerprint),
        )

    # -- aliases -------------------------------------------------------------

    async def SetAlias(self, request: rpc.SetAliasRequest, context: Any) -> Any:
        model_id, alias_id = _alias_name(request.name)
        target = _exact_version(request.version, "version")
        violations = list(validation.reason_violations(request.reason, required=True))
        if target.model != model_id:
            violations.append(FieldViolation("version", f"must be a version of models/{model_id}"))
        if request.expected_version not in ("", "-"):
            _exact_version(request.expected_version, "expected_version")
        validation.raise_if_any(violations, "invalid alias change")
        principal = caller_principal(context)
        decision = await self._ask_gate(target, alias_id, "set", principal, request.reason)
        alias = await self._workers.run(
            self._store.aliases.set,
            model_id,
            alias_id,
            target.version or 0,
            principal=principal,
            reason=request.reason,
            decision=decision,
            expected_version=request.expected_version,
        )
        self._watch_hub.notify()
        return rpc.SetAliasResponse(alias=alias)

    async def DeleteAlias(self, request: rpc.DeleteAliasRequest, context: Any) -> Any:
        model_id, alias_id = _alias_name(request.name)
        validation.raise_if_any(
            validation.reason_violations(request.reason, required=True), "invalid alias deletion"
        )
        if request.expected_version:
            _exact_version(request.expected_version, "expected_version")
        principal = caller_principal(context)
        current = names.ModelVersionRef(model_id, alias=alias_id)
        try:
            decision = await self._ask_gate(current, alias_id, "delete", principal, request.reason)
        except NotFoundError as missing:
            await self._workers.run(self._store.get_model, model_id)  # an unknown model says so
            raise NotFoundError(
                f"{request.name} does not exist", reason="ALIAS_NOT_FOUND"
            ) from missing
        alias = await self._workers.run(
            self._store.aliases.delete,
            model_id,
            alias_id,
            principal=principal,
            reason=request.reason,
            decision=decision,
            expected_version=request.expected_version,
        )
        self._watch_hub.notify()
        return rpc.DeleteAliasResponse(alias=alias)

    async def _ask_gate(
        self,
        version_ref: names.ModelVersionRef,
        alias_id: str,
        change: AliasChange,
        principal: str,
        reason: str,
    ) -> str:
        """The gate's decision on changing ``alias_id`` (to or from ``version_ref``)."""
        model = await self._workers.run(self._store.get_model, version_ref.model)
        version = await self._workers.run(
            self._store.get_version, version_ref, pb.MODEL_VERSION_VIEW_FULL
        )
        return await self._gate.evaluate(
            model=model,
            version=version,
            alias_id=alias_id,
            change=change,
            principal=principal,
            reason=reason,
        )

    async def ListAliases(self, request: rpc.ListAliasesRequest, context: Any) -> Any:
        model_id = _parent_model(request.parent)
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.fingerprint(request.parent)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        aliases, _ = await self._workers.run(self._store.aliases.snapshot, model_id)
        page = aliases[cursor.offset : cursor.offset + size]
        has_more = len(aliases) > cursor.offset + size
        return rpc.ListAliasesResponse(
            aliases=page, next_page_token=_next_token(has_more, cursor, size, fingerprint)
        )

    async def WatchAliases(
        self, request: rpc.WatchAliasesRequest, context: Any
    ) -> AsyncIterator[rpc.WatchAliasesResponse]:
        model_id = _parent_model(request.parent)
        for i, alias_id in enumerate(request.alias_ids):
            validation.alias_id(alias_id, field=f"alias_ids[{i}]")
        if request.start_revision < 0:
            raise _invalid("start_revision", "0 for the current state, or a revision received")
        async for event in self._watch_hub.watch(
            model_id, list(request.alias_ids), request.start_revision
        ):
            yield event

    # -- lineage -------------------------------------------------------------

    async def GetLineage(self, request: rpc.GetLineageRequest, context: Any) -> Any:
        ref = _version_ref(request.name)
        if request.max_depth < 0:
            raise _invalid("max_depth", "0 for all (at most 100), or a positive depth")
        depth = min(request.max_depth or MAX_LINEAGE_DEPTH, MAX_LINEAGE_DEPTH)
        direction = request.direction
        start, ancestors, descendants = await self._workers.run(
            self._store.lineage,
            ref,
            ancestors=direction != pb.LINEAGE_DIRECTION_DESCENDANTS,
            descendants=direction != pb.LINEAGE_DIRECTION_ANCESTORS,
            max_depth=depth,
        )
        returned = [start, *ancestors, *descendants]
        known = {v.name for v in returned}
        edges = [
            pb.LineageEdge(
                parent_version=v.lineage.parent_version,
                child_version=v.name,
                transformation=v.lineage.transformation,
            )
            for v in returned
            if v.lineage.parent_version in known
        ]
        return rpc.GetLineageResponse(
            model_version=start, ancestors=ancestors, descendants=descendants, edges=edges
        )


def _close_after(reader: BlobReader, read: asyncio.Future[Any] | None) -> None:
    """Close a download's reader once its last read is over (its outcome, an
    error included, no longer matters: the download has ended)."""
    if read is not None and not read.cancelled():
        read.exception()
    reader.close()


def _discard_made(discard: Callable[[T], None], started: asyncio.Future[T]) -> None:
    if not started.cancelled() and started.exception() is None:
        discard(started.result())


def _invalid(field: str, description: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{field}: {description}", violations=[FieldViolation(field, description)]
    )


def _next_token(has_more: bool, cursor: pagination.PageCursor, size: int, fingerprint: str) -> str:
    if not has_more:
        return ""
    return pagination.encode_page_token(pagination.PageCursor(cursor.offset + size), fingerprint)


def _version_ref(name: str, field: str = "name") -> names.ModelVersionRef:
    """A version name or an alias reference (``@latest`` included)."""
    ref = names.parse_model_version_ref(name, field=field)
    if ref.alias is not None and ref.alias != LATEST:
        validation.alias_id(ref.alias, field=field)
    return ref


def _exact_version(name: str, field: str) -> names.ModelVersionRef:
    ref = names.parse_model_version_ref(name, field=field)
    if ref.version is None:
        raise _invalid(field, "a version name (models/{m}/versions/{v}), not an alias")
    return ref


def _parent_model(parent: str) -> str | None:
    """The model id of a List parent; None for ``models/-`` (every model)."""
    if parent == ALL_MODELS:
        return None
    return names.parse_model_name(parent, field="parent")


def _alias_name(name: str) -> tuple[str, str]:
    model_name, separator, alias_id = name.partition("/aliases/")
    if not separator:
        raise _invalid("name", "expected models/{model}/aliases/{alias}")
    return names.parse_model_name(model_name), validation.alias_id(alias_id)
