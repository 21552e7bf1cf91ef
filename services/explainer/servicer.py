"""``conveyor.explainer.v1.ExplainerService``.

Transport and order of checks: the request on its own (INVALID_ARGUMENT
before any lookup), then the version in the registry (NOT_FOUND), then the
request against the model (INVALID_ARGUMENT, FAILED_PRECONDITION), then
whether the deadline can cover the work (DEADLINE_EXCEEDED before any
``ModelInfer``), then the work. Nothing is stored unless it all succeeded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from conveyor.explainer.v1 import explainer_messages_pb2 as rpc
from conveyor.explainer.v1 import explainer_service_pb2_grpc
from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.services.explainer import importance
from conveyor.services.explainer.explaining import Explained, Explainer
from conveyor.services.explainer.model_spec import ExplainedModel, explained_model
from conveyor.services.explainer.reports import IMPORTANCE_SUFFIX, ReportStore, explanation_report
from conveyor.services.explainer.requests import (
    ExplanationPlan,
    check_instances,
    images,
    resolve_config,
    tabular_rows,
)
from conveyor.shared.auth import caller_principal
from conveyor.shared.deadlines import remaining
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    PreconditionViolation,
    ResourceExhaustedError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.names import ModelVersionRef, parse_model_name, parse_model_version_ref
from conveyor.shared.registry_client import RegistryClient

FloatArray = npt.NDArray[np.float64]
tracer = trace.get_tracer(__name__)


def model_reference(name: str, *, field: str) -> str:
    """The version reference a request's ``model`` names: a bare
    ``models/{model}`` means its ``production`` alias."""
    if name.count("/") == 1 and "@" not in name:
        return str(ModelVersionRef(parse_model_name(name, field=field), alias="production"))
    return str(parse_model_version_ref(name, field=field))


class ExplainerServicer(explainer_service_pb2_grpc.ExplainerServiceServicer):
    """Explanations of model versions served by the inference service."""

    def __init__(
        self,
        registry: RegistryClient,
        explainer: Explainer,
        reports: ReportStore,
        *,
        max_concurrent: int,
    ) -> None:
        self._registry = registry
        self._explainer = explainer
        self._reports = reports
        self._max_concurrent = max_concurrent
        self._running = 0

    async def Explain(self, request: rpc.ExplainRequest, context: Any) -> rpc.ExplainResponse:
        reference = model_reference(request.model, field="model")
        plan = resolve_config(request.config)
        instances = [request.instance] if request.HasField("instance") else []
        check_instances(instances, plan, field="instance")
        with self._slot():
            model, explained = await self._explain(
                reference,
                instances,
                plan,
                "instance",
                request.include_pictures or request.attach_report,
                attach_report=request.attach_report,
            )
            attachment = ""
            if request.attach_report:
                attachment = await self._attach(model, plan, explained, context)
        if not request.include_pictures:
            _drop_pictures(explained)
        return rpc.ExplainResponse(
            explanation=explained.explanations[0],
            num_inference_calls=explained.num_inference_calls,
            report_attachment=attachment,
        )

    async def ExplainBatch(
        self, request: rpc.ExplainBatchRequest, context: Any
    ) -> rpc.ExplainBatchResponse:
        reference = model_reference(request.model, field="model")
        plan = resolve_config(request.config)
        check_instances(request.instances, plan, field="instances")
        kinds = {instance.WhichOneof("data") for instance in request.instances}
        if len(kinds) > 1:
            raise invalid_field("instances", "instances of mixed kinds (rows and images)")
        with self._slot():
            model, explained = await self._explain(
                reference,
                request.instances,
                plan,
                "instances",
                request.include_pictures or request.attach_report,
                attach_report=request.attach_report,
            )
            attachment = ""
            if request.attach_report:
                attachment = await self._attach(model, plan, explained, context)
        if not request.include_pictures:
            _drop_pictures(explained)
        return rpc.ExplainBatchResponse(
            explanations=explained.explanations,
            num_model_evaluations=explained.num_model_evaluations,
            num_inference_calls=explained.num_inference_calls,
            report_attachment=attachment,
        )

    async def ComputeGlobalImportance(
        self, request: rpc.ComputeGlobalImportanceRequest, context: Any
    ) -> AsyncIterator[rpc.ComputeGlobalImportanceResponse]:
        reference = model_reference(request.model, field="model")
        plan = resolve_config(request.config)
        violations: list[FieldViolation] = []
        if not plan.is_tabular:
            violations.append(
                FieldViolation("config.method", "global importance is for tabular methods")
            )
        size = request.sample_size or importance.DEFAULT_SAMPLE_SIZE
        if not 1 <= size <= importance.MAX_SAMPLE_SIZE:
            violations.append(
                FieldViolation(
                    "sample_size",
                    f"{request.sample_size} is outside 1 to {importance.MAX_SAMPLE_SIZE:,} "
                    "(0: 100)",
                )
            )
        if len(request.instances) > importance.MAX_SAMPLE_SIZE:
            violations.append(
                FieldViolation(
                    "instances", f"at most {importance.MAX_SAMPLE_SIZE:,} rows, not more"
                )
            )
        raise_if_any(violations, "invalid global importance request")
        with self._slot():
            model = await self._model(reference, plan)
            if model.archived:
                raise _archived(model)
            if model.image_layout() is not None:
                raise FailedPreconditionError(
                    f"{model.version_name} takes images; global importance is for tabular models",
                    reason="NOT_TABULAR",
                )
            if request.instances:
                rows = tabular_rows(request.instances, model, field="instances")
                if model.reference_sample is None:
                    # No reference data: the rows given are the only data there is.
                    model = replace(model, reference_sample=np.stack(rows))
            elif model.reference_sample is not None:
                rows = importance.sample_rows(model.reference_sample, size, plan.seed)
            else:
                raise FailedPreconditionError(
                    f"{model.version_name} has no reference sample; pass the rows to explain "
                    "in instances",
                    violations=[
                        PreconditionViolation(
                            "REFERENCE_STATISTICS", model.version_name, "no reference sample"
                        )
                    ],
                    reason="NO_REFERENCE_SAMPLE",
                )
            background = await asyncio.to_thread(self._explainer.background, model, plan)
            self._explainer.check_deadline(model, plan, len(rows), background)
            updates = importance.global_importance(
                self._explainer,
                model,
                rows,
                plan,
                background=background,
                deadline=_deadline(),
            )
            async for update in updates:
                if isinstance(update, pb.GlobalImportanceProgress):
                    yield rpc.ComputeGlobalImportanceResponse(progress=update)
                else:
                    stored = await self._reports.store_importance(model.version_name, update)
                    yield rpc.ComputeGlobalImportanceResponse(global_importance=stored)

    async def GetGlobalImportance(
        self, request: rpc.GetGlobalImportanceRequest, context: Any
    ) -> rpc.GetGlobalImportanceResponse:
        name = request.name
        if not name.endswith(IMPORTANCE_SUFFIX):
            raise invalid_field(
                "name",
                "expected models/{model}/versions/{version}/globalImportance or "
                f"models/{{model}}@{{alias}}/globalImportance, got {name!r}",
            )
        reference = parse_model_version_ref(name.removesuffix(IMPORTANCE_SUFFIX), field="name")
        version = await self._registry.version(str(reference))
        found = await self._reports.global_importance(version.name)
        return rpc.GetGlobalImportanceResponse(global_importance=found)

    async def _model(self, reference: str, plan: ExplanationPlan) -> ExplainedModel:
        version = await self._registry.version(reference)
        return explained_model(version, plan.output_name)

    async def _explain(
        self,
        reference: str,
        instances: Sequence[pb.Instance],
        plan: ExplanationPlan,
        field: str,
        include_pictures: bool,
        *,
        attach_report: bool,
    ) -> tuple[ExplainedModel, Explained]:
        model = await self._model(reference, plan)
        if attach_report and model.archived:
            raise _archived(model)
        data: list[FloatArray]
        if plan.is_tabular:
            data = tabular_rows([i.row for i in instances], model, field=field, item=".row")
        else:
            data = images([i.image for i in instances], model, field=field, item=".image")
        background = await asyncio.to_thread(self._explainer.background, model, plan)
        self._explainer.check_deadline(model, plan, len(data), background)
        with tracer.start_as_current_span("explainer.explain") as span:
            span.set_attribute("conveyor.model_version", model.version_name)
            span.set_attribute("conveyor.explainer.method", pb.ExplanationMethod.Name(plan.method))
            span.set_attribute("conveyor.explainer.instances", len(data))
            span.set_attribute("conveyor.explainer.seed", plan.seed)
            explained = await self._explainer.explain(
                model,
                data,
                plan,
                background=background,
                include_pictures=include_pictures,
                deadline=_deadline(),
            )
            span.set_attribute(
                "conveyor.explainer.model_evaluations", explained.num_model_evaluations
            )
            span.set_attribute("conveyor.explainer.inference_calls", explained.num_inference_calls)
        return model, explained

    async def _attach(
        self, model: ExplainedModel, plan: ExplanationPlan, explained: Explained, context: Any
    ) -> str:
        report = explanation_report(model, plan.to_config(), explained, caller_principal(context))
        return await self._reports.attach_report(report)

    @contextmanager
    def _slot(self) -> Iterator[None]:
        if self._running >= self._max_concurrent:
            raise ResourceExhaustedError(
                f"the explainer is already running {self._running} explanations "
                f"(max_concurrent_explanations); retry later",
                reason="EXPLAINER_BUSY",
            )
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1


def _drop_pictures(explained: Explained) -> None:
    """Pictures drawn only for the attached report stay out of the answer."""
    for explanation in explained.explanations:
        del explanation.pictures[:]


def _deadline() -> float | None:
    left = remaining()
    return None if left is None else time.monotonic() + left


def _archived(model: ExplainedModel) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"{model.version_name} is archived: nothing can be attached to it",
        violations=[PreconditionViolation("VERSION_STATE", model.version_name, "archived")],
        reason="VERSION_ARCHIVED",
    )
