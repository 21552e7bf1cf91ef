"""Global feature importance: explanations of a sample of the version's
reference rows (or the caller's rows), aggregated per feature as the mean
absolute contribution, its mean signed value and its spread.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from google.protobuf.duration_pb2 import Duration

from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.services.explainer import pictures
from conveyor.services.explainer.explaining import Explainer
from conveyor.services.explainer.model_spec import ExplainedModel
from conveyor.services.explainer.reports import now
from conveyor.services.explainer.requests import ExplanationPlan

FloatArray = npt.NDArray[np.float64]

DEFAULT_SAMPLE_SIZE: Final = 100
MAX_SAMPLE_SIZE: Final = 1_000
INSTANCES_PER_STEP: Final = 16
"""Rows explained together (sharing ``ModelInfer`` calls) between progress messages."""
PICTURE_FEATURES: Final = 20


def sample_rows(reference: FloatArray, size: int, seed: int) -> list[FloatArray]:
    """``size`` reference rows drawn without replacement with ``seed`` (all
    of them when there are fewer), in reference order."""
    if len(reference) <= size:
        return list(reference)
    chosen = np.sort(np.random.default_rng(seed).choice(len(reference), size, replace=False))
    return list(reference[chosen])


async def global_importance(
    explainer: Explainer,
    model: ExplainedModel,
    rows: list[FloatArray],
    plan: ExplanationPlan,
    *,
    background: Any,
    deadline: float | None,
) -> AsyncIterator[pb.GlobalImportanceProgress | pb.GlobalImportance]:
    """Progress after every step, then the result (not yet stored)."""
    started = time.monotonic()
    every_feature = replace(plan, top_k=model.num_features)
    weights = np.zeros((len(rows), model.num_features))
    evaluations = calls = 0
    for start in range(0, len(rows), INSTANCES_PER_STEP):
        step = rows[start : start + INSTANCES_PER_STEP]
        explained = await explainer.explain(
            model,
            step,
            every_feature,
            background=background,
            include_pictures=False,
            deadline=deadline,
        )
        for offset, explanation in enumerate(explained.explanations):
            for contribution in explanation.contributions:
                weights[start + offset, contribution.index] = contribution.weight
        evaluations += explained.num_model_evaluations
        calls += explained.num_inference_calls
        yield pb.GlobalImportanceProgress(
            instances_done=start + len(step),
            instances_total=len(rows),
            num_model_evaluations=evaluations,
        )
    mean_abs = np.abs(weights).mean(axis=0)
    order = sorted(range(model.num_features), key=lambda i: (-mean_abs[i], i))
    features = [
        pb.FeatureImportance(
            feature=model.feature_name(i),
            index=i,
            mean_abs_weight=float(mean_abs[i]),
            mean_weight=float(weights[:, i].mean()),
            std_weight=float(weights[:, i].std()),
        )
        for i in order
    ]
    shown = features[:PICTURE_FEATURES]
    method = pb.ExplanationMethod.Name(plan.method).removeprefix("EXPLANATION_METHOD_")
    picture = pictures.bar_chart_png(
        [f.feature for f in shown],
        [f.mean_abs_weight for f in shown],
        title=f"{model.version_name}: mean |contribution| over {len(rows)} rows "
        f"({method.replace('_', ' ').lower()})",
    )
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=time.monotonic() - started))
    yield pb.GlobalImportance(
        config=every_feature.to_config(),
        features=features,
        num_instances=len(rows),
        num_model_evaluations=evaluations,
        num_inference_calls=calls,
        picture=pb.Picture(kind=pb.PICTURE_KIND_BAR_CHART, content_type="image/png", data=picture),
        create_time=now(),
        compute_duration=duration,
    )
