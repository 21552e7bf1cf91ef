"""``conveyor.monitor.v1.MonitorService``: the prediction log, feedback,
references and configs (reports are :mod:`.report_servicer`'s; SLOs, alert
rules and alerts :mod:`.alert_servicer`'s; the RPC surface joins them).

Every call checks the whole request before it stores anything, so a rejected
call leaves no trace; ingest is bounded by :class:`Ingestor`'s capacity.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Final

from conveyor.monitor.v1 import monitor_messages_pb2 as rpc
from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.monitor import config as configs
from conveyor.services.monitor.ingest import SubjectHasher
from conveyor.services.monitor.ingestor import Ingestor, now_us
from conveyor.services.monitor.listing import list_predictions, record_of
from conveyor.services.monitor.metrics import MonitorMetrics
from conveyor.services.monitor.profiles import (
    VersionProfiles,
    build_reference,
    exact_version,
    fit_reference_scorer,
    model_of,
    resolve_version,
)
from conveyor.services.monitor.references import FeatureSchema, check_schema, from_rows
from conveyor.services.monitor.store import MonitorStore
from conveyor.shared import names, pagination
from conveyor.shared.auth.principal import current_decision_id
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.filtering import FieldKind, FilterField, parse_filter
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.workers import WorkerThreads

logger = logging.getLogger(__name__)

MAX_FEEDBACK: Final = 10_000
MIN_REFERENCE_ROWS: Final = 100
MAX_REFERENCE_ROWS: Final = 10_000_000
MAX_REASON: Final = 1_024
_BOOLEAN: Final = FilterField(FieldKind.ENUM, enum_values=("TRUE", "FALSE"))
PREDICTION_FILTERS: Final = {
    "time": FilterField(FieldKind.TIMESTAMP),
    "request_id": FilterField(FieldKind.STRING),
    "status_code": FilterField(FieldKind.NUMBER),
    "shadow": _BOOLEAN,
    "outlier": _BOOLEAN,
    "outlier_score": FilterField(FieldKind.NUMBER),
    "has_label": _BOOLEAN,
}

UPDATABLE_PATHS: Final = ", ".join(sorted(configs.UPDATABLE))


class MonitorServicer:
    """The data-plane RPCs of ``MonitorService``."""

    def __init__(
        self,
        store: MonitorStore,
        profiles: VersionProfiles,
        registry: RegistryClient,
        workers: WorkerThreads,
        ingestor: Ingestor,
        hasher: SubjectHasher,
        metrics: MonitorMetrics,
    ) -> None:
        self._store = store
        self._profiles = profiles
        self._registry = registry
        self._workers = workers
        self._ingestor = ingestor
        self._hasher = hasher
        self._metrics = metrics

    # -- ingest ----------------------------------------------------------------

    async def LogPredictions(
        self, request_iterator: AsyncIterator[rpc.LogPredictionsRequest], context: Any
    ) -> rpc.LogPredictionsResponse:
        accepted = duplicates = 0
        async for message in request_iterator:
            stored, repeated = await self._ingestor.ingest(list(message.records))
            accepted += stored
            duplicates += repeated
        return rpc.LogPredictionsResponse(accepted_count=accepted, duplicate_count=duplicates)

    async def BatchLogPredictions(
        self, request: rpc.BatchLogPredictionsRequest, context: Any
    ) -> rpc.BatchLogPredictionsResponse:
        accepted, duplicates = await self._ingestor.ingest(list(request.records))
        return rpc.BatchLogPredictionsResponse(accepted_count=accepted, duplicate_count=duplicates)

    async def LogFeedback(
        self, request: rpc.LogFeedbackRequest, context: Any
    ) -> rpc.LogFeedbackResponse:
        if not request.feedback:
            raise invalid_field("feedback", "required: at least one label")
        if len(request.feedback) > MAX_FEEDBACK:
            raise invalid_field("feedback", f"at most {MAX_FEEDBACK:,} labels per call")
        violations: list[FieldViolation] = []
        stamp = now_us()
        labels: list[tuple[str, str, int, int]] = []
        for index, given in enumerate(request.feedback):
            prefix = f"feedback[{index}]"
            try:
                model = names.model_name(
                    names.parse_model_name(given.model, field=f"{prefix}.model")
                )
            except InvalidArgumentError as error:
                violations.extend(error.violations)
                continue
            if not 1 <= len(given.request_id) <= 256:
                violations.append(
                    FieldViolation(f"{prefix}.request_id", "1 to 256 characters required")
                )
            if given.label < 0:
                violations.append(FieldViolation(f"{prefix}.label", "must not be negative"))
            time_us = (
                given.time.seconds * 1_000_000 + given.time.nanos // 1000
                if given.HasField("time")
                else stamp
            )
            labels.append((model, given.request_id, given.label, time_us))
        raise_if_any(violations[:20], "invalid feedback")
        for model in sorted({label[0] for label in labels}):
            try:
                await self._registry.model(model)
            except NotFoundError:
                violations.append(
                    FieldViolation("feedback.model", f"{model} is not a model the registry knows")
                )
        violations.extend(await self._workers.run(self._label_violations, labels))
        raise_if_any(violations[:20], "invalid feedback")
        result = await self._workers.run(self._store.record_feedback, labels, now_us=stamp)
        self._metrics.count_feedback(accepted=result.accepted, matched=result.matched)
        return rpc.LogFeedbackResponse(
            accepted_count=result.accepted,
            matched_count=result.matched,
            ignored_count=result.ignored,
        )

    def _label_violations(self, labels: list[tuple[str, str, int, int]]) -> list[FieldViolation]:
        """Labels that are not classes of the prediction they join (when stored)."""
        violations = []
        widths = self._store.output_widths(
            [(model, request_id) for model, request_id, _, _ in labels]
        )
        for index, (model, request_id, label, _) in enumerate(labels):
            width = widths.get((model, request_id))
            if width:
                classes = 2 if width == 1 else width
                if label >= classes:
                    violations.append(
                        FieldViolation(
                            f"feedback[{index}].label",
                            f"the prediction has {classes} classes: 0 to {classes - 1}",
                        )
                    )
        return violations

    # -- listing and erasure ---------------------------------------------------

    async def ListPredictions(
        self, request: rpc.ListPredictionsRequest, context: Any
    ) -> rpc.ListPredictionsResponse:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, PREDICTION_FILTERS)
        version = await resolve_version(self._registry, request.parent, field="parent")
        fingerprint = pagination.fingerprint(request.parent, request.filter)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        rows, has_more = await self._workers.run(
            list_predictions,
            self._store.engine,
            version,
            restrictions,
            offset=cursor.offset,
            limit=size,
        )
        return rpc.ListPredictionsResponse(
            predictions=[record_of(row) for row in rows],
            next_page_token=pagination.next_page_token(has_more, cursor, size, fingerprint),
        )

    async def ErasePredictions(
        self, request: rpc.ErasePredictionsRequest, context: Any
    ) -> rpc.ErasePredictionsResponse:
        violations = []
        if not 1 <= len(request.subject_key) <= 256:
            violations.append(FieldViolation("subject_key", "1 to 256 characters required"))
        if len(request.reason) > MAX_REASON:
            violations.append(FieldViolation("reason", "at most 1,024 characters"))
        model: str | None = None
        if request.model:
            try:
                model = names.model_name(names.parse_model_name(request.model, field="model"))
            except InvalidArgumentError as error:
                violations.extend(error.violations)
        raise_if_any(violations, "invalid erasure")
        if model is not None:
            await self._registry.model(model)
        # The auth interceptor asked policy before this ran: the decision that
        # allowed the erasure is already in the audit log (fail closed). With
        # authentication off (local development) there is no decision to name.
        decision = current_decision_id.get()
        erased, erased_feedback = await self._workers.run(
            self._store.erase_subject, self._hasher(request.subject_key), model
        )
        logger.info(
            "erased %d predictions and %d labels of one data subject", erased, erased_feedback
        )
        return rpc.ErasePredictionsResponse(
            erased_predictions=erased,
            erased_feedback=erased_feedback,
            decision=f"decisions/{decision}" if decision else "",
        )

    # -- references --------------------------------------------------------------

    async def SetReference(
        self, request_iterator: AsyncIterator[rpc.SetReferenceRequest], context: Any
    ) -> rpc.SetReferenceResponse:
        header: pb.Reference | None = None
        rows: list[rpc.ReferenceRow] = []
        async for message in request_iterator:
            kind = message.WhichOneof("content")
            if header is None:
                if kind != "reference":
                    raise invalid_field("reference", "the first message must carry the reference")
                header = message.reference
            elif kind == "reference":
                raise invalid_field("reference", "only the first message carries the reference")
            else:
                rows.extend(message.rows.rows)
                if len(rows) > MAX_REFERENCE_ROWS:
                    raise invalid_field("rows", f"at most {MAX_REFERENCE_ROWS:,} rows")
        if header is None:
            raise invalid_field("reference", "required")
        version = self._reference_version(header.name)
        violations = check_schema(list(header.features), prefix="reference.features")
        if header.output_type not in (pb.OUTPUT_TYPE_PROBABILITIES, pb.OUTPUT_TYPE_LOGITS):
            violations.append(FieldViolation("reference.output_type", "required"))
        if not MIN_REFERENCE_ROWS <= len(rows) <= MAX_REFERENCE_ROWS:
            violations.append(
                FieldViolation(
                    "rows",
                    f"{MIN_REFERENCE_ROWS} to {MAX_REFERENCE_ROWS:,} rows needed, not {len(rows)}",
                )
            )
        raise_if_any(violations, "invalid reference")
        registered = await self._registry.version(version)
        if registered.state == registry_pb.MODEL_VERSION_STATE_ARCHIVED:
            raise FailedPreconditionError(f"{version} is archived", reason="VERSION_ARCHIVED")
        schema = FeatureSchema(tuple(header.features))
        signature_width = _signature_width(registered)
        if signature_width is not None and signature_width != len(schema.numerical):
            raise invalid_field(
                "reference.features",
                f"{len(schema.numerical)} numerical features, but {version}'s input "
                f"signature takes {signature_width}",
            )
        data, row_violations = await self._workers.run(from_rows, schema, rows, max_violations=20)
        raise_if_any(row_violations, "invalid reference rows")
        model_config = configs.resolve(await self._profiles.config(model_of(version)))
        reference = build_reference(
            version,
            schema,
            data,
            output_type=header.output_type,
            source=pb.REFERENCE_SOURCE_DATASET,
            row_count=data.rows,
        )
        try:
            scorer = await self._workers.run(
                fit_reference_scorer, schema, data, model_config, self._hasher
            )
        except ValueError as error:
            raise invalid_field(
                "rows",
                f"the outlier scorer ({model_config.outlier_method.name}) cannot be fitted: "
                f"{error}; send more rows or change outliers.method in the monitoring config",
            ) from None
        await self._workers.run(
            self._store.put_reference,
            version,
            reference,
            data.to_bytes(),
            None if scorer is None else scorer.to_bytes(),
            model_config.outlier_method.value,
        )
        self._profiles.forget_version(version)
        return rpc.SetReferenceResponse(reference=reference)

    async def GetReference(
        self, request: rpc.GetReferenceRequest, context: Any
    ) -> rpc.GetReferenceResponse:
        if not request.name.endswith("/reference"):
            raise invalid_field("name", "models/{model}/versions/{version}/reference")
        version = await resolve_version(
            self._registry, request.name.removesuffix("/reference"), field="name"
        )
        profile = await self._profiles.get(version)
        if profile.reference is None:
            raise NotFoundError(
                f"{version} has neither registered training statistics nor an uploaded reference",
                reason="REFERENCE_NOT_FOUND",
            )
        return rpc.GetReferenceResponse(reference=profile.reference)

    # -- configs -------------------------------------------------------------------

    async def GetMonitoringConfig(
        self, request: rpc.GetMonitoringConfigRequest, context: Any
    ) -> rpc.GetMonitoringConfigResponse:
        model = await self._config_model(request.name, field="name")
        stored = await self._profiles.config(model)
        return rpc.GetMonitoringConfigResponse(monitoring_config=configs.filled(stored))

    async def UpdateMonitoringConfig(
        self, request: rpc.UpdateMonitoringConfigRequest, context: Any
    ) -> rpc.UpdateMonitoringConfigResponse:
        given = request.monitoring_config
        model = await self._config_model(given.name, field="monitoring_config.name")
        paths = list(request.update_mask.paths)
        violations = []
        if not paths:
            violations.append(FieldViolation("update_mask", "required: name the fields to change"))
        for index, path in enumerate(paths):
            if path.split(".")[0] not in configs.UPDATABLE:
                violations.append(
                    FieldViolation(
                        f"update_mask.paths[{index}]",
                        f"{path!r} cannot be updated; updatable: {UPDATABLE_PATHS}",
                    )
                )
        raise_if_any(violations, "invalid update mask")
        current = await self._profiles.config(model)
        updated = pb.MonitoringConfig()
        updated.CopyFrom(current)
        request.update_mask.MergeMessage(
            given, updated, replace_message_field=True, replace_repeated_field=True
        )
        violations = configs.check_config(updated, prefix="monitoring_config")
        raise_if_any(violations, "invalid monitoring config")
        updated.name = configs.config_name(model)
        updated.update_time.GetCurrentTime()
        await self._workers.run(self._store.put_config, updated)
        if {"outliers", "privacy"} & {path.split(".")[0] for path in paths}:
            await self._workers.run(self._store.clear_scorers, model)
        self._profiles.forget_model(model)
        return rpc.UpdateMonitoringConfigResponse(monitoring_config=configs.filled(updated))

    # -- helpers ----------------------------------------------------------------------

    def _reference_version(self, name: str) -> str:
        if not name.endswith("/reference"):
            raise invalid_field("reference.name", "models/{model}/versions/{version}/reference")
        return exact_version(name.removesuffix("/reference"), field="reference.name")

    async def _config_model(self, name: str, *, field: str) -> str:
        if not name.endswith("/monitoringConfig"):
            raise invalid_field(field, "models/{model}/monitoringConfig")
        model = names.model_name(
            names.parse_model_name(name.removesuffix("/monitoringConfig"), field=field)
        )
        await self._registry.model(model)
        return model


def _signature_width(version: Any) -> int | None:
    """The number of input features the version's signature declares, when it says."""
    inputs = version.signature.inputs
    if len(inputs) != 1:
        return None
    tensor = inputs[0]
    if tensor.feature_names:
        return len(tensor.feature_names)
    if len(tensor.shape) == 2 and tensor.shape[1] > 0:
        return int(tensor.shape[1])
    return None
