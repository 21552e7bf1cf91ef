"""Bad input gets the right status with the field named, before any model
evaluation, and leaves the explainer serving."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.explainer.v1 import explainer_messages_pb2 as rpc
from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError, from_rpc_error
from tests.explainer.conftest import ServedModel, Suite, running
from tests.explainer.test_explain import reference, tabular

LIME = pb.EXPLANATION_METHOD_LIME_TABULAR


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def fields(error: grpc.aio.AioRpcError) -> list[str]:
    failure = from_rpc_error(error)
    assert isinstance(failure, InvalidArgumentError), failure
    return [v.field for v in failure.violations]


async def test_bad_requests_name_the_field_and_evaluate_nothing(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    row = reference(mlp_model)[0]
    explain = suite.explainer.Explain

    short = await refused(
        explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=tabular(row[:29]),
                config=pb.ExplanationConfig(method=LIME),
            )
        )
    )
    assert short.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(short) == ["instance.row.values"]
    assert "29 values; models/cancer/versions/1 takes 30 features" in (short.details() or "")

    for samples in (5, 100_001):
        out_of_range = await refused(
            explain(
                rpc.ExplainRequest(
                    model="models/cancer",
                    instance=tabular(row),
                    config=pb.ExplanationConfig(method=LIME, num_samples=samples),
                )
            )
        )
        assert out_of_range.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(out_of_range) == ["config.num_samples"]

    malformed = await refused(
        explain(
            rpc.ExplainRequest(
                model="cancer", instance=tabular(row), config=pb.ExplanationConfig(method=LIME)
            )
        )
    )
    assert fields(malformed) == ["model"]
    config = await refused(
        explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=tabular(row),
                config=pb.ExplanationConfig(top_k=-1, background_size=5000),
            )
        )
    )
    assert fields(config) == ["config.method", "config.top_k", "config.background_size"]
    missing = await refused(
        explain(rpc.ExplainRequest(model="models/cancer", config=pb.ExplanationConfig(method=LIME)))
    )
    assert fields(missing) == ["instance"]

    mismatched = await refused(
        explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=pb.Instance(image=pb.Image(shape=[5, 6], pixels=[0.0] * 30)),
                config=pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_KERNEL_SHAP),
            )
        )
    )
    assert fields(mismatched) == ["instance.image"]

    no_image_model = await refused(
        explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=pb.Instance(image=pb.Image(shape=[5, 6], pixels=[0.0] * 30)),
                config=pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_IMAGE),
            )
        )
    )
    assert fields(no_image_model) == ["instance.image.shape"]

    target = await refused(
        explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=tabular(row),
                config=pb.ExplanationConfig(method=LIME, target_index=2, num_samples=10),
            )
        )
    )
    assert fields(target) == ["config.target_index"]

    not_a_number = row.copy()
    not_a_number[4] = np.nan
    nan = await refused(
        explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=tabular(not_a_number),
                config=pb.ExplanationConfig(method=LIME),
            )
        )
    )
    assert fields(nan) == ["instance.row.values"]

    batch = await refused(
        suite.explainer.ExplainBatch(
            rpc.ExplainBatchRequest(
                model="models/cancer",
                instances=[tabular(row), tabular(row[:3])],
                config=pb.ExplanationConfig(method=LIME),
            )
        )
    )
    assert fields(batch) == ["instances[1].row.values"]
    too_many = await refused(
        suite.explainer.ExplainBatch(
            rpc.ExplainBatchRequest(
                model="models/cancer",
                instances=[tabular(row)] * 65,
                config=pb.ExplanationConfig(method=LIME),
            )
        )
    )
    assert fields(too_many) == ["instances"]

    # None of it reached the model, and the explainer still serves.
    assert await suite.infer_requests("cancer", "1") == 0
    health = health_pb2_grpc.HealthStub(suite.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    good = await explain(
        rpc.ExplainRequest(
            model="models/cancer",
            instance=tabular(row),
            config=pb.ExplanationConfig(method=LIME, num_samples=50),
        )
    )
    assert good.explanation.num_model_evaluations == 50


async def test_unknown_models_versions_and_aliases_are_not_found(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    row = reference(mlp_model)[0]
    for name in ("models/nope", "models/cancer/versions/9", "models/cancer@staging"):
        error = await refused(
            suite.explainer.Explain(
                rpc.ExplainRequest(
                    model=name, instance=tabular(row), config=pb.ExplanationConfig(method=LIME)
                )
            )
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND, name
    missing = await refused(
        suite.explainer.GetGlobalImportance(
            rpc.GetGlobalImportanceRequest(name="models/cancer/versions/1/globalImportance")
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert "call ComputeGlobalImportance" in (missing.details() or "")


async def test_a_deadline_too_short_is_refused_before_any_evaluation(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    row = reference(mlp_model)[0]
    error = await refused(
        suite.explainer.Explain(
            rpc.ExplainRequest(
                model="models/cancer",
                instance=tabular(row),
                config=pb.ExplanationConfig(method=LIME, num_samples=100_000),
            ),
            timeout=0.5,
        )
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "allow more time or ask for fewer samples" in (error.details() or "")
    assert await suite.infer_requests("cancer", "1") == 0


async def test_versions_that_cannot_be_explained_are_failed_preconditions(
    suite: Suite, mlp_model: ServedModel
) -> None:
    # Registered without its reference statistics: nothing to sample around.
    bare = ServedModel(
        type(mlp_model.version)(
            format=mlp_model.version.format, signature=mlp_model.version.signature
        ),
        mlp_model.onnx,
    )
    await suite.serve("bare", bare)
    row = reference(mlp_model)[0]
    error = await refused(
        suite.explainer.Explain(
            rpc.ExplainRequest(
                model="models/bare", instance=tabular(row), config=pb.ExplanationConfig(method=LIME)
            )
        )
    )
    failure = from_rpc_error(error)
    assert isinstance(failure, FailedPreconditionError)
    assert failure.reason == "NO_REFERENCE_SAMPLE"

    # A version inference will not serve (no deployment for the model).
    await suite.inference.register(
        "undeployed",
        data=mlp_model.onnx,
        signature=mlp_model.version.signature,
        reference_statistics=mlp_model.version.reference_statistics,
    )
    unserved = await refused(
        suite.explainer.Explain(
            rpc.ExplainRequest(
                model="models/undeployed",
                instance=tabular(row),
                config=pb.ExplanationConfig(method=LIME, num_samples=20),
            )
        )
    )
    assert unserved.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the inference service will not evaluate models/undeployed/versions/1" in (
        unserved.details() or ""
    )

    # An archived version takes no report (refused before any work).
    old = await suite.inference.register(
        "bare", data=mlp_model.onnx, signature=mlp_model.version.signature, alias="", create=False
    )
    await suite.registry.ArchiveModelVersion(registry_rpc.ArchiveModelVersionRequest(name=old))
    archived = await refused(
        suite.explainer.Explain(
            rpc.ExplainRequest(
                model=old,
                instance=tabular(row),
                config=pb.ExplanationConfig(method=LIME),
                attach_report=True,
            )
        )
    )
    assert from_rpc_error(archived).reason == "VERSION_ARCHIVED"


async def test_more_calls_than_allowed_at_once_are_refused(
    tmp_path: object, mlp_model: ServedModel
) -> None:
    async for suite in running(tmp_path, max_concurrent_explanations=1):  # type: ignore[arg-type]
        await suite.serve("cancer", mlp_model)
        request = rpc.ExplainRequest(
            model="models/cancer",
            instance=tabular(reference(mlp_model)[0]),
            config=pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_KERNEL_SHAP, seed=1),
        )
        results = await asyncio.gather(
            *(suite.explainer.Explain(request, timeout=60) for _ in range(3)),
            return_exceptions=True,
        )
        codes = sorted(
            r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results
        )
        assert codes[0] == "OK", codes
        assert "RESOURCE_EXHAUSTED" in codes, codes
