"""Explanations through the real services equal the libraries' own, called
directly with the same seed and the model run here; batched ``ModelInfer``
calls, counted by the inference service itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shap
from lime.lime_image import LimeImageExplainer
from lime.lime_tabular import LimeTabularExplainer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conveyor.explainer.v1 import explainer_messages_pb2 as rpc
from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.services.explainer.methods import segmenter, shap_background
from tests.explainer.conftest import ServedModel, Suite, synthetic_model

TOLERANCE = 1e-6
PNG = b"\x89PNG\r\n\x1a\n"


def reference(model: ServedModel) -> np.ndarray:
    sample = model.version.reference_statistics.sample
    return np.asarray(sample.values).reshape(-1, sample.column_count)


def tabular(values: np.ndarray) -> pb.Instance:
    return pb.Instance(row=pb.TabularRow(values=values.tolist()))


def weights_of(explanation: pb.Explanation) -> dict[int, float]:
    return {c.index: c.weight for c in explanation.contributions}


async def test_lime_tabular_equals_the_library_called_directly(
    suite: Suite, mlp_model: ServedModel
) -> None:
    version = await suite.serve("cancer", mlp_model)
    rows = reference(mlp_model)
    row = rows[17]
    before = await suite.infer_requests("cancer", "1")
    reply = await suite.explainer.Explain(
        rpc.ExplainRequest(
            model="models/cancer",
            instance=tabular(row),
            config=pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=7, top_k=8),
            include_pictures=True,
        ),
        timeout=60,
    )
    explanation = reply.explanation
    outputs = mlp_model.predict(row[np.newaxis])[0]
    target = int(np.argmax(outputs))
    direct = LimeTabularExplainer(
        rows,
        mode="regression",
        feature_names=list(mlp_model.version.signature.inputs[0].feature_names),
        discretize_continuous=True,
        random_state=7,
    ).explain_instance(
        row, lambda x: mlp_model.predict(x)[:, target], num_features=8, num_samples=5000
    )
    expected = dict(direct.local_exp[1])
    assert explanation.model_version == version
    assert explanation.target_index == target
    assert explanation.target_label == ["malignant", "benign"][target]
    assert explanation.prediction == pytest.approx(outputs[target], abs=1e-6)
    assert list(explanation.output_values) == pytest.approx(outputs.tolist(), abs=1e-6)
    assert len(explanation.contributions) == 8
    assert weights_of(explanation) == pytest.approx(expected, abs=TOLERANCE)
    weights = [abs(c.weight) for c in explanation.contributions]
    assert weights == sorted(weights, reverse=True)
    assert explanation.base_value == pytest.approx(direct.intercept[1], abs=TOLERANCE)
    assert explanation.local_fidelity_r2 == pytest.approx(direct.score, abs=TOLERANCE)
    assert explanation.local_prediction == pytest.approx(direct.local_pred[0], abs=TOLERANCE)
    named = dict(direct.as_list())
    for contribution in explanation.contributions:
        assert named[contribution.condition] == pytest.approx(contribution.weight, abs=TOLERANCE)
        assert contribution.value == row[contribution.index]
    assert (explanation.seed, explanation.num_model_evaluations) == (7, 5000)
    [picture] = explanation.pictures
    assert picture.kind == pb.PICTURE_KIND_BAR_CHART
    assert picture.data.startswith(PNG)
    # The instance in one call, then the 5,000 samples in two (4,096 rows at most).
    assert reply.num_inference_calls == 1 + math.ceil(5000 / 4096)
    assert await suite.infer_requests("cancer", "1") - before == reply.num_inference_calls


async def test_kernel_shap_equals_the_library_and_adds_up_to_the_prediction(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    rows = reference(mlp_model)
    row = rows[3]
    reply = await suite.explainer.Explain(
        rpc.ExplainRequest(
            model="models/cancer/versions/1",
            instance=tabular(row),
            config=pb.ExplanationConfig(
                method=pb.EXPLANATION_METHOD_KERNEL_SHAP,
                seed=11,
                num_samples=500,
                background_size=20,
                top_k=5,
            ),
        ),
        timeout=60,
    )
    explanation = reply.explanation
    target = explanation.target_index
    np.random.seed(11)
    direct = shap.KernelExplainer(
        lambda x: mlp_model.predict(x)[:, target], shap_background(rows, None, 20)
    )
    values = np.asarray(
        direct.shap_values(row[np.newaxis], nsamples=500, l1_reg=False, silent=True)
    )
    phi = values.reshape(-1)
    top = sorted(range(len(phi)), key=lambda i: (-abs(phi[i]), i))[:5]
    assert [c.index for c in explanation.contributions] == top
    assert weights_of(explanation) == pytest.approx({i: phi[i] for i in top}, abs=TOLERANCE)
    assert explanation.base_value == pytest.approx(float(direct.expected_value), abs=TOLERANCE)
    total = (
        explanation.base_value + sum(weights_of(explanation).values()) + explanation.omitted_weight
    )
    assert total == pytest.approx(explanation.prediction, abs=1e-5)
    assert not explanation.HasField("local_fidelity_r2")
    # 500 samples against 20 background rows: 10,000 rows in three calls of
    # at most 4,096, after one call for the instance and the background.
    assert explanation.num_model_evaluations == 500 * 20
    assert reply.num_inference_calls == 1 + 3


async def test_a_batch_shares_calls_and_explains_each_instance_as_alone(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    rows = reference(mlp_model)[:3]
    config = pb.ExplanationConfig(
        method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=3, num_samples=1000
    )
    batch = await suite.explainer.ExplainBatch(
        rpc.ExplainBatchRequest(
            model="models/cancer", instances=[tabular(r) for r in rows], config=config
        ),
        timeout=60,
    )
    # The three instances in one call, their 3,000 samples together in one.
    assert batch.num_inference_calls == 2
    assert batch.num_model_evaluations == 3 + 3 * 1000
    for row, explanation in zip(rows, batch.explanations, strict=True):
        alone = await suite.explainer.Explain(
            rpc.ExplainRequest(model="models/cancer", instance=tabular(row), config=config),
            timeout=60,
        )
        assert alone.explanation == explanation


async def test_the_same_seed_gives_the_same_explanation(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    row = reference(mlp_model)[5]
    for method in (pb.EXPLANATION_METHOD_LIME_TABULAR, pb.EXPLANATION_METHOD_KERNEL_SHAP):
        request = rpc.ExplainRequest(
            model="models/cancer",
            instance=tabular(row),
            config=pb.ExplanationConfig(method=method, seed=5, num_samples=300),
        )
        first = await suite.explainer.Explain(request, timeout=60)
        second = await suite.explainer.Explain(request, timeout=60)
        assert first.explanation == second.explanation
        other = await suite.explainer.Explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=tabular(row),
                config=pb.ExplanationConfig(method=method, seed=6, num_samples=300),
            ),
            timeout=60,
        )
        assert other.explanation.contributions != first.explanation.contributions
    unseeded = rpc.ExplainRequest(
        model="models/cancer",
        instance=tabular(row),
        config=pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_TABULAR, num_samples=100),
    )
    drawn = [(await suite.explainer.Explain(unseeded, timeout=60)).explanation for _ in range(2)]
    assert drawn[0].seed != drawn[1].seed  # drawn by the server (2**-32 to collide)
    again = rpc.ExplainRequest()
    again.CopyFrom(unseeded)
    again.config.seed = drawn[1].seed
    assert (await suite.explainer.Explain(again, timeout=60)).explanation == drawn[1]


async def test_lime_image_equals_the_library_on_the_digits_cnn(
    suite: Suite, cnn_model: ServedModel
) -> None:
    await suite.serve("digits", cnn_model)
    image = reference(cnn_model)[17].reshape(8, 8)
    reply = await suite.explainer.Explain(
        rpc.ExplainRequest(
            model="models/digits",
            instance=pb.Instance(image=pb.Image(shape=[8, 8], pixels=image.reshape(-1).tolist())),
            config=pb.ExplanationConfig(
                method=pb.EXPLANATION_METHOD_LIME_IMAGE,
                seed=4,
                num_samples=600,
                top_k=5,
                image_options=pb.ImageOptions(
                    segmentation=pb.SEGMENTATION_ALGORITHM_GRID, num_segments=16
                ),
            ),
            include_pictures=True,
        ),
        timeout=60,
    )
    explanation = reply.explanation
    outputs = cnn_model.predict(image.reshape(1, 1, 8, 8))[0]
    target = int(np.argmax(outputs))
    direct = LimeImageExplainer(random_state=4).explain_instance(
        image,
        lambda images: cnn_model.predict(np.asarray(images)[..., 0]),
        labels=(target,),
        top_labels=None,
        num_features=5,
        num_samples=600,
        batch_size=600,
        segmentation_fn=segmenter(pb.SEGMENTATION_ALGORITHM_GRID, 16, 4),
        random_seed=4,
    )
    assert explanation.target_index == target
    assert explanation.target_label == str(target)
    assert explanation.num_features == 16
    assert list(explanation.segmentation.shape) == [8, 8]
    assert list(explanation.segmentation.segment_ids) == direct.segments.reshape(-1).tolist()
    assert weights_of(explanation) == pytest.approx(dict(direct.local_exp[target]), abs=TOLERANCE)
    assert explanation.local_fidelity_r2 == pytest.approx(direct.score, abs=TOLERANCE)
    for contribution in explanation.contributions:
        assert contribution.feature == f"superpixel {contribution.index}"
        mask = direct.segments == contribution.index
        assert contribution.value == pytest.approx(image[mask].mean())
    [picture] = explanation.pictures
    assert picture.kind == pb.PICTURE_KIND_MASK_OVERLAY
    assert picture.data.startswith(PNG)
    assert reply.num_inference_calls == 2


@pytest.mark.parametrize(
    "method", [pb.EXPLANATION_METHOD_LIME_TABULAR, pb.EXPLANATION_METHOD_KERNEL_SHAP]
)
async def test_only_the_features_that_matter_rank_first(
    suite: Suite, method: pb.ExplanationMethod.ValueType
) -> None:
    await suite.serve("synthetic", synthetic_model())
    row = np.array([1.5, 0.2, -0.3, -1.2, 0.4, 0.1])
    reply = await suite.explainer.Explain(
        rpc.ExplainRequest(
            model="models/synthetic",
            instance=tabular(row),
            config=pb.ExplanationConfig(method=method, seed=1, target_index=1, top_k=6),
        ),
        timeout=60,
    )
    ranked = [c.index for c in reply.explanation.contributions]
    assert set(ranked[:2]) == {0, 3}
    assert reply.explanation.target_label == "yes"


async def test_one_trace_holds_the_explanation_and_its_model_calls(
    suite: Suite, mlp_model: ServedModel, spans: InMemorySpanExporter
) -> None:
    await suite.serve("cancer", mlp_model)
    spans.clear()
    await suite.explainer.ExplainBatch(
        rpc.ExplainBatchRequest(
            model="models/cancer",
            instances=[tabular(r) for r in reference(mlp_model)[:2]],
            config=pb.ExplanationConfig(
                method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=1, num_samples=100
            ),
        ),
        timeout=60,
    )
    finished = spans.get_finished_spans()
    [call] = [
        s for s in finished if s.name == "/conveyor.explainer.v1.ExplainerService/ExplainBatch"
    ]
    [explain] = [s for s in finished if s.name == "explainer.explain"]
    assert explain.parent is not None
    assert explain.parent.span_id == call.context.span_id
    attributes = dict(explain.attributes or {})
    assert attributes["conveyor.model_version"] == "models/cancer/versions/1"
    assert attributes["conveyor.explainer.inference_calls"] == 2
    assert attributes["conveyor.explainer.model_evaluations"] == 202
    infers = [
        s
        for s in finished
        if s.name == "/inference.GRPCInferenceService/ModelInfer" and s.kind == SpanKind.CLIENT
    ]
    assert len(infers) == 2
    for span in infers:
        assert span.context.trace_id == call.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == explain.context.span_id
