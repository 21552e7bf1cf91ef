"""Checks on what callers send the registry, each failure a field violation.

Every problem in a request is collected and reported at once (one
INVALID_ARGUMENT with a violation per bad field), before anything is stored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping

from google.protobuf.field_mask_pb2 import FieldMask

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared import names
from conveyor.shared.errors import FieldViolation, InvalidArgumentError

KIB = 1024
MIB = 1024 * KIB
MAX_CHUNK_BYTES = 2 * MIB
MAX_VERSION_METADATA_BYTES = 4 * MIB
MAX_ATTACHMENT_BYTES = 8 * MIB
MAX_REASON_BYTES = 1 * KIB
MAX_SAMPLE_ROWS = 1000
MAX_SAMPLE_BYTES = 1 * MIB

MODEL_UPDATABLE = frozenset(
    {
        "display_name",
        "description",
        "owner_team",
        "risk_tier",
        "compliance_tags",
        "promotion_thresholds",
        "tags",
        "labels",
        "personal_data_features",
    }
)
VERSION_UPDATABLE = frozenset(
    {"description", "labels", "model_card", "reference_statistics", "deployment_block"}
)

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_ONNX_FORMATS = {
    pb.MODEL_FORMAT_ONNX_FP32,
    pb.MODEL_FORMAT_ONNX_FP16,
    pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC,
    pb.MODEL_FORMAT_ONNX_INT8_STATIC,
}


def raise_if_any(violations: Iterable[FieldViolation], message: str) -> None:
    found = list(violations)
    if found:
        summary = "; ".join(f"{v.field}: {v.description}" for v in found[:3])
        raise InvalidArgumentError(f"{message}: {summary}", violations=found)


def model_violations(model: pb.Model, prefix: str = "model") -> Iterator[FieldViolation]:
    if not model.owner_team.strip():
        yield FieldViolation(f"{prefix}.owner_team", "required: the team that owns the model")
    if model.risk_tier == pb.RISK_TIER_UNSPECIFIED:
        yield FieldViolation(f"{prefix}.risk_tier", "required: LOW, MEDIUM or HIGH")
    yield from _text(f"{prefix}.display_name", model.display_name, 128)
    yield from _text(f"{prefix}.description", model.description, 16 * KIB)
    yield from _keywords(f"{prefix}.tags", model.tags)
    yield from _keywords(f"{prefix}.compliance_tags", model.compliance_tags)
    yield from _labels(f"{prefix}.labels", model.labels)
    if len(model.promotion_thresholds) > 32:
        yield FieldViolation(f"{prefix}.promotion_thresholds", "at most 32")
    for i, threshold in enumerate(model.promotion_thresholds):
        where = f"{prefix}.promotion_thresholds[{i}]"
        if not threshold.metric:
            yield FieldViolation(f"{where}.metric", "required")
        if threshold.comparison == pb.THRESHOLD_COMPARISON_UNSPECIFIED:
            yield FieldViolation(
                f"{where}.comparison", "required: GREATER_OR_EQUAL or LESS_OR_EQUAL"
            )
        if not math.isfinite(threshold.value):
            yield FieldViolation(f"{where}.value", "must be a finite number")


def version_violations(version: pb.ModelVersion, prefix: str) -> Iterator[FieldViolation]:
    if version.format == pb.MODEL_FORMAT_UNSPECIFIED:
        yield FieldViolation(f"{prefix}.format", "required: the artifact's format")
    if version.format == pb.MODEL_FORMAT_TORCH_STATE_DICT and not version.architecture.name:
        yield FieldViolation(
            f"{prefix}.architecture.name", "required for a torch state dict: it rebuilds the module"
        )
    if version.format in _ONNX_FORMATS and not (
        version.signature.inputs and version.signature.outputs
    ):
        yield FieldViolation(f"{prefix}.signature", "ONNX versions need their inputs and outputs")
    for side in ("inputs", "outputs"):
        for i, tensor in enumerate(getattr(version.signature, side)):
            yield from _tensor(f"{prefix}.signature.{side}[{i}]", tensor)
    if len(version.metrics) > 256:
        yield FieldViolation(f"{prefix}.metrics", "at most 256 entries")
    for key, value in version.metrics.items():
        if not key or len(key) > 128:
            yield FieldViolation(f"{prefix}.metrics", f"metric names are 1-128 characters: {key!r}")
        if not math.isfinite(value):
            yield FieldViolation(f"{prefix}.metrics[{key}]", "must be a finite number")
    yield from _text(f"{prefix}.description", version.description, 16 * KIB)
    yield from _text(f"{prefix}.model_card", version.model_card, 256 * KIB)
    yield from _labels(f"{prefix}.labels", version.labels)
    yield from _lineage(f"{prefix}.lineage", version.lineage)
    if version.HasField("reference_statistics"):
        yield from _reference(f"{prefix}.reference_statistics", version.reference_statistics)
    if version.HasField("deployment_block") and not version.deployment_block.reason:
        yield FieldViolation(f"{prefix}.deployment_block.reason", "required: why it is blocked")


def attachment_violations(attachment: pb.Attachment, prefix: str) -> Iterator[FieldViolation]:
    if attachment.kind == pb.ATTACHMENT_KIND_UNSPECIFIED:
        yield FieldViolation(f"{prefix}.kind", "required")
    if not attachment.content_type:
        yield FieldViolation(f"{prefix}.content_type", "required: the media type of content")
    if not attachment.content:
        yield FieldViolation(f"{prefix}.content", "required and not empty")
    if len(attachment.content) > MAX_ATTACHMENT_BYTES:
        yield FieldViolation(f"{prefix}.content", f"at most {MAX_ATTACHMENT_BYTES} bytes")
    yield from _text(f"{prefix}.display_name", attachment.display_name, 128)


def upload_violations(sha256: str, size_bytes: int, max_bytes: int) -> Iterator[FieldViolation]:
    if not _SHA256.match(sha256):
        yield FieldViolation("metadata.sha256", "required: 64 lowercase hex characters")
    if size_bytes <= 0:
        yield FieldViolation("metadata.size_bytes", "an artifact cannot be empty")
    elif size_bytes > max_bytes:
        yield FieldViolation("metadata.size_bytes", f"at most {max_bytes} bytes")


def reason_violations(reason: str, *, required: bool) -> Iterator[FieldViolation]:
    if required and not reason.strip():
        yield FieldViolation("reason", "required: why the alias changes")
    if len(reason.encode()) > MAX_REASON_BYTES:
        yield FieldViolation("reason", f"at most {MAX_REASON_BYTES} bytes")


def mask_paths(mask: FieldMask, allowed: frozenset[str]) -> list[str]:
    """The paths of ``mask`` (``*`` = all of ``allowed``); others are refused."""
    paths = list(mask.paths)
    if not paths:
        raise InvalidArgumentError(
            "update_mask is required",
            violations=[FieldViolation("update_mask", f"name fields among {sorted(allowed)}")],
        )
    if paths == ["*"]:
        return sorted(allowed)
    raise_if_any(
        (
            FieldViolation("update_mask", f"{p!r} cannot be updated; allowed: {sorted(allowed)}")
            for p in paths
            if p not in allowed
        ),
        "invalid update_mask",
    )
    return paths


def alias_id(value: str, field: str = "name") -> str:
    names.check_id(value, field=field)
    if value == "latest":
        raise InvalidArgumentError(
            "`latest` is reserved for the newest version",
            violations=[FieldViolation(field, "`latest` is reserved")],
            reason="INVALID_NAME",
        )
    return value


def _text(field: str, value: str, limit: int) -> Iterator[FieldViolation]:
    if len(value.encode()) > limit:
        yield FieldViolation(field, f"at most {limit} bytes")


def _keywords(field: str, values: Iterable[str]) -> Iterator[FieldViolation]:
    items = list(values)
    if len(items) > 32:
        yield FieldViolation(field, "at most 32")
    for value in items:
        if not value or value != value.lower() or len(value) > 63:
            yield FieldViolation(field, f"lowercase, 1-63 characters: {value!r}")


def _labels(field: str, labels: Mapping[str, str]) -> Iterator[FieldViolation]:
    if len(labels) > 64:
        yield FieldViolation(field, "at most 64 entries")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            yield FieldViolation(field, f"keys are lowercase letters, digits, _ and -: {key!r}")
        if len(value) > 63:
            yield FieldViolation(f"{field}[{key}]", "values are at most 63 characters")


def _tensor(field: str, tensor: pb.TensorSpec) -> Iterator[FieldViolation]:
    if not tensor.name:
        yield FieldViolation(f"{field}.name", "required")
    if tensor.dtype == pb.TENSOR_DATA_TYPE_UNSPECIFIED:
        yield FieldViolation(f"{field}.dtype", "required")
    if any(dim < -1 or dim == 0 for dim in tensor.shape):
        yield FieldViolation(f"{field}.shape", "dimensions are positive, or -1 when dynamic")


def _lineage(field: str, lineage: pb.Lineage) -> Iterator[FieldViolation]:
    references = (
        ("parent_version", None),
        ("training_job", "trainingJobs"),
        ("optimization_job", "optimizationJobs"),
        ("dataset", "datasets"),
    )
    for name, collection in references:
        value = getattr(lineage, name)
        if not value:
            continue
        try:
            if collection is None:
                ref = names.parse_model_version_ref(value, field=f"{field}.{name}")
                if ref.version is None:
                    yield FieldViolation(f"{field}.{name}", "a version name, not an alias")
            else:
                names.parse_resource_name(value, collection, field=f"{field}.{name}")
        except InvalidArgumentError as error:
            yield from error.violations


def _reference(field: str, reference: pb.ReferenceStatistics) -> Iterator[FieldViolation]:
    sample = reference.sample
    if sample.values:
        if sample.column_count <= 0 or len(sample.values) % sample.column_count:
            yield FieldViolation(f"{field}.sample", "values must fill rows of column_count")
        elif len(sample.values) // sample.column_count > MAX_SAMPLE_ROWS:
            yield FieldViolation(f"{field}.sample", f"at most {MAX_SAMPLE_ROWS} rows")
        if sample.ByteSize() > MAX_SAMPLE_BYTES:
            yield FieldViolation(f"{field}.sample", f"at most {MAX_SAMPLE_BYTES} bytes")
