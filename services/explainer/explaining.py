"""One call's explanations: check the deadline, evaluate the instances, run
the method for every instance in its own thread with shared evaluations,
and assemble the ``Explanation`` messages (pictures included when asked).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.services.explainer import methods, pictures
from conveyor.services.explainer.inference_client import EvaluationCount, InferenceClient
from conveyor.services.explainer.methods import MethodResult
from conveyor.services.explainer.model_spec import ExplainedModel
from conveyor.services.explainer.requests import ExplanationPlan
from conveyor.services.explainer.sharing import SharedEvaluations
from conveyor.shared.deadlines import remaining
from conveyor.shared.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    PreconditionViolation,
    invalid_field,
)

FloatArray = npt.NDArray[np.float64]

COST_SMOOTHING: Final = 0.3
"""Weight of the newest measurement in a version's cost per evaluation."""


@dataclass(frozen=True)
class Explained:
    """The explanations of one call and what they cost."""

    explanations: list[pb.Explanation]
    num_model_evaluations: int
    num_inference_calls: int


@dataclass(frozen=True)
class _Instance:
    data: FloatArray
    """A tabular row (``[M]``) or an image (``[H, W, C]``)."""
    model_input: FloatArray
    """The same in the model's instance shape."""
    outputs: FloatArray
    target: int


class Explainer:
    """Explains instances of model versions through the inference service."""

    def __init__(
        self,
        inference: InferenceClient,
        *,
        seconds_per_evaluation: float,
        seconds_per_call: float,
    ) -> None:
        self._inference = inference
        self._default_cost = seconds_per_evaluation
        self._seconds_per_call = seconds_per_call
        self._costs: dict[str, float] = {}

    def background(self, model: ExplainedModel, plan: ExplanationPlan) -> Any:
        """Kernel SHAP's background for ``model`` (None for the other methods);
        FAILED_PRECONDITION when a tabular method finds no reference sample."""
        if not plan.is_tabular:
            return None
        if model.reference_sample is None:
            raise FailedPreconditionError(
                f"{model.version_name} has no reference sample in its reference statistics "
                f"({model.num_features} columns): register the version with its training "
                "statistics (the trainer does) before explaining it",
                violations=[
                    PreconditionViolation(
                        "REFERENCE_STATISTICS", model.version_name, "no reference sample"
                    )
                ],
                reason="NO_REFERENCE_SAMPLE",
            )
        if plan.method != pb.EXPLANATION_METHOD_KERNEL_SHAP:
            return None
        return methods.shap_background(
            model.reference_sample, model.reference_weights, plan.background_size
        )

    def check_deadline(
        self, model: ExplainedModel, plan: ExplanationPlan, instances: int, background: Any
    ) -> None:
        """DEADLINE_EXCEEDED before any work when what is left of the deadline
        cannot cover the evaluations asked for at this version's measured cost."""
        left = remaining()
        if left is None:
            return
        evaluations = instances * plan.evaluations_per_instance(
            model.num_features, _background_rows(background)
        )
        cost = self._costs.get(model.version_name, self._default_cost)
        needed = self._seconds_per_call + evaluations * cost
        if needed > left:
            raise DeadlineExceededError(
                f"the deadline leaves {left:.3f} s, and {evaluations:,} model evaluations of "
                f"{model.version_name} take about {needed:.3f} s ({cost * 1e6:.1f} µs each); "
                "allow more time or ask for fewer samples",
                reason="DEADLINE_TOO_SHORT",
            )

    async def explain(
        self,
        model: ExplainedModel,
        data: list[FloatArray],
        plan: ExplanationPlan,
        *,
        background: Any,
        include_pictures: bool,
        deadline: float | None,
    ) -> Explained:
        """Explain every instance (rows or ``[H, W, C]`` images, checked)."""
        if plan.target_index is not None and model.output_width is not None:
            _check_target(plan.target_index, model.output_width)
        started = time.monotonic()
        count = EvaluationCount()
        max_batch = await self._inference.max_batch_size(model, deadline=deadline)
        rows_per_call = self._inference.rows_per_call(model, max_batch)

        async def evaluate(rows: FloatArray) -> FloatArray:
            return await self._inference.evaluate(
                model, rows, rows_per_call=rows_per_call, deadline=deadline, count=count
            )

        model_inputs = [to_model_input(model, d) for d in data]
        background_rows = background.data if background is not None else None
        priming = np.stack(model_inputs)
        if background_rows is not None:
            priming = np.concatenate([priming, background_rows.reshape(-1, *model.instance_shape)])
        outputs = await evaluate(priming)
        instances = [
            _Instance(d, x, outputs[i], _target(plan, outputs[i]))
            for i, (d, x) in enumerate(zip(data, model_inputs, strict=True))
        ]
        background_outputs = outputs[len(instances) :]
        loop = asyncio.get_running_loop()
        shared = SharedEvaluations(
            lambda rows: asyncio.run_coroutine_threadsafe(evaluate(rows), loop).result(),
            participants=len(instances),
        )
        executor = ThreadPoolExecutor(len(instances), thread_name_prefix="explain")
        try:
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        executor,
                        contextvars.copy_context().run,
                        self._explain_one,
                        model,
                        plan,
                        instance,
                        shared,
                        background,
                        background_outputs,
                        include_pictures,
                    )
                    for instance in instances
                )
            )
        except BaseException as error:
            shared.stop(error)
            raise
        finally:
            executor.shutdown(wait=False)
        self._measured(model, count.rows, time.monotonic() - started)
        return Explained(list(results), count.rows, count.calls)

    def _explain_one(
        self,
        model: ExplainedModel,
        plan: ExplanationPlan,
        instance: _Instance,
        shared: SharedEvaluations,
        background: Any,
        background_outputs: FloatArray,
        include_pictures: bool,
    ) -> pb.Explanation:
        evaluated = [0]

        def model_rows(rows: FloatArray) -> FloatArray:
            evaluated[0] += len(rows)
            batch = rows.reshape(len(rows), *model.instance_shape)
            return shared.evaluate(batch)

        def target_column(rows: FloatArray) -> FloatArray:
            return model_rows(np.asarray(rows, dtype=np.float64))[:, instance.target]

        try:
            result = _run_method(
                model, plan, instance, target_column, model_rows, background, background_outputs
            )
        finally:
            shared.leave()
        return explanation_message(
            model, plan, instance, result, evaluated[0], include_pictures=include_pictures
        )

    def _measured(self, model: ExplainedModel, evaluations: int, seconds: float) -> None:
        if evaluations <= 0:
            return
        cost = seconds / evaluations
        previous = self._costs.get(model.version_name)
        self._costs[model.version_name] = (
            cost if previous is None else (1 - COST_SMOOTHING) * previous + COST_SMOOTHING * cost
        )


def _run_method(
    model: ExplainedModel,
    plan: ExplanationPlan,
    instance: _Instance,
    target_column: Callable[[FloatArray], FloatArray],
    model_rows: Callable[[FloatArray], FloatArray],
    background: Any,
    background_outputs: FloatArray,
) -> MethodResult:
    samples = plan.num_samples(model.num_features)
    if plan.method == pb.EXPLANATION_METHOD_LIME_TABULAR:
        assert model.reference_sample is not None  # checked by Explainer.background
        return methods.lime_tabular(
            instance.data,
            target_column,
            model.reference_sample,
            [model.feature_name(i) for i in range(model.num_features)],
            seed=plan.seed,
            num_samples=samples,
            top_k=plan.top_k,
        )
    if plan.method == pb.EXPLANATION_METHOD_KERNEL_SHAP:
        target = instance.target
        return methods.kernel_shap(
            instance.data,
            target_column,
            background,
            seed=plan.seed,
            num_samples=samples,
            known=(float(instance.outputs[target]), background_outputs[:, target]),
        )

    def classify(images: FloatArray) -> FloatArray:
        inputs = np.stack([to_model_input(model, image) for image in images])
        return model_rows(inputs.reshape(len(inputs), -1))

    return methods.lime_image(
        instance.data,
        classify,
        target=instance.target,
        seed=plan.seed,
        num_samples=samples,
        top_k=plan.top_k,
        segmentation=plan.segmentation,
        num_segments=plan.num_segments,
        hide_value=plan.hide_value,
    )


def to_model_input(model: ExplainedModel, data: FloatArray) -> FloatArray:
    """A row or ``[H, W, C]`` image in the model's instance shape."""
    layout = model.image_layout()
    if data.ndim == 3 and layout is not None and layout.channels_first:
        data = data.transpose(2, 0, 1)
    return np.ascontiguousarray(data, dtype=np.float64).reshape(model.instance_shape)


def explanation_message(
    model: ExplainedModel,
    plan: ExplanationPlan,
    instance: _Instance,
    result: MethodResult,
    evaluations: int,
    *,
    include_pictures: bool,
) -> pb.Explanation:
    """The ``Explanation`` of one instance: the top-k contributions, named."""
    shown = result.weights[: plan.top_k]
    omitted = math.fsum(w for _, w in result.weights[plan.top_k :])
    image = result.segments is not None
    explanation = pb.Explanation(
        model_version=model.version_name,
        method=plan.method,
        omitted_weight=omitted,
        base_value=result.base_value,
        target_index=instance.target,
        target_label=model.class_name(instance.target),
        prediction=float(instance.outputs[instance.target]),
        output_values=instance.outputs.tolist(),
        seed=plan.seed,
        num_model_evaluations=evaluations,
    )
    if result.local_prediction is not None:
        explanation.local_prediction = result.local_prediction
    if result.local_fidelity_r2 is not None:
        explanation.local_fidelity_r2 = result.local_fidelity_r2
    if result.segments is not None:
        segments = result.segments
        explanation.num_features = len(np.unique(segments))
        explanation.segmentation.shape.extend(segments.shape)
        explanation.segmentation.segment_ids.extend(segments.reshape(-1).tolist())
        means = instance.data.mean(axis=2)
        for index, weight in shown:
            explanation.contributions.add(
                feature=f"superpixel {index}",
                index=index,
                value=float(means[segments == index].mean()),
                weight=weight,
            )
    else:
        explanation.num_features = model.num_features
        for index, weight in shown:
            explanation.contributions.add(
                feature=model.feature_name(index),
                index=index,
                value=float(instance.data[index]),
                weight=weight,
                condition=result.conditions.get(index, ""),
            )
    if include_pictures:
        title = _picture_title(model, plan, explanation)
        if image:
            assert result.segments is not None
            data = pictures.mask_overlay_png(instance.data, result.segments, shown, title=title)
            kind = pb.PICTURE_KIND_MASK_OVERLAY
        else:
            labels = [c.condition or c.feature for c in explanation.contributions]
            data = pictures.bar_chart_png(
                labels, [c.weight for c in explanation.contributions], title=title
            )
            kind = pb.PICTURE_KIND_BAR_CHART
        explanation.pictures.add(kind=kind, content_type="image/png", data=data)
    return explanation


def _picture_title(
    model: ExplainedModel, plan: ExplanationPlan, explanation: pb.Explanation
) -> str:
    method = pb.ExplanationMethod.Name(plan.method).removeprefix("EXPLANATION_METHOD_")
    target = explanation.target_label or f"output {explanation.target_index}"
    return (
        f"{model.version_name}: {target} = {explanation.prediction:.4g} "
        f"({method.replace('_', ' ').lower()}, seed {plan.seed})"
    )


def _target(plan: ExplanationPlan, outputs: FloatArray) -> int:
    if plan.target_index is not None:
        _check_target(plan.target_index, len(outputs))
        return plan.target_index
    return int(np.argmax(outputs)) if len(outputs) > 1 else 0


def _check_target(target_index: int, width: int) -> None:
    if target_index >= width:
        raise invalid_field(
            "config.target_index",
            f"{target_index} is out of range: the output has {width} elements",
        )


def _background_rows(background: Any) -> int:
    return 1 if background is None else int(background.data.shape[0])
