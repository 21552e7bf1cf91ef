"""``conveyor models download`` and ``conveyor models upload``: artifacts in chunks.

A download streams into ``FILE.part`` and renames it to ``FILE`` only once the
whole artifact's SHA-256 matches the digest the registry sent, so ``FILE`` is
either absent or right. Next to the partial file, ``FILE.part.json`` records
the version the bytes belong to (``{"model_version", "sha256", "size_bytes"}``);
``--resume`` continues that exact version from the partial file's size even
when the alias given has moved since, as the contract asks. An upload hashes
the file first (the registry refuses a digest that does not match what
arrives), then streams it in 1 MiB chunks with a request id.

The argparse ``type=`` parsers of these commands' arguments are here too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import grpc

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.services.registry.cli import CommandError, HintedRpcError, Session, model_name
from conveyor.services.registry.cli_output import Progress, human_size
from conveyor.shared import names
from conveyor.shared.errors import ConveyorError

CHUNK_BYTES = 1024 * 1024
"""Upload chunk size: the contract recommends 1 MiB (2 MiB at most)."""

FORMATS = {
    name.removeprefix("MODEL_FORMAT_").lower(): value
    for name, value in pb.ModelFormat.items()
    if value != pb.MODEL_FORMAT_UNSPECIFIED
}
TASKS = {
    name.removeprefix("TASK_TYPE_").lower(): value
    for name, value in pb.TaskType.items()
    if value != pb.TASK_TYPE_UNSPECIFIED
}
DTYPES = {
    name.removeprefix("TENSOR_DATA_TYPE_"): value
    for name, value in pb.TensorDataType.items()
    if value != pb.TENSOR_DATA_TYPE_UNSPECIFIED
}


async def models_download(session: Session, args: argparse.Namespace) -> int:
    """Streams an artifact to ``args.output``, verifies it, renames it into place."""
    target: Path = args.output
    partial = target.with_name(target.name + ".part")
    record = _record_path(partial)
    name: str = args.reference
    offset, expected = 0, None
    if args.resume and partial.exists():
        offset = partial.stat().st_size
        expected = _read_record(record)
        if expected is not None:
            name = expected.name
        print(f"resuming {name} at byte {offset}", file=sys.stderr)
    digest = await asyncio.to_thread(_sha256_of, partial, offset)
    request = rpc.DownloadArtifactRequest(name=name, offset=offset)
    resolved, artifact, offset = await _receive(session, request, partial, expected, digest)
    if offset != artifact.size_bytes:
        raise CommandError(
            "DATA_LOSS",
            f"the stream ended at byte {offset} of {artifact.size_bytes}",
            hint=f"add --resume to continue from {partial}",
        )
    if digest.hexdigest() != artifact.sha256:
        partial.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
        raise CommandError(
            "DATA_LOSS",
            f"the downloaded bytes hash to {digest.hexdigest()}, not {artifact.sha256}",
            hint="the partial file was removed: download again without --resume",
        )
    partial.replace(target)
    record.unlink(missing_ok=True)
    print(f"{resolved} -> {target} ({human_size(offset)}, sha256 {artifact.sha256} verified)")
    return 0


async def models_upload(session: Session, args: argparse.Namespace) -> int:
    """Hashes ``args.file``, uploads it as a new version; prints the version's name."""
    path: Path = args.file
    size = (await asyncio.to_thread(path.stat)).st_size
    sha256 = (await asyncio.to_thread(_sha256_of, path, size)).hexdigest()
    version = pb.ModelVersion(
        format=FORMATS[args.format],
        task=TASKS[args.task] if args.task else pb.TASK_TYPE_UNSPECIFIED,
        description=args.description or "",
        metrics=dict(args.metrics or []),
        labels=dict(args.label or []),
    )
    if args.input or args.output:
        version.signature.CopyFrom(
            pb.ModelSignature(inputs=args.input or [], outputs=args.output or [])
        )
    if args.parent:
        version.lineage.parent_version = args.parent
    metadata = rpc.CreateModelVersionMetadata(
        parent=model_name(args.model),
        model_version=version,
        sha256=sha256,
        size_bytes=size,
        request_id=str(uuid.uuid4()),
    )
    progress = Progress(f"uploading {path.name}", size)
    reply = await session.registry.CreateModelVersion(
        _upload_requests(metadata, path, progress), timeout=session.transfer_timeout
    )
    progress.finish()
    print(reply.model_version.name)
    return 0


# -- argument parsers ----------------------------------------------------------


def version_reference(text: str) -> str:
    """``churn@production``, ``churn/versions/3`` or ``churn@latest`` as a full name."""
    name = model_name(text)
    try:
        names.parse_model_version_ref(name)
    except ConveyorError as error:
        raise argparse.ArgumentTypeError(
            f"expected MODEL@ALIAS, MODEL/versions/N or MODEL@latest, got {text!r}"
        ) from error
    return name


def metric(text: str) -> tuple[str, float]:
    """``accuracy=0.97``."""
    key, value = key_value(text)
    try:
        return key, float(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from error


def key_value(text: str) -> tuple[str, str]:
    """``key=value``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def tensor_spec(text: str) -> pb.TensorSpec:
    """``input:FP32:-1,30``: name, Open Inference Protocol datatype, shape."""
    name, _, rest = text.rpartition(":")
    name, _, dtype = name.rpartition(":")
    try:
        shape = [int(dim) for dim in rest.split(",")] if rest else []
    except ValueError:
        shape = None
    if not name or dtype.upper() not in DTYPES or shape is None:
        raise argparse.ArgumentTypeError(
            f"expected NAME:DTYPE:SHAPE such as input:FP32:-1,30 "
            f"(DTYPE one of {', '.join(DTYPES)}), got {text!r}"
        )
    return pb.TensorSpec(name=name, dtype=DTYPES[dtype.upper()], shape=shape)


# -- helpers -----------------------------------------------------------------


async def _upload_requests(
    metadata: rpc.CreateModelVersionMetadata, path: Path, progress: Progress
) -> AsyncIterator[rpc.CreateModelVersionRequest]:
    yield rpc.CreateModelVersionRequest(metadata=metadata)
    with path.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, CHUNK_BYTES):
            progress.advance(len(chunk))
            yield rpc.CreateModelVersionRequest(chunk=chunk)


def _sha256_of(path: Path, length: int) -> hashlib._Hash:
    """A SHA-256 over the first ``length`` bytes of ``path`` (none when 0)."""
    digest = hashlib.sha256()
    if length:
        with path.open("rb") as source:
            remaining = length
            while remaining and (block := source.read(min(CHUNK_BYTES, remaining))):
                digest.update(block)
                remaining -= len(block)
    return digest


async def _receive(
    session: Session,
    request: rpc.DownloadArtifactRequest,
    partial: Path,
    expected: _Record | None,
    digest: hashlib._Hash,
) -> tuple[str, pb.Artifact, int]:
    """Appends the stream to ``partial`` (opened at the first message, so a refused
    call leaves no file); returns the resolved version, its artifact, the end offset."""
    offset, resolved, artifact = request.offset, "", pb.Artifact()
    opened: tuple[BinaryIO, Progress] | None = None
    with contextlib.ExitStack() as files:
        try:
            async for message in session.registry.DownloadArtifact(
                request, timeout=session.transfer_timeout
            ):
                if opened is None:  # the first message names what is sent
                    artifact, resolved = message.artifact, message.model_version
                    _check_same(expected, artifact, resolved, partial)
                    _write_record(_record_path(partial), resolved, artifact)
                    opened = (
                        files.enter_context(partial.open("ab" if offset else "wb")),
                        Progress(f"downloading {resolved}", artifact.size_bytes, done=offset),
                    )
                if message.offset != offset:
                    raise CommandError(
                        "DATA_LOSS", f"got bytes at offset {message.offset}, expected {offset}"
                    )
                opened[0].write(message.data)
                digest.update(message.data)
                offset += len(message.data)
                opened[1].advance(len(message.data))
        except grpc.RpcError as error:
            if not (hint := _interrupted_hint(error, partial, offset, resolved)):
                raise
            raise HintedRpcError(error, hint) from error
        if opened is None:
            raise CommandError("DATA_LOSS", f"the stream of {request.name} ended before it began")
        sink, progress = opened
        sink.flush()
        os.fsync(sink.fileno())
    progress.finish()
    return resolved, artifact, offset


def _record_path(partial: Path) -> Path:
    """``FILE.part.json`` next to ``FILE.part``."""
    return partial.with_name(partial.name + ".json")


def _interrupted_hint(error: grpc.RpcError, partial: Path, offset: int, resolved: str) -> str:
    if resolved and offset:
        return f"{offset} bytes are kept in {partial}: add --resume to continue from there"
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
    if offset and code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"{partial} does not fit this artifact: download again without --resume"
    return ""


class _Record:
    """What ``FILE.part.json`` says the partial bytes are."""

    def __init__(self, name: str, sha256: str) -> None:
        self.name, self.sha256 = name, sha256


def _read_record(path: Path) -> _Record | None:
    try:
        data = json.loads(path.read_text())
        return _Record(str(data["model_version"]), str(data["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(path: Path, version: str, artifact: pb.Artifact) -> None:
    record = {
        "model_version": version,
        "sha256": artifact.sha256,
        "size_bytes": artifact.size_bytes,
    }
    path.write_text(json.dumps(record) + "\n")


def _check_same(
    expected: _Record | None, artifact: pb.Artifact, resolved: str, partial: Path
) -> None:
    if expected is not None and expected.sha256 != artifact.sha256:
        raise CommandError(
            "FAILED_PRECONDITION",
            f"{partial} holds part of {expected.name} ({expected.sha256[:12]}), "
            f"but {resolved} now has artifact {artifact.sha256[:12]}",
            hint="download again without --resume",
        )
