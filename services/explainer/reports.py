"""What the explainer stores in the registry: explanation reports (the
promotion gate looks for one) and global importance, both as attachments of
the version holding a message's proto3 JSON form.

Attachments are immutable; a newer one of the same kind supersedes the
older for readers, so :meth:`ReportStore.global_importance` reads the newest
global-importance attachment of the version.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Final

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.explainer.explaining import Explained
from conveyor.services.explainer.model_spec import ExplainedModel
from conveyor.shared.errors import (
    ConveyorError,
    DataLossError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.registry_writer import RegistryWriteError, RegistryWriter

REPORT_CONTENT_TYPE: Final = "application/vnd.conveyor.explanation-report+json"
IMPORTANCE_CONTENT_TYPE: Final = "application/vnd.conveyor.global-importance+json"
IMPORTANCE_SUFFIX: Final = "/globalImportance"


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def explanation_report(
    model: ExplainedModel, config: pb.ExplanationConfig, explained: Explained, created_by: str
) -> pb.ExplanationReport:
    return pb.ExplanationReport(
        model_version=model.version_name,
        config=config,
        explanations=explained.explanations,
        num_model_evaluations=explained.num_model_evaluations,
        num_inference_calls=explained.num_inference_calls,
        create_time=now(),
        created_by=created_by,
    )


class ReportStore:
    """Explanation reports and global importance in the registry."""

    def __init__(self, registry: RegistryClient, writer: RegistryWriter) -> None:
        self._registry = registry
        self._writer = writer

    async def attach_report(self, report: pb.ExplanationReport) -> str:
        """Attach ``report`` to its version; the attachment's name."""
        method = pb.ExplanationMethod.Name(report.config.method).removeprefix("EXPLANATION_METHOD_")
        return await self._attach(
            report.model_version,
            registry_pb.ATTACHMENT_KIND_EXPLANATION_REPORT,
            f"explanation-{uuid.uuid4().hex[:16]}",
            f"{method.replace('_', ' ').lower()} explanation of "
            f"{len(report.explanations)} instance(s)",
            REPORT_CONTENT_TYPE,
            json_format.MessageToJson(report).encode(),
        )

    async def store_importance(
        self, version_name: str, importance: pb.GlobalImportance
    ) -> pb.GlobalImportance:
        """Attach ``importance`` to the version; it, named and with its attachment."""
        attachment_id = f"global-importance-{uuid.uuid4().hex[:16]}"
        stored = pb.GlobalImportance()
        stored.CopyFrom(importance)
        stored.name = version_name + IMPORTANCE_SUFFIX
        stored.attachment = f"{version_name}/attachments/{attachment_id}"
        await self._attach(
            version_name,
            registry_pb.ATTACHMENT_KIND_FEATURE_IMPORTANCE,
            attachment_id,
            f"global feature importance over {importance.num_instances} rows",
            IMPORTANCE_CONTENT_TYPE,
            json_format.MessageToJson(stored).encode(),
        )
        return stored

    async def global_importance(self, version_name: str) -> pb.GlobalImportance:
        """The newest global importance stored with the version; NOT_FOUND when none."""
        attachment = await self._registry.newest_attachment(
            version_name,
            f'kind=FEATURE_IMPORTANCE AND content_type="{IMPORTANCE_CONTENT_TYPE}"',
        )
        if attachment is None:
            raise NotFoundError(
                f"no global importance has been computed for {version_name}: "
                "call ComputeGlobalImportance",
                reason="GLOBAL_IMPORTANCE_NOT_FOUND",
            )
        try:
            return json_format.Parse(
                attachment.content.decode(), pb.GlobalImportance(), ignore_unknown_fields=True
            )
        except (UnicodeDecodeError, json_format.ParseError) as error:
            raise DataLossError(
                f"{attachment.name} does not hold a global importance: {error}",
                reason="UNREADABLE_ATTACHMENT",
            ) from None

    async def _attach(
        self,
        parent: str,
        kind: registry_pb.AttachmentKind.ValueType,
        attachment_id: str,
        display_name: str,
        content_type: str,
        content: bytes,
    ) -> str:
        request = registry_rpc.CreateAttachmentRequest(
            parent=parent,
            attachment_id=attachment_id,
            attachment=registry_pb.Attachment(
                kind=kind,
                display_name=display_name[:128],
                content_type=content_type,
                content=content,
                source="service:explainer",
            ),
            request_id=str(uuid.uuid4()),
        )
        try:
            await self._writer.attach(request)
        except RegistryWriteError as error:
            if error.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPreconditionError(
                    f"the registry refused the attachment to {parent}: {error.message}",
                    reason="ATTACHMENT_REFUSED",
                ) from None
            raise _write_failure(error, parent) from None
        return f"{parent}/attachments/{attachment_id}"


def _write_failure(error: RegistryWriteError, parent: str) -> ConveyorError:
    if error.code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(error.message)
    if error.code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(error.message)
    return UnavailableError(
        f"the registry could not store the attachment to {parent} ({error.code.name})",
        reason="REGISTRY_UNAVAILABLE",
    )
