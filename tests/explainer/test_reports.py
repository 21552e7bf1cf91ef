"""Explanation reports and global importance, stored in the registry as
attachments of the version and read back."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from conveyor.explainer.v1 import explainer_messages_pb2 as rpc
from conveyor.explainer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.explainer.reports import IMPORTANCE_CONTENT_TYPE, REPORT_CONTENT_TYPE
from tests.explainer.conftest import ServedModel, Suite, synthetic_model
from tests.explainer.test_explain import PNG, reference, tabular


async def attachments(suite: Suite, version: str) -> list[registry_pb.Attachment]:
    reply = await suite.registry.ListAttachments(
        registry_rpc.ListAttachmentsRequest(parent=version)
    )
    return list(reply.attachments)


async def content(suite: Suite, name: str) -> bytes:
    reply = await suite.registry.GetAttachment(registry_rpc.GetAttachmentRequest(name=name))
    return bytes(reply.attachment.content)


async def test_a_batch_report_is_attached_to_the_version(
    suite: Suite, mlp_model: ServedModel
) -> None:
    version = await suite.serve("cancer", mlp_model)
    rows = reference(mlp_model)[:2]
    reply = await suite.explainer.ExplainBatch(
        rpc.ExplainBatchRequest(
            model="models/cancer@production",
            instances=[tabular(r) for r in rows],
            config=pb.ExplanationConfig(
                method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=2, num_samples=200
            ),
            attach_report=True,
        ),
        timeout=60,
    )
    assert not any(e.pictures for e in reply.explanations)  # not asked for here
    [stored] = await attachments(suite, version)
    assert stored.name == reply.report_attachment
    assert stored.kind == registry_pb.ATTACHMENT_KIND_EXPLANATION_REPORT
    assert stored.content_type == REPORT_CONTENT_TYPE
    assert stored.created_by == "user:anonymous"  # authentication is off here
    report = json_format.Parse(await content(suite, stored.name), pb.ExplanationReport())
    assert report.model_version == version
    for explanation, answered in zip(report.explanations, reply.explanations, strict=True):
        [picture] = explanation.pictures  # the report always has its pictures
        del explanation.pictures[:]
        assert explanation == answered
    assert report.config.seed == 2
    assert report.config.num_samples == 200
    assert report.num_inference_calls == reply.num_inference_calls
    assert report.num_model_evaluations == 2 + 2 * 200
    assert picture.data.startswith(PNG)


async def test_global_importance_streams_progress_then_is_stored_and_read_back(
    suite: Suite,
) -> None:
    version = await suite.serve("synthetic", synthetic_model())
    request = rpc.ComputeGlobalImportanceRequest(
        model="models/synthetic",
        config=pb.ExplanationConfig(
            method=pb.EXPLANATION_METHOD_KERNEL_SHAP,
            seed=9,
            num_samples=100,
            background_size=10,
            target_index=1,
        ),
        sample_size=20,
    )
    updates = [u async for u in suite.explainer.ComputeGlobalImportance(request, timeout=120)]
    progress = [u.progress for u in updates[:-1]]
    assert [p.instances_done for p in progress] == [16, 20]
    assert {p.instances_total for p in progress} == {20}
    result = updates[-1].global_importance
    assert result.name == f"{version}/globalImportance"
    assert result.num_instances == 20
    assert result.num_model_evaluations == progress[-1].num_model_evaluations
    assert [f.index for f in result.features][:2] in ([0, 3], [3, 0])
    assert len(result.features) == 6
    importances = [f.mean_abs_weight for f in result.features]
    assert importances == sorted(importances, reverse=True)
    assert result.features[0].mean_abs_weight > 10 * result.features[2].mean_abs_weight
    assert result.picture.data.startswith(PNG)
    assert result.config.top_k == 6
    assert result.compute_duration.ToTimedelta().total_seconds() > 0

    [stored] = await attachments(suite, version)
    assert stored.name == result.attachment
    assert stored.kind == registry_pb.ATTACHMENT_KIND_FEATURE_IMPORTANCE
    assert stored.content_type == IMPORTANCE_CONTENT_TYPE
    assert json.loads(await content(suite, stored.name))["name"] == result.name

    for name in (result.name, "models/synthetic@production/globalImportance"):
        got = await suite.explainer.GetGlobalImportance(rpc.GetGlobalImportanceRequest(name=name))
        assert got.global_importance == result

    # The same seed samples the same rows and gives the same importance.
    again = [u async for u in suite.explainer.ComputeGlobalImportance(request, timeout=120)]
    repeated = again[-1].global_importance
    assert list(repeated.features) == list(result.features)
    newest = await suite.explainer.GetGlobalImportance(
        rpc.GetGlobalImportanceRequest(name=result.name)
    )
    assert newest.global_importance.attachment == repeated.attachment != result.attachment


async def test_global_importance_of_given_rows_and_its_bad_input(
    suite: Suite, mlp_model: ServedModel
) -> None:
    await suite.serve("cancer", mlp_model)
    rows = reference(mlp_model)[:3]
    config = pb.ExplanationConfig(
        method=pb.EXPLANATION_METHOD_LIME_TABULAR, seed=1, num_samples=100
    )
    updates = [
        u
        async for u in suite.explainer.ComputeGlobalImportance(
            rpc.ComputeGlobalImportanceRequest(
                model="models/cancer",
                config=config,
                instances=[pb.TabularRow(values=r.tolist()) for r in rows],
            ),
            timeout=60,
        )
    ]
    result = updates[-1].global_importance
    assert result.num_instances == 3
    assert result.num_model_evaluations == 3 + 3 * 100
    assert len(result.features) == 30

    bad = [
        rpc.ComputeGlobalImportanceRequest(model="models/cancer", config=config, sample_size=1001),
        rpc.ComputeGlobalImportanceRequest(
            model="models/cancer",
            config=pb.ExplanationConfig(method=pb.EXPLANATION_METHOD_LIME_IMAGE),
        ),
        rpc.ComputeGlobalImportanceRequest(
            model="models/cancer",
            config=config,
            instances=[pb.TabularRow(values=np.zeros(4).tolist())],
        ),
    ]
    for request in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in suite.explainer.ComputeGlobalImportance(request, timeout=60):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing was stored by the refused calls.
    assert len(await attachments(suite, "models/cancer/versions/1")) == 1


async def test_global_importance_without_reference_data_needs_rows(suite: Suite) -> None:
    synthetic = synthetic_model()
    bare = type(synthetic.version)(
        format=synthetic.version.format, signature=synthetic.version.signature
    )
    await suite.serve("bare", type(synthetic)(bare, synthetic.onnx))
    config = pb.ExplanationConfig(
        method=pb.EXPLANATION_METHOD_KERNEL_SHAP, seed=4, num_samples=50, target_index=1
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in suite.explainer.ComputeGlobalImportance(
            rpc.ComputeGlobalImportanceRequest(model="models/bare", config=config), timeout=60
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rows = np.random.default_rng(1).normal(size=(12, 6))
    updates = [
        u
        async for u in suite.explainer.ComputeGlobalImportance(
            rpc.ComputeGlobalImportanceRequest(
                model="models/bare",
                config=config,
                instances=[pb.TabularRow(values=r.tolist()) for r in rows],
            ),
            timeout=60,
        )
    ]
    result = updates[-1].global_importance
    assert result.num_instances == 12
    assert {f.index for f in result.features[:2]} == {0, 3}
