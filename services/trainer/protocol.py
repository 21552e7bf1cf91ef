"""What the trainer server and its worker processes agree on: the job
directory's layout, the progress lines a worker writes, and its exit codes.

A job's directory, ``<data_dir>/trainer/jobs/{job}/``, holds:

- ``job.binpb``: the ``TrainingJob`` (spec, code revision), written by the
  server before it starts the worker;
- ``datasets/{dataset}.data`` and ``datasets/{dataset}.binpb``: each uploaded
  dataset the job uses (a hard link to the stored file) and the metadata it
  was uploaded with, its ``digest`` the one the file must parse to;
- ``checkpoint.pt``: written by the worker after every epoch (atomically);
  the server removes it, and the dataset links, once the job has ended;
- on success, in this order: ``weights.pt`` (the state dict, loadable with
  ``torch.load(weights_only=True)``), ``model_version.binpb`` (the registry
  ``ModelVersion`` to register, without its artifact),
  ``evaluation_report.json`` and, last, ``result.binpb`` (the
  ``TrainingResult``): its presence says the others are complete;
- ``worker.log``: the worker's log (its stderr).

The worker writes one JSON object per line to its stdout (rank 0 only):
``{"type": TYPE, "message": ...}`` where the message is the proto3 JSON of

- ``started``: ``{"environment": ExecutionEnvironment, "dataset_digest": str}``;
- ``step``: ``TrainingProgress`` (at most every :data:`STEP_EVENT_INTERVAL_S`);
- ``resumed``: ``{"history": [EpochSummary, ...]}``, once, when training goes on
  from a checkpoint: the epochs the checkpoint holds, which replace the job's
  history (the trainer may have died before it recorded the last of them);
- ``epoch``: ``{"epoch": EpochSummary, "progress": TrainingProgress}``;
- ``checkpoint``: ``CheckpointInfo``;
- ``result``: ``TrainingResult``;
- ``error``: ``JobError``.

It exits with :data:`EXIT_SUCCEEDED`, :data:`EXIT_FAILED` (after an ``error``
line) or :data:`EXIT_CANCELLED` (SIGTERM asked it to stop).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import Message

from conveyor.shared.storage.files import fsync_directory

JOB_FILE: Final = "job.binpb"
CHECKPOINT_FILE: Final = "checkpoint.pt"
WEIGHTS_FILE: Final = "weights.pt"
MODEL_VERSION_FILE: Final = "model_version.binpb"
EVALUATION_REPORT_FILE: Final = "evaluation_report.json"
RESULT_FILE: Final = "result.binpb"
DATASETS_DIR: Final = "datasets"
LOG_FILE: Final = "worker.log"
STANDBY_FLAG: Final = "--standby"
"""The worker's argument that makes it warm up and read its job directory from stdin."""

EXIT_SUCCEEDED: Final = 0
EXIT_FAILED: Final = 1
EXIT_CANCELLED: Final = 3

EVENT_TYPES: Final = ("started", "resumed", "step", "epoch", "checkpoint", "result", "error")

STEP_EVENT_INTERVAL_S: Final = 0.05
"""The least time between two ``step`` lines: the shortest progress interval a
watcher may ask for, so no watcher misses anything it could receive."""

MAX_EVENT_LINE_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class WorkerEvent:
    """One line of a worker's output."""

    type: str
    message: dict[str, Any]


def encode_event(event_type: str, message: Message | dict[str, Any]) -> bytes:
    """The line for one event (with its newline)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    payload = to_json(message) if isinstance(message, Message) else message
    return json.dumps({"type": event_type, "message": payload}).encode() + b"\n"


def decode_event(line: bytes) -> WorkerEvent:
    """The event on ``line``; ValueError when it is not one."""
    decoded = json.loads(line)
    if not isinstance(decoded, dict) or decoded.get("type") not in EVENT_TYPES:
        raise ValueError("not a worker event")
    message = decoded.get("message")
    if not isinstance(message, dict):
        raise ValueError("a worker event's message is an object")
    return WorkerEvent(str(decoded["type"]), message)


def to_json(message: Message) -> dict[str, Any]:
    """``message`` as proto3 JSON (field names as in the .proto)."""
    converted: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return converted


def from_json(value: Any, message: Message) -> None:
    """Fill ``message`` from proto3 JSON (unknown fields ignored)."""
    json_format.ParseDict(value, message, ignore_unknown_fields=True)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
