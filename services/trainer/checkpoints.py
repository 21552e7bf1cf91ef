"""Per-epoch training checkpoints, written atomically and read back safely.

A checkpoint is ``torch.save`` of plain data only (tensors, numbers, strings,
bytes, lists and dicts of them), so it loads with ``weights_only=True``. It is
written to a temporary file beside its final path, flushed and fsynced, then
renamed over the previous checkpoint and the directory fsynced: a crash leaves
the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import uuid
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from google.protobuf import timestamp_pb2

from conveyor.shared.errors import DataLossError
from conveyor.shared.storage.files import fsync_directory, process_alive
from conveyor.trainer.v1 import resources_pb2 as pb

CHECKPOINT_FORMAT = "conveyor.trainer.checkpoint/1"
_TEMPORARY_SUFFIX = ".partial"


def save_checkpoint(
    path: Path, payload: Mapping[str, Any], *, epoch: int, global_step: int
) -> pb.CheckpointInfo:
    """Atomically replace ``path`` with ``payload``; returns what was saved."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}{_TEMPORARY_SUFFIX}")
    try:
        with temporary.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(datetime.now(UTC))
    return pb.CheckpointInfo(
        epoch=epoch,
        global_step=global_step,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        create_time=created,
    )


def load_checkpoint(
    source: Path | bytes, *, map_location: torch.device | str = "cpu"
) -> dict[str, Any]:
    """The payload saved at ``source`` (a path, or a checkpoint file's bytes),
    loaded with ``weights_only=True``.

    DATA_LOSS (reason ``CHECKPOINT_CORRUPT``) when it cannot be read back.
    """
    name = source.name if isinstance(source, Path) else "checkpoint"
    readable = source if isinstance(source, Path) else io.BytesIO(source)
    try:
        loaded = torch.load(readable, weights_only=True, map_location=map_location)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as error:
        raise DataLossError(
            f"checkpoint {name} is unreadable ({type(error).__name__})",
            reason="CHECKPOINT_CORRUPT",
        ) from error
    if not isinstance(loaded, dict) or loaded.get("format") != CHECKPOINT_FORMAT:
        raise DataLossError(
            f"checkpoint {name} is not a trainer checkpoint", reason="CHECKPOINT_CORRUPT"
        )
    return loaded


def remove_stale_temporaries(directory: Path) -> int:
    """Remove temporary checkpoint files whose writer is gone; returns how many."""
    removed = 0
    if not directory.is_dir():
        return removed
    for leftover in directory.glob(f".*{_TEMPORARY_SUFFIX}"):
        writer = leftover.name.rsplit(".", 2)[-2].split("-", 1)[0]
        if writer.isdigit() and process_alive(int(writer)):
            continue
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed
