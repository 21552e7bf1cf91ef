"""What the registry's List methods filter and order on (AIP-160, AIP-132)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from conveyor.registry.v1 import resources_pb2 as pb
from conveyor.shared.errors import FieldViolation, InvalidArgumentError
from conveyor.shared.filtering import FieldKind, FilterField


def short_names(enum: EnumDescriptor, prefix: str) -> dict[int, str]:
    """Enum numbers to names without the prefix (STAGE_PRODUCTION -> PRODUCTION)."""
    return {v.number: v.name.removeprefix(prefix) for v in enum.values if v.number != 0}


STAGES = short_names(pb.Stage.DESCRIPTOR, "STAGE_")
RISK_TIERS = short_names(pb.RiskTier.DESCRIPTOR, "RISK_TIER_")
FORMATS = short_names(pb.ModelFormat.DESCRIPTOR, "MODEL_FORMAT_")
TASKS = short_names(pb.TaskType.DESCRIPTOR, "TASK_TYPE_")
ATTACHMENT_KINDS = short_names(pb.AttachmentKind.DESCRIPTOR, "ATTACHMENT_KIND_")
_STAGE_OF_ALIAS = {"production": "PRODUCTION", "canary": "CANARY", "staging": "STAGING"}

MODEL_FILTERS = {
    "name": FilterField(FieldKind.STRING),
    "tags": FilterField(FieldKind.STRINGS),
    "aliases": FilterField(FieldKind.STRINGS),
    "stage": FilterField(FieldKind.ENUM, enum_values=set(STAGES.values())),
    "owner_team": FilterField(FieldKind.STRING),
    "risk_tier": FilterField(FieldKind.ENUM, enum_values=set(RISK_TIERS.values())),
    "compliance_tags": FilterField(FieldKind.STRINGS),
    "labels.": FilterField(FieldKind.MAP),
}

VERSION_FILTERS = {
    "format": FilterField(FieldKind.ENUM, enum_values=set(FORMATS.values())),
    "task": FilterField(FieldKind.ENUM, enum_values=set(TASKS.values())),
    "stage": FilterField(FieldKind.ENUM, enum_values=set(STAGES.values())),
    "aliases": FilterField(FieldKind.STRINGS),
    "labels.": FilterField(FieldKind.MAP),
    "lineage.parent_version": FilterField(FieldKind.STRING),
    "lineage.training_job": FilterField(FieldKind.STRING),
    "lineage.optimization_job": FilterField(FieldKind.STRING),
    "lineage.dataset_digest": FilterField(FieldKind.STRING),
    "metrics.": FilterField(FieldKind.MAP, numeric_values=True),
    "create_time": FilterField(FieldKind.TIMESTAMP),
    "deployment_block": FilterField(FieldKind.PRESENCE),
}

ATTACHMENT_FILTERS = {
    "kind": FilterField(FieldKind.ENUM, enum_values=set(ATTACHMENT_KINDS.values())),
    "content_type": FilterField(FieldKind.STRING),
    "created_by": FilterField(FieldKind.STRING),
}


def resolve_model(model: pb.Model, field: str) -> object:
    if field.startswith("labels."):
        return model.labels.get(field.removeprefix("labels."))
    if field == "stage":
        if model.state == pb.MODEL_STATE_ARCHIVED:
            return {"ARCHIVED"}
        held = {_STAGE_OF_ALIAS[a] for a in model.aliases if a in _STAGE_OF_ALIAS}
        return held or {"NONE"}
    if field == "risk_tier":
        return RISK_TIERS.get(model.risk_tier)
    if field == "aliases":
        return set(model.aliases)
    value: Any = getattr(model, field)
    return value if isinstance(value, str) else set(value)


def resolve_version(version: pb.ModelVersion, field: str) -> object:
    if field.startswith("labels."):
        return version.labels.get(field.removeprefix("labels."))
    if field.startswith("metrics."):
        return version.metrics.get(field.removeprefix("metrics."))
    if field.startswith("lineage."):
        return getattr(version.lineage, field.removeprefix("lineage.")) or None
    simple: dict[str, Callable[[], object]] = {
        "format": lambda: FORMATS.get(version.format),
        "task": lambda: TASKS.get(version.task),
        "stage": lambda: STAGES.get(version.stage),
        "aliases": lambda: set(version.aliases),
        "create_time": lambda: version.create_time.ToDatetime(tzinfo=UTC),
        "deployment_block": lambda: version.deployment_block.reason or None,
    }
    return simple[field]()


def resolve_attachment(attachment: pb.Attachment, field: str) -> object:
    if field == "kind":
        return ATTACHMENT_KINDS.get(attachment.kind)
    value: str = getattr(attachment, field)
    return value


def parse_order(text: str, allowed: tuple[str, ...], default: str) -> tuple[str, bool]:
    """``field [desc]`` with field in ``allowed`` (or ``metrics.*`` when allowed)."""
    words = (text or default).split()
    field = words[0] if words else ""
    descending = words[1:] == ["desc"]
    metric = "metrics.*" in allowed and field.startswith("metrics.") and len(field) > 8
    if not (field in allowed or metric) or words[1:] not in ([], ["desc"], ["asc"]):
        options = ", ".join(allowed)
        raise InvalidArgumentError(
            f"invalid order_by {text!r}",
            violations=[FieldViolation("order_by", f"one of {options}, optionally with ' desc'")],
            reason="INVALID_ORDER_BY",
        )
    return field, descending


def version_sort_key(field: str, descending: bool) -> Callable[[pb.ModelVersion], Any]:
    """Sort key for versions; versions without the metric come last either way."""
    sign = -1 if descending else 1

    def key(version: pb.ModelVersion) -> tuple[Any, ...]:
        tie = (version.name.rsplit("/", 3)[1], sign * int(version.name.rsplit("/", 1)[1]))
        if field == "create_time":
            return (sign * version.create_time.ToNanoseconds(), *tie)
        metric = version.metrics.get(field.removeprefix("metrics."))
        return (metric is None, 0.0 if metric is None else sign * metric, *tie)

    return key
